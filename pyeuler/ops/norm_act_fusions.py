"""The norm_act ops fused with their neighbours (docs/semantics.md §4, §5): ``conv(ReLU(norm(x)))``,
its VJP counterpart ``Wᵀ⋆(ReLU∘norm)ᵀ dy`` and the IE-Skip update ``x − 2γ·(e − θ·v)`` fused
into the last pass of the branch VJP.  Each keeps x rather than an activation for its
backward and recomputes what it needs there: "unrolled" IE-Skips keep several branch
evaluations alive at once, so memory decides.  ``conv(ReLU(norm(x)))``'s first-order
backward (:func:`_norm_relu_conv_backward`) has its reduction pass write the activation
again, no pass of its own; the others spend one elementwise pass.  Each is a custom op
whose backward is written with the kernel ops of :mod:`pyeuler.ops.norm_act_ops`, exact to
every order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from pyeuler.backend import kernel_module as _kernels
from pyeuler.ops import primitives
from pyeuler.ops.dispatch import forward_mode_active, func_transform_active, kernel_backend
from pyeuler.ops.gradient_relay import hand_on, incoming, mark_relaying
from pyeuler.ops.norm_act_ops import (Affine, BackwardInputs, NormConfig, NormStats, OutputGrads,
                                      algebra_for, backward_math, backward_terms,
                                      double_backward_math, forward_math, no_zero_gradients,
                                      none_if_empty, norm_act_backward,
                                      register_eager_vjp_autograd, sums_needed, unaliased,
                                      wanted_inputs)
from pyeuler.ops.norm_algebra import center_of, forward_coefficients, statistic_count

__all__ = ["cached_weight_casts", "conv_weight_for", "norm_relu_backward_conv", "norm_relu_backward_ie_update"]


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


register_eager_vjp_autograd("pyeuler::affine_relu", _affine_relu_eager)


# The casts of conv weights to the autocast dtype made inside one scope (an IE-Skip call),
# innermost scope last.  Torch's autocast caches its own casts of leaf weights the same way
# until the autocast region exits; the casts here (the convolutions and their transposes
# inside custom ops) cannot reach that cache.
_open_cast_scopes: list[dict] = []


@contextlib.contextmanager
def cached_weight_casts() -> Iterator[None]:
    """Within this block :func:`conv_weight_for` casts each weight once per dtype and grad
    mode (an IE-Skip with K steps uses each conv weight 3K + 1 times): one cast kernel, and
    one cast of the summed gradient in the backward instead of one per use.  A weight
    changed in place (its version counter moved) is cast anew.  Not under torch.compile,
    whose graphs deduplicate the casts themselves."""
    _open_cast_scopes.append({})
    try:
        yield
    finally:
        _open_cast_scopes.pop()


# The cast of a conv weight to the autocast dtype, whose backward casts the summed gradient
# back into the weight's own memory format.  Torch's cast keeps the gradient's strides, and
# the weight gradient of a transposed convolution's double backward (the VJP inside an
# unrolled IE step) comes transposed: the sum takes that layout, and AccumulateGrad then
# copies the float32 gradient once more into the parameter's.  A reverse-mode formula only,
# as for every custom op: forward mode and torch.func transforms take torch's cast.


@torch.library.custom_op("pyeuler::cast_weight", mutates_args=())
def _cast_weight_op(weight: Tensor, dtype: torch.dtype) -> Tensor:
    return weight.to(dtype, copy=True)  # a copy even in weight's dtype: outputs never alias


@_cast_weight_op.register_fake
def _(weight, dtype):
    return torch.empty_like(weight, dtype=dtype)


def _memory_format_of(weight: Tensor) -> torch.memory_format:
    """The format ``weight`` is dense in; for another layout (a view, an expanded weight)
    ``preserve_format``: the gradient's strides, as torch's cast gives them."""
    if weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if weight.dim() == 5 and weight.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format if weight.is_contiguous() else torch.preserve_format


def _cast_weight_setup(ctx, inputs, output):
    weight, _ = inputs
    ctx.dtype, ctx.memory_format = weight.dtype, _memory_format_of(weight)


def _cast_weight_backward(ctx, grad):
    return grad.to(ctx.dtype, memory_format=ctx.memory_format), None


torch.library.register_autograd("pyeuler::cast_weight", _cast_weight_backward,
                                setup_context=_cast_weight_setup)


def conv_weight_for(x: Tensor, weight: Tensor) -> Tensor:
    """The conv weight as a convolution on ``x`` uses it: cast to the autocast dtype when
    autocast is on for x's device (as ``F.conv*d`` would, differentiably, the gradient in
    the weight's memory format; cached inside :func:`cached_weight_casts`), else as is."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        if (weight.dtype == dtype or weight.is_inference() or torch.compiler.is_compiling()
                or func_transform_active() or forward_mode_active(weight)):
            return weight.to(dtype)
        if not _open_cast_scopes:
            return _cast_weight_op(weight, dtype)
        scope = _open_cast_scopes[-1]
        key = (id(weight), dtype, torch.is_grad_enabled())
        cached = scope.get(key)
        if cached is not None and cached[0] is weight and cached[1] == weight._version:
            return cached[2]
        cast = _cast_weight_op(weight, dtype)
        scope[key] = (weight, weight._version, cast)
        return cast
    if weight.dtype != x.dtype:
        raise TypeError(f"conv weight is {weight.dtype} but x is {x.dtype} (outside autocast "
                        "they must match)")
    return weight


