"""Normalisation + affine + scaled residual add + ReLU: ``act(shortcut + h·Norm(x))``.

This file is the one home of the op's math (SPEC §1, §3, §4):

- the forward factors into ``norm_stats``, the per-channel ``forward_coefficients``
  ``scale = h·w·invstd``, ``shift = h·(b − mean·w·invstd)`` (computed once, kept in
  :class:`NormStats` for every backward pass) and one ``affine_act_forward`` pass;
- the backward (the explicit BNᵀ of SPEC §3) factors into one reduction pass, the
  per-channel ``backward_coefficients`` and one ``affine_act_backward_apply`` pass
  ``dx = a·g + b·(x − mean) + c``.

The passes come from a kernel module implementing :mod:`pyeuler.ops.primitives`:
``primitives`` itself for ``backend="eager"`` (torch ops, so autograd differentiates
everything, float64 included), ``pyeuler.triton`` or ``pyeuler.cuda`` for the fused
backends, where the per-channel passes (:mod:`pyeuler.ops.norm_algebra`) are one launch
each.  The fused backends run as ``torch.library`` custom ops whose backward is itself a
custom op; its backward (the second order, needed by "unrolled" IE-Skips) is again two
fused passes, a reduce and an elementwise apply, with the per-channel algebra's
vector–Jacobian product between them: a kernel when no graph is built, the
differentiable torch ops of :mod:`pyeuler.ops.norm_algebra` under ``create_graph``, so
every order stays exact, under ``torch.compile`` too.

Batch mean and variance are outputs of the forward *and differentiable*: the IE-Skip's
VJP reuses them, and its "unrolled" gradient must flow through them.  Running statistics
(and ``num_batches_tracked``) are updated from them by one more per-channel pass,
``update_running_stats``: one launch, no host synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from pyeuler.backend import kernel_module as _kernels
from pyeuler.backend import resolve_backend
from pyeuler.ops import primitives, reference_norm
from pyeuler.ops.dispatch import kernel_backend
from pyeuler.ops import norm_algebra
from pyeuler.ops.norm_algebra import center_of, forward_coefficients, statistic_count

__all__ = ["NormStats", "norm_act", "norm_act_backward", "norm_act_module", "norm_relu_backward_conv",
           "norm_relu_backward_ie_update", "update_running_stats"]


class Affine(NamedTuple):
    """``h·Norm(x) = scale·x + shift``: per-channel ``[C]`` (BatchNorm) or per-sample
    ``[N, C]`` (GroupNorm) coefficients in the accumulation dtype."""

    scale: Tensor
    shift: Tensor


@dataclass
class NormStats:
    """What the backward of one norm_act evaluation needs (kept by IE-Skips for the VJP)."""

    x: Tensor
    mean: Tensor  # [C] (batch norm) or [N, groups] (group norm), float32 / float64
    var: Tensor
    mask: Tensor | None  # ReLU mask, kept only when a shortcut makes it unrecoverable from x
    batch_stats: bool
    # the forward's (scale, shift) of h·Norm(x), detached: backward passes recompute the ReLU
    # mask from them, a piecewise-constant use, instead of recomputing them per pass
    affine: Affine | None = None


# ----------------------------------------------------------------------------------------
# Per-channel algebra: pyeuler.ops.norm_algebra.


def _forward_math(kernels, x, weight, bias, shortcut, h, h_value, mean_in, var_in, eps, groups,
                  relu, save_mask):
    if mean_in is None:
        mean, var, scale, shift = kernels.norm_stats_and_coefficients(x, groups, weight, bias, h,
                                                                      h_value, eps)
    else:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        mean, var = mean_in.to(acc), var_in.to(acc)
        scale, shift = kernels.forward_coefficients(mean, var, weight, bias, h, h_value, eps,
                                                    groups, x.shape[1])
    y, mask = kernels.affine_act_forward(x, scale, shift, shortcut, relu, save_mask)
    return y, mean, var, mask, Affine(scale, shift)


def _sums_needed(needs, batch_stats: bool) -> bool:
    need_x, _, need_weight, need_bias, need_h = needs
    return need_weight or need_bias or need_h or (need_x and batch_stats)


def _backward_terms(kernels, dy, dmean, dvar, x, weight, bias, h, h_value, mean, var, mask, eps,
                    groups, relu, batch_stats, needs, affine=None):
    """The reduction pass and the per-channel algebra of the backward.

    Returns ``(apply_args, dweight, dbias, dh, sums)``: ``apply_args`` = (scale, shift, a,
    b, c, center) for the elementwise pass ``dx = a·g + b·(x − center) + c``; ``sums`` =
    (Σg, Σg·(x − center)) or None when nothing needs them.  ``needs`` = (x, shortcut,
    weight, bias, h) flags.  ``affine``: the forward's coefficients (they only gate the ReLU
    here), recomputed when not given.
    """
    channels = x.shape[1]
    scale, shift = affine or kernels.forward_coefficients(mean, var, weight, bias, h, h_value,
                                                           eps, groups, channels)
    center = center_of(mean, groups, channels)
    sums = None
    if _sums_needed(needs, batch_stats):
        sums = kernels.affine_act_backward_reduce(dy, x, scale, shift, center, mask, relu, groups > 0)
    a, b, c, dweight, dbias, dh = kernels.backward_coefficients(
        *(sums or (None, None)), dmean, dvar, weight, bias, h, var, h_value, eps, groups,
        batch_stats, needs, channels, statistic_count(x, groups))
    return (scale, shift, a, b, c, center), dweight, dbias, dh, sums


def _backward_math(kernels, dy, dmean, dvar, x, weight, bias, h, h_value, mean, var, mask, eps,
                   groups, relu, batch_stats, needs, affine=None):
    """Gradients (dx, dshortcut, dweight, dbias, dh) of the forward, and the reduce sums
    (see _backward_terms)."""
    (scale, shift, a, b, c, center), dweight, dbias, dh, sums = _backward_terms(
        kernels, dy, dmean, dvar, x, weight, bias, h, h_value, mean, var, mask, eps, groups, relu,
        batch_stats, needs, affine)
    need_x, need_shortcut = needs[0], needs[1]
    dx = dshortcut = None
    if need_x or need_shortcut:
        dx, dshortcut = kernels.affine_act_backward_apply(dy, x, scale, shift, mask, relu, a, b, c,
                                                          center, need_shortcut)
        if not need_x:
            dx = None
    return (dx, dshortcut, dweight, dbias, dh), sums


_BWD_INPUTS = ("dy", "dmean", "dvar", "x", "weight", "bias", "h", "mean", "var")
_COEFFICIENT_INPUTS = ("sum_g", "sum_gxc", "dmean", "dvar", "weight", "bias", "h", "mean", "var")


def _algebra(backend: str):
    """Where a backward formula runs the per-channel algebra: the backend's one-launch
    kernels when it only computes (a first-order backward), else the torch ops of
    :mod:`pyeuler.ops.norm_algebra`: differentiable under create_graph (higher orders), and
    traceable while torch.compile / make_fx trace the formula (the compiler fuses them)."""
    tracing = torch.compiler.is_compiling() or get_proxy_mode() is not None
    return norm_algebra if torch.is_grad_enabled() or tracing else _kernels(backend)


def _double_backward_math(inputs, sums, output_grads, sum_grads, config, wanted, backend):
    """Gradients of norm_act_bwd's inputs (``_BWD_INPUTS``) from the gradients of its
    outputs: ``output_grads`` = those of (dx, dshortcut, dweight, dbias, dh), ``sum_grads``
    = those of the reduce sums (Σg, Σg·(x − center)).  The second order of the op.

    Two passes over the activations, like the first-order backward: a reduce of the
    gradient of dx (its sums are the gradients of a, b, c), then one elementwise pass giving
    the gradients of dy and x; both are fused-kernel ops.  In between, one per-channel pass,
    :func:`~pyeuler.ops.norm_algebra.double_backward_coefficients`: the backward's a and b,
    the VJP of its per-channel algebra and the centre's (mean's) gradient; one launch on the
    fused backends.  Everything stays differentiable, so third and higher orders are exact too.
    ``inputs`` = the ``_BWD_INPUTS``, then mask, scale, shift (None: recomputed).
    ``wanted`` flags the gradients to compute, in ``_BWD_INPUTS`` order (None elsewhere).
    """
    named = dict(zip(_BWD_INPUTS, inputs[:9]))
    mask, scale, shift = inputs[9:12]
    dy, x, mean = named["dy"], named["x"], named["mean"]
    g_dx, g_dshortcut, g_dweight, g_dbias, g_dh = output_grads
    h_value, eps, groups, relu, batch_stats, needs = config
    channels, count, per_sample = x.shape[1], statistic_count(x, groups), groups > 0
    if scale is None:  # they only gate the ReLU here: the forward's, or recomputed
        scale, shift = forward_coefficients(mean, named["var"], named["weight"], named["bias"],
                                                named["h"], h_value, eps, groups, channels)
    center = center_of(mean, groups, channels)
    sum_g, sum_gxc = sums if sums else (None, None)
    g_dx = g_dx if needs[0] else None
    cotangents = (None, None, None)
    if g_dx is not None:  # the gradients of a, b, c: Σddx·g, Σddx·(x − center), Σddx
        sum_dd, sum_dd_xc, sum_dd_g = _double_backward_reduce_op(g_dx, dy, x, scale, shift, center,
                                                                 mask, relu, per_sample, backend)
        cotangents = (sum_dd_g, sum_dd_xc, sum_dd)
    param_grads = tuple(g if need else None
                        for g, need in zip((g_dweight, g_dbias, g_dh), needs[2:]))
    grads = _algebra(backend).double_backward_coefficients(
        sum_g, sum_gxc, named["dmean"], named["dvar"], named["weight"], named["bias"], named["h"],
        named["var"], h_value, eps, groups, batch_stats, needs, channels, count,
        cotangents + param_grads, sum_grads if sums else (None, None))
    a, b, p, q = grads.pop("a"), grads.pop("b"), grads["sum_g"], grads["sum_gxc"]
    ddy = dxx = None
    if wanted[0] or wanted[3]:
        ddy, dxx = _double_backward_apply_op(
            g_dx if g_dx is not None else torch.zeros_like(x), dy, x, scale, shift, mask, relu,
            a, b, torch.zeros_like(a) if p is None else p, torch.zeros_like(a) if q is None else q,
            center, g_dshortcut if needs[1] else None, backend)
    grads.update(dy=ddy, x=dxx)
    return tuple(grads.get(k) if want else None for k, want in zip(_BWD_INPUTS, wanted))


# ----------------------------------------------------------------------------------------
# Fused backends as custom ops.  norm_act_fwd's backward is norm_act_bwd; norm_act_bwd's
# backward is written with the two double-backward kernel ops and torch ops on vectors; the
# kernel ops' own backward is the vector–Jacobian product of the eager primitive.  So every
# order of derivative is exact, under torch.compile too (no autograd.Function anywhere).


def _storage_id(t: Tensor) -> int:
    # the StorageImpl itself, not its data pointer: fake tensors (pyeuler.cost) have none
    return t.untyped_storage()._cdata


def _unaliased(outputs, inputs):
    """Custom-op outputs may alias neither inputs nor each other.  The kernels write fresh
    buffers, so this copies nothing on their path; the torch-op fallback of the per-channel
    algebra (GroupNorm beyond one tile) may return one tensor twice (``dbias = Σg``)."""
    taken = {_storage_id(t) for t in inputs if isinstance(t, Tensor) and t.numel()}
    result = []
    for t in outputs:
        if t.numel():
            if _storage_id(t) in taken:
                t = t.clone()
            taken.add(_storage_id(t))
        result.append(t)
    return tuple(result)


def _no_zero_gradients(ctx, *non_differentiable: Tensor) -> None:
    """Outputs nobody differentiates get no gradient, instead of autograd filling a zero
    tensor for each (a launch apiece): the backward formulas take None.  ``non_differentiable``
    outputs (the ReLU mask, the coefficients kept only to gate it) get none at all."""
    ctx.set_materialize_grads(False)
    if non_differentiable:
        ctx.mark_non_differentiable(*non_differentiable)


def _register_eager_vjp_autograd(op_name: str, primitive) -> None:
    """Autograd for a custom op wrapping kernel ``primitive``: the VJP of the eager version
    (:mod:`primitives`), itself differentiable.  The op's arguments are the primitive's,
    then ``backend``."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(t if isinstance(t, Tensor) else None for t in inputs))
        ctx.constants = [None if isinstance(t, Tensor) else t for t in inputs]

    def backward(ctx, *grads):
        args = [t if t is not None else c for t, c in zip(ctx.saved_tensors, ctx.constants)]
        varying = [i for i, t in enumerate(args) if isinstance(t, Tensor) and t.is_floating_point()
                   and ctx.needs_input_grad[i]]

        def eager(*tensors):
            values = list(args)
            for i, t in zip(varying, tensors):
                values[i] = t
            return tuple(primitive(*values[:-1]))

        outs, vjp = torch.func.vjp(eager, *[args[i] for i in varying])
        cotangents = tuple(g if g is not None else torch.zeros_like(o) for g, o in zip(grads, outs))
        result = [None] * len(args)
        for i, g in zip(varying, vjp(cotangents)):
            result[i] = g
        return tuple(result)

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


