"""The norm_act custom ops and their autograd: ``act(shortcut + h·Norm(x))`` on the fused
backends (docs/semantics.md §1, §3, §4).

- the forward factors into the statistics pass with the per-channel ``forward_coefficients``
  ``scale = h·w·invstd``, ``shift = h·(b − mean·w·invstd)`` in its final stage (kept in
  :class:`NormStats` for every backward pass) and one ``affine_act_forward`` pass;
- the backward (the explicit BNᵀ of docs/semantics.md §3) factors into one reduction pass, the
  per-channel ``backward_coefficients`` and one ``affine_act_backward_apply`` pass
  ``dx = a·g + b·(x − mean) + c``;
- the second order (needed by "unrolled" IE-Skips) is again a reduce and an apply pass with
  one per-channel pass, ``double_backward_coefficients``, between them.

The passes come from a kernel module implementing :mod:`pyeuler.ops.primitives`:
``primitives`` itself for ``backend="eager"`` (torch ops, so autograd differentiates
everything, float64 included), ``pyeuler.triton`` or ``pyeuler.cuda`` for the fused
backends, where each per-channel pass (:mod:`pyeuler.ops.norm_algebra`) is one launch.  The
fused backends run as ``torch.library`` custom ops whose backward is itself a custom op; the
per-channel algebra between the second order's passes is a kernel when no graph is built,
the differentiable torch ops of :mod:`pyeuler.ops.norm_algebra` under ``create_graph``, so
every order stays exact, under ``torch.compile`` too.

Batch mean and variance are outputs of the forward *and differentiable*: the IE-Skip's VJP
reuses them, and its "unrolled" gradient must flow through them.  Running statistics (and
``num_batches_tracked``) are updated from them by ``update_running_stats``: one launch, no
host synchronisation.

The fusions with the neighbouring convolution and the IE update live in
:mod:`pyeuler.ops.norm_act_fusions`; the public API in :mod:`pyeuler.ops.norm_act`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from pyeuler.backend import kernel_module as _kernels
from pyeuler.ops import norm_algebra, primitives
from pyeuler.ops import sync as collectives
from pyeuler.ops.dispatch import kernel_backend
from pyeuler.ops.gradient_relay import hand_on, incoming, mark_relaying
from pyeuler.ops.norm_algebra import center_of, forward_coefficients, statistic_count

__all__ = ["Affine", "BackwardInputs", "NormConfig", "NormStats", "OutputGrads",
           "norm_act_backward"]


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
    # the processes whose global batch mean and var are (synchronised BatchNorm), or None
    sync: collectives.SyncGroup | None = None



# ----------------------------------------------------------------------------------------
# Per-channel algebra: pyeuler.ops.norm_algebra.


def forward_math(kernels, x, weight, bias, shortcut, h, h_value, mean_in, var_in, eps, groups,
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


def sums_needed(needs, batch_stats: bool) -> bool:
    need_x, _, need_weight, need_bias, need_h = needs
    return need_weight or need_bias or need_h or (need_x and batch_stats)


class ApplyTerms(NamedTuple):
    """What the elementwise backward pass ``dx = a·g + b·(x − center) + c`` reads: the
    forward's scale and shift (they gate the ReLU) and the backward's coefficients."""

    scale: Tensor
    shift: Tensor
    a: Tensor
    b: Tensor
    c: Tensor
    center: Tensor


def backward_terms(kernels, dy, dmean, dvar, x, weight, bias, h, h_value, mean, var, mask, eps,
                    groups, relu, batch_stats, needs, affine=None):
    """The reduction pass and the per-channel algebra of the backward.

    Returns ``(terms, dweight, dbias, dh, sums)``: ``terms`` the :class:`ApplyTerms` of
    the elementwise pass ``dx = a·g + b·(x − center) + c``; ``sums`` =
    (Σg, Σg·(x − center)) or None when nothing needs them.  ``needs`` = (x, shortcut,
    weight, bias, h) flags.  ``affine``: the forward's coefficients (they only gate the ReLU
    here), recomputed when not given.
    """
    channels = x.shape[1]
    scale, shift = affine or kernels.forward_coefficients(mean, var, weight, bias, h, h_value,
                                                           eps, groups, channels)
    center = center_of(mean, groups, channels)
    sums = None
    if sums_needed(needs, batch_stats):
        sums = kernels.affine_act_backward_reduce(dy, x, scale, shift, center, mask, relu, groups > 0)
    a, b, c, dweight, dbias, dh = kernels.backward_coefficients(
        *(sums or (None, None)), dmean, dvar, weight, bias, h, var, h_value, eps, groups,
        batch_stats, needs, channels, statistic_count(x, groups))
    return ApplyTerms(scale, shift, a, b, c, center), dweight, dbias, dh, sums


def backward_math(kernels, dy, dmean, dvar, x, weight, bias, h, h_value, mean, var, mask, eps,
                   groups, relu, batch_stats, needs, affine=None, dx_addends=()):
    """Gradients (dx, dshortcut, dweight, dbias, dh) of the forward, and the reduce sums
    (see backward_terms); ``dx_addends``, at most two other shares of x's gradient, are
    added to dx in its pass (:mod:`pyeuler.ops.gradient_relay`)."""
    (scale, shift, a, b, c, center), dweight, dbias, dh, sums = backward_terms(
        kernels, dy, dmean, dvar, x, weight, bias, h, h_value, mean, var, mask, eps, groups, relu,
        batch_stats, needs, affine)
    need_x, need_shortcut = needs[0], needs[1]
    dx = dshortcut = None
    if need_x or need_shortcut:
        dx, dshortcut = kernels.affine_act_backward_apply(dy, x, scale, shift, mask, relu, a, b, c,
                                                          center, need_shortcut, *dx_addends)
        if not need_x:
            dx = None
    return (dx, dshortcut, dweight, dbias, dh), sums


class BackwardInputs(NamedTuple):
    """The tensors a first-order backward (norm_act_bwd or a fusion) read: what its own
    backward, the second order, differentiates.  ``mask``, ``scale``, ``shift`` only gate
    the ReLU (``scale``/``shift`` None: recomputed from the statistics)."""

    dy: Tensor
    dmean: Tensor | None
    dvar: Tensor | None
    x: Tensor
    weight: Tensor | None
    bias: Tensor | None
    h: Tensor | None
    mean: Tensor
    var: Tensor
    mask: Tensor | None = None
    scale: Tensor | None = None
    shift: Tensor | None = None


# The inputs the second order can differentiate, in BackwardInputs order.
DIFFERENTIABLE_INPUTS = BackwardInputs._fields[:9]


class NormConfig(NamedTuple):
    """The non-tensor arguments of one norm_act evaluation's backward."""

    h_value: float
    eps: float
    groups: int
    relu: bool
    batch_stats: bool
    needs: tuple[bool, ...]  # gradients wanted of (x, shortcut, weight, bias, h)