def _conv_args(conv_weight: Tensor, stride, padding, dilation, conv_groups):
    spatial = conv_weight.dim() - 2
    return list(stride), list(padding), list(dilation), False, [0] * spatial, conv_groups


@torch.library.custom_op("pyeuler::norm_relu_conv", mutates_args=())
def norm_relu_conv(
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
    u, mean, var, _, affine = forward_math(_kernels(backend), x, weight, bias, None, None, 1.0,
                                            mean_in, var_in, eps, groups, True, False)
    if mean_in is not None:  # outputs must not alias inputs
        mean, var = mean.clone(), var.clone()
    # under autocast the convolution runs in the weight's (autocast) dtype, as F.conv*d would
    z = torch.convolution(u.to(conv_weight.dtype), conv_weight, None,
                          *_conv_args(conv_weight, stride, padding, dilation, conv_groups))
    return z, mean, var, *affine


@norm_relu_conv.register_fake
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
    no_zero_gradients(ctx, scale, shift)
    mark_relaying(ctx)
    ctx.z_shape = z.shape
    ctx.save_for_backward(x, weight, bias, mean, var, conv_weight, scale, shift)
    ctx.config = (eps, groups, mean_in is None, _conv_args(conv_weight, stride, padding, dilation,
                                                           conv_groups), backend)


@torch.library.custom_op("pyeuler::norm_relu_conv_backward", mutates_args=())
def _norm_relu_conv_backward(
    dz: Tensor,
    dmean: Tensor | None,
    dvar: Tensor | None,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    scale: Tensor,
    shift: Tensor,
    conv_weight: Tensor,
    eps: float,
    groups: int,
    batch_stats: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    conv_groups: int,
    needs: list[bool],
    dx_addend: Tensor | None,
    dx_addend2: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias, dconv_weight)`` of ``conv(ReLU(norm(x)))``, first order only;
    ``needs`` flags (x, weight, bias), an unneeded gradient is empty; ``dx_addend`` and
    ``dx_addend2`` (x's shape, optional) are added to dx in its pass (relayed shares,
    :mod:`gradient_relay`).
    The reduce pass of the norm's backward also writes the recomputed activation the weight
    gradient reads, so x is read once for both."""
    kernels = _kernels(backend)
    conv_args = _conv_args(conv_weight, stride, padding, dilation, conv_groups)
    du = _conv_input_grad(dz, x.shape, conv_weight, conv_args).to(x.dtype)
    channels = x.shape[1]
    center = center_of(mean, groups, channels)
    sum_g, sum_gxc, u = kernels.affine_act_backward_reduce_recompute(
        du, x, scale, shift, center, True, groups > 0, conv_weight.dtype)
    dconv = torch.ops.aten.convolution_backward(dz, u, conv_weight, None, *conv_args,
                                                [False, True, False])[1]
    need_x, need_weight, need_bias = needs
    a, b, c, dweight, dbias, _ = kernels.backward_coefficients(
        sum_g, sum_gxc, dmean, dvar, weight, bias, None, var, 1.0, eps, groups, batch_stats,
        (need_x, False, need_weight, need_bias, False), channels, statistic_count(x, groups))
    dx = x.new_empty(0)
    if need_x:
        dx, _ = kernels.affine_act_backward_apply(du, x, scale, shift, None, True, a, b, c, center,
                                                  False, dx_addend, dx_addend2)
    empty = mean.new_empty(0)
    return unaliased((dx, dweight if need_weight else empty,
                      dbias if need_bias else empty.clone(), dconv),
                     (dz, dmean, dvar, x, weight, bias, mean, var, scale, shift, conv_weight,
                      dx_addend, dx_addend2))


@_norm_relu_conv_backward.register_fake
def _(dz, dmean, dvar, x, weight, bias, mean, var, scale, shift, conv_weight, eps, groups,
      batch_stats, stride, padding, dilation, conv_groups, needs, dx_addend, dx_addend2, backend):
    need_x, need_weight, need_bias = needs
    param = mean.new_empty(x.shape[1])
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            param.clone() if need_weight else mean.new_empty(0),
            param.clone() if need_bias else mean.new_empty(0),
            torch.empty_like(conv_weight))


def _conv_backward(ctx, dz, dmean, dvar, dscale, dshift):
    x, weight, bias, mean, var, conv_weight, scale, shift = ctx.saved_tensors
    eps, groups, batch_stats, conv_args, backend = ctx.config
    addends = incoming(ctx, at_most=2)  # x's gradient shares from later readers, if relayed
    if dz is None:  # only the statistics are used downstream
        if dmean is None and dvar is None:
            return (hand_on(ctx, *addends),) + (None,) * 12
        dz = x.new_zeros(ctx.z_shape, dtype=conv_weight.dtype)
    need_x, need_weight, need_bias, need_conv = (ctx.needs_input_grad[i] for i in (0, 1, 2, 7))
    need_input = need_x or need_weight or need_bias
    needs = (need_x, False, need_weight, need_bias, False)
    if (not torch.is_grad_enabled() and need_conv and need_input
            and sums_needed(needs, batch_stats)):
        # first order: one pass over x gives the reduce sums and the activation (the
        # differentiable path below recomputes the activation by a pass of its own)
        stride, padding, dilation, _, _, conv_groups = conv_args
        dx, dweight, dbias, dconv = _norm_relu_conv_backward(
            dz, dmean, dvar, x, weight, bias, mean, var, scale, shift, conv_weight, eps, groups,
            batch_stats, stride, padding, dilation, conv_groups, [need_x, need_weight, need_bias],
            *(addends + (None, None))[:2], backend)
        return (hand_on(ctx, none_if_empty(dx)), none_if_empty(dweight), none_if_empty(dbias),
                None, None, None, None, dconv, None, None, None, None, None)
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
            needs, backend, dmean=dmean, dvar=dvar, affine=affine)
    return (hand_on(ctx, dx, *addends), dweight, dbias, None, None, None, None, dconv, None, None, None,
            None, None)


torch.library.register_autograd("pyeuler::norm_relu_conv", _conv_backward,
                                setup_context=_conv_setup_context)


# Its VJP counterpart, ``Wᵀ⋆(ReLU∘norm)ᵀ dy`` (the input gradient of the conv that produced
# the norm's input), keeps dy and x for the backward and either keeps the norm's input
# gradient too (a first-order backward reads it) or recomputes it there from the saved reduce
# sums: one elementwise pass instead of a stored tensor.


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


register_eager_vjp_autograd("pyeuler::affine_act_backward_apply", _backward_apply_eager)

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
    keep_input_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(Wᵀ⋆dx, Σg, Σg·(x − center), dx)``, dx the input gradient of ``ReLU(norm(x))``; the
    sums (empty when the backward needs none) are kept to recompute dx, dx itself is
    returned (for the backward to keep) iff ``keep_input_grad``, else empty.  ``scale``/
    ``shift``: the forward's coefficients, which gate the ReLU."""
    (dx, *_), sums = backward_math(_kernels(backend), dy, dmean, dvar, x, weight, bias, None, 1.0,
                                    mean, var, None, eps, groups, True, batch_stats,
                                    _INPUT_GRAD_ONLY, Affine(scale, shift))
    conv_args = _conv_args(conv_weight, stride, padding, dilation, conv_groups)
    grad_input = _conv_input_grad(dx.to(conv_weight.dtype), input_shape, conv_weight, conv_args)
    inputs = (dy, dmean, dvar, x, weight, bias, mean, var, scale, shift, conv_weight)
    return unaliased((grad_input,) + (sums or (x.new_empty(0), x.new_empty(0)))
                     + (dx if keep_input_grad else x.new_empty(0),), inputs)


@_norm_relu_backward_conv.register_fake
def _(dy, dmean, dvar, x, weight, bias, mean, var, scale, shift, eps, groups, batch_stats,
      conv_weight, input_shape, stride, padding, dilation, conv_groups, keep_input_grad,
      backend):
    conv_args = _conv_args(conv_weight, stride, padding, dilation, conv_groups)
    grad_input = _conv_input_grad(torch.empty_like(x, dtype=conv_weight.dtype), input_shape,
                                  conv_weight, conv_args)
    sum_shape = (x.shape[1],) if groups == 0 else (x.shape[0], x.shape[1])
    sums = sums_needed(_INPUT_GRAD_ONLY, batch_stats)
    return (grad_input, mean.new_empty(sum_shape if sums else (0,)),
            mean.new_empty(sum_shape if sums else (0,)),
            torch.empty_like(x) if keep_input_grad else x.new_empty(0))


# norm_relu_backward_conv's differentiable arguments (of BackwardInputs) and their positions
_BACKWARD_CONV_POSITIONS = {"dy": 0, "dmean": 1, "dvar": 2, "x": 3, "weight": 4, "bias": 5,
                            "mean": 6, "var": 7}


def _backward_conv_setup_context(ctx, inputs, output):
    (dy, dmean, dvar, x, weight, bias, mean, var, scale, shift, eps, groups, batch_stats,
     conv_weight, input_shape, stride, padding, dilation, conv_groups, keep_input_grad,
     backend) = inputs
    kept_input_grad = output[3]
    no_zero_gradients(ctx, kept_input_grad)
    mark_relaying(ctx)
    sums = output[1:3] if output[1].numel() else (None, None)
    ctx.save_for_backward(dy, dmean, dvar, x, weight, bias, mean, var, scale, shift, conv_weight,
                          *sums, kept_input_grad if keep_input_grad else None)
    ctx.config = (eps, groups, batch_stats,
                  _conv_args(conv_weight, stride, padding, dilation, conv_groups), backend)


def _backward_conv_backward(ctx, grad_input_grad, sum_g_grad, sum_gxc_grad, _):
    (dy, dmean, dvar, x, weight, bias, mean, var, scale, shift, conv_weight, sum_g,
     sum_gxc, kept_input_grad) = ctx.saved_tensors
    eps, groups, batch_stats, conv_args, backend = ctx.config
    sums = None if sum_g is None else (sum_g, sum_gxc)
    # the map dx ↦ Wᵀ⋆dx is linear in dx and in W; its adjoint in dx is the convolution.
    dx_grad = conv_weight_grad = None
    if grad_input_grad is not None:
        dx_grad = torch.convolution(grad_input_grad, conv_weight, None, *conv_args).to(x.dtype)
    if ctx.needs_input_grad[13] and grad_input_grad is not None:
        if kept_input_grad is not None and not torch.is_grad_enabled():
            dx = kept_input_grad  # first order: the kept tensor (a constant to autograd)
        else:
            channels = x.shape[1]
            a, b, c, *_ = algebra_for(backend).backward_coefficients(
                *(sums or (None, None)), dmean, dvar, weight, bias, None, var, 1.0, eps,
                groups, batch_stats, _INPUT_GRAD_ONLY, channels, statistic_count(x, groups))
            dx = _backward_apply_op(dy, x, scale, shift, None, True, a, b, c,
                                    center_of(mean, groups, channels), backend)
        conv_weight_grad = torch.ops.aten.convolution_backward(
            dx.to(conv_weight.dtype), grad_input_grad, conv_weight, None, *conv_args,
            [False, True, False])[1]
    inputs = BackwardInputs(dy, dmean, dvar, x, weight, bias, None, mean, var, None, scale, shift)
    grads = double_backward_math(
        inputs, sums, OutputGrads(dx=dx_grad, sum_g=none_if_empty(sum_g_grad),
                                  sum_gxc=none_if_empty(sum_gxc_grad)),
        NormConfig(1.0, eps, groups, True, batch_stats, _INPUT_GRAD_ONLY),
        wanted_inputs(ctx, inputs, _BACKWARD_CONV_POSITIONS), backend)
    grads["x"] = hand_on(ctx, grads.get("x"), *incoming(ctx))
    return (*(grads.get(name) for name in _BACKWARD_CONV_POSITIONS), *(None,) * 5,
            conv_weight_grad, *(None,) * 7)


torch.library.register_autograd("pyeuler::norm_relu_backward_conv", _backward_conv_backward,
                                setup_context=_backward_conv_setup_context)


# The IE-Skip update fused into the last pass of the branch VJP, ``x − 2γ·(e − θ·v)`` with v
# the norm's input gradient, differentiable (for "unrolled"): v is never written or read.  With
# a backward to come it reads the residual's term ``−2γ·e`` (pyeuler.ops.ie_skip writes it
# beside e) rather than e: the term's gradient is then the output's own, and e keeps a single
# reader.


def _ie_update_pass(kernels, dy, x, weight, bias, mean, var, residual, eps, groups,
                    batch_stats, step_size, theta, residual_is_term, affine):
    (scale, shift, a, b, c, center), *_, sums = backward_terms(
        kernels, dy, None, None, x, weight, bias, None, 1.0, mean, var, None, eps, groups, True,
        batch_stats, _INPUT_GRAD_ONLY, affine)
    out = kernels.affine_act_backward_apply_ie_update(dy, x, scale, shift, None, True, a, b, c,
                                                      center, residual, step_size, theta,
                                                      residual_is_term)
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
    residual: Tensor,
    eps: float,
    groups: int,
    batch_stats: bool,
    step_size: float,
    theta: float,
    residual_is_term: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(x − 2γ·(e − θ·v), Σg, Σg·(x − center))`` from ``residual`` = e or (with
    ``residual_is_term``) its term ``−2γ·e``; the sums (empty when not needed) are kept for
    the backward.  ``scale``/``shift``: the forward's coefficients (the ReLU gate)."""
    out, sums = _ie_update_pass(_kernels(backend), dy, x, weight, bias, mean, var, residual,
                                eps, groups, batch_stats, step_size, theta, residual_is_term,
                                Affine(scale, shift))
    return unaliased((out,) + (sums or (x.new_empty(0), x.new_empty(0))),
                      (dy, x, weight, bias, mean, var, scale, shift, residual))


@_norm_relu_backward_ie_update.register_fake
def _(dy, x, weight, bias, mean, var, scale, shift, residual, eps, groups, batch_stats,
      step_size, theta, residual_is_term, backend):
    sum_shape = (x.shape[1],) if groups == 0 else (x.shape[0], x.shape[1])
    sums = sums_needed(_INPUT_GRAD_ONLY, batch_stats)
    return (torch.empty_like(x), mean.new_empty(sum_shape if sums else (0,)),
            mean.new_empty(sum_shape if sums else (0,)))


# norm_relu_backward_ie_update's differentiable arguments (of BackwardInputs) and positions
_IE_UPDATE_POSITIONS = {"dy": 0, "x": 1, "weight": 2, "bias": 3, "mean": 4, "var": 5}


def _ie_update_setup_context(ctx, inputs, output):
    (dy, x, weight, bias, mean, var, scale, shift, residual, eps, groups, batch_stats,
     step_size, theta, residual_is_term, backend) = inputs
    no_zero_gradients(ctx)
    mark_relaying(ctx)
    sums = output[1:] if output[1].numel() else (None, None)
    ctx.save_for_backward(dy, x, weight, bias, mean, var, scale, shift, *sums)
    ctx.config = (eps, groups, batch_stats, step_size, theta, backend)
    ctx.residual_coef = 1.0 if residual_is_term else -2.0 * step_size
    ctx.residual_dtype = residual.dtype


def _ie_update_backward(ctx, out_grad, sum_g_grad, sum_gxc_grad):
    dy, x, weight, bias, mean, var, scale, shift, sum_g, sum_gxc = ctx.saved_tensors
    eps, groups, batch_stats, step_size, theta, backend = ctx.config
    sums = None if sum_g is None else (sum_g, sum_gxc)
    if out_grad is None:  # only the kept sums are used downstream
        out_grad = torch.zeros_like(x)
    inputs = BackwardInputs(dy, None, None, x, weight, bias, None, mean, var, None, scale, shift)
    # out = x + residual_coef·residual + 2γθ·v: v's gradient is 2γθ·out_grad, and x's own
    # share, out_grad, is summed into x's gradient; both inside the second order's
    # elementwise pass.  The term's gradient is out_grad itself.
    grads = double_backward_math(
        inputs, sums, OutputGrads(dx=out_grad, sum_g=none_if_empty(sum_g_grad),
                                  sum_gxc=none_if_empty(sum_gxc_grad)),
        NormConfig(1.0, eps, groups, True, batch_stats, _INPUT_GRAD_ONLY),
        wanted_inputs(ctx, inputs, _IE_UPDATE_POSITIONS), backend,
        dx_grad_scale=2.0 * step_size * theta, x_grad_addend=out_grad)
    shares = incoming(ctx)  # taken even when unused, so that the relay holds no share
    g_x = hand_on(ctx, grads["x"], *shares) if ctx.needs_input_grad[1] else None
    g_residual = None
    if ctx.needs_input_grad[8]:
        g_residual = out_grad if ctx.residual_coef == 1.0 else ctx.residual_coef * out_grad
        g_residual = g_residual.to(ctx.residual_dtype)
    return (grads.get("dy"), g_x, grads.get("weight"), grads.get("bias"), grads.get("mean"),
            grads.get("var"), None, None, g_residual, *(None,) * 7)


torch.library.register_autograd("pyeuler::norm_relu_backward_ie_update", _ie_update_backward,
                                setup_context=_ie_update_setup_context)



def _affine_of(stats: NormStats, norm: torch.nn.Module) -> Affine:
    """The forward's coefficients of ``ReLU(norm(x))`` kept in ``stats``, else recomputed."""
    if stats.affine is not None:
        return stats.affine
    groups = norm.num_groups if isinstance(norm, torch.nn.GroupNorm) else 0
    coefficients = forward_coefficients(stats.mean, stats.var, norm.weight, norm.bias, None, 1.0,
                                         norm.eps, groups, stats.x.shape[1])
    return Affine(*(t.detach() for t in coefficients))


def norm_relu_backward_ie_update(dy: Tensor, stats: NormStats, norm: torch.nn.Module,
                                 residual: Tensor, step_size: float, theta: float, backend: str,
                                 residual_is_term: bool = False) -> Tensor:
    """The IE step ``x − 2γ·(e − θ·v)`` with ``v`` the input gradient of ``ReLU(norm(x))`` at
    ``stats`` for output gradient ``dy``, in one fused pass that never writes v.
    ``residual`` is e, or with ``residual_is_term`` its term ``−2γ·e``
    (:func:`pyeuler.ops.ie_skip.ie_residual_with_term`).  Differentiable to any order, like
    :func:`norm_act_backward` ("unrolled" IE-Skips use it too)."""
    groups = norm.num_groups if isinstance(norm, torch.nn.GroupNorm) else 0
    if stats.mask is not None:
        raise ValueError("norm_relu_backward_ie_update recomputes the ReLU mask from x: stats "
                         "must come from an evaluation without a shortcut")
    backend = kernel_backend(backend, dy, stats.x, norm.weight, norm.bias, stats.mean, stats.var,
                             residual)
    if stats.sync is not None:  # unfused: v from the synchronised backward, then the update
        v, *_ = norm_act_backward(dy, stats.x, norm.weight, norm.bias, None, 1.0, stats.mean,
                                  stats.var, None, norm.eps, groups, True, True, _INPUT_GRAD_ONLY,
                                  backend, affine=stats.affine, sync=stats.sync)
        if not residual_is_term:
            return primitives.ie_update(stats.x, residual, v, step_size, theta)
        acc = torch.float64 if stats.x.dtype == torch.float64 else torch.float32
        return (stats.x.to(acc) + residual.to(acc)
                + (2.0 * step_size * theta) * v.to(acc)).to(stats.x.dtype)
    if backend == "eager":  # torch ops: autograd differentiates them directly
        out, _ = _ie_update_pass(primitives, dy, stats.x, norm.weight, norm.bias, stats.mean,
                                 stats.var, residual, norm.eps, groups, stats.batch_stats,
                                 step_size, theta, residual_is_term, stats.affine)
        return out
    scale, shift = _affine_of(stats, norm)
    out, _, _ = _norm_relu_backward_ie_update(dy, stats.x, norm.weight, norm.bias, stats.mean,
                                              stats.var, scale, shift, residual, norm.eps,
                                              groups, stats.batch_stats, step_size, theta,
                                              residual_is_term, backend)
    return out


def norm_relu_backward_conv(dy: Tensor, stats: NormStats, norm: torch.nn.Module,
                            conv: torch.nn.Module, input_shape, backend: str,
                            keep_input_grad: bool = False) -> Tensor:
    """``Wᵀ⋆v``: the input gradient of ``conv`` (which produced ``stats.x``) where ``v`` is
    the input gradient of ``ReLU(norm(x))`` at ``stats`` for output gradient ``dy``; in the
    convolution's compute dtype (the autocast dtype under autocast).

    On the fused backends v is kept for a first-order backward with ``keep_input_grad``,
    else recomputed there (one elementwise pass, and always for a differentiable
    backward); differentiable to any order, like :func:`norm_act_backward`.
    """
    groups = norm.num_groups if isinstance(norm, torch.nn.GroupNorm) else 0
    conv_weight = conv_weight_for(dy, conv.weight)
    backend = kernel_backend(backend, dy, stats.x, norm.weight, norm.bias, stats.mean, stats.var,
                             conv_weight)
    if backend == "eager" or stats.sync is not None:  # synchronised: unfused
        dx, *_ = norm_act_backward(dy, stats.x, norm.weight, norm.bias, None, 1.0, stats.mean,
                                   stats.var, stats.mask, norm.eps, groups, True, stats.batch_stats,
                                   _INPUT_GRAD_ONLY, backend, affine=stats.affine, sync=stats.sync)
        conv_args = _conv_args(conv_weight, conv.stride, conv.padding, conv.dilation, conv.groups)
        return _conv_input_grad(dx.to(conv_weight.dtype), input_shape, conv_weight, conv_args)
    if stats.mask is not None:
        raise ValueError("norm_relu_backward_conv recomputes the ReLU mask from x: stats must "
                         "come from an evaluation without a shortcut")
    scale, shift = _affine_of(stats, norm)
    grad_input, *_ = _norm_relu_backward_conv(
        dy, None, None, stats.x, norm.weight, norm.bias, stats.mean, stats.var, scale, shift,
        norm.eps, groups, stats.batch_stats, conv_weight, list(input_shape), list(conv.stride),
        list(conv.padding), list(conv.dilation), conv.groups, keep_input_grad, backend)
    return grad_input