@torch.library.custom_op("pyeuler::affine_act_double_backward_reduce", mutates_args=())
def _double_backward_reduce_op(ddx: Tensor, dy: Tensor, x: Tensor, scale: Tensor, shift: Tensor,
                               center: Tensor, mask: Tensor | None, relu: bool, per_sample: bool,
                               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    sums = _kernels(backend).affine_act_double_backward_reduce(ddx, dy, x, scale, shift, center,
                                                               mask, relu, per_sample)
    return _unaliased(sums, (ddx, dy, x, scale, shift, center, mask))


@_double_backward_reduce_op.register_fake
def _(ddx, dy, x, scale, shift, center, mask, relu, per_sample, backend):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = x.shape[:2] if per_sample else x.shape[1:2]
    return tuple(x.new_empty(shape, dtype=acc) for _ in range(3))


_register_eager_vjp_autograd("pyeuler::affine_act_double_backward_reduce",
                             primitives.affine_act_double_backward_reduce)


@torch.library.custom_op("pyeuler::affine_act_double_backward_apply", mutates_args=())
def _double_backward_apply_op(ddx: Tensor, dy: Tensor, x: Tensor, scale: Tensor, shift: Tensor,
                              mask: Tensor | None, relu: bool, a: Tensor, b: Tensor, p: Tensor,
                              q: Tensor, center: Tensor, ddshortcut: Tensor | None,
                              backend: str) -> tuple[Tensor, Tensor]:
    return tuple(_kernels(backend).affine_act_double_backward_apply(
        ddx, dy, x, scale, shift, mask, relu, a, b, p, q, center, ddshortcut))


@_double_backward_apply_op.register_fake
def _(ddx, dy, x, scale, shift, mask, relu, a, b, p, q, center, ddshortcut, backend):
    return torch.empty_like(x, dtype=dy.dtype), torch.empty_like(x)


_register_eager_vjp_autograd("pyeuler::affine_act_double_backward_apply",
                             primitives.affine_act_double_backward_apply)


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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, mask, scale, shift)``; the mask is empty unless ``save_mask``."""
    y, mean, var, mask, affine = _forward_math(_kernels(backend), x, weight, bias, shortcut, h,
                                               h_value, mean_in, var_in, eps, groups, relu,
                                               save_mask)
    if mean_in is not None:  # outputs must not alias inputs
        mean, var = mean.clone(), var.clone()
    if mask is None:
        mask = x.new_empty(0, dtype=torch.bool)
    return y, mean, var, mask, *affine


@_norm_act_fwd.register_fake
def _(x, weight, bias, shortcut, h, h_value, mean_in, var_in, eps, groups, relu, save_mask, backend):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    stat_shape = (x.shape[1],) if groups == 0 else (x.shape[0], groups)
    mask = torch.empty_like(x, dtype=torch.bool) if save_mask else x.new_empty(0, dtype=torch.bool)
    coef_shape = (x.shape[1],) if groups == 0 else (x.shape[0], x.shape[1])
    return (torch.empty_like(x), x.new_empty(stat_shape, dtype=acc), x.new_empty(stat_shape, dtype=acc),
            mask, x.new_empty(coef_shape, dtype=acc), x.new_empty(coef_shape, dtype=acc))


def _fwd_setup_context(ctx, inputs, output):
    (x, weight, bias, shortcut, h, h_value, mean_in, var_in, eps, groups, relu, save_mask,
     backend) = inputs
    _, mean, var, mask, scale, shift = output
    _no_zero_gradients(ctx, mask, scale, shift)
    ctx.save_for_backward(x, weight, bias, h, mean, var, mask if save_mask else None, scale, shift)
    ctx.config = (h_value, eps, groups, relu, mean_in is None, backend)
    ctx.has_shortcut = shortcut is not None


def _fwd_backward(ctx, dy, dmean, dvar, dmask, dscale, dshift):
    x, weight, bias, h, mean, var, mask, scale, shift = ctx.saved_tensors
    if dy is None:  # only the statistics are used downstream
        if dmean is None and dvar is None:
            return (None,) * 13
        dy = torch.zeros_like(x)
    h_value, eps, groups, relu, batch_stats, backend = ctx.config
    needs = (ctx.needs_input_grad[0], ctx.has_shortcut and ctx.needs_input_grad[3],
             ctx.needs_input_grad[1], ctx.needs_input_grad[2], ctx.needs_input_grad[4])
    dx, dshortcut, dweight, dbias, dh = norm_act_backward(
        dy, x, weight, bias, h, h_value, mean, var, mask, eps, groups, relu, batch_stats, needs,
        backend, dmean=dmean, dvar=dvar, affine=Affine(scale, shift))
    # running statistics (mean_in, var_in) are buffers: no gradient.
    return (dx, dweight, dbias, dshortcut, dh, None, None, None, None, None, None, None, None)


torch.library.register_autograd("pyeuler::norm_act_fwd", _fwd_backward,
                                setup_context=_fwd_setup_context)


def _empty_if_none(values, like: Tensor):
    return tuple(v if v is not None else like.new_empty(0) for v in values)


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
    scale: Tensor | None,
    shift: Tensor | None,
    h_value: float,
    eps: float,
    groups: int,
    relu: bool,
    batch_stats: bool,
    needs: list[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The five gradients, then the reduce sums (Σg, Σg·(x − center)), kept for the
    second order; empty tensors stand for None.  ``scale``/``shift``: the forward's
    coefficients (None: recomputed)."""
    affine = None if scale is None else Affine(scale, shift)
    grads, sums = _backward_math(_kernels(backend), dy, dmean, dvar, x, weight, bias, h, h_value,
                                 mean, var, mask, eps, groups, relu, batch_stats, tuple(needs),
                                 affine)
    return _unaliased(_empty_if_none(grads + (sums or (None, None)), x),
                      (dy, dmean, dvar, x, weight, bias, h, mean, var, mask, scale, shift))


