"""``IESkip``: an implicit-Euler skip connection around any shape-preserving branch."""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from pyeuler.ops.ie_skip import ie_skip, validate_ie_args

__all__ = ["IESkip"]

_warned_batch_norm_eval = False


def warn_batch_norm_in_eval(branch: nn.Module) -> None:
    """Once per process: BatchNorm inside an IE-Skip evaluated with running statistics."""
    global _warned_batch_norm_eval
    if _warned_batch_norm_eval or not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in branch.modules()):
        return
    _warned_batch_norm_eval = True
    warnings.warn(
        "an IE-Skip with BatchNorm in its branch runs in eval mode: its running statistics "
        "averaged the branch's inputs at x0 and at the IE iterates, which are distributed "
        "differently, so eval accuracy can fall far below training accuracy (measured: "
        "75.7 ± 20.1 % vs 98.5 %, docs/robustness_report.md); norm='group' has no running "
        "statistics.  This warning is shown once.", UserWarning, stacklevel=2)


class IESkip(nn.Module):
    """``x0 + f(x0)`` refined by ``steps`` gradient steps toward ``x = x0 + θ·f(x) + (1−θ)·f(x0)``.

    For a :class:`~pyeuler.nn.PreActBranch` the refinement uses pyeuler's explicit VJP and
    fused kernels; any other shape-preserving module goes through generic autograd.
    ``grad``: ``"unrolled"`` (exact), ``"detached"`` (the IE authors' cheaper gradient,
    that of x0 + f(x0)), ``"implicit"`` (solve the implicit equation with a budget of
    ``steps`` evaluations, optionally stopping at relative residual ``tol``, and
    differentiate by the implicit function theorem).
    """

    def __init__(self, branch: nn.Module, steps: int = 1, step_size: float = 0.1,
                 theta: float = 1.0, grad: str = "unrolled", bn_update: str = "all",
                 backend: str | None = None, *, tol: float | None = None):
        super().__init__()
        validate_ie_args(steps, step_size, theta, grad, bn_update, tol)
        self.branch = branch
        self.steps, self.step_size, self.theta = steps, float(step_size), float(theta)
        self.grad, self.bn_update, self.backend, self.tol = grad, bn_update, backend, tol

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and self.steps:
            warn_batch_norm_in_eval(self.branch)
        backend = self.backend or getattr(self.branch, "backend", None)
        return ie_skip(self.branch, x, self.steps, self.step_size, self.theta, self.grad,
                       self.bn_update, backend, tol=self.tol)

    def extra_repr(self) -> str:
        tol = f", tol={self.tol}" if self.tol is not None else ""
        return (f"steps={self.steps}, step_size={self.step_size}, theta={self.theta}, "
                f"grad={self.grad!r}, bn_update={self.bn_update!r}{tol}")
