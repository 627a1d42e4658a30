"""Normalisation + affine + scaled residual add + ReLU: ``act(shortcut + h·Norm(x))``.

This file is the one home of the op's math (SPEC §1, §3, §4):

- the forward factors into ``norm_stats`` and one ``affine_act_forward`` pass with
  coefficients ``scale = h·w·invstd``, ``shift = h·(b − mean·w·invstd)``;
- the backward (the explicit BNᵀ of SPEC §3) factors into one reduction pass and one
  ``affine_act_backward_apply`` pass ``dx = a·g + b·(x − mean) + c``, with all of the
  BatchNorm / GroupNorm algebra on per-channel vectors here.

The passes come from a kernel module implementing :mod:`pyeuler.ops.primitives`:
``primitives`` itself for ``backend="eager"`` (torch ops, so autograd differentiates
everything, float64 included), ``pyeuler.triton`` or ``pyeuler.cuda`` for the fused
backends.  The fused backends run as ``torch.library`` custom ops whose backward is itself
a custom op, differentiable once more through the eager formula, so second-order
gradients (needed by "unrolled" IE-Skips) stay exact under ``torch.compile``.

Batch mean and variance are outputs of the forward *and differentiable*: the IE-Skip's
VJP reuses them, and its "unrolled" gradient must flow through them.  Running statistics
are updated from them with plain tensor ops (no host synchronisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pyeuler.backend import resolve_backend
from pyeuler.ops import primitives

__all__ = ["NormStats", "norm_act", "norm_act_backward", "norm_act_module", "norm_relu_backward_ie_update",
           "update_running_stats"]


def _kernels(backend: str):
    if backend == "eager":
        return primitives
    if backend == "triton":
        from pyeuler import triton as kernels
    elif backend == "cuda":
        from pyeuler import cuda as kernels
    else:
        raise ValueError(f"backend must be 'eager', 'triton' or 'cuda' here, got {backend!r}")
    return kernels


@dataclass
class NormStats:
    """What the backward of one norm_act evaluation needs (kept by IE-Skips for the VJP)."""

    x: Tensor
    mean: Tensor  # [C] (batch norm) or [N, groups] (group norm), float32 / float64
    var: Tensor
    mask: Tensor | None  # ReLU mask, kept only when a shortcut makes it unrecoverable from x
    batch_stats: bool


# ----------------------------------------------------------------------------------------
# Per-channel algebra shared by every backend.


def _per_channel(v: Tensor | None, channels: int, like: Tensor) -> Tensor:
    """A [C] float tensor from None (→ ones), a scalar or a [C] tensor."""
    if v is None:
        return torch.ones(channels, dtype=like.dtype, device=like.device)
    return v.to(like.dtype).expand(channels) if v.dim() == 0 else v.to(like.dtype)


def _expand_groups(v: Tensor, channels: int) -> Tensor:
    """[N, groups] group statistic → [N, C] per-channel coefficient."""
    return v.repeat_interleave(channels // v.shape[1], dim=1)


def _step(h: Tensor | None, h_value: float, channels: int, like: Tensor) -> Tensor:
    return _per_channel(h, channels, like) if h is not None else like.new_full((channels,), h_value)


def _forward_coefficients(mean, var, weight, bias, h, h_value, eps, groups, channels):
    """scale, shift ([C] or [N, C]) and invstd of ``h·(w·(x − mean)·invstd + b)``."""
    invstd = torch.rsqrt(var + eps)
    w = _per_channel(weight, channels, invstd)
    b = _per_channel(bias, channels, invstd) if bias is not None else torch.zeros_like(w)
    step = _step(h, h_value, channels, invstd)
    if groups == 0:
        scale = step * w * invstd
        shift = step * b - scale * mean
        return scale, shift, invstd
    invstd_c = _expand_groups(invstd, channels)
    scale = step * w * invstd_c
    shift = step * b - scale * _expand_groups(mean, channels)
    return scale, shift, invstd


def _center(mean: Tensor, groups: int, channels: int) -> Tensor:
    return mean if groups == 0 else _expand_groups(mean, channels)


def _count(x: Tensor, groups: int) -> int:
    """Elements behind one statistic."""
    spatial = math.prod(x.shape[2:])
    return x.shape[0] * spatial if groups == 0 else (x.shape[1] // groups) * spatial


def _sum_to(v: Tensor, h: Tensor) -> Tensor:
    """Reduce a per-channel gradient to the shape of the learnable step ``h``."""
    return v.sum().reshape(h.shape) if h.dim() == 0 else v


def _forward_math(kernels, x, weight, bias, shortcut, h, h_value, mean_in, var_in, eps, groups,
                  relu, save_mask):
    channels = x.shape[1]
    if mean_in is None:
        mean, var = kernels.norm_stats(x, groups)
    else:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        mean, var = mean_in.to(acc), var_in.to(acc)
    scale, shift, _ = _forward_coefficients(mean, var, weight, bias, h, h_value, eps, groups, channels)
    y, mask = kernels.affine_act_forward(x, scale, shift, shortcut, relu, save_mask)
    return y, mean, var, mask


def _backward_terms(kernels, dy, dmean, dvar, x, weight, bias, h, h_value, mean, var, mask, eps,
                    groups, relu, batch_stats, needs):
    """The reduction pass and the per-channel algebra of the backward (SPEC §3's BNᵀ).

    Returns ``(apply_args, dweight, dbias, dh)``: ``apply_args`` = (scale, shift, a, b, c,
    center) for the elementwise pass ``dx = a·g + b·(x − center) + c``.  ``needs`` =
    (x, shortcut, weight, bias, h) flags.  ``dmean``/``dvar`` are gradients flowing into
    the batch statistics themselves (IE-Skip VJPs use them), or None.
    """
    n, channels = x.shape[0], x.shape[1]
    scale, shift, invstd = _forward_coefficients(mean, var, weight, bias, h, h_value, eps, groups,
                                                 channels)
    center = _center(mean, groups, channels)
    w = _per_channel(weight, channels, invstd)
    step = _step(h, h_value, channels, invstd)
    need_x, need_shortcut, need_weight, need_bias, need_h = needs
    need_sums = need_weight or need_bias or need_h or (need_x and batch_stats)
    dweight = dbias = dh = None
    a = (step * w) * (invstd if groups == 0 else _expand_groups(invstd, channels))
    b = c = torch.zeros_like(a)
    if need_sums:
        per_sample = groups > 0
        sum_g, sum_gxc = kernels.affine_act_backward_reduce(dy, x, scale, shift, center, mask, relu,
                                                            per_sample)
        invstd_c = invstd if groups == 0 else _expand_groups(invstd, channels)
        # Σ dŷ·x̂ per (sample,) channel, where ŷ = w·x̂ + b is the normalised output.
        sum_gxhat = sum_gxc * invstd_c
        if per_sample:
            dweight_c, dbias_c = (step * sum_gxhat).sum(0), (step * sum_g).sum(0)
        else:
            dweight_c, dbias_c = step * sum_gxhat, step * sum_g
        dweight = dweight_c if need_weight else None
        dbias = dbias_c if need_bias else None
        if need_h:
            bvec = _per_channel(bias, channels, invstd) if bias is not None else torch.zeros_like(w)
            dh_c = w * sum_gxhat + bvec * sum_g
            dh_c = dh_c.sum(0) if per_sample else dh_c
            dh = _sum_to(dh_c, h)
        if need_x and batch_stats:
            count = _count(x, groups)
            # mean over the statistic's set of dx̂ = h·w·g and of dx̂·x̂.
            mean_dxhat = step * w * sum_g
            mean_dxhat_xhat = step * w * sum_gxhat
            if per_sample:
                groups_shape = (n, groups, channels // groups)
                mean_dxhat = _expand_groups(mean_dxhat.reshape(groups_shape).sum(2) / count, channels)
                mean_dxhat_xhat = _expand_groups(mean_dxhat_xhat.reshape(groups_shape).sum(2) / count,
                                                 channels)
            else:
                mean_dxhat, mean_dxhat_xhat = mean_dxhat / count, mean_dxhat_xhat / count
            c = -invstd_c * mean_dxhat
            b = -invstd_c * invstd_c * mean_dxhat_xhat
    if need_x and batch_stats and (dmean is not None or dvar is not None):
        count = _count(x, groups)
        if dmean is not None:
            c = c + _center(dmean, groups, channels) / count
        if dvar is not None:
            b = b + _center(dvar, groups, channels) * (2.0 / count)
    return (scale, shift, a, b, c, center), dweight, dbias, dh


def _backward_math(kernels, dy, dmean, dvar, x, weight, bias, h, h_value, mean, var, mask, eps,
                   groups, relu, batch_stats, needs):
    """Gradients (dx, dshortcut, dweight, dbias, dh) of the forward (see _backward_terms)."""
    (scale, shift, a, b, c, center), dweight, dbias, dh = _backward_terms(
        kernels, dy, dmean, dvar, x, weight, bias, h, h_value, mean, var, mask, eps, groups, relu,
        batch_stats, needs)
    need_x, need_shortcut = needs[0], needs[1]
    dx = dshortcut = None
    if need_x or need_shortcut:
        dx, dshortcut = kernels.affine_act_backward_apply(dy, x, scale, shift, mask, relu, a, b, c,
                                                          center, need_shortcut)
        if not need_x:
            dx = None
    return dx, dshortcut, dweight, dbias, dh


# ----------------------------------------------------------------------------------------
# Fused backends as custom ops.  The backward is a custom op too; its own backward is the
# vector–Jacobian product of the same math written with torch ops (`primitives`).

_BWD_INPUTS = ("dy", "dmean", "dvar", "x", "weight", "bias", "h", "mean", "var")


@torch.library.custom_op("pyeuler::norm_act_fwd", mutates_args=())
def _norm_act_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    shortcut: Tensor | None,
    h: Tensor | None,
    h_value: float,
    mean_in: Tensor | None,
    var_in: Tensor | None,
    eps: float,
    groups: int,
    relu: bool,
    save_mask: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, mean, var, mask = _forward_math(_kernels(backend), x, weight, bias, shortcut, h, h_value,
                                       mean_in, var_in, eps, groups, relu, save_mask)
    if mean_in is not None:  # outputs must not alias inputs
        mean, var = mean.clone(), var.clone()
    if mask is None:
        mask = x.new_empty(0, dtype=torch.bool)
    return y, mean, var, mask


@_norm_act_fwd.register_fake
def _(x, weight, bias, shortcut, h, h_value, mean_in, var_in, eps, groups, relu, save_mask, backend):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    stat_shape = (x.shape[1],) if groups == 0 else (x.shape[0], groups)
    mask = torch.empty_like(x, dtype=torch.bool) if save_mask else x.new_empty(0, dtype=torch.bool)
    return (torch.empty_like(x), x.new_empty(stat_shape, dtype=acc), x.new_empty(stat_shape, dtype=acc),
            mask)


def _fwd_setup_context(ctx, inputs, output):
    (x, weight, bias, shortcut, h, h_value, mean_in, var_in, eps, groups, relu, save_mask,
     backend) = inputs
    _, mean, var, mask = output
    ctx.save_for_backward(x, weight, bias, h, mean, var, mask if save_mask else None)
    ctx.config = (h_value, eps, groups, relu, mean_in is None, backend)
    ctx.has_shortcut = shortcut is not None


def _fwd_backward(ctx, dy, dmean, dvar, dmask):
    x, weight, bias, h, mean, var, mask = ctx.saved_tensors
    h_value, eps, groups, relu, batch_stats, backend = ctx.config
    needs = (ctx.needs_input_grad[0], ctx.has_shortcut and ctx.needs_input_grad[3],
             ctx.needs_input_grad[1], ctx.needs_input_grad[2], ctx.needs_input_grad[4])
    dx, dshortcut, dweight, dbias, dh = norm_act_backward(
        dy, x, weight, bias, h, h_value, mean, var, mask, eps, groups, relu, batch_stats, needs,
        backend, dmean=dmean, dvar=dvar)
    # running statistics (mean_in, var_in) are buffers: no gradient.
    return (dx, dweight, dbias, dshortcut, dh, None, None, None, None, None, None, None, None)


torch.library.register_autograd("pyeuler::norm_act_fwd", _fwd_backward,
                                setup_context=_fwd_setup_context)


@torch.library.custom_op("pyeuler::norm_act_bwd", mutates_args=())
def _norm_act_bwd(
    dy: Tensor,
    dmean: Tensor | None,
    dvar: Tensor | None,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    h: Tensor | None,
    mean: Tensor,
    var: Tensor,
    mask: Tensor | None,
    h_value: float,
    eps: float,
    groups: int,
    relu: bool,
    batch_stats: bool,
    needs: list[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _backward_math(_kernels(backend), dy, dmean, dvar, x, weight, bias, h, h_value, mean, var,
                           mask, eps, groups, relu, batch_stats, tuple(needs))
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_norm_act_bwd.register_fake
def _(dy, dmean, dvar, x, weight, bias, h, mean, var, mask, h_value, eps, groups, relu, batch_stats,
      needs, backend):
    empty = x.new_empty(0)
    param = mean.new_empty(x.shape[1])
    return (
        torch.empty_like(x) if needs[0] else empty,
        torch.empty_like(dy) if needs[1] else empty.clone(),
        param.clone() if needs[2] else empty.clone(),
        param.clone() if needs[3] else empty.clone(),
        mean.new_empty(h.shape) if needs[4] and h is not None else empty.clone(),
    )


def _bwd_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:10])
    ctx.config = inputs[10:]


def _bwd_backward(ctx, *grad_outputs):
    """Second order: VJP of the eager formula (torch ops), so BN's second-order terms stay."""
    saved = ctx.saved_tensors
    dy, dmean, dvar, x, weight, bias, h, mean, var, mask = saved
    h_value, eps, groups, relu, batch_stats, needs, _ = ctx.config
    named = dict(zip(_BWD_INPUTS, (dy, dmean, dvar, x, weight, bias, h, mean, var)))
    wrt = [k for i, k in enumerate(_BWD_INPUTS)
           if named[k] is not None and ctx.needs_input_grad[i]]

    def formula(*tensors):
        values = dict(named, **dict(zip(wrt, tensors)))
        outs = _backward_math(primitives, values["dy"], values["dmean"], values["dvar"],
                              values["x"], values["weight"], values["bias"], values["h"], h_value,
                              values["mean"], values["var"], mask, eps, groups, relu, batch_stats,
                              tuple(needs))
        return tuple(o for o in outs if o is not None)

    outs, vjp = torch.func.vjp(formula, *[named[k] for k in wrt])
    given = [g for g, needed in zip(grad_outputs, needs) if needed]
    cotangents = tuple(g if g is not None and g.numel() else torch.zeros_like(o)
                       for g, o in zip(given, outs))
    grads = dict(zip(wrt, vjp(cotangents)))
    return (*(grads.get(k) for k in _BWD_INPUTS), None, None, None, None, None, None, None, None)


torch.library.register_autograd("pyeuler::norm_act_bwd", _bwd_backward,
                                setup_context=_bwd_setup_context)


# ----------------------------------------------------------------------------------------
# Public entry points.


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         count: int, momentum: float | Tensor) -> None:
    """``nn.BatchNorm`` semantics: ``r ← (1 − m)·r + m·batch``, unbiased variance stored."""
    if count < 2:
        raise ValueError("running statistics need more than one value per channel")
    with torch.no_grad():
        running_mean.lerp_(mean.detach().to(running_mean.dtype), momentum)
        unbiased = var.detach() * (count / (count - 1))
        running_var.lerp_(unbiased.to(running_var.dtype), momentum)