@_norm_act_bwd.register_fake
def _(dy, dmean, dvar, x, weight, bias, h, mean, var, mask, scale, shift, h_value, eps, groups,
      relu, batch_stats, needs, backend):
    empty = x.new_empty(0)
    param = mean.new_empty(x.shape[1])
    sum_shape = (x.shape[1],) if groups == 0 else (x.shape[0], x.shape[1])
    sums = _sums_needed(needs, batch_stats)
    return (
        torch.empty_like(x) if needs[0] else empty,
        torch.empty_like(dy) if needs[1] else empty.clone(),
        param.clone() if needs[2] else empty.clone(),
        param.clone() if needs[3] else empty.clone(),
        mean.new_empty(h.shape) if needs[4] and h is not None else empty.clone(),
        mean.new_empty(sum_shape) if sums else empty.clone(),
        mean.new_empty(sum_shape) if sums else empty.clone(),
    )


def _bwd_setup_context(ctx, inputs, output):
    _no_zero_gradients(ctx)
    sums = output[5:] if output[5].numel() else (None, None)
    ctx.save_for_backward(*inputs[:12], *sums)
    ctx.config = inputs[12:]


def _none_if_empty(t: Tensor | None) -> Tensor | None:
    return t if t is not None and t.numel() else None


def _bwd_backward(ctx, *output_grads):
    *inputs, sum_g, sum_gxc = ctx.saved_tensors
    h_value, eps, groups, relu, batch_stats, needs, backend = ctx.config
    sums = None if sum_g is None else (sum_g, sum_gxc)
    wanted = [ctx.needs_input_grad[i] and inputs[i] is not None for i in range(9)]
    grads = _double_backward_math(inputs, sums, [_none_if_empty(g) for g in output_grads[:5]],
                                  [_none_if_empty(g) for g in output_grads[5:]],
                                  (h_value, eps, groups, relu, batch_stats, tuple(needs)), wanted,
                                  backend)
    return (*grads, *(None,) * 10)


