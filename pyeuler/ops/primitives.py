"""Kernel primitives: the small contract every fused backend implements.

A normalisation + affine + (scaled) residual add + ReLU, forward and backward, factors into
four memory-bound passes over the activation tensor, and two small passes over per-channel
vectors between them: :func:`forward_coefficients` (statistics → the forward's scale and
shift), :func:`backward_coefficients` (reduce sums → the backward's coefficients and the
parameter gradients), for the second order :func:`backward_coefficients_vjp`, and
BatchNorm's :func:`update_running_stats`, defined in :mod:`pyeuler.ops.norm_algebra`.  A
kernel backend runs each as one launch; as torch ops each would be several tiny ones.
Synchronised BatchNorm's collectives run between these passes, in :mod:`pyeuler.ops.sync`,
shared by all backends (docs/semantics.md §10).

Tensors are ``(N, C, *spatial)`` with 0–3 spatial dims, contiguous or channels_last, in
float32 / float16 / bfloat16 (float64 too for this eager version).  Per-channel
coefficients are float32 of shape ``[C]`` ("per channel") or ``[N, C]`` ("per sample and
channel", used by GroupNorm).  All accumulation is in float32 (float64 for float64 input).

NaN and ±inf propagate as in torch: the ReLU keeps a NaN (``torch.relu``), and its gate
``m`` is torch's ``threshold_backward`` rule, ``m = not (y <= 0)``: a NaN output passes its
gradient, and a closed gate gives exactly 0 (a select, not ``dy·m``, so a NaN or inf ``dy``
there does not leak through).  The one deliberate deviation from torch is in
:func:`norm_stats`.

This module is the readable definition: each kernel backend (``pyeuler.triton``,
``pyeuler.cuda``) exposes functions with exactly these names and signatures, and is
tested against these.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The per-channel passes: the readable versions are the algebra itself.
from pyeuler.ops.norm_algebra import (backward_coefficients, backward_coefficients_vjp,
                                      double_backward_coefficients, forward_coefficients,
                                      update_running_stats)

__all__ = [
    "forward_coefficients",
    "backward_coefficients",
    "backward_coefficients_vjp",
    "double_backward_coefficients",
    "update_running_stats",
    "norm_stats",
    "norm_stats_and_coefficients",
    "affine_act_forward",
    "affine_act_backward_reduce",
    "affine_act_backward_reduce_recompute",
    "affine_act_backward_apply",
    "affine_act_backward_apply_ie_update",
    "affine_act_double_backward_reduce",
    "affine_act_double_backward_apply",
    "ie_residual",
    "ie_residual_with_term",
    "ie_residual_with_term_adjoint",
    "ie_update",
]


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _coef(v: Tensor, x: Tensor) -> Tensor:
    """Broadcast a [C] or [N, C] coefficient against (N, C, *spatial)."""
    spatial = (1,) * (x.dim() - 2)
    if v.dim() == 1:
        return v.view(1, -1, *spatial)
    return v.view(v.shape[0], v.shape[1], *spatial)


def norm_stats(x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Biased mean and variance.

    groups == 0: BatchNorm statistics per channel over (N, *spatial) -> two [C] tensors.
    groups >= 1: GroupNorm statistics per (sample, group) over (C/groups, *spatial)
    -> two [N, groups] tensors.  Kernels use a Welford / Chan merge, never E[x²]−E[x]².

    A variance of +inf (the accumulation overflowed, e.g. bfloat16 values near 1e30) is
    returned as NaN.  This deviates from torch on purpose: torch keeps the inf, so
    ``invstd = 0`` and the normalised output is a confident, finite ``relu(bias)``; the NaN
    makes the output NaN instead, which finite-loss guards catch.  Inputs holding NaN or
    ±inf give a NaN variance anyway.
    """
    xf = x.to(_acc_dtype(x))
    if groups == 0:
        dims = [0] + list(range(2, x.dim()))
    else:
        xf, dims = xf.reshape(x.shape[0], groups, -1), [2]
    # Two passes (the mean, then the mean square deviation): as accurate as Welford, and on
    # CPU several times faster than torch.var_mean, forward and backward.  Sums divided
    # per statistic: the backward of a sum broadcasts without a pass, mean()'s divides
    # every element.
    count = 1
    for d in dims:  # a loop, not math.prod over a generator: torch.compile traces it
        count *= xf.shape[d]
    mean = xf.sum(dims, keepdim=True) / count
    var = (xf - mean).square().sum(dims) / count
    return mean.reshape(var.shape), var.masked_fill(var == float("inf"), float("nan"))