class OutputGrads(NamedTuple):
    """Gradients flowing into a first-order backward's outputs (None: none)."""

    dx: Tensor | None = None
    dshortcut: Tensor | None = None
    dweight: Tensor | None = None
    dbias: Tensor | None = None
    dh: Tensor | None = None
    sum_g: Tensor | None = None  # of the kept reduce sums Σg, Σg·(x − center)
    sum_gxc: Tensor | None = None


def algebra_for(backend: str):
    """Where a backward formula runs the per-channel algebra: the backend's one-launch
    kernels when it only computes (a first-order backward), else the torch ops of
    :mod:`pyeuler.ops.norm_algebra`: differentiable under create_graph (higher orders), and
    traceable while torch.compile / make_fx trace the formula (the compiler fuses them)."""
    tracing = torch.compiler.is_compiling() or get_proxy_mode() is not None
    return norm_algebra if torch.is_grad_enabled() or tracing else _kernels(backend)


def double_backward_math(inputs: BackwardInputs, sums, grads_in: OutputGrads,
                         config: NormConfig, wanted: set[str], backend: str, *,
                         dx_grad_scale: float = 1.0, x_grad_addend: Tensor | None = None) -> dict:
    """Gradients of a first-order backward's inputs (``wanted``, a subset of
    :data:`DIFFERENTIABLE_INPUTS`) from the gradients of its outputs: the second order of
    the op.  ``sums`` = the kept reduce sums (Σg, Σg·(x − center)) or None.

    The gradient of dx is ``dx_grad_scale·grads_in.dx``, and ``x_grad_addend`` (x's shape)
    is added to x's gradient: both in the elementwise pass, where they cost no pass of
    their own (the fused IE update's backward, whose output gradient is both).

    Two passes over the activations, like the first-order backward: a reduce of the
    gradient of dx (its sums are the gradients of a, b, c), then one elementwise pass giving
    the gradients of dy and x; both are fused-kernel ops.  In between, one per-channel pass,
    :func:`~pyeuler.ops.norm_algebra.double_backward_coefficients`: the backward's a and b,
    the VJP of its per-channel algebra and the centre's (mean's) gradient; one launch on the
    fused backends.  Everything stays differentiable, so third and higher orders are exact too.
    Returns ``{name: gradient}`` for the wanted inputs (None where zero).
    """
    dy, x, mean, var = inputs.dy, inputs.x, inputs.mean, inputs.var
    mask, scale, shift = inputs.mask, inputs.scale, inputs.shift
    g_dx, g_dshortcut, g_dweight, g_dbias, g_dh = grads_in[:5]
    h_value, eps, groups, relu, batch_stats, needs = config
    channels, count, per_sample = x.shape[1], statistic_count(x, groups), groups > 0
    if scale is None:  # they only gate the ReLU here: the forward's, or recomputed
        scale, shift = forward_coefficients(mean, var, inputs.weight, inputs.bias, inputs.h,
                                            h_value, eps, groups, channels)
    center = center_of(mean, groups, channels)
    sum_g, sum_gxc = sums if sums else (None, None)
    g_dx = g_dx if needs[0] else None
    cotangents = (None, None, None)
    if g_dx is not None:  # the gradients of a, b, c: Σddx·g, Σddx·(x − center), Σddx
        sums_dd = _double_backward_reduce_op(g_dx, dy, x, scale, shift, center, mask, relu,
                                             per_sample, backend)
        if dx_grad_scale != 1.0:  # per-channel vectors: one launch for the three
            sums_dd = torch._foreach_mul(sums_dd, dx_grad_scale)
        sum_dd, sum_dd_xc, sum_dd_g = sums_dd
        cotangents = (sum_dd_g, sum_dd_xc, sum_dd)
    param_grads = tuple(g if need else None
                        for g, need in zip((g_dweight, g_dbias, g_dh), needs[2:]))
    grads = algebra_for(backend).double_backward_coefficients(
        sum_g, sum_gxc, inputs.dmean, inputs.dvar, inputs.weight, inputs.bias, inputs.h, var,
        h_value, eps, groups, batch_stats, needs, channels, count, cotangents + param_grads,
        (grads_in.sum_g, grads_in.sum_gxc) if sums else (None, None))
    a, b, p, q = grads.pop("a"), grads.pop("b"), grads["sum_g"], grads["sum_gxc"]
    ddy = dxx = None
    if "dy" in wanted or "x" in wanted:
        ddy, dxx = _double_backward_apply_op(
            g_dx if g_dx is not None else torch.zeros_like(x), dy, x, scale, shift, mask, relu,
            a, b, torch.zeros_like(a) if p is None else p, torch.zeros_like(a) if q is None else q,
            center, g_dshortcut if needs[1] else None, dx_grad_scale if g_dx is not None else 1.0,
            x_grad_addend if "x" in wanted else None, backend)
    grads.update(dy=ddy, x=dxx)
    return {name: grads.get(name) for name in wanted}