torch.library.register_autograd("pyeuler::norm_act_bwd", _bwd_backward,
                                setup_context=_bwd_setup_context)


# ----------------------------------------------------------------------------------------
# ``conv(ReLU(norm(x)))`` keeping x, not the activation, for the backward: the activation is
# recomputed there by one elementwise pass (memory: "unrolled" IE-Skips keep several branch
# evaluations alive at once).


def _affine_relu_eager(x, scale, shift):
    return primitives.affine_act_forward(x, scale, shift, None, True, False)[:1]


@torch.library.custom_op("pyeuler::affine_relu", mutates_args=())
def _affine_relu_op(x: Tensor, scale: Tensor, shift: Tensor, backend: str) -> Tensor:
    return _kernels(backend).affine_act_forward(x, scale, shift, None, True, False)[0]


@_affine_relu_op.register_fake
def _(x, scale, shift, backend):
    return torch.empty_like(x)


_register_eager_vjp_autograd("pyeuler::affine_relu", _affine_relu_eager)


def conv_weight_for(x: Tensor, weight: Tensor) -> Tensor:
    """The conv weight as a convolution on ``x`` uses it: cast to the autocast dtype when
    autocast is on for x's device (as ``F.conv*d`` would, differentiably), else as is."""
    if torch.is_autocast_enabled(x.device.type):
        return weight.to(torch.get_autocast_dtype(x.device.type))
    if weight.dtype != x.dtype:
        raise TypeError(f"conv weight is {weight.dtype} but x is {x.dtype} (outside autocast "
                        "they must match)")
    return weight


def _conv_args(conv_weight: Tensor, stride, padding, dilation, conv_groups):
    spatial = conv_weight.dim() - 2
    return list(stride), list(padding), list(dilation), False, [0] * spatial, conv_groups


