"""BatchNorm and GroupNorm as plain tensor arithmetic: the norms of the ``"reference"`` oracle.

Why not ``F.batch_norm``: in training mode torch's native batch_norm has derivative formulas
that are exact only to second order (torch 2.13, reverse and forward mode).  Third order is
what a gradient penalty through an "unrolled" BatchNorm IE-Skip needs (the IE-Skip's forward
already differentiates the branch): there the native composition gave −31.877 for −31.950,
and a third derivative by nested ``torch.func.jvp`` −8.955 for −13.710
(tests/test_reference_oracle.py).  Written as means, differences, products and ``rsqrt``,
every derivative of the norms here is autograd's derivative of elementary ops, exact at
every order, in reverse and forward mode (``torch.func.jvp``, ``jacfwd``, ``grad``,
``vmap``), and traceable by ``torch.compile(fullgraph=True)``: no host synchronisation, no
branch on tensor values.  GroupNorm is decomposed too, so that no order of the oracle rests
on a native double-backward formula.

:func:`batch_norm` and :func:`group_norm` take ``F.batch_norm`` / ``F.group_norm``'s
arguments and follow their semantics (torch 2.13), apart from one deliberate deviation:

- **A batch variance that overflows to +inf is NaN**, so the output is NaN rather than a
  confident finite answer (torch's native norms give ``(x − mean)·rsqrt(inf) = 0`` there,
  i.e. the bias).  The rule is shared with pyeuler's kernels.

Shapes: ``x`` is (N, C, *spatial) with 0–3 spatial dims, any memory format (the output
keeps it); weight, bias, running_mean, running_var are (C,).  Dtypes: float16 / bfloat16
inputs are computed in float32 and returned in the input dtype, as the native norms do on
CPU, also under CPU autocast (on CUDA, autocast runs F.group_norm in float32 and returns
float32; here the result stays in the input dtype, like pyeuler's fused backends); float64
is computed in float64.  Empty batches (N = 0) return an empty output and leave the running
statistics untouched, as ``nn.BatchNorm*d`` and ``nn.GroupNorm`` do.

:func:`native_norms` switches both functions to torch's native norms: for speed baselines,
which time what users write, never for checking correctness.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["batch_norm", "group_norm", "native_norms"]

_native = False


@contextlib.contextmanager
def native_norms():
    """Inside the block, :func:`batch_norm` and :func:`group_norm` (and so the
    ``"reference"`` backend) call ``F.batch_norm`` / ``F.group_norm``.

    For benchmarks only: their baseline is plain PyTorch as users write it.  Native
    batch_norm's third derivative is wrong in training mode, so the oracle must not run here.
    A module-level switch rather than an argument: torch.compile traces through it (and
    guards on it), and the model code it reaches is unchanged.
    """
    global _native
    previous, _native = _native, True
    try:
        yield
    finally:
        _native = previous


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_channel(v: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """(C,) → (1, C, 1, …) broadcasting against a dim-``dim`` (N, C, *spatial) tensor."""
    return v.to(dtype).reshape(1, -1, *([1] * (dim - 2)))


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    if weight is not None:
        y = y * _per_channel(weight, y.dim(), y.dtype)
    if bias is not None:
        y = y + _per_channel(bias, y.dim(), y.dtype)
    return y


def _centered_stats(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, x − mean, Σ(x − mean)²)`` over ``dims``, kept as size-1 dims.

    Two passes (never E[x²] − E[x]²).  A sum of squares that overflows to +inf becomes NaN:
    the deliberate deviation from torch described in the module docstring.
    """
    mean = x.mean(dims, keepdim=True)
    centered = x - mean
    sum_sq = (centered * centered).sum(dims, keepdim=True)
    return mean, centered, torch.where(sum_sq == math.inf, math.nan, sum_sq)


def _update_running(running: Tensor, batch: Tensor, momentum: float | Tensor) -> None:
    """``running ← momentum·batch + (1 − momentum)·running``, as torch's kernel computes it.

    Written through ``out=`` rather than in place: torch.func transforms refuse an in-place
    op on a captured tensor when an argument is transformed, while the native kernel, which
    updates its buffers inside the op, runs under them; an ``out=`` op writes the plain
    (primal) value just as the kernel does.
    """
    batch = batch.detach().reshape(-1).to(running.dtype)
    torch.add(momentum * batch, (1 - momentum) * running, out=running)


def batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
               momentum: float | Tensor = 0.1, eps: float = 1e-5) -> Tensor:
    """``F.batch_norm`` (same arguments) by tensor arithmetic; exact at every derivative order.

    Training: normalise by the biased batch mean and variance over (N, *spatial) per channel;
    when running statistics are given (and the batch is not empty) fold the batch mean and
    the unbiased variance into them under no_grad with ``momentum`` (a float or a 0-dim
    tensor, no host synchronisation).  Eval: normalise by the running statistics.
    """
    if _native:
        if isinstance(momentum, Tensor):
            momentum = float(momentum)  # F.batch_norm takes a float (a host sync, as users pay)
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    dtype = _compute_dtype(x)
    xf = x.to(dtype)
    if training:
        count = x.shape[0] * math.prod(x.shape[2:])
        if count == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input "
                             f"size {tuple(x.shape)}")
        dims = (0, *range(2, x.dim()))
        mean, centered, sum_sq = _centered_stats(xf, dims)
        var = sum_sq / count
        if running_mean is not None and running_var is not None and x.numel() > 0:
            with torch.no_grad():
                _update_running(running_mean, mean, momentum)
                _update_running(running_var, sum_sq / (count - 1), momentum)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var must be given in eval mode "
                             "(training=False)")
        centered = xf - _per_channel(running_mean, x.dim(), dtype)
        var = _per_channel(running_var, x.dim(), dtype)
    return _affine(centered * torch.rsqrt(var + eps), weight, bias).to(x.dtype)


def group_norm(x: Tensor, num_groups: int, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """``F.group_norm`` (same arguments) by tensor arithmetic; exact at every derivative order.

    Normalises each (sample, group of C/num_groups channels) by its biased mean and variance
    over those channels and the spatial dims, then applies the per-channel affine.
    """
    if _native:
        return F.group_norm(x, num_groups, weight, bias, eps)
    channels = x.shape[1]
    if channels % num_groups:
        raise ValueError(f"Expected number of channels in input to be divisible by num_groups, "
                         f"but got input of shape {tuple(x.shape)} and num_groups={num_groups}")
    # (N, G, C/G, *spatial) is a view whatever x's memory format, and flattening the
    # result back keeps that format.
    xg = x.to(_compute_dtype(x)).unflatten(1, (num_groups, channels // num_groups))
    count = (channels // num_groups) * math.prod(x.shape[2:])
    _, centered, sum_sq = _centered_stats(xg, tuple(range(2, xg.dim())))
    y = (centered * torch.rsqrt(sum_sq / count + eps)).flatten(1, 2)
    return _affine(y, weight, bias).to(x.dtype)