# ----------------------------------------------------------------------------------------
# Fused backends as custom ops.  norm_act_fwd's backward is norm_act_bwd; norm_act_bwd's
# backward is written with the two double-backward kernel ops and torch ops on vectors; the
# kernel ops' own backward is the vector–Jacobian product of the eager primitive.  So every
# order of derivative is exact, under torch.compile too (no autograd.Function anywhere).


def _storage_id(t: Tensor) -> int:
    # the StorageImpl itself, not its data pointer: fake tensors (pyeuler.cost) have none
    return t.untyped_storage()._cdata


def unaliased(outputs, inputs):
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


def no_zero_gradients(ctx, *non_differentiable: Tensor) -> None:
    """Outputs nobody differentiates get no gradient, instead of autograd filling a zero
    tensor for each (a launch apiece): the backward formulas take None.  ``non_differentiable``
    outputs (the ReLU mask, the coefficients kept only to gate it) get none at all."""
    ctx.set_materialize_grads(False)
    if non_differentiable:
        ctx.mark_non_differentiable(*non_differentiable)


def register_eager_vjp_autograd(op_name: str, primitive) -> None:
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
    return unaliased(sums, (ddx, dy, x, scale, shift, center, mask))


@_double_backward_reduce_op.register_fake
def _(ddx, dy, x, scale, shift, center, mask, relu, per_sample, backend):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = x.shape[:2] if per_sample else x.shape[1:2]
    return tuple(x.new_empty(shape, dtype=acc) for _ in range(3))