def _validate(x, weight, bias, running_mean, running_var, shortcut, h, groups, training):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.dim() > 5:
        raise ValueError(f"x must have shape (N, C, *spatial) with 0-3 spatial dims, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    channels = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is None:
            continue
        if t.shape != (channels,):
            raise ValueError(f"{name} must have shape ({channels},), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if shortcut is not None:
        if shortcut.shape != x.shape:
            raise ValueError(f"shortcut must have x's shape {tuple(x.shape)}, got {tuple(shortcut.shape)}")
        if shortcut.device != x.device:
            raise ValueError(f"shortcut is on {shortcut.device} but x is on {x.device}")
        if not shortcut.is_floating_point():
            raise TypeError(f"shortcut must be floating point, got {shortcut.dtype}")
    if isinstance(h, Tensor):
        if h.dim() > 1 or (h.dim() == 1 and h.shape[0] not in (1, channels)):
            raise ValueError(f"h must be a float, a scalar tensor or a ({channels},) tensor, "
                             f"got shape {tuple(h.shape)}")
        if h.device != x.device:
            raise ValueError(f"h is on {h.device} but x is on {x.device}")
    if groups < 0 or (groups > 0 and channels % groups):
        raise ValueError(f"groups must be 0 (batch norm) or divide C={channels}, got {groups}")
    if groups == 0 and training and x.numel() // channels <= 1:
        raise ValueError(f"x has one value per channel ({tuple(x.shape)}); batch statistics in "
                         "training mode need more than one (N·spatial > 1)")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if groups == 0 and not training and running_mean is None:
        raise ValueError("eval mode (training=False) needs running_mean and running_var")


def _reference(x, weight, bias, running_mean, running_var, training, momentum, eps, groups,
               shortcut, h, relu, update_running):
    """The literal torch.nn.functional composition every other backend is tested against."""
    if groups:
        y = torch.nn.functional.group_norm(x, groups, weight, bias, eps)
    else:
        if training and not update_running:
            running_mean = running_var = None
        if isinstance(momentum, Tensor):
            momentum = float(momentum)
        y = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training,
                                           momentum, eps)
    if isinstance(h, Tensor) and h.dim() == 1:
        h = h.view(1, -1, *([1] * (x.dim() - 2)))
    if not (isinstance(h, float) and h == 1.0):
        y = h * y
    if shortcut is not None:
        y = shortcut + y
    return torch.relu(y) if relu else y


def norm_act(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    *,
    training: bool = True,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    groups: int = 0,
    shortcut: Tensor | None = None,
    h: float | Tensor = 1.0,
    relu: bool = True,
    update_running: bool = True,
    backend: str | None = None,
    return_stats: bool = False,
):
    """``act(shortcut + h·Norm(x))`` with BatchNorm (``groups=0``) or GroupNorm(groups).

    BatchNorm follows ``F.batch_norm``: batch statistics when ``training`` (running
    statistics updated in place when given and ``update_running``), running statistics
    otherwise.  GroupNorm always uses per-sample statistics.  ``h`` is a float, a scalar
    tensor or a per-channel tensor (learnable if it requires grad).  With
    ``return_stats=True`` also returns the :class:`NormStats` a backward pass needs.
    """
    _validate(x, weight, bias, running_mean, running_var, shortcut, h, groups, training)
    name = resolve_backend(backend, x.device)
    if name == "reference":
        if return_stats:
            raise ValueError("return_stats=True needs an explicit backend, not 'reference'")
        return _reference(x, weight, bias, running_mean, running_var, training, momentum, eps,
                          groups, shortcut, h, relu, update_running)
    h_tensor = h.reshape(-1)[0] if isinstance(h, Tensor) and h.numel() == 1 and h.dim() == 1 else h
    h_tensor, h_value = (h_tensor, 1.0) if isinstance(h_tensor, Tensor) else (None, float(h))
    batch_stats = groups > 0 or training or running_mean is None
    mean_in = None if batch_stats else running_mean
    var_in = None if batch_stats else running_var
    save_mask = relu and shortcut is not None
    if name == "eager":
        y, mean, var, mask = _forward_math(primitives, x, weight, bias, shortcut, h_tensor, h_value,
                                           mean_in, var_in, eps, groups, relu, save_mask)
    else:
        y, mean, var, mask = _norm_act_fwd(x, weight, bias, shortcut, h_tensor, h_value, mean_in,
                                           var_in, eps, groups, relu, save_mask, name)
        mask = mask if save_mask else None
    if groups == 0 and batch_stats and running_mean is not None and update_running:
        update_running_stats(running_mean, running_var, mean, var, _count(x, 0), momentum)
    if return_stats:
        return y, NormStats(x, mean, var, mask, batch_stats)
    return y


def norm_act_backward(dy, x, weight, bias, h, h_value, mean, var, mask, eps, groups, relu,
                      batch_stats, needs, backend, *, dmean=None, dvar=None):
    """Explicit gradients ``(dx, dshortcut, dweight, dbias, dh)`` of :func:`norm_act`.

    Differentiable once more on every backend (so IE-Skip VJPs built from it have exact
    "unrolled" gradients).  ``needs`` flags (x, shortcut, weight, bias, h); unneeded
    entries are None.
    """
    if backend == "eager":
        return _backward_math(primitives, dy, dmean, dvar, x, weight, bias, h, h_value, mean, var,
                              mask, eps, groups, relu, batch_stats, tuple(needs))
    grads = _norm_act_bwd(dy, dmean, dvar, x, weight, bias, h, mean, var, mask, h_value, eps, groups,
                          relu, batch_stats, list(needs), backend)
    return tuple(g if need else None for g, need in zip(grads, needs))


def norm_relu_backward_ie_update(dy: Tensor, stats: NormStats, norm: torch.nn.Module, e: Tensor,
                                 step_size: float, theta: float, backend: str) -> Tensor:
    """``x − 2γ·(e − θ·v)`` with ``v`` the input gradient of ``ReLU(norm(x))`` at ``stats``
    for output gradient ``dy``, in one fused pass (no autograd: "detached" / no-grad IE-Skips)."""
    kernels = _kernels(backend)
    groups = norm.num_groups if isinstance(norm, torch.nn.GroupNorm) else 0
    (scale, shift, a, b, c, center), *_ = _backward_terms(
        kernels, dy, None, None, stats.x, norm.weight, norm.bias, None, 1.0, stats.mean, stats.var,
        stats.mask, norm.eps, groups, True, stats.batch_stats, (True, False, False, False, False))
    return kernels.affine_act_backward_apply_ie_update(dy, stats.x, scale, shift, stats.mask, True,
                                                       a, b, c, center, e, step_size, theta)


def norm_act_module(
    norm: torch.nn.Module,
    x: Tensor,
    *,
    shortcut: Tensor | None = None,
    h: float | Tensor = 1.0,
    relu: bool = True,
    update_running: bool = True,
    backend: str | None = None,
    return_stats: bool = False,
):
    """:func:`norm_act` with the parameters and buffers of an ``nn.BatchNorm*d`` or
    ``nn.GroupNorm``, updating ``num_batches_tracked`` and honouring ``momentum=None``
    (cumulative average) exactly as the module's own forward does."""
    if isinstance(norm, torch.nn.GroupNorm):
        return norm_act(x, norm.weight, norm.bias, eps=norm.eps, groups=norm.num_groups,
                        shortcut=shortcut, h=h, relu=relu, backend=backend,
                        return_stats=return_stats)
    if not isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"norm must be an nn.BatchNorm*d or nn.GroupNorm, got {type(norm).__name__}")
    momentum: float | Tensor = 0.0 if norm.momentum is None else norm.momentum
    tracking = norm.training and norm.track_running_stats and update_running
    if tracking and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            momentum = 1.0 / norm.num_batches_tracked
    use_running = not norm.training or norm.track_running_stats
    return norm_act(
        x, norm.weight, norm.bias,
        norm.running_mean if use_running else None,
        norm.running_var if use_running else None,
        training=norm.training or norm.running_mean is None, momentum=momentum, eps=norm.eps,
        shortcut=shortcut, h=h, relu=relu, update_running=tracking, backend=backend,
        return_stats=return_stats)
