"""``IESkip``: an implicit-Euler skip connection around any shape-preserving branch."""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from pyeuler.backend import check_backend_name
from pyeuler.nn.deprecation import keyword_only_since
from pyeuler.ops.ie_skip import check_recompute, ie_skip, validate_ie_args

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
        "74.6 ± 13.2 % vs 98.6 ± 0.9 % over 5 seeds, docs/robustness_report.md); "
        "norm='group' has no running statistics.  This warning is shown once.", UserWarning,
        stacklevel=2)


class IESkip(nn.Module):
    """``x0 + f(x0)`` refined by ``steps`` gradient steps toward ``x = x0 + θ·f(x) + (1−θ)·f(x0)``
    (Li, He & Lin, ICML 2020; docs/semantics.md §2).

    For a :class:`~pyeuler.nn.PreActBranch` the refinement uses pyeuler's explicit VJP and
    fused kernels; any other shape-preserving module goes through generic autograd.
    Calling the module maps ``x`` of shape ``(N, C, *spatial)`` (or ``(N, D)`` for a
    ``dim=0`` branch), any floating dtype (the ``triton`` and ``cuda`` backends: float32,
    float16, bfloat16), contiguous or channels-last, to a tensor of the same shape, dtype and
    device; it warns once per process (``UserWarning``) when it first
    runs in eval mode with BatchNorm in the branch (docs/semantics.md §2).

    Args:
        branch: the residual function f, a module (or callable) mapping x to a tensor of
            x's shape; BatchNorm inside it is evaluated once per IE iterate.
        steps: K >= 0, the number of gradient steps (``grad="implicit"``: the solver's
            budget of branch evaluations, forward and backward each).  0 is the plain
            residual step ``x0 + f(x0)``.
        step_size: γ > 0, finite: each step is ``x − 2γ·(e − θ·J_fᵀe)``.  Unused with
            ``grad="implicit"``.
        theta: θ in [0, 1] of the θ-method (1: implicit Euler, 0: explicit).
        grad: ``"unrolled"`` (the exact derivative of the K-step map), ``"detached"``
            (the IE authors' cheaper gradient, that of ``x0 + f(x0)``: white-box attacks
            through it are weaker than they look) or ``"implicit"`` (solve the implicit
            equation and differentiate by the implicit function theorem; first-order
            reverse mode only).
        bn_update: ``"all"`` (every branch evaluation in training mode updates BatchNorm's
            running statistics) or ``"first"`` (only the evaluation at x0).
        tol: with ``grad="implicit"`` only, stop early when the relative residual
            ``‖x − c − θ·f(x)‖ / ‖c + θ·f(x)‖`` falls to ``tol`` (> 0; read on the host each
            iteration); None runs the whole budget.
        recompute: ``grad="unrolled"`` on the fused backends, what the backward recomputes
            instead of keeping: ``"selective"`` (default) the convolutions' inputs,
            ``"full"`` also the VJP's norm gradient (least memory), ``"none"`` nothing
            (fewest bytes moved); :func:`pyeuler.ops.ie_skip.ie_skip` gives the measured
            trade.
        backend: the pyeuler backend (``"reference"``, ``"eager"``, ``"triton"``,
            ``"cuda"``, ``"auto"``); None: the branch's ``backend`` attribute, else the
            process default (:func:`pyeuler.set_backend`).

    Returns:
        The module.  ``IESkip(f)(x)`` returns the IE-Skip's output: x's shape, dtype and
        device.

    Raises:
        ValueError: bad ``steps``, ``step_size``, ``theta``, ``grad``, ``bn_update``,
            ``tol`` or ``recompute`` (at construction; ``tol`` only with
            ``grad="implicit"``; a ``recompute`` string that is not a policy); at a call, x
            of the wrong rank for the branch, a branch that does not preserve x's shape, or
            a PreActBranch with dropout in training mode under ``grad="implicit"``.
        TypeError: ``recompute`` not a string (at construction); at a call, x not a
            floating-point tensor (or float64 on a kernel backend), or a branch that does
            not return one tensor.
        RuntimeError: at a call, an unavailable ``backend`` (the message lists those that
            are available).
        NotImplementedError: at a call, what ``grad="implicit"`` cannot differentiate:
            forward mode and ``torch.func`` transforms.  (``create_graph=True`` through
            it raises RuntimeError in the backward pass.)
    """

    @keyword_only_since("steps", "step_size", "theta", "grad", "bn_update", "backend")
    def __init__(self, branch: nn.Module, *, steps: int = 1, step_size: float = 0.1,
                 theta: float = 1.0, grad: str = "unrolled", bn_update: str = "all",
                 tol: float | None = None, recompute: str = "selective",
                 backend: str | None = None):
        super().__init__()
        validate_ie_args(steps, step_size, theta, grad, bn_update, tol)
        check_recompute(recompute)
        if backend is not None:  # its availability is checked where it runs (a call)
            check_backend_name(backend)
        self.recompute = recompute
        self.branch = branch
        self.steps, self.step_size, self.theta = steps, float(step_size), float(theta)
        self.grad, self.bn_update, self.backend, self.tol = grad, bn_update, backend, tol

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and self.steps:
            warn_batch_norm_in_eval(self.branch)
        backend = self.backend or getattr(self.branch, "backend", None)
        return ie_skip(self.branch, x, self.steps, self.step_size, self.theta, self.grad,
                       self.bn_update, backend, tol=self.tol, recompute=self.recompute)

    def extra_repr(self) -> str:
        tol = f", tol={self.tol}" if self.tol is not None else ""
        recompute = "" if self.recompute == "selective" else f", recompute={self.recompute!r}"
        return (f"steps={self.steps}, step_size={self.step_size}, theta={self.theta}, "
                f"grad={self.grad!r}, bn_update={self.bn_update!r}{tol}{recompute}")