register_eager_vjp_autograd("pyeuler::affine_act_double_backward_reduce",
                             primitives.affine_act_double_backward_reduce)


@torch.library.custom_op("pyeuler::affine_act_double_backward_apply", mutates_args=())
def _double_backward_apply_op(ddx: Tensor, dy: Tensor, x: Tensor, scale: Tensor, shift: Tensor,
                              mask: Tensor | None, relu: bool, a: Tensor, b: Tensor, p: Tensor,
                              q: Tensor, center: Tensor, ddshortcut: Tensor | None,
                              ddx_scale: float, dxx_addend: Tensor | None,
                              backend: str) -> tuple[Tensor, Tensor]:
    return tuple(_kernels(backend).affine_act_double_backward_apply(
        ddx, dy, x, scale, shift, mask, relu, a, b, p, q, center, ddshortcut, ddx_scale,
        dxx_addend))


@_double_backward_apply_op.register_fake
def _(ddx, dy, x, scale, shift, mask, relu, a, b, p, q, center, ddshortcut, ddx_scale, dxx_addend,
      backend):
    return torch.empty_like(x, dtype=dy.dtype), torch.empty_like(x)


register_eager_vjp_autograd("pyeuler::affine_act_double_backward_apply",
                             primitives.affine_act_double_backward_apply)


