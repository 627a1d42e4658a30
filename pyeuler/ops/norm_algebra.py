"""The per-channel algebra of normalisation + affine + step + ReLU (docs/semantics.md §1, §3, §4).

Everything here is arithmetic on per-channel ``[C]`` or per-(sample, channel) ``[N, C]``
vectors (GroupNorm statistics are ``[N, groups]``): the half of each pass that is not a
sweep over the activations.  The forward's coefficients ``scale = h·w·invstd``,
``shift = h·(b − mean·w·invstd)``; the backward's ``(a, b, c)`` of
``dx = a·g + b·(x − center) + c`` and the parameter gradients, from the reduce sums
``Σg, Σg·(x − center)`` (BatchNorm's BNᵀ, GroupNorm's per-group analogue); and the
vector–Jacobian product of the latter, the per-channel half of the second order.

These torch-op versions are the readable contract (float64 capable, differentiable to
every order); kernel backends implement :func:`forward_coefficients` and
:func:`backward_coefficients` under the same names and signatures (:mod:`pyeuler.ops.primitives`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["DOUBLE_BACKWARD_KEYS", "VJP_KEYS", "add_optional", "backward_coefficients",
           "backward_coefficients_vjp", "center_of", "double_backward_coefficients",
           "double_backward_presence", "expand_groups", "forward_coefficients", "statistic_count",
           "update_running_stats", "vjp_presence"]


def _per_channel(v: Tensor | None, channels: int, like: Tensor) -> Tensor:
    """A [C] float tensor from None (→ ones), a scalar or a [C] tensor."""
    if v is None:
        return torch.ones(channels, dtype=like.dtype, device=like.device)
    return v.to(like.dtype).expand(channels) if v.dim() == 0 else v.to(like.dtype)


def expand_groups(v: Tensor, channels: int) -> Tensor:
    """[N, groups] group statistic → [N, C] per-channel coefficient."""
    return v.repeat_interleave(channels // v.shape[1], dim=1)


def _step(h: Tensor | None, h_value: float, channels: int, like: Tensor) -> Tensor | float:
    """The step factor: a [C] tensor when learnable, else the float itself."""
    return _per_channel(h, channels, like) if h is not None else h_value


def _times(factor: Tensor | float | None, v: Tensor) -> Tensor:
    """``factor·v``; None or a float 1 (no weight, h = 1) costs no kernel launch.  The
    per-channel algebra runs once per norm and derivative order, so its launches add up."""
    if factor is None or (isinstance(factor, float) and factor == 1.0):
        return v
    return factor * v


def forward_coefficients(mean, var, weight, bias, h, h_value, eps, groups, channels):
    """``(scale, shift)`` with ``scale·x + shift = h·(w·(x − mean)·invstd + b)``,
    ``invstd = (var + eps)^(−1/2)``.

    mean, var: [C] (BatchNorm) or [N, groups] (GroupNorm, ``groups`` > 0); weight, bias:
    [C] or None (1, 0); h: a learnable [C] or 0-dim tensor, or None for the float
    ``h_value``.  Returns two [C] (or [N, C]) tensors in var's dtype.
    """
    invstd = torch.rsqrt(var + eps)
    step = _step(h, h_value, channels, invstd)
    weight = None if weight is None else _per_channel(weight, channels, invstd)
    invstd_c = invstd if groups == 0 else expand_groups(invstd, channels)
    scale = _times(step, _times(weight, invstd_c))
    shift = -scale * center_of(mean, groups, channels)
    if bias is not None:
        shift = shift + _times(step, _per_channel(bias, channels, invstd))
    return scale, shift


def center_of(mean: Tensor, groups: int, channels: int) -> Tensor:
    return mean if groups == 0 else expand_groups(mean, channels)


def statistic_count(x: Tensor, groups: int) -> int:
    """Elements behind one statistic; 1 for an empty batch, whose placeholder statistics
    (:func:`norm_act`) only ever scale empty tensors, so the algebra stays finite."""
    spatial = math.prod(x.shape[2:])
    count = x.shape[0] * spatial if groups == 0 else (x.shape[1] // groups) * spatial
    return max(count, 1)


def _sum_to(v: Tensor, h: Tensor) -> Tensor:
    """Reduce a per-channel gradient to the shape of the learnable step ``h``."""
    return v.sum().reshape(h.shape) if h.dim() == 0 else v


def backward_coefficients(sum_g, sum_gxc, dmean, dvar, weight, bias, h, var, h_value, eps, groups,
                          batch_stats, needs, channels, count):
    """The per-channel half of the backward (docs/semantics.md §3's BNᵀ): from the reduce sums
    ``Σg``, ``Σg·(x − center)`` to ``(a, b, c)`` of ``dx = a·g + b·(x − center) + c`` and
    the parameter gradients ``(dweight, dbias, dh)`` (None where not in ``needs``).

    Pure arithmetic on [C] / [N, C] vectors; :func:`backward_coefficients_vjp` is its derivative.
    ``dmean``/``dvar`` are gradients flowing into the batch statistics themselves (IE-Skip
    VJPs use them), or None.  ``count`` (values behind each statistic) is an int, or a 0-dim
    tensor: a synchronised BatchNorm's global count (docs/semantics.md §10), kept on the device.
    """
    invstd = torch.rsqrt(var + eps)
    w = None if weight is None else _per_channel(weight, channels, invstd)
    step = _step(h, h_value, channels, invstd)
    step_w = _times(step, w) if w is not None else step  # h·w: the scale of dx̂ = h·w·g
    invstd_c = invstd if groups == 0 else expand_groups(invstd, channels)
    need_x, _, need_weight, need_bias, need_h = needs
    per_sample = groups > 0
    a = _times(step_w, invstd_c)
    b = c = torch.zeros_like(a)
    dweight = dbias = dh = None
    if sum_g is not None:
        # Σ dŷ·x̂ per (sample,) channel, where ŷ = w·x̂ + b is the normalised output.
        sum_gxhat = sum_gxc * invstd_c
        if need_weight:
            dweight = _times(step, sum_gxhat)
            dweight = dweight.sum(0) if per_sample else dweight
        if need_bias:
            dbias = _times(step, sum_g)
            dbias = dbias.sum(0) if per_sample else dbias
        if need_h:
            dh_c = _times(w, sum_gxhat)
            if bias is not None:
                dh_c = dh_c + _per_channel(bias, channels, invstd) * sum_g
            dh = _sum_to(dh_c.sum(0) if per_sample else dh_c, h)
        if need_x and batch_stats:
            # means over the statistic's set of dx̂ = h·w·g and of dx̂·x̂, times −invstd.
            mean_dxhat = _times(step_w, sum_g)
            mean_dxhat_xhat = _times(step_w, sum_gxhat)
            if per_sample:
                groups_shape = (var.shape[0], groups, channels // groups)
                mean_dxhat = expand_groups(mean_dxhat.reshape(groups_shape).sum(2), channels)
                mean_dxhat_xhat = expand_groups(mean_dxhat_xhat.reshape(groups_shape).sum(2),
                                                 channels)
            c = mean_dxhat * (-invstd_c / count)
            b = mean_dxhat_xhat * (invstd_c * invstd_c * (-1.0 / count))
    if need_x and batch_stats:
        if dmean is not None:
            c = c + center_of(dmean, groups, channels) / count
        if dvar is not None:
            b = b + center_of(dvar, groups, channels) * (2.0 / count)
    return a, b, c, dweight, dbias, dh


def add_optional(total: Tensor | None, term: Tensor | None) -> Tensor | None:
    if term is None:
        return total
    return term if total is None else total + term


# The gradients backward_coefficients_vjp returns, in this order.
VJP_KEYS = ("sum_g", "sum_gxc", "dmean", "dvar", "weight", "bias", "h", "var")


def vjp_presence(sum_g, dmean, dvar, weight, bias, h, batch_stats, needs, cotangents):
    """Which of :data:`VJP_KEYS` :func:`backward_coefficients_vjp` returns (its non-None
    entries: what the cotangents reach), and the cotangents that reach anything (the rest
    None).  Depends on presence only, never on values: kernels allocate from it."""
    cot_a, cot_b, cot_c, cot_dweight, cot_dbias, cot_dh = cotangents
    sums = sum_g is not None
    centered = bool(needs[0]) and bool(batch_stats)
    if not centered:  # b and c are constants (zero) then
        cot_b = cot_c = None
    cot_dweight = cot_dweight if sums and needs[2] else None
    cot_dbias = cot_dbias if sums and needs[3] else None
    cot_dh = cot_dh if sums and needs[4] else None
    learnable = weight is not None or h is not None
    statistic_sums = sums and centered and (cot_c is not None or cot_b is not None)
    want_sum_gxc = sums and (cot_dweight is not None or cot_dh is not None
                             or (centered and cot_b is not None))
    want_step_w = learnable and (cot_a is not None or statistic_sums)
    present = (
        sums and (cot_dbias is not None or (cot_dh is not None and bias is not None)
                  or (centered and cot_c is not None)),
        want_sum_gxc,
        centered and dmean is not None and cot_c is not None,
        centered and dvar is not None and cot_b is not None,
        weight is not None and (cot_dh is not None or want_step_w),
        bias is not None and cot_dh is not None,
        h is not None and (cot_dweight is not None or cot_dbias is not None or want_step_w),
        cot_a is not None or want_sum_gxc or statistic_sums,
    )
    return present, (cot_a, cot_b, cot_c, cot_dweight, cot_dbias, cot_dh)


def backward_coefficients_vjp(sum_g, sum_gxc, dmean, dvar, weight, bias, h, var, h_value, eps, groups,
                      batch_stats, needs, channels, count, cotangents):
    """The vector–Jacobian product of :func:`backward_coefficients`, written out.

    ``cotangents`` = gradients of (a, b, c, dweight, dbias, dh), None where absent.
    Returns the gradients of ``sum_g, sum_gxc, dmean, dvar, weight, bias, h, var`` (a dict,
    None where zero).  The mean does not enter the coefficients (the centre is the caller's).
    By hand rather than ``torch.func.vjp``: this runs for every norm in every second-order
    backward, and a functorch trace there costs a millisecond of host time per call.
    Torch ops only, so it is itself differentiable (third order).
    """
    cot_a, cot_b, cot_c, cot_dweight, cot_dbias, cot_dh = cotangents
    need_x, _, need_weight, need_bias, need_h = needs
    per_sample = groups > 0

    def over_samples(v):  # [N, C] → [C] where the coefficient is per channel
        return v.sum(0) if per_sample and v.dim() == 2 else v

    def to_groups(v):  # adjoint of expand_groups: [N, C] → [N, groups]
        return v.reshape(v.shape[0], groups, channels // groups).sum(2) if per_sample else v

    def group_sum(v):  # the reduction of backward_coefficients' means (self-adjoint)
        return expand_groups(to_groups(v), channels) if per_sample else v

    invstd = torch.rsqrt(var + eps)
    invstd_c = invstd if groups == 0 else expand_groups(invstd, channels)
    w = None if weight is None else _per_channel(weight, channels, invstd)
    step = _step(h, h_value, channels, invstd)
    step_w = _times(step, w) if w is not None else step
    d_invstd_c = d_step_w = d_step = d_w = d_bias = None
    d_sum_g = d_sum_gxhat = d_dmean = d_dvar = None
    learnable_step_w = w is not None or h is not None  # else h·w is a constant float
    if cot_a is not None:  # a = h·w·invstd
        d_invstd_c = _times(step_w, cot_a)
        if learnable_step_w:
            d_step_w = over_samples(cot_a * invstd_c)
    if sum_g is not None:
        sum_gxhat = sum_gxc * invstd_c
        if need_weight and cot_dweight is not None:  # dweight = Σₙ h·Σg·x̂
            d_step = add_optional(d_step, over_samples(cot_dweight * sum_gxhat))
            d_sum_gxhat = add_optional(d_sum_gxhat, _times(step, cot_dweight))
        if need_bias and cot_dbias is not None:  # dbias = Σₙ h·Σg
            d_step = add_optional(d_step, over_samples(cot_dbias * sum_g))
            d_sum_g = add_optional(d_sum_g, _times(step, cot_dbias))
        if need_h and cot_dh is not None:  # dh = Σ (w·Σg·x̂ + b·Σg)
            cot_dh_c = cot_dh.expand(channels) if cot_dh.dim() == 0 else cot_dh
            if w is not None:
                d_w = add_optional(d_w, over_samples(cot_dh_c * sum_gxhat))
            d_sum_gxhat = add_optional(d_sum_gxhat, _times(w, cot_dh_c))
            if bias is not None:
                d_bias = over_samples(cot_dh_c * sum_g)
                d_sum_g = add_optional(d_sum_g, _per_channel(bias, channels, invstd) * cot_dh_c)
        if need_x and batch_stats:
            mean_dxhat = group_sum(_times(step_w, sum_g))
            mean_dxhat_xhat = group_sum(_times(step_w, sum_gxhat))
            if cot_c is not None:  # c = −invstd·Σ(h·w·Σg)/n
                d_invstd_c = add_optional(d_invstd_c, cot_c * mean_dxhat * (-1.0 / count))
                u = group_sum(cot_c * (-invstd_c / count))
                if learnable_step_w:
                    d_step_w = add_optional(d_step_w, over_samples(u * sum_g))
                d_sum_g = add_optional(d_sum_g, _times(step_w, u))
            if cot_b is not None:  # b = −invstd²·Σ(h·w·Σg·x̂)/n
                d_invstd_c = add_optional(d_invstd_c, cot_b * mean_dxhat_xhat * invstd_c * (-2.0 / count))
                u = group_sum(cot_b * (invstd_c * invstd_c * (-1.0 / count)))
                if learnable_step_w:
                    d_step_w = add_optional(d_step_w, over_samples(u * sum_gxhat))
                d_sum_gxhat = add_optional(d_sum_gxhat, _times(step_w, u))
        d_sum_gxc = None
        if d_sum_gxhat is not None:  # Σg·x̂ = Σg·(x − center)·invstd
            d_sum_gxc = d_sum_gxhat * invstd_c
            d_invstd_c = add_optional(d_invstd_c, d_sum_gxhat * sum_gxc)
    else:
        d_sum_gxc = None
    if need_x and batch_stats:  # c += dmean/n, b += 2·dvar/n
        if dmean is not None and cot_c is not None:
            d_dmean = to_groups(cot_c) / count
        if dvar is not None and cot_b is not None:
            d_dvar = to_groups(cot_b) * (2.0 / count)
    if d_step_w is not None:  # h·w
        if w is not None:
            d_w = add_optional(d_w, _times(step, d_step_w))
            d_step = add_optional(d_step, d_step_w * w)
        else:
            d_step = add_optional(d_step, d_step_w)
    d_var = None
    if d_invstd_c is not None:  # invstd = (var + eps)^(−1/2)
        d_var = to_groups(d_invstd_c) * (invstd * invstd * invstd * -0.5)
    d_h = None if h is None or d_step is None else _sum_to(d_step, h).to(h.dtype)
    return {"sum_g": d_sum_g, "sum_gxc": d_sum_gxc, "dmean": d_dmean, "dvar": d_dvar,
            "weight": None if d_w is None else d_w.to(weight.dtype),
            "bias": None if d_bias is None else d_bias.to(bias.dtype), "h": d_h, "var": d_var}


def update_running_stats(running_mean: Tensor, running_var: Tensor,
                         num_batches_tracked: Tensor | None, mean: Tensor, var: Tensor,
                         count: int | Tensor, momentum: float | Tensor | None) -> None:
    """``nn.BatchNorm``'s running-statistics update, in place (no host synchronisation).

    ``num_batches_tracked`` (int64, 0-dim or [1]) is incremented when given.  The rate
    ``m`` is ``momentum`` (a float in [0, 1] or a 0-dim tensor), or, with ``momentum=None``,
    the cumulative average ``1/num_batches_tracked`` after the increment.  Then
    ``running_mean ← lerp(running_mean, mean, m)`` and
    ``running_var ← lerp(running_var, var·count/(count − 1), m)`` (the unbiased variance),
    each in the running buffer's dtype as ``Tensor.lerp_`` computes it.

    ``mean``, ``var``: the biased batch statistics ``[C]`` (float32, float64 for float64
    input); ``count >= 2``: the values behind each, an int or a 0-dim tensor (a synchronised
    BatchNorm's global count, docs/semantics.md §10, not checked: that would read it on the
    host).  Raises ValueError for an int ``count < 2`` or ``momentum=None`` without
    ``num_batches_tracked``.
    """
    if not isinstance(count, Tensor) and count < 2:
        raise ValueError("running statistics need more than one value per channel")
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if momentum is None:
            momentum = 1.0 / num_batches_tracked.reshape(()).to(running_mean.dtype)
        running_mean.lerp_(mean.detach().to(running_mean.dtype), momentum)
        unbiased = var.detach() * (count / (count - 1))
        running_var.lerp_(unbiased.to(running_var.dtype), momentum)


# The gradients double_backward_coefficients adds to backward_coefficients_vjp's.
DOUBLE_BACKWARD_KEYS = ("a", "b", *VJP_KEYS, "mean")


def double_backward_presence(sum_g, dmean, dvar, weight, bias, h, batch_stats, needs, cotangents,
                             sum_cotangents):
    """Which of :data:`DOUBLE_BACKWARD_KEYS` :func:`double_backward_coefficients` returns,
    and the cotangents that reach anything (as :func:`vjp_presence`).  Presence only."""
    present, cotangents = vjp_presence(sum_g, dmean, dvar, weight, bias, h, batch_stats, needs,
                                       cotangents)
    sums = sum_g is not None
    d_sum_g = present[0] or (sums and sum_cotangents[0] is not None)
    d_sum_gxc = present[1] or (sums and sum_cotangents[1] is not None)
    d_mean = cotangents[2] is not None or (sums and d_sum_gxc)
    return (True, True, d_sum_g, d_sum_gxc, *present[2:], d_mean), cotangents


def double_backward_coefficients(sum_g, sum_gxc, dmean, dvar, weight, bias, h, var, h_value, eps,
                                 groups, batch_stats, needs, channels, count, cotangents,
                                 sum_cotangents=(None, None)):
    """The per-channel half of norm_act's second order (docs/semantics.md §4), one pass between the
    double backward's reduce and apply passes.

    ``cotangents`` are the gradients of ``(a, b, c, dweight, dbias, dh)`` as in
    :func:`backward_coefficients_vjp` (for the reduce's sums: ``cot_a = Σddx·g``,
    ``cot_b = Σddx·(x − center)``, ``cot_c = Σddx``); ``sum_cotangents`` the gradients of
    the sums ``(Σg, Σg·(x − center))`` themselves where the first-order op returns them,
    or None.  Returns a dict (None where structurally zero):

    - ``"a"``, ``"b"``: the backward's coefficients (:func:`backward_coefficients`), which
      the apply pass reads;
    - the entries of :func:`backward_coefficients_vjp`, with ``sum_cotangents`` added to
      ``"sum_g"`` and ``"sum_gxc"`` (the apply pass's ``p`` and ``q``);
    - ``"mean"``: the gradient reaching the statistic mean through the centre, which enters
      ``dx = … + b·(x − center)`` and ``Σg·(x − center)``: ``−(b·cot_c + q·Σg)``, summed
      over each group's channels for GroupNorm (statistic-shaped, ``[C]`` or ``[N, groups]``).

    All float32 (float64 for float64 statistics); torch ops, differentiable (third order).
    """
    a, b, *_ = backward_coefficients(sum_g, sum_gxc, dmean, dvar, weight, bias, h, var, h_value,
                                     eps, groups, batch_stats, needs, channels, count)
    grads = backward_coefficients_vjp(sum_g, sum_gxc, dmean, dvar, weight, bias, h, var, h_value,
                                      eps, groups, batch_stats, needs, channels, count, cotangents)
    if sum_g is not None:
        grads["sum_g"] = add_optional(grads["sum_g"], sum_cotangents[0])
        grads["sum_gxc"] = add_optional(grads["sum_gxc"], sum_cotangents[1])
    cot_c = cotangents[2] if needs[0] and batch_stats else None
    d_center = None if cot_c is None else -(b * cot_c)
    if grads["sum_gxc"] is not None:
        d_center = add_optional(d_center, -(grads["sum_gxc"] * sum_g))
    if d_center is not None and groups:
        d_center = d_center.reshape(var.shape[0], groups, channels // groups).sum(2)
    return {"a": a, "b": b, **grads, "mean": d_center}