def norm_stats_and_coefficients(x: Tensor, groups: int, weight: Tensor | None,
                                bias: Tensor | None, h: Tensor | None, h_value: float,
                                eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(mean, var, scale, shift)``: :func:`norm_stats` and the
    :func:`forward_coefficients` of those statistics, which kernel backends compute in the
    statistics' final (merge) stage instead of a launch of their own.  ``scale``/``shift``
    are ``[C]`` (BatchNorm) or ``[N, C]`` (GroupNorm)."""
    mean, var = norm_stats(x, groups)
    return mean, var, *forward_coefficients(mean, var, weight, bias, h, h_value, eps, groups,
                                            x.shape[1])


def _relu_gate(x: Tensor, scale: Tensor, shift: Tensor, mask: Tensor | None, relu: bool):
    """The ReLU's gate: the saved boolean ``mask`` when given, else the pre-activation
    ``scale·x + shift`` (closed where it is <= 0) when ``relu``, else None (always open).
    Piecewise constant, so it carries no gradient (computed from detached operands)."""
    if mask is not None:
        return mask
    if not relu:
        return None
    return _coef(scale.detach(), x) * x.detach().to(_acc_dtype(x)) + _coef(shift.detach(), x)


def _gated(v: Tensor, gate: Tensor | None) -> Tensor:
    """``v`` where the gate is open, exactly 0 where it is closed (whatever v holds there):
    torch's ``threshold_backward`` rule on a pre-activation (one vectorised pass; a NaN
    pre-activation passes v), a select on a boolean mask."""
    if gate is None:
        return v
    if gate.dtype == torch.bool:
        return torch.where(gate, v, 0.0)  # keeps v's layout, unlike masked_fill
    return torch.ops.aten.threshold_backward(v, gate, 0.0)


def affine_act_forward(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    shortcut: Tensor | None,
    relu: bool,
    save_mask: bool,
) -> tuple[Tensor, Tensor | None]:
    """``y = act(shortcut + scale·x + shift)``; shortcut optional, act = ReLU if ``relu``.

    Returns y (x's dtype and memory format) and, iff ``save_mask``, the boolean gate
    ``not (y <= 0)`` (true where y > 0 or y is NaN).
    """
    acc = _acc_dtype(x)
    y = torch.addcmul(_coef(shift, x), _coef(scale, x), x.to(acc))  # one pass: scale·x + shift
    if shortcut is not None:
        y = y + shortcut.to(acc)
    if relu:
        y = torch.relu(y)
    mask = ~(y <= 0) if save_mask else None
    return y.to(x.dtype), mask


def affine_act_backward_reduce(
    dy: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    center: Tensor,
    mask: Tensor | None,
    relu: bool,
    per_sample: bool,
) -> tuple[Tensor, Tensor]:
    """Sums of ``g`` and ``g·(x − center)`` where ``g = dy·m``.

    ``m`` is ``mask`` when given, else ``not (scale·x + shift <= 0)`` when ``relu``, else 1;
    ``dy·m`` is a select (0 where the gate is closed, even for a NaN ``dy``).
    Sums run over (N, *spatial) -> [C] tensors, or over (*spatial) -> [N, C] when
    ``per_sample``.  ``center`` is [C] or [N, C] (the mean the statistics used).
    """
    acc = _acc_dtype(x)
    g = _gated(dy.to(acc), _relu_gate(x, scale, shift, mask, relu))
    xc = x.to(acc) - _coef(center, x)
    dims = list(range(2, x.dim())) if per_sample else [0] + list(range(2, x.dim()))
    if not dims:  # per_sample with no spatial dims: nothing to sum
        return g, g * xc
    return g.sum(dims), (g * xc).sum(dims)


def affine_act_backward_reduce_recompute(
    dy: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    center: Tensor,
    relu: bool,
    per_sample: bool,
    y_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(Σg, Σg·(x − center), y)``: the sums of :func:`affine_act_backward_reduce` (gate
    recomputed from ``scale``/``shift``, no saved mask) and the forward's activation
    ``y = act(scale·x + shift)``, computed in the accumulation dtype and rounded once to
    ``y_dtype``, in x's memory format.

    One pass for what a recomputing backward needs twice: a convolution's weight gradient
    reads y, the norm's input gradient the sums (:mod:`pyeuler.ops.norm_act_fusions`).
    """
    sums = affine_act_backward_reduce(dy, x, scale, shift, center, None, relu, per_sample)
    acc = _acc_dtype(x)
    y = torch.addcmul(_coef(shift, x), _coef(scale, x), x.to(acc))
    if relu:
        y = torch.relu(y)
    return *sums, y.to(y_dtype)


def _times_nonzero(k: Tensor, v: Tensor, x: Tensor) -> Tensor:
    """``k·v`` for a per-channel coefficient k, exactly 0 where k is 0 even where v is NaN
    or ±inf: a zero coefficient is an absent term (in eval mode, with running statistics,
    dx does not depend on x or on the sums), as in torch's BatchNorm backward."""
    return torch.where(_coef(k, x) == 0, 0.0, _coef(k, x) * v)


def _times_centered(k: Tensor, x: Tensor, center: Tensor) -> Tensor:
    """``k·(x − center)``, exactly 0 where the coefficient k is 0 (:func:`_times_nonzero`)."""
    return _times_nonzero(k, x.to(_acc_dtype(x)) - _coef(center, x), x)


def _gated_input_grad(dy, x, scale, shift, mask, relu, a, b, c, center):
    """``g = dy·m`` and ``a·g + b·(x − center) + c`` in the accumulation dtype."""
    acc = _acc_dtype(x)
    g = _gated(dy.to(acc), _relu_gate(x, scale, shift, mask, relu))
    return g, _coef(a, x) * g + _times_centered(b, x, center) + _coef(c, x)


def affine_act_backward_apply(
    dy: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    mask: Tensor | None,
    relu: bool,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    center: Tensor,
    want_dshortcut: bool,
    dx_addend: Tensor | None = None,
    dx_addend2: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``dx = ((a·g + b·(x − center) + c) + dx_addend) + dx_addend2`` with ``g = dy·m``
    (``m`` as in the reduce).

    a, b, c, center are [C] or [N, C].  dx has x's dtype and memory format; the shortcut's
    gradient ``g`` (dy's dtype) is returned iff ``want_dshortcut``.  ``dx_addend`` and
    ``dx_addend2`` (each optional, x's shape, any floating dtype and layout) are other
    shares of x's gradient, added in that order before dx is rounded: x's gradient summed
    where it is computed, not by passes of its own (:mod:`pyeuler.ops.gradient_relay`).
    """
    g, dx = _gated_input_grad(dy, x, scale, shift, mask, relu, a, b, c, center)
    for addend in (dx_addend, dx_addend2):
        if addend is not None:
            dx = dx + addend.to(dx.dtype)
    return dx.to(x.dtype), (g.to(dy.dtype) if want_dshortcut else None)


def affine_act_backward_apply_ie_update(
    dy: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    mask: Tensor | None,
    relu: bool,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    center: Tensor,
    residual: Tensor,
    step_size: float,
    theta: float,
    residual_is_term: bool,
) -> Tensor:
    """The IE-Skip update fused into the last backward pass of its VJP.

    With ``v = a·g + b·(x − center) + c`` (:func:`affine_act_backward_apply`'s dx, here the
    VJP ``J_fᵀe`` of a pre-activation branch whose input is ``x``), returns the step
    ``x − 2γ·(e − θ·v)`` in x's dtype and memory format without materialising v: reads dy,
    x, the residual once and writes one tensor, instead of two passes and two writes.
    ``residual`` is e, or with ``residual_is_term`` its term ``−2γ·e``
    (:func:`ie_residual_with_term`: the step is then ``x + residual + 2γθ·v``).
    """
    _, v = _gated_input_grad(dy, x, scale, shift, mask, relu, a, b, c, center)
    acc = _acc_dtype(x)
    residual_coef = 1.0 if residual_is_term else -2.0 * step_size
    return (x.to(acc) + residual_coef * residual.to(acc)
            + (2.0 * step_size * theta) * v).to(x.dtype)


def affine_act_double_backward_reduce(
    ddx: Tensor,
    dy: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    center: Tensor,
    mask: Tensor | None,
    relu: bool,
    per_sample: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sums of ``ddx``, ``ddx·(x − center)`` and ``ddx·g`` (``g = dy·m``, ``m`` as in
    :func:`affine_act_backward_reduce`).

    The reduction pass of the backward of :func:`affine_act_backward_apply`: ``ddx`` is the
    gradient flowing into its ``dx = a·g + b·(x − center) + c``, and the three sums are the
    gradients of ``c``, ``b`` and ``a``.  Same reduction sets and shapes as the first-order
    reduce ([C], or [N, C] when ``per_sample``).
    """
    acc = _acc_dtype(x)
    g = _gated(dy.to(acc), _relu_gate(x, scale, shift, mask, relu))
    dd = ddx.to(acc)
    xc = x.to(acc) - _coef(center, x)
    terms = (dd, dd * xc, dd * g)
    dims = list(range(2, x.dim())) if per_sample else [0] + list(range(2, x.dim()))
    if not dims:
        return terms
    return tuple(t.sum(dims) for t in terms)


def affine_act_double_backward_apply(
    ddx: Tensor,
    dy: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    mask: Tensor | None,
    relu: bool,
    a: Tensor,
    b: Tensor,
    p: Tensor,
    q: Tensor,
    center: Tensor,
    ddshortcut: Tensor | None,
    ddx_scale: float = 1.0,
    dxx_addend: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The elementwise pass of the backward of :func:`affine_act_backward_apply`.

    ``dx = a·g + b·(x − center) + c`` with ``g = dy·m`` (``m`` piecewise constant, so its
    derivative is zero), and the reduce sums ``S1 = Σg``, ``S2 = Σg·(x − center)`` that the
    per-channel coefficients were computed from.  Given ``ddx`` (the gradient of dx is
    ``ddx_scale·ddx``), ``p`` and ``q`` (the gradients of S1 and S2) and ``ddshortcut`` (the
    gradient of the shortcut's gradient ``g``; optional), returns

        ddy = m·(a·dd + p + q·(x − center) + ddshortcut)      (dy's dtype and layout)
        dxx = b·dd + q·g + dxx_addend                         (x's dtype and layout)

    with ``dd = ddx_scale·ddx``: the gradients of dy and of x (at fixed ``center``; the
    per-channel algebra adds the centre's share).  ``dxx_addend`` (optional, x's shape) is a
    gradient of x from elsewhere summed in the same pass, and ``ddx_scale`` a factor that
    would otherwise cost a pass over ddx: the IE update ``x − 2γ·(e − θ·dx)`` passes its own
    output gradient as both (docs/semantics.md §3).  A zero b or q contributes exactly 0 (an
    absent term), as in ``_times_nonzero``.  a, b, p, q, center are [C] or [N, C].
    """
    acc = _acc_dtype(x)
    m = _relu_gate(x, scale, shift, mask, relu)
    g = _gated(dy.to(acc), m)
    dd = ddx.to(acc) if ddx_scale == 1.0 else ddx_scale * ddx.to(acc)
    ddy = _coef(a, x) * dd + _coef(p, x) + _times_centered(q, x, center)
    if ddshortcut is not None:
        ddy = ddy + ddshortcut.to(acc)
    ddy = _gated(ddy, m)
    dxx = _times_nonzero(b, dd, x) + _times_nonzero(q, g, x)
    if dxx_addend is not None:
        dxx = dxx + dxx_addend.to(acc)
    return ddy.to(dy.dtype), dxx.to(x.dtype)


def ie_residual(x: Tensor, c: Tensor, fx: Tensor, theta: float) -> Tensor:
    """IE-Skip residual ``e = x − c − θ·f(x)`` (docs/semantics.md §2)."""
    acc = _acc_dtype(x)
    return (x.to(acc) - c.to(acc) - theta * fx.to(acc)).to(x.dtype)


def ie_residual_with_term(x: Tensor, c: Tensor, fx: Tensor, theta: float,
                          step_size: float) -> tuple[Tensor, Tensor]:
    """``(e, −2γ·e)``: the residual ``e = x − c − θ·f(x)`` and its term in the IE step
    ``x − 2γ·(e − θ·v)`` (docs/semantics.md §2), both in x's dtype, from one pass.

    The VJP reads e and the step reads the term (:func:`affine_act_backward_apply_ie_update`),
    two tensors with one reader each: their gradients reach this op apart, and its adjoint
    (:func:`ie_residual_with_term_adjoint`) combines them in one pass, where a single e read
    twice would have the autograd engine sum them, and a scale and a negation follow."""
    acc = _acc_dtype(x)
    e = x.to(acc) - c.to(acc) - theta * fx.to(acc)
    return e.to(x.dtype), (-2.0 * step_size * e).to(x.dtype)


def ie_residual_with_term_adjoint(de: Tensor, dterm: Tensor, theta: float, step_size: float,
                                  dx_addend: Tensor | None = None
                                  ) -> tuple[Tensor, Tensor, Tensor]:
    """The transpose of :func:`ie_residual_with_term`'s linear map: from the gradients of
    ``e`` and of its term (one shape), those of x, c and f(x), in de's dtype::

        u = de − 2γ·dterm,    dx = u + dx_addend,    dc = −u,    dfx = −θ·u

    ``dx_addend`` (optional, de's shape, any floating dtype and layout): another share of
    x's gradient, added before dx is rounded (:mod:`pyeuler.ops.gradient_relay`).  Linear
    in (de, dterm), so its VJP is :func:`ie_residual_with_term`'s map again."""
    acc = _acc_dtype(de)
    u = de.to(acc) - (2.0 * step_size) * dterm.to(acc)
    dx = u if dx_addend is None else u + dx_addend.to(acc)
    return dx.to(de.dtype), (-u).to(de.dtype), (-theta * u).to(de.dtype)


def ie_update(x: Tensor, e: Tensor, v: Tensor, step_size: float, theta: float) -> Tensor:
    """IE-Skip gradient step ``x − 2γ·(e − θ·v)`` with ``v = J_fᵀ e`` (docs/semantics.md §2)."""
    acc = _acc_dtype(x)
    return (x.to(acc) - 2.0 * step_size * (e.to(acc) - theta * v.to(acc))).to(x.dtype)