@torch.library.custom_op("pyeuler::norm_act_fwd", mutates_args=())
def norm_act_fwd(
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
    y, mean, var, mask, affine = forward_math(_kernels(backend), x, weight, bias, shortcut, h,
                                               h_value, mean_in, var_in, eps, groups, relu,
                                               save_mask)
    if mean_in is not None:  # outputs must not alias inputs
        mean, var = mean.clone(), var.clone()
    if mask is None:
        mask = x.new_empty(0, dtype=torch.bool)
    return y, mean, var, mask, *affine


@norm_act_fwd.register_fake
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
    no_zero_gradients(ctx, mask, scale, shift)
    mark_relaying(ctx)
    ctx.save_for_backward(x, weight, bias, h, mean, var, mask if save_mask else None, scale, shift)
    ctx.config = (h_value, eps, groups, relu, mean_in is None, backend)
    ctx.has_shortcut = shortcut is not None


def _fwd_backward(ctx, dy, dmean, dvar, dmask, dscale, dshift):
    x, weight, bias, h, mean, var, mask, scale, shift = ctx.saved_tensors
    addends = incoming(ctx, at_most=2)  # x's gradient shares from later readers, if relayed
    if dy is None:  # only the statistics are used downstream
        if dmean is None and dvar is None:
            return (hand_on(ctx, *addends),) + (None,) * 12
        dy = torch.zeros_like(x)
    h_value, eps, groups, relu, batch_stats, backend = ctx.config
    needs = (ctx.needs_input_grad[0], ctx.has_shortcut and ctx.needs_input_grad[3],
             ctx.needs_input_grad[1], ctx.needs_input_grad[2], ctx.needs_input_grad[4])
    dx, dshortcut, dweight, dbias, dh = norm_act_backward(
        dy, x, weight, bias, h, h_value, mean, var, mask, eps, groups, relu, batch_stats, needs,
        backend, dmean=dmean, dvar=dvar, affine=Affine(scale, shift),
        dx_addends=addends if needs[0] else ())
    # running statistics (mean_in, var_in) are buffers: no gradient.
    return (hand_on(ctx, dx), dweight, dbias, dshortcut, dh, None, None, None, None, None, None,
            None, None)


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
    dx_addend: Tensor | None,
    dx_addend2: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The five gradients, then the reduce sums (Σg, Σg·(x − center)), kept for the
    second order; empty tensors stand for None.  ``scale``/``shift``: the forward's
    coefficients (None: recomputed).  ``dx_addend``, ``dx_addend2`` (x's shape, optional):
    other shares of x's gradient, added to dx in its pass (:mod:`gradient_relay`)."""
    affine = None if scale is None else Affine(scale, shift)
    addends = tuple(t for t in (dx_addend, dx_addend2) if t is not None)
    grads, sums = backward_math(_kernels(backend), dy, dmean, dvar, x, weight, bias, h, h_value,
                                 mean, var, mask, eps, groups, relu, batch_stats, tuple(needs),
                                 affine, addends)
    return unaliased(_empty_if_none(grads + (sums or (None, None)), x),
                      (dy, dmean, dvar, x, weight, bias, h, mean, var, mask, scale, shift,
                       dx_addend, dx_addend2))


@_norm_act_bwd.register_fake
def _(dy, dmean, dvar, x, weight, bias, h, mean, var, mask, scale, shift, h_value, eps, groups,
      relu, batch_stats, needs, dx_addend, dx_addend2, backend):
    empty = x.new_empty(0)
    param = mean.new_empty(x.shape[1])
    sum_shape = (x.shape[1],) if groups == 0 else (x.shape[0], x.shape[1])
    sums = sums_needed(needs, batch_stats)
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
    no_zero_gradients(ctx)
    sums = output[5:] if output[5].numel() else (None, None)
    ctx.save_for_backward(*inputs[:12], *sums)
    h_value, eps, groups, relu, batch_stats, needs, *addends, backend = inputs[12:]
    ctx.config = NormConfig(h_value, eps, groups, relu, batch_stats, tuple(needs))
    ctx.addend_dtypes = tuple(None if t is None else t.dtype for t in addends)
    ctx.backend = backend


def none_if_empty(t: Tensor | None) -> Tensor | None:
    return t if t is not None and t.numel() else None


def wanted_inputs(ctx, inputs: BackwardInputs, positions: dict[str, int]) -> set[str]:
    """The inputs (of :data:`DIFFERENTIABLE_INPUTS`) whose gradients an op's backward must
    return; ``positions`` maps each to its argument index in the op."""
    return {name for name, i in positions.items()
            if ctx.needs_input_grad[i] and getattr(inputs, name) is not None}


# norm_act_bwd's differentiable arguments: the first nine, in BackwardInputs order
_BWD_POSITIONS = {name: i for i, name in enumerate(DIFFERENTIABLE_INPUTS)}


def _bwd_backward(ctx, *output_grads):
    *saved, sum_g, sum_gxc = ctx.saved_tensors
    inputs = BackwardInputs(*saved)
    sums = None if sum_g is None else (sum_g, sum_gxc)
    output_grads = OutputGrads(*map(none_if_empty, output_grads))
    grads = double_backward_math(inputs, sums, output_grads, ctx.config,
                                 wanted_inputs(ctx, inputs, _BWD_POSITIONS), ctx.backend)
    # dx = (...) + dx_addend + dx_addend2: each addend's gradient is dx's own
    addend_grads = tuple(
        output_grads.dx.to(dtype) if needed and output_grads.dx is not None else None
        for needed, dtype in zip(ctx.needs_input_grad[18:20], ctx.addend_dtypes))
    return (*(grads.get(name) for name in DIFFERENTIABLE_INPUTS), *(None,) * 9, *addend_grads,
            None)


torch.library.register_autograd("pyeuler::norm_act_bwd", _bwd_backward,
                                setup_context=_bwd_setup_context)



def norm_act_backward(dy, x, weight, bias, h, h_value, mean, var, mask, eps, groups, relu,
                      batch_stats, needs, backend, *, dmean=None, dvar=None,
                      affine: Affine | None = None, sync=None, dx_addends=()):
    """Explicit gradients ``(dx, dshortcut, dweight, dbias, dh)`` of :func:`norm_act`.

    Differentiable once more on every backend (so IE-Skip VJPs built from it have exact
    "unrolled" gradients).  ``needs`` flags (x, shortcut, weight, bias, h); unneeded
    entries are None.  ``affine``: the forward's coefficients (:class:`NormStats`), which
    spare recomputing them; they only gate the ReLU.  ``sync``: the
    :class:`~pyeuler.ops.sync.SyncGroup` of a synchronised BatchNorm evaluation
    (:attr:`NormStats.sync`), whose gradients then follow docs/semantics.md §10.
    ``dx_addends``: at most two other shares of x's gradient (x needed), added to dx
    (:mod:`pyeuler.ops.gradient_relay`), in its pass where the backward is fused.
    """
    if len(dx_addends) > 2 or (dx_addends and not needs[0]):
        raise ValueError("dx_addends takes at most two tensors, and only when dx is needed")
    if sync is not None:
        dx, *rest = collectives.run_eagerly(synced_norm_act_backward)(
            dy, x, weight, bias, h, h_value, mean, var, mask, eps, relu, needs, sync, backend,
            dmean=dmean, dvar=dvar, affine=affine)
        return (sum(dx_addends, dx) if dx is not None else None, *rest)
    backend = kernel_backend(backend, dy, x, weight, bias, h, mean, var, dmean, dvar)
    if backend == "eager":
        grads, _ = backward_math(primitives, dy, dmean, dvar, x, weight, bias, h, h_value, mean,
                                  var, mask, eps, groups, relu, batch_stats, tuple(needs), affine,
                                  dx_addends)
        return grads
    scale, shift = affine or (None, None)
    grads = _norm_act_bwd(dy, dmean, dvar, x, weight, bias, h, mean, var, mask, scale, shift,
                          h_value, eps, groups, relu, batch_stats, list(needs),
                          *(tuple(dx_addends) + (None, None))[:2], backend)
    return tuple(g if need else None for g, need in zip(grads[:5], needs))



@torch.library.custom_op("pyeuler::update_running_stats",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def update_running_stats_op(running_mean: Tensor, running_var: Tensor,
                             num_batches_tracked: Tensor | None, mean: Tensor, var: Tensor,
                             count: int, momentum: float | None, momentum_tensor: Tensor | None,
                             backend: str) -> None:
    rate = momentum_tensor if momentum_tensor is not None else momentum
    _kernels(backend).update_running_stats(running_mean, running_var, num_batches_tracked, mean,
                                           var, count, rate)


@update_running_stats_op.register_fake
def _(running_mean, running_var, num_batches_tracked, mean, var, count, momentum, momentum_tensor,
      backend):
    return None



# ----------------------------------------------------------------------------------------
# Synchronised BatchNorm (docs/semantics.md §10): the same passes, with the collectives of
# :mod:`pyeuler.ops.sync` between them, on every backend (eager: the passes in torch ops).
# Autograd functions rather than custom ops, because they hold a process group.  The
# per-channel algebra runs as the torch ops of norm_algebra, which take the global count as
# a tensor (reading it on the host would synchronise); the passes over the activations are
# the backend's kernels, their contract unchanged.


@torch.library.custom_op("pyeuler::affine_act_backward_reduce", mutates_args=())
def _backward_reduce_op(dy: Tensor, x: Tensor, scale: Tensor, shift: Tensor, center: Tensor,
                        mask: Tensor | None, relu: bool, backend: str) -> tuple[Tensor, Tensor]:
    sums = _kernels(backend).affine_act_backward_reduce(dy, x, scale, shift, center, mask, relu,
                                                        False)
    return unaliased(sums, (dy, x, scale, shift, center, mask))


@_backward_reduce_op.register_fake
def _(dy, x, scale, shift, center, mask, relu, backend):
    return tuple(scale.new_empty(x.shape[1]) for _ in range(2))


register_eager_vjp_autograd("pyeuler::affine_act_backward_reduce",
                             lambda *args: primitives.affine_act_backward_reduce(*args, False))


class _ActivationPasses(NamedTuple):
    """The passes over the activations a synchronised norm runs, per-channel ([C]) sums."""

    reduce: object  # (dy, x, scale, shift, center, mask, relu) → (Σg, Σg·(x − center))
    double_reduce: object  # (ddx, dy, x, scale, shift, center, mask, relu) → three sums
    double_apply: object  # affine_act_double_backward_apply's arguments


def _activation_passes(backend: str, x: Tensor):
    """``(kernels, passes)`` for a synchronised norm: the backend's kernel module, and the
    passes that must stay differentiable (higher orders): torch ops on ``"eager"`` (and for
    an empty shard, which launches nothing), the kernel custom ops on the fused backends."""
    if backend == "eager" or x.numel() == 0:
        return primitives, _ActivationPasses(
            lambda *a: primitives.affine_act_backward_reduce(*a, False),
            lambda *a: primitives.affine_act_double_backward_reduce(*a, False),
            primitives.affine_act_double_backward_apply)
    return _kernels(backend), _ActivationPasses(
        lambda *a: _backward_reduce_op(*a, backend),
        lambda *a: _double_backward_reduce_op(*a, False, backend),
        lambda *a: _double_backward_apply_op(*a, backend))


def _zeros_if_none(t: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if t is None else t


def _synced_sums(passes, dy, dmean, dvar, x, scale, shift, mean, mask, relu, sync):
    """This process's reduce sums and the all-reduced ``(Σg, Σg·(x − mean), dmean, dvar,
    count)`` of the global batch (absent statistic gradients are zeros)."""
    local = passes.reduce(dy, x, scale, shift, mean, mask, relu)
    count = torch.full((), float(statistic_count(x, 0) if x.numel() else 0), dtype=mean.dtype,
                       device=mean.device)
    return local, collectives.all_reduce_sum(
        (*local, _zeros_if_none(dmean, mean), _zeros_if_none(dvar, mean), count), sync)


def _synced_coefficients(total_sums, local_sums, weight, bias, h, var, h_value, eps, needs):
    """``(a, b, c)`` of the input gradient from the global batch's sums, and the parameter
    gradients (this process's share) from its own sums."""
    sum_g, sum_gxc, dmean, dvar, count = total_sums
    channels = var.shape[0]
    a, b, c, *_ = norm_algebra.backward_coefficients(
        sum_g, sum_gxc, dmean, dvar, weight, bias, h, var, h_value, eps, 0, True,
        (needs[0], False, False, False, False), channels, count)
    *_, dweight, dbias, dh = norm_algebra.backward_coefficients(
        *local_sums, None, None, weight, bias, h, var, h_value, eps, 0, True,
        (False, False, *needs[2:]), channels, count)
    return (a, b, c), (dweight, dbias, dh)


class SyncedNormActBackward(torch.autograd.Function):
    """The input and parameter gradients of a synchronised :class:`SyncedNormAct`: its
    reduce pass, one all-reduce, the per-channel algebra on the global sums (this process's
    own sums for the parameters' shares), its apply pass.  Its backward, the second order,
    is the double backward's reduce and apply passes with one all-reduce between them (the
    gradients reaching the all-reduced quantities, summed: the adjoint of a sum)."""

    @staticmethod
    def forward(ctx, dy, dmean, dvar, x, weight, bias, h, mean, var, mask, scale, shift,
                h_value, eps, relu, needs, sync, backend):
        kernels, passes = _activation_passes(backend, x)
        local, total = _synced_sums(passes, dy, dmean, dvar, x, scale, shift, mean, mask, relu,
                                    sync)
        (a, b, c), params = _synced_coefficients(total, local, weight, bias, h, var, h_value, eps,
                                                 needs)
        dx = dshortcut = None
        if needs[0] or needs[1]:
            dx, dshortcut = kernels.affine_act_backward_apply(dy, x, scale, shift, mask, relu, a,
                                                              b, c, mean, needs[1])
        ctx.save_for_backward(dy, dmean, dvar, x, weight, bias, h, mean, var, mask, scale, shift)
        ctx.config = (h_value, eps, relu, needs, sync, backend)
        ctx.sums = (local, total)
        ctx.set_materialize_grads(False)
        return (dx if needs[0] else None, dshortcut, *params)

    @staticmethod
    def backward(ctx, g_dx, g_dshortcut, g_dweight, g_dbias, g_dh):
        dy, dmean, dvar, x, weight, bias, h, mean, var, mask, scale, shift = ctx.saved_tensors
        h_value, eps, relu, needs, sync, backend = ctx.config
        _, passes = _activation_passes(backend, x)
        if torch.is_grad_enabled():  # a third order: the sums must carry their graph
            local, total = _synced_sums(passes, dy, dmean, dvar, x, scale, shift, mean, mask,
                                        relu, sync)
        else:
            local, total = ctx.sums
        sum_g, sum_gxc, total_dmean, total_dvar, count = total
        channels = x.shape[1]
        cot_a = cot_b = cot_c = None
        if g_dx is not None:  # the gradients of a, b, c: Σddx·g, Σddx·(x − mean), Σddx
            cot_c, cot_b, cot_a = passes.double_reduce(g_dx, dy, x, scale, shift, mean, mask, relu)
        config = (h_value, eps, 0, True)
        of_coefficients = norm_algebra.backward_coefficients_vjp(
            sum_g, sum_gxc, total_dmean, total_dvar, weight, bias, h, var, *config,
            (needs[0], False, False, False, False), channels, count,
            (cot_a, cot_b, cot_c, None, None, None))
        of_params = norm_algebra.backward_coefficients_vjp(
            *local, None, None, weight, bias, h, var, *config, (False, False, *needs[2:]),
            channels, count, (None, None, None, g_dweight, g_dbias, g_dh))
        # the global sums and statistic gradients are sums over processes: their gradients
        # reach every process's addend summed over processes
        p, q, d_dmean, d_dvar = collectives.all_reduce_sum(
            [_zeros_if_none(of_coefficients[k], mean)
             for k in ("sum_g", "sum_gxc", "dmean", "dvar")], sync)
        p = norm_algebra.add_optional(p, of_params["sum_g"])
        q = norm_algebra.add_optional(q, of_params["sum_gxc"])
        a, b, *_ = norm_algebra.backward_coefficients(
            sum_g, sum_gxc, total_dmean, total_dvar, weight, bias, h, var, *config,
            (needs[0], False, False, False, False), channels, count)
        ddy = dxx = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
            ddy, dxx = passes.double_apply(
                _zeros_if_none(g_dx, x), dy, x, scale, shift, mask, relu, a, b, p, q, mean,
                g_dshortcut if needs[1] else None, 1.0, None)
        # the mean is the centre of dx's b·(x − mean) and of the sum Σg·(x − mean)
        d_mean = -(q * local[0])
        if cot_c is not None:
            d_mean = d_mean - b * cot_c
        grads = {name: norm_algebra.add_optional(of_coefficients[name], of_params[name])
                 for name in ("weight", "bias", "h", "var")}
        return (ddy, d_dmean if dmean is not None else None,
                d_dvar if dvar is not None else None, dxx, grads["weight"], grads["bias"],
                grads["h"], d_mean, grads["var"], *(None,) * 9)


def synced_norm_act_backward(dy, x, weight, bias, h, h_value, mean, var, mask, eps, relu, needs,
                             sync, backend, *, dmean=None, dvar=None,
                             affine: Affine | None = None):
    """:func:`norm_act_backward` for a synchronised BatchNorm evaluation (``sync``, a
    :class:`pyeuler.ops.sync.SyncGroup`; ``mean``, ``var`` the global batch's): the exact
    gradients of ``L = Σ_r L_r``, differentiable to every order."""
    if affine is None:
        affine = Affine(*(t.detach() for t in forward_coefficients(
            mean, var, weight, bias, h, h_value, eps, 0, x.shape[1])))
    return SyncedNormActBackward.apply(dy, dmean, dvar, x, weight, bias, h, mean, var, mask,
                                       affine.scale, affine.shift, h_value, eps, relu,
                                       tuple(needs), sync, backend)


class SyncedNormAct(torch.autograd.Function):
    """``act(shortcut + h·BN(x))`` normalised with the global batch's statistics: the
    statistics pass on this process's shard, one all-gather and Chan merge
    (:func:`pyeuler.ops.sync.merged_statistics`), the forward coefficients and the
    elementwise pass.  Returns ``(y, mean, var, count, scale, shift, mask)`` with the global
    mean, (biased) variance and count; mean and var are differentiable, as in norm_act_fwd.
    Its backward is :class:`SyncedNormActBackward`."""

    @staticmethod
    def forward(ctx, x, weight, bias, shortcut, h, h_value, eps, relu, save_mask, sync, backend):
        kernels, _ = _activation_passes(backend, x)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        if x.numel():
            mean, var = kernels.norm_stats(x, 0)
            count = statistic_count(x, 0)
        else:  # an empty shard adds nothing, but joins the collective
            mean = var = torch.zeros(x.shape[1], dtype=acc, device=x.device)
            count = 0
        count, mean, var = collectives.merged_statistics(
            torch.full((), float(count), dtype=acc, device=x.device), mean, var, sync)
        scale, shift = kernels.forward_coefficients(mean, var, weight, bias, h, h_value, eps, 0,
                                                    x.shape[1])
        y, mask = kernels.affine_act_forward(x, scale, shift, shortcut, relu, save_mask)
        ctx.save_for_backward(x, weight, bias, h, mean, var, mask, scale, shift)
        ctx.config = (h_value, eps, relu, sync, backend, shortcut is not None)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(t for t in (count, scale, shift, mask) if t is not None))
        return y, mean, var, count, scale, shift, mask

    @staticmethod
    def backward(ctx, dy, dmean, dvar, dcount, dscale, dshift, dmask):
        x, weight, bias, h, mean, var, mask, scale, shift = ctx.saved_tensors
        h_value, eps, relu, sync, backend, has_shortcut = ctx.config
        if dy is None and dmean is None and dvar is None:
            return (None,) * 11
        needs = (ctx.needs_input_grad[0], has_shortcut and ctx.needs_input_grad[3],
                 ctx.needs_input_grad[1], ctx.needs_input_grad[2], ctx.needs_input_grad[4])
        dx, dshortcut, dweight, dbias, dh = synced_norm_act_backward(
            _zeros_if_none(dy, x), x, weight, bias, h, h_value, mean, var, mask, eps, relu,
            needs, sync, backend, dmean=dmean, dvar=dvar, affine=Affine(scale, shift))
        return (dx, dweight, dbias, dshortcut, dh, *(None,) * 6)