@torch.library.custom_op("pyeuler::norm_relu_conv", mutates_args=())
def _norm_relu_conv(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean_in: Tensor | None,
    var_in: Tensor | None,
    eps: float,
    groups: int,
    conv_weight: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    conv_groups: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(conv(ReLU(norm(x))), mean, var, scale, shift)``."""
    u, mean, var, _, affine = _forward_math(_kernels(backend), x, weight, bias, None, None, 1.0,
                                            mean_in, var_in, eps, groups, True, False)
    if mean_in is not None:  # outputs must not alias inputs
        mean, var = mean.clone(), var.clone()
    # under autocast the convolution runs in the weight's (autocast) dtype, as F.conv*d would
    z = torch.convolution(u.to(conv_weight.dtype), conv_weight, None,
                          *_conv_args(conv_weight, stride, padding, dilation, conv_groups))
    return z, mean, var, *affine


@_norm_relu_conv.register_fake
def _(x, weight, bias, mean_in, var_in, eps, groups, conv_weight, stride, padding, dilation,
      conv_groups, backend):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    stat_shape = (x.shape[1],) if groups == 0 else (x.shape[0], groups)
    coef_shape = (x.shape[1],) if groups == 0 else (x.shape[0], x.shape[1])
    z = torch.convolution(torch.empty_like(x, dtype=conv_weight.dtype), conv_weight, None,
                          *_conv_args(conv_weight, stride, padding, dilation, conv_groups))
    return (z, x.new_empty(stat_shape, dtype=acc), x.new_empty(stat_shape, dtype=acc),
            x.new_empty(coef_shape, dtype=acc), x.new_empty(coef_shape, dtype=acc))


def _conv_setup_context(ctx, inputs, output):
    (x, weight, bias, mean_in, var_in, eps, groups, conv_weight, stride, padding, dilation,
     conv_groups, backend) = inputs
    z, mean, var, scale, shift = output
    _no_zero_gradients(ctx, scale, shift)
    ctx.z_shape = z.shape
    ctx.save_for_backward(x, weight, bias, mean, var, conv_weight, scale, shift)
    ctx.config = (eps, groups, mean_in is None, _conv_args(conv_weight, stride, padding, dilation,
                                                           conv_groups), backend)


def _conv_backward(ctx, dz, dmean, dvar, dscale, dshift):
    x, weight, bias, mean, var, conv_weight, scale, shift = ctx.saved_tensors
    eps, groups, batch_stats, conv_args, backend = ctx.config
    if dz is None:  # only the statistics are used downstream
        if dmean is None and dvar is None:
            return (None,) * 13
        dz = x.new_zeros(ctx.z_shape, dtype=conv_weight.dtype)
    need_x, need_weight, need_bias, need_conv = (ctx.needs_input_grad[i] for i in (0, 1, 2, 7))
    need_input = need_x or need_weight or need_bias
    affine = Affine(scale, shift)
    if torch.is_grad_enabled():
        # create_graph: the recomputed activation must be differentiable in the statistics
        # and the norm's parameters, so the coefficients are rebuilt from them
        scale, shift = forward_coefficients(mean, var, weight, bias, None, 1.0, eps, groups,
                                                x.shape[1])
    u = _affine_relu_op(x, scale, shift, backend) if need_conv else x
    du, dconv, _ = torch.ops.aten.convolution_backward(dz, u.to(conv_weight.dtype), conv_weight,
                                                       None, *conv_args,
                                                       [need_input, need_conv, False])
    dx = dweight = dbias = None
    if need_input:
        dx, _, dweight, dbias, _ = norm_act_backward(
            du.to(x.dtype), x, weight, bias, None, 1.0, mean, var, None, eps, groups, True,
            batch_stats,
            (need_x, False, need_weight, need_bias, False), backend, dmean=dmean, dvar=dvar,
            affine=affine)
    return dx, dweight, dbias, None, None, None, None, dconv, None, None, None, None, None


torch.library.register_autograd("pyeuler::norm_relu_conv", _conv_backward,
                                setup_context=_conv_setup_context)


# Its VJP counterpart, ``Wᵀ⋆(ReLU∘norm)ᵀ dy`` (the input gradient of the conv that produced
# the norm's input), keeps dy and x for the backward and recomputes the norm's input
# gradient there from the saved reduce sums: one elementwise pass instead of a stored tensor.


def _backward_apply_eager(dy, x, scale, shift, mask, relu, a, b, c, center):
    return primitives.affine_act_backward_apply(dy, x, scale, shift, mask, relu, a, b, c, center,
                                                False)[:1]


@torch.library.custom_op("pyeuler::affine_act_backward_apply", mutates_args=())
def _backward_apply_op(dy: Tensor, x: Tensor, scale: Tensor, shift: Tensor, mask: Tensor | None,
                       relu: bool, a: Tensor, b: Tensor, c: Tensor, center: Tensor,
                       backend: str) -> Tensor:
    return _kernels(backend).affine_act_backward_apply(dy, x, scale, shift, mask, relu, a, b, c,
                                                       center, False)[0]


@_backward_apply_op.register_fake
def _(dy, x, scale, shift, mask, relu, a, b, c, center, backend):
    return torch.empty_like(x)


_register_eager_vjp_autograd("pyeuler::affine_act_backward_apply", _backward_apply_eager)

_INPUT_GRAD_ONLY = (True, False, False, False, False)


def _conv_input_grad(dx: Tensor, input_shape, conv_weight: Tensor, conv_args) -> Tensor:
    placeholder = dx.new_empty(1).expand(input_shape)  # only its shape is read
    return torch.ops.aten.convolution_backward(dx, placeholder, conv_weight, None, *conv_args,
                                               [True, False, False])[0]


@torch.library.custom_op("pyeuler::norm_relu_backward_conv", mutates_args=())
def _norm_relu_backward_conv(
    dy: Tensor,
    dmean: Tensor | None,
    dvar: Tensor | None,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    scale: Tensor,
    shift: Tensor,
    eps: float,
    groups: int,
    batch_stats: bool,
    conv_weight: Tensor,
    input_shape: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    conv_groups: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(Wᵀ⋆dx, Σg, Σg·(x − center))``, dx the input gradient of ``ReLU(norm(x))``; the
    sums (empty when the backward needs none) are kept to recompute dx.  ``scale``/
    ``shift``: the forward's coefficients, which gate the ReLU."""
    (dx, *_), sums = _backward_math(_kernels(backend), dy, dmean, dvar, x, weight, bias, None, 1.0,
                                    mean, var, None, eps, groups, True, batch_stats,
                                    _INPUT_GRAD_ONLY, Affine(scale, shift))
    conv_args = _conv_args(conv_weight, stride, padding, dilation, conv_groups)
    grad_input = _conv_input_grad(dx.to(conv_weight.dtype), input_shape, conv_weight, conv_args)
    inputs = (dy, dmean, dvar, x, weight, bias, mean, var, scale, shift, conv_weight)
    return _unaliased((grad_input,) + (sums or (x.new_empty(0), x.new_empty(0))), inputs)


@_norm_relu_backward_conv.register_fake
def _(dy, dmean, dvar, x, weight, bias, mean, var, scale, shift, eps, groups, batch_stats,
      conv_weight, input_shape, stride, padding, dilation, conv_groups, backend):
    conv_args = _conv_args(conv_weight, stride, padding, dilation, conv_groups)
    grad_input = _conv_input_grad(torch.empty_like(x, dtype=conv_weight.dtype), input_shape,
                                  conv_weight, conv_args)
    sum_shape = (x.shape[1],) if groups == 0 else (x.shape[0], x.shape[1])
    sums = _sums_needed(_INPUT_GRAD_ONLY, batch_stats)
    return (grad_input, mean.new_empty(sum_shape if sums else (0,)),
            mean.new_empty(sum_shape if sums else (0,)))


def _backward_conv_setup_context(ctx, inputs, output):
    (dy, dmean, dvar, x, weight, bias, mean, var, scale, shift, eps, groups, batch_stats,
     conv_weight, input_shape, stride, padding, dilation, conv_groups, backend) = inputs
    _no_zero_gradients(ctx)
    sums = output[1:] if output[1].numel() else (None, None)
    ctx.save_for_backward(dy, dmean, dvar, x, weight, bias, mean, var, scale, shift, conv_weight,
                          *sums)
    ctx.config = (eps, groups, batch_stats,
                  _conv_args(conv_weight, stride, padding, dilation, conv_groups), backend)


def _backward_conv_backward(ctx, grad_input_grad, sum_g_grad, sum_gxc_grad):
    (dy, dmean, dvar, x, weight, bias, mean, var, scale, shift, conv_weight, sum_g,
     sum_gxc) = ctx.saved_tensors
    eps, groups, batch_stats, conv_args, backend = ctx.config
    sums = None if sum_g is None else (sum_g, sum_gxc)
    # the map dx ↦ Wᵀ⋆dx is linear in dx and in W; its adjoint in dx is the convolution.
    dx_grad = conv_weight_grad = None
    if grad_input_grad is not None:
        dx_grad = torch.convolution(grad_input_grad, conv_weight, None, *conv_args).to(x.dtype)
    if ctx.needs_input_grad[13] and grad_input_grad is not None:
        channels = x.shape[1]
        a, b, c, *_ = _algebra(backend).backward_coefficients(
            *(sums or (None, None)), dmean, dvar, weight, bias, None, var, 1.0, eps, groups,
            batch_stats, _INPUT_GRAD_ONLY, channels, statistic_count(x, groups))
        dx = _backward_apply_op(dy, x, scale, shift, None, True, a, b, c,
                                center_of(mean, groups, channels), backend)
        conv_weight_grad = torch.ops.aten.convolution_backward(
            dx.to(conv_weight.dtype), grad_input_grad, conv_weight, None, *conv_args,
            [False, True, False])[1]
    inputs = (dy, dmean, dvar, x, weight, bias, None, mean, var, None, scale, shift)
    # _BWD_INPUTS order; h (position 6) is not an input here
    wanted = [i is not None and ctx.needs_input_grad[i] and inputs[k] is not None
              for k, i in enumerate((0, 1, 2, 3, 4, 5, None, 6, 7))]
    grads = _double_backward_math(inputs, sums, (dx_grad, None, None, None, None),
                                  (_none_if_empty(sum_g_grad), _none_if_empty(sum_gxc_grad)),
                                  (1.0, eps, groups, True, batch_stats, _INPUT_GRAD_ONLY), wanted,
                                  backend)
    g_dy, g_dmean, g_dvar, g_x, g_weight, g_bias, _, g_mean, g_var = grads
    return (g_dy, g_dmean, g_dvar, g_x, g_weight, g_bias, g_mean, g_var, None, None, None, None,
            None, conv_weight_grad, None, None, None, None, None, None)


torch.library.register_autograd("pyeuler::norm_relu_backward_conv", _backward_conv_backward,
                                setup_context=_backward_conv_setup_context)


# The IE-Skip update fused into the last pass of the branch VJP, ``x − 2γ·(e − θ·v)`` with v
# the norm's input gradient, differentiable (for "unrolled"): v is never written or read.


def _ie_update_pass(kernels, dy, x, weight, bias, mean, var, e, eps, groups, batch_stats,
                    step_size, theta, affine):
    (scale, shift, a, b, c, center), *_, sums = _backward_terms(
        kernels, dy, None, None, x, weight, bias, None, 1.0, mean, var, None, eps, groups, True,
        batch_stats, _INPUT_GRAD_ONLY, affine)
    out = kernels.affine_act_backward_apply_ie_update(dy, x, scale, shift, None, True, a, b, c,
                                                      center, e, step_size, theta)
    return out, sums


@torch.library.custom_op("pyeuler::norm_relu_backward_ie_update", mutates_args=())
def _norm_relu_backward_ie_update(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    scale: Tensor,
    shift: Tensor,
    e: Tensor,
    eps: float,
    groups: int,
    batch_stats: bool,
    step_size: float,
    theta: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(x − 2γ·(e − θ·v), Σg, Σg·(x − center))``; the sums (empty when not needed) are
    kept for the backward.  ``scale``/``shift``: the forward's coefficients (the ReLU gate)."""
    out, sums = _ie_update_pass(_kernels(backend), dy, x, weight, bias, mean, var, e, eps, groups,
                                batch_stats, step_size, theta, Affine(scale, shift))
    return _unaliased((out,) + (sums or (x.new_empty(0), x.new_empty(0))),
                      (dy, x, weight, bias, mean, var, scale, shift, e))


@_norm_relu_backward_ie_update.register_fake
def _(dy, x, weight, bias, mean, var, scale, shift, e, eps, groups, batch_stats, step_size, theta,
      backend):
    sum_shape = (x.shape[1],) if groups == 0 else (x.shape[0], x.shape[1])
    sums = _sums_needed(_INPUT_GRAD_ONLY, batch_stats)
    return (torch.empty_like(x), mean.new_empty(sum_shape if sums else (0,)),
            mean.new_empty(sum_shape if sums else (0,)))


def _ie_update_setup_context(ctx, inputs, output):
    (dy, x, weight, bias, mean, var, scale, shift, e, eps, groups, batch_stats, step_size, theta,
     backend) = inputs
    _no_zero_gradients(ctx)
    sums = output[1:] if output[1].numel() else (None, None)
    ctx.save_for_backward(dy, x, weight, bias, mean, var, scale, shift, *sums)
    ctx.config = (eps, groups, batch_stats, step_size, theta, backend)
    ctx.e_dtype = e.dtype


def _ie_update_backward(ctx, out_grad, sum_g_grad, sum_gxc_grad):
    dy, x, weight, bias, mean, var, scale, shift, sum_g, sum_gxc = ctx.saved_tensors
    eps, groups, batch_stats, step_size, theta, backend = ctx.config
    sums = None if sum_g is None else (sum_g, sum_gxc)
    if out_grad is None:  # only the kept sums are used downstream
        out_grad = torch.zeros_like(x)
    inputs = (dy, None, None, x, weight, bias, None, mean, var, None, scale, shift)
    # _BWD_INPUTS order: dy, dmean, dvar, x, weight, bias, h, mean, var
    wanted = [ctx.needs_input_grad[0], False, False, ctx.needs_input_grad[1],
              ctx.needs_input_grad[2] and weight is not None,
              ctx.needs_input_grad[3] and bias is not None, False, ctx.needs_input_grad[4],
              ctx.needs_input_grad[5]]
    grads = _double_backward_math(inputs, sums, ((2.0 * step_size * theta) * out_grad, None, None,
                                                 None, None),
                                  (_none_if_empty(sum_g_grad), _none_if_empty(sum_gxc_grad)),
                                  (1.0, eps, groups, True, batch_stats, _INPUT_GRAD_ONLY), wanted,
                                  backend)
    g_dy, _, _, g_x, g_weight, g_bias, _, g_mean, g_var = grads
    g_x = out_grad + g_x if ctx.needs_input_grad[1] else None
    g_e = (-2.0 * step_size * out_grad).to(ctx.e_dtype) if ctx.needs_input_grad[8] else None
    return (g_dy, g_x, g_weight, g_bias, g_mean, g_var, None, None, g_e, None, None, None, None,
            None, None)


torch.library.register_autograd("pyeuler::norm_relu_backward_ie_update", _ie_update_backward,
                                setup_context=_ie_update_setup_context)


# ----------------------------------------------------------------------------------------
# Public entry points.


@torch.library.custom_op("pyeuler::update_running_stats",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def _update_running_stats_op(running_mean: Tensor, running_var: Tensor,
                             num_batches_tracked: Tensor | None, mean: Tensor, var: Tensor,
                             count: int, momentum: float | None, momentum_tensor: Tensor | None,
                             backend: str) -> None:
    rate = momentum_tensor if momentum_tensor is not None else momentum
    _kernels(backend).update_running_stats(running_mean, running_var, num_batches_tracked, mean,
                                           var, count, rate)


@_update_running_stats_op.register_fake
def _(running_mean, running_var, num_batches_tracked, mean, var, count, momentum, momentum_tensor,
      backend):
    return None


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         count: int, momentum: float | Tensor | None, *,
                         num_batches_tracked: Tensor | None = None,
                         backend: str = "eager") -> None:
    """``nn.BatchNorm``'s running-statistics update in place
    (:func:`pyeuler.ops.norm_algebra.update_running_stats`: ``num_batches_tracked`` += 1
    when given, then ``r ← lerp(r, batch, m)`` with the unbiased variance stored, ``m`` =
    ``momentum`` or, for None, ``1/num_batches_tracked``).  One launch on the fused
    backends; no host synchronisation.  Raises ValueError for ``count < 2``."""
    if count < 2:
        raise ValueError("running statistics need more than one value per channel")
    mean, var = mean.detach(), var.detach()
    if backend not in ("triton", "cuda"):
        primitives.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var,
                                        count, momentum)
        return
    momentum_tensor = momentum if isinstance(momentum, Tensor) else None
    _update_running_stats_op(running_mean, running_var, num_batches_tracked, mean, var, count,
                             None if momentum_tensor is not None or momentum is None
                             else float(momentum), momentum_tensor, backend)


def _is_real(v) -> bool:
    """A Python real number (bools and strings are not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _validate(x, weight, bias, running_mean, running_var, shortcut, h, groups, training, eps,
              momentum, relu, num_batches_tracked=None):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.dim() > 5:
        raise ValueError(f"x must have shape (N, C, *spatial) with 0-3 spatial dims, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    channels = x.shape[1]
    if channels < 1:
        raise ValueError(f"x must have at least one channel (dim 1), got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.shape != (channels,):
            if t.dim() == 1:
                raise ValueError(f"{name} must have shape ({channels},): x has {channels} "
                                 f"channels (dim 1) but {name} has {t.shape[0]}")
            raise ValueError(f"{name} must have shape ({channels},), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if shortcut is not None:
        if not isinstance(shortcut, Tensor):
            raise TypeError(f"shortcut must be a Tensor or None, got {type(shortcut).__name__}")
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
        if not h.is_floating_point():
            raise TypeError(f"h must be a floating-point tensor, got {h.dtype}")
    elif not _is_real(h):
        raise TypeError(f"h must be a float or a floating-point tensor, got {type(h).__name__}")
    if not _is_real(eps) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    if isinstance(momentum, Tensor):
        if momentum.dim() != 0 or not momentum.is_floating_point():
            raise ValueError(f"momentum must be a float or a 0-dim floating-point tensor, got "
                             f"{momentum.dtype} of shape {tuple(momentum.shape)}")
        if running_mean is not None and momentum.device != running_mean.device:
            raise ValueError(f"momentum is on {momentum.device} but the running statistics "
                             f"are on {running_mean.device}")
        # its value is not checked: that would read it on the host (a sync)
    elif momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (the cumulative average) needs num_batches_tracked")
    elif not _is_real(momentum) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a float in [0, 1] or None, got {momentum!r}")
    if num_batches_tracked is not None:
        if not isinstance(num_batches_tracked, Tensor):
            raise TypeError("num_batches_tracked must be a Tensor or None, got "
                            f"{type(num_batches_tracked).__name__}")
        if num_batches_tracked.dtype != torch.int64 or num_batches_tracked.numel() != 1:
            raise ValueError("num_batches_tracked must be a one-element int64 tensor, got "
                             f"{num_batches_tracked.dtype} of shape {tuple(num_batches_tracked.shape)}")
        if running_mean is None:
            raise ValueError("num_batches_tracked needs running_mean and running_var")
        if num_batches_tracked.device != running_mean.device:
            raise ValueError(f"num_batches_tracked is on {num_batches_tracked.device} but the "
                             f"running statistics are on {running_mean.device}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 0 or (
            groups > 0 and channels % groups):
        raise ValueError(f"groups must be 0 (batch norm) or divide C={channels}, got {groups!r}")
    if groups == 0 and training and x.numel() == channels:  # N·spatial == 1, as torch refuses
        raise ValueError(f"x has one value per channel ({tuple(x.shape)}); batch statistics in "
                         "training mode need more than one (N·spatial > 1)")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if groups == 0 and not training and running_mean is None:
        raise ValueError("eval mode (training=False) needs running_mean and running_var")


def _promoted(x: Tensor, shortcut: Tensor | None, h) -> tuple[Tensor, Tensor | None]:
    """x and the shortcut in the dtype torch's ``shortcut + h·Norm(x)`` has: promoted over x,
    the shortcut and a per-channel h (a 0-dim h does not promote, as in torch); the kernels
    compute and write in x's dtype."""
    dtype = x.dtype
    if shortcut is not None:
        dtype = torch.promote_types(dtype, shortcut.dtype)
    if isinstance(h, Tensor) and h.dim() > 0:
        dtype = torch.promote_types(dtype, h.dtype)
    if shortcut is not None and shortcut.dtype != dtype:
        shortcut = shortcut.to(dtype)
    return x.to(dtype), shortcut


def _validate_conv(conv, x, shortcut, h, relu):
    if not isinstance(conv, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        raise TypeError(f"conv must be an nn.Conv1d/2d/3d, got {type(conv).__name__}")
    if conv.weight.dim() != x.dim():
        raise ValueError(f"conv is a {conv.weight.dim() - 2}-d convolution but x has "
                         f"{x.dim() - 2} spatial dims")
    if conv.bias is not None or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError("conv must be bias-free with numeric zero padding")
    if shortcut is not None or not relu or not (isinstance(h, float) and h == 1.0):
        raise ValueError("conv needs relu=True, no shortcut and h=1.0")


def _reference(x, weight, bias, running_mean, running_var, training, momentum, eps, groups,
               shortcut, h, relu, update_running):
    """The literal composition every other backend is tested against: the norms of
    :mod:`pyeuler.ops.reference_norm` (plain arithmetic, exact at every derivative order,
    unlike native batch_norm's third), then step, shortcut and ReLU."""
    if groups:
        y = reference_norm.group_norm(x, groups, weight, bias, eps)
    else:
        if training and not update_running:
            running_mean = running_var = None
        y = reference_norm.batch_norm(x, running_mean, running_var, weight, bias, training,
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
    momentum: float | Tensor | None = 0.1,
    eps: float = 1e-5,
    groups: int = 0,
    shortcut: Tensor | None = None,
    h: float | Tensor = 1.0,
    relu: bool = True,
    update_running: bool = True,
    num_batches_tracked: Tensor | None = None,
    backend: str | None = None,
    return_stats: bool = False,
    conv: torch.nn.Module | None = None,
):
    """``act(shortcut + h·Norm(x))`` with BatchNorm (``groups=0``) or GroupNorm(groups).

    BatchNorm follows ``F.batch_norm``: batch statistics when ``training`` (running
    statistics updated in place when given and ``update_running``, together with
    ``num_batches_tracked`` if given; ``momentum=None`` is the cumulative average
    ``1/num_batches_tracked``, as in ``nn.BatchNorm``), running statistics otherwise.
    GroupNorm always uses per-sample statistics.  ``h`` is a float, a scalar
    tensor or a per-channel tensor (learnable if it requires grad).  With
    ``return_stats=True`` also returns the :class:`NormStats` a backward pass needs.

    ``conv`` (a bias-free ``nn.Conv{1,2,3}d``; ReLU, no shortcut, ``h=1``) returns
    ``conv(ReLU(Norm(x)))`` instead.  On the fused backends its backward then recomputes
    the activation from x rather than keeping it: one elementwise pass for a tensor of
    memory.
    """
    _validate(x, weight, bias, running_mean, running_var, shortcut, h, groups, training, eps,
              momentum, relu, num_batches_tracked)
    if conv is not None:
        _validate_conv(conv, x, shortcut, h, relu)
    name = resolve_backend(backend, x.device)
    tracking = groups == 0 and training and running_mean is not None and update_running
    if not tracking:
        num_batches_tracked = None
        momentum = 0.0 if momentum is None else momentum  # unused
    if name == "reference":
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / num_batches_tracked.to(running_mean.dtype)
        if return_stats:
            raise ValueError("return_stats=True needs an explicit backend, not 'reference'")
        y = _reference(x, weight, bias, running_mean, running_var, training, momentum, eps,
                       groups, shortcut, h, relu, update_running)
        return y if conv is None else conv(y)
    x, shortcut = _promoted(x, shortcut, h)
    name = kernel_backend(name, x, weight, bias, shortcut, h, running_mean, running_var)
    h_tensor = h.reshape(-1)[0] if isinstance(h, Tensor) and h.numel() == 1 and h.dim() == 1 else h
    h_tensor, h_value = (h_tensor, 1.0) if isinstance(h_tensor, Tensor) else (None, float(h))
    batch_stats = groups > 0 or training or running_mean is None
    mean_in = None if batch_stats else running_mean
    var_in = None if batch_stats else running_var
    empty = x.numel() == 0
    if empty and batch_stats:
        # No values, no statistics: placeholders (mean 0, variance 1) that only ever scale
        # empty tensors; running statistics stay as they are, as torch's layers leave them.
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        stat_shape = (x.shape[1],) if groups == 0 else (x.shape[0], groups)
        mean_in = torch.zeros(stat_shape, dtype=acc, device=x.device)
        var_in = torch.ones(stat_shape, dtype=acc, device=x.device)
    save_mask = relu and shortcut is not None
    if conv is not None and name != "eager":
        y, mean, var, *affine = _norm_relu_conv(
            x, weight, bias, mean_in, var_in, eps, groups, conv_weight_for(x, conv.weight),
            list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups, name)
        mask = None
    elif name == "eager":
        y, mean, var, mask, affine = _forward_math(primitives, x, weight, bias, shortcut, h_tensor,
                                                   h_value, mean_in, var_in, eps, groups, relu,
                                                   save_mask)
    else:
        y, mean, var, mask, *affine = _norm_act_fwd(x, weight, bias, shortcut, h_tensor, h_value,
                                                    mean_in, var_in, eps, groups, relu, save_mask,
                                                    name)
        mask = mask if save_mask else None
    if conv is not None and name == "eager":
        y = conv(y)
    if tracking and empty:  # nothing to average in; the module still counts the batch
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
    elif tracking:
        update_running_stats(running_mean, running_var, mean, var, statistic_count(x, 0), momentum,
                             num_batches_tracked=num_batches_tracked, backend=name)
    if return_stats:
        affine = Affine(*(t.detach() for t in affine))  # they only ever gate the ReLU
        return y, NormStats(x, mean, var, mask, batch_stats, affine)
    return y


def norm_act_backward(dy, x, weight, bias, h, h_value, mean, var, mask, eps, groups, relu,
                      batch_stats, needs, backend, *, dmean=None, dvar=None,
                      affine: Affine | None = None):
    """Explicit gradients ``(dx, dshortcut, dweight, dbias, dh)`` of :func:`norm_act`.

    Differentiable once more on every backend (so IE-Skip VJPs built from it have exact
    "unrolled" gradients).  ``needs`` flags (x, shortcut, weight, bias, h); unneeded
    entries are None.  ``affine``: the forward's coefficients (:class:`NormStats`), which
    spare recomputing them; they only gate the ReLU.
    """
    backend = kernel_backend(backend, dy, x, weight, bias, h, mean, var, dmean, dvar)
    if backend == "eager":
        grads, _ = _backward_math(primitives, dy, dmean, dvar, x, weight, bias, h, h_value, mean,
                                  var, mask, eps, groups, relu, batch_stats, tuple(needs), affine)
        return grads
    scale, shift = affine or (None, None)
    grads = _norm_act_bwd(dy, dmean, dvar, x, weight, bias, h, mean, var, mask, scale, shift,
                          h_value, eps, groups, relu, batch_stats, list(needs), backend)
    return tuple(g if need else None for g, need in zip(grads[:5], needs))


def _affine_of(stats: NormStats, norm: torch.nn.Module) -> Affine:
    """The forward's coefficients of ``ReLU(norm(x))`` kept in ``stats``, else recomputed."""
    if stats.affine is not None:
        return stats.affine
    groups = norm.num_groups if isinstance(norm, torch.nn.GroupNorm) else 0
    coefficients = forward_coefficients(stats.mean, stats.var, norm.weight, norm.bias, None, 1.0,
                                         norm.eps, groups, stats.x.shape[1])
    return Affine(*(t.detach() for t in coefficients))


def norm_relu_backward_ie_update(dy: Tensor, stats: NormStats, norm: torch.nn.Module, e: Tensor,
                                 step_size: float, theta: float, backend: str) -> Tensor:
    """``x − 2γ·(e − θ·v)`` with ``v`` the input gradient of ``ReLU(norm(x))`` at ``stats``
    for output gradient ``dy``, in one fused pass that never writes v.  Differentiable to
    any order, like :func:`norm_act_backward` ("unrolled" IE-Skips use it too)."""
    groups = norm.num_groups if isinstance(norm, torch.nn.GroupNorm) else 0
    if stats.mask is not None:
        raise ValueError("norm_relu_backward_ie_update recomputes the ReLU mask from x: stats "
                         "must come from an evaluation without a shortcut")
    backend = kernel_backend(backend, dy, stats.x, norm.weight, norm.bias, stats.mean, stats.var, e)
    if backend == "eager":  # torch ops: autograd differentiates them directly
        out, _ = _ie_update_pass(primitives, dy, stats.x, norm.weight, norm.bias, stats.mean,
                                 stats.var, e, norm.eps, groups, stats.batch_stats, step_size, theta,
                                 stats.affine)
        return out
    scale, shift = _affine_of(stats, norm)
    out, _, _ = _norm_relu_backward_ie_update(dy, stats.x, norm.weight, norm.bias, stats.mean,
                                              stats.var, scale, shift, e, norm.eps, groups,
                                              stats.batch_stats, step_size, theta, backend)
    return out


def norm_relu_backward_conv(dy: Tensor, stats: NormStats, norm: torch.nn.Module,
                            conv: torch.nn.Module, input_shape, backend: str) -> Tensor:
    """``Wᵀ⋆v``: the input gradient of ``conv`` (which produced ``stats.x``) where ``v`` is
    the input gradient of ``ReLU(norm(x))`` at ``stats`` for output gradient ``dy``; in the
    convolution's compute dtype (the autocast dtype under autocast).

    On the fused backends v is not kept for the backward but recomputed there (one
    elementwise pass); differentiable to any order, like :func:`norm_act_backward`.
    """
    groups = norm.num_groups if isinstance(norm, torch.nn.GroupNorm) else 0
    conv_weight = conv_weight_for(dy, conv.weight)
    backend = kernel_backend(backend, dy, stats.x, norm.weight, norm.bias, stats.mean, stats.var,
                             conv_weight)
    if backend == "eager":
        dx, *_ = norm_act_backward(dy, stats.x, norm.weight, norm.bias, None, 1.0, stats.mean,
                                   stats.var, stats.mask, norm.eps, groups, True, stats.batch_stats,
                                   _INPUT_GRAD_ONLY, backend, affine=stats.affine)
        conv_args = _conv_args(conv_weight, conv.stride, conv.padding, conv.dilation, conv.groups)
        return _conv_input_grad(dx.to(conv_weight.dtype), input_shape, conv_weight, conv_args)
    if stats.mask is not None:
        raise ValueError("norm_relu_backward_conv recomputes the ReLU mask from x: stats must "
                         "come from an evaluation without a shortcut")
    scale, shift = _affine_of(stats, norm)
    grad_input, _, _ = _norm_relu_backward_conv(
        dy, None, None, stats.x, norm.weight, norm.bias, stats.mean, stats.var, scale, shift,
        norm.eps, groups, stats.batch_stats, conv_weight, list(input_shape), list(conv.stride),
        list(conv.padding), list(conv.dilation), conv.groups, backend)
    return grad_input


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
    conv: torch.nn.Module | None = None,
):
    """:func:`norm_act` with the parameters and buffers of an ``nn.BatchNorm*d`` or
    ``nn.GroupNorm``, updating ``num_batches_tracked`` and honouring ``momentum=None``
    (cumulative average) exactly as the module's own forward does."""
    if isinstance(norm, torch.nn.GroupNorm):
        return norm_act(x, norm.weight, norm.bias, eps=norm.eps, groups=norm.num_groups,
                        shortcut=shortcut, h=h, relu=relu, backend=backend,
                        return_stats=return_stats, conv=conv)
    if not isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"norm must be an nn.BatchNorm*d or nn.GroupNorm, got {type(norm).__name__}")
    tracking = norm.training and norm.track_running_stats and update_running
    use_running = not norm.training or norm.track_running_stats
    return norm_act(
        x, norm.weight, norm.bias,
        norm.running_mean if use_running else None,
        norm.running_var if use_running else None,
        training=norm.training or norm.running_mean is None,
        momentum=norm.momentum if tracking else 0.0, eps=norm.eps,
        shortcut=shortcut, h=h, relu=relu, update_running=tracking,
        num_batches_tracked=norm.num_batches_tracked if tracking else None, backend=backend,
        return_stats=return_stats, conv=conv)
