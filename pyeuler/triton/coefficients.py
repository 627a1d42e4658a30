"""The per-channel passes of the norms (:mod:`pyeuler.ops.norm_algebra`), one launch each.

Between the sweeps over the activations a norm needs a little arithmetic on per-channel
vectors: the forward's ``scale``/``shift`` from the statistics, and the backward's
``(a, b, c)`` and parameter gradients from the reduce sums.  As torch ops that is a dozen
tiny launches per norm and pass; here it is one program that reads the vectors once.

Layout: a channel ``c = g·CPG + j`` of group ``g`` (``CPG`` = channels per group) sits in a
``[BLOCK_G, BLOCK_J]`` tile, so GroupNorm's per-group means are row sums of the tile.
BatchNorm is the case ``CPG = 1`` (every channel its own group, no means to take), tiled
over channel chunks.  GroupNorm loops over the samples n, summing the parameter gradients
over n in registers.  One program does it all: the vectors are small (``N·C`` ≲ 10⁵) and a
fixed order keeps the sums deterministic, with no atomics; a 0-dim learnable h needs its
gradient summed over everything anyway.  Beyond ``_MAX_TILE`` channels per sample (GroupNorm)
the torch-op version runs instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyeuler.ops import norm_algebra
from pyeuler.triton._utils import check_device, declare_passes

__all__ = ["backward_coefficients", "backward_coefficients_vjp", "double_backward_coefficients",
           "forward_coefficients", "update_running_stats"]

_BLOCK = 1024  # channels per chunk (BatchNorm)
_MAX_TILE = 8192  # channels of one sample held at once (GroupNorm)


@triton.jit
def _load_or(ptr, offsets, ok, PRESENT: tl.constexpr, default):
    """A float32 tile from ``ptr`` when present, else ``default`` everywhere."""
    if PRESENT:
        value = tl.load(ptr + offsets, mask=ok, other=default).to(tl.float32)
    else:
        value = tl.full(offsets.shape, default, tl.float32)
    return value


@triton.jit
def _step(h_ptr, channel, ok, h_value, H_MODE: tl.constexpr):
    """h per channel: 0 a float (h_value), 1 a 0-dim tensor, 2 a [C] tensor."""
    if H_MODE == 2:
        value = tl.load(h_ptr + channel, mask=ok, other=0.0).to(tl.float32)
    elif H_MODE == 1:
        value = tl.load(h_ptr + channel * 0, mask=ok, other=0.0).to(tl.float32)
    else:
        value = tl.full(channel.shape, h_value, tl.float32)
    return value


@triton.jit
def _tile(chunk, G, CPG, BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr):
    """Channel indices of a [BLOCK_G, BLOCK_J] tile (groups × channels per group), their
    group indices and validity."""
    g = chunk * BLOCK_G + tl.arange(0, BLOCK_G)[:, None]
    j = tl.arange(0, BLOCK_J)[None, :]
    ok = (g < G) & (j < CPG)
    return g * CPG + j, g, ok


@triton.jit
def store_forward_coefficients(mean, var, channel, out, ok, weight_ptr, bias_ptr, h_ptr,
                               scale_ptr, shift_ptr, h_value, eps, HAS_WEIGHT: tl.constexpr,
                               HAS_BIAS: tl.constexpr, H_MODE: tl.constexpr):
    """``scale = h·w·invstd``, ``shift = h·b − scale·mean``
    (:func:`~pyeuler.ops.norm_algebra.forward_coefficients`) of channels ``channel``, stored
    at ``out``: the one definition, shared by the coefficient kernel and the statistics
    merge (:mod:`pyeuler.triton.norm_stats`), so both give the same bits."""
    invstd = tl.rsqrt(var + eps)
    step = _step(h_ptr, channel, ok, h_value, H_MODE)
    scale = step * (_load_or(weight_ptr, channel, ok, HAS_WEIGHT, 1.0) * invstd)
    shift = -scale * mean
    if HAS_BIAS:
        shift += step * tl.load(bias_ptr + channel, mask=ok, other=0.0).to(tl.float32)
    tl.store(scale_ptr + out, scale, mask=ok)
    tl.store(shift_ptr + out, shift, mask=ok)


def forward_coefficient_passes(launch, present=True) -> dict[str, int]:
    """Passes of ``store_forward_coefficients``' operands in a launch that runs it
    (``present``): one over each vector it reads or writes, none over absent ones."""
    return {"weight_ptr": int(present and launch["HAS_WEIGHT"]),
            "bias_ptr": int(present and launch["HAS_BIAS"]),
            "h_ptr": int(present and launch["H_MODE"] != 0),
            "scale_ptr": int(present), "shift_ptr": int(present)}


@triton.jit
def _store_parameter_grads(dweight_ptr, dbias_ptr, dh_ptr, dweight, dbias, dh, dh_total,
                           channel, ok, NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr,
                           NEED_H: tl.constexpr, H_MODE: tl.constexpr):
    """Store one chunk's parameter gradients; a 0-dim h's is summed into ``dh_total`` (the
    caller stores it once, after the last chunk)."""
    if NEED_WEIGHT:
        tl.store(dweight_ptr + channel, dweight, mask=ok)
    if NEED_BIAS:
        tl.store(dbias_ptr + channel, dbias, mask=ok)
    if NEED_H:
        if H_MODE == 2:
            tl.store(dh_ptr + channel, dh, mask=ok)
        else:
            dh_total += tl.where(ok, dh, 0.0)
    return dh_total


# Per-channel vectors: one pass over each that the launch's flags read or write; the
# placeholders of absent ones (_dummy) are not touched.
@declare_passes(lambda launch: {"mean_ptr": 1, "var_ptr": 1, **forward_coefficient_passes(launch)})
@triton.jit
def _forward_coefficients_kernel(
    mean_ptr, var_ptr, weight_ptr, bias_ptr, h_ptr, scale_ptr, shift_ptr,
    n_rows, C, G, CPG, h_value, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, H_MODE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr,
):
    for n in range(n_rows):
        for chunk in range(tl.cdiv(G, BLOCK_G)):
            channel, g, ok = _tile(chunk, G, CPG, BLOCK_G, BLOCK_J)
            stat = n * G + g
            store_forward_coefficients(
                tl.load(mean_ptr + stat, mask=ok, other=0.0),
                tl.load(var_ptr + stat, mask=ok, other=1.0), channel, n * C + channel, ok,
                weight_ptr, bias_ptr, h_ptr, scale_ptr, shift_ptr, h_value, eps, HAS_WEIGHT,
                HAS_BIAS, H_MODE)


@declare_passes(lambda launch: {
    "sum_g_ptr": int(launch["HAS_SUMS"]), "sum_gxc_ptr": int(launch["HAS_SUMS"]),
    "dmean_ptr": int(launch["CENTERED"] and launch["HAS_DMEAN"]),
    "dvar_ptr": int(launch["CENTERED"] and launch["HAS_DVAR"]),
    "weight_ptr": int(launch["HAS_WEIGHT"]),
    "bias_ptr": int(launch["HAS_SUMS"] and launch["HAS_BIAS"]),
    "h_ptr": int(launch["H_MODE"] != 0), "var_ptr": 1, "a_ptr": 1, "b_ptr": 1, "c_ptr": 1,
    "dweight_ptr": int(launch["NEED_WEIGHT"]), "dbias_ptr": int(launch["NEED_BIAS"]),
    "dh_ptr": int(launch["NEED_H"] and launch["H_MODE"] != 0)})
@triton.jit
def _backward_coefficients_kernel(
    sum_g_ptr, sum_gxc_ptr, dmean_ptr, dvar_ptr, weight_ptr, bias_ptr, h_ptr, var_ptr,
    a_ptr, b_ptr, c_ptr, dweight_ptr, dbias_ptr, dh_ptr,
    n_rows, C, G, CPG, h_value, eps, inv_count,
    HAS_SUMS: tl.constexpr, HAS_DMEAN: tl.constexpr, HAS_DVAR: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, H_MODE: tl.constexpr,
    NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr, NEED_H: tl.constexpr,
    CENTERED: tl.constexpr, PER_SAMPLE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """``CENTERED``: the input gradient sees the batch statistics (need_x and
    batch_stats), so b and c get the mean terms."""
    dh_total = tl.zeros([BLOCK_G, BLOCK_J], dtype=tl.float32)  # a 0-dim h's, over chunks
    for chunk in range(tl.cdiv(G, BLOCK_G)):
        channel, g, ok = _tile(chunk, G, CPG, BLOCK_G, BLOCK_J)
        w = _load_or(weight_ptr, channel, ok, HAS_WEIGHT, 1.0)
        step = _step(h_ptr, channel, ok, h_value, H_MODE)
        step_w = step * w
        dweight = tl.zeros([BLOCK_G, BLOCK_J], dtype=tl.float32)
        dbias = tl.zeros([BLOCK_G, BLOCK_J], dtype=tl.float32)
        dh = tl.zeros([BLOCK_G, BLOCK_J], dtype=tl.float32)
        for n in range(n_rows):
            stat = n * G + g
            invstd = tl.rsqrt(tl.load(var_ptr + stat, mask=ok, other=1.0) + eps)
            out = n * C + channel
            b = tl.zeros([BLOCK_G, BLOCK_J], dtype=tl.float32)
            c = tl.zeros([BLOCK_G, BLOCK_J], dtype=tl.float32)
            if HAS_SUMS:
                sum_g = tl.load(sum_g_ptr + out, mask=ok, other=0.0)
                sum_gxhat = tl.load(sum_gxc_ptr + out, mask=ok, other=0.0) * invstd
                dweight += step * sum_gxhat
                dbias += step * sum_g
                dh_c = w * sum_gxhat
                if HAS_BIAS:
                    dh_c += tl.load(bias_ptr + channel, mask=ok, other=0.0).to(tl.float32) * sum_g
                dh += dh_c
                if CENTERED:
                    mean_dxhat = step_w * sum_g
                    mean_dxhat_xhat = step_w * sum_gxhat
                    if PER_SAMPLE:  # sums over the group's channels, per sample
                        mean_dxhat = tl.sum(tl.where(ok, mean_dxhat, 0.0), axis=1)[:, None]
                        mean_dxhat_xhat = tl.sum(tl.where(ok, mean_dxhat_xhat, 0.0), axis=1)[:, None]
                    c = mean_dxhat * (-invstd * inv_count)
                    b = mean_dxhat_xhat * (invstd * invstd * -inv_count)
            if CENTERED:
                if HAS_DMEAN:
                    c += tl.load(dmean_ptr + stat, mask=ok, other=0.0) * inv_count
                if HAS_DVAR:
                    b += tl.load(dvar_ptr + stat, mask=ok, other=0.0) * (2.0 * inv_count)
            tl.store(a_ptr + out, step_w * invstd, mask=ok)
            tl.store(b_ptr + out, b, mask=ok)
            tl.store(c_ptr + out, c, mask=ok)
        dh_total = _store_parameter_grads(dweight_ptr, dbias_ptr, dh_ptr, dweight, dbias, dh,
                                          dh_total, channel, ok, NEED_WEIGHT, NEED_BIAS, NEED_H,
                                          H_MODE)
    if NEED_H:
        if H_MODE == 1:
            tl.store(dh_ptr, tl.sum(tl.sum(dh_total, axis=1), axis=0))


def _geometry(groups: int, channels: int, stat: torch.Tensor, h: torch.Tensor | None):
    """(rows, G, CPG, BLOCK_G, BLOCK_J) of the tiling, or None where a sample's channels do
    not fit one tile (GroupNorm beyond ``_MAX_TILE``) or h is neither 0-dim nor [C]."""
    if h is not None and h.dim() == 1 and h.shape[0] != channels:
        return None
    if groups == 0:
        return 1, channels, 1, min(_BLOCK, triton.next_power_of_2(channels)), 1
    cpg = channels // groups
    block_g, block_j = triton.next_power_of_2(groups), triton.next_power_of_2(cpg)
    if block_g * block_j > _MAX_TILE:
        return None
    return stat.shape[0], groups, cpg, block_g, block_j


def _h_mode(h: torch.Tensor | None) -> int:
    return 0 if h is None else (1 if h.dim() == 0 else 2)


def _dummy(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like if t is None else t


def _check(var: torch.Tensor, **vectors) -> None:
    check_device(var, "var")
    if var.dtype != torch.float32:
        raise TypeError(f"the statistics must be float32 for the Triton backend, got {var.dtype}")
    for name, t in vectors.items():
        if t is not None and t.device != var.device:
            raise ValueError(f"{name} is on {t.device} but var is on {var.device}")


def forward_coefficients(mean, var, weight, bias, h, h_value, eps, groups, channels):
    """See :func:`pyeuler.ops.norm_algebra.forward_coefficients`; one launch."""
    _check(var, mean=mean, weight=weight, bias=bias, h=h)
    geometry = _geometry(groups, channels, var, h)
    if geometry is None:
        return norm_algebra.forward_coefficients(mean, var, weight, bias, h, h_value, eps, groups,
                                                 channels)
    rows, n_groups, cpg, block_g, block_j = geometry
    shape = (channels,) if groups == 0 else (rows, channels)
    scale, shift = var.new_empty(shape), var.new_empty(shape)
    _forward_coefficients_kernel[(1,)](
        mean.contiguous(), var.contiguous(), _dummy(weight, var), _dummy(bias, var),
        _dummy(h, var), scale, shift, rows, channels, n_groups, cpg, float(h_value), float(eps),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, H_MODE=_h_mode(h),
        BLOCK_G=block_g, BLOCK_J=block_j)
    return scale, shift


def backward_coefficients(sum_g, sum_gxc, dmean, dvar, weight, bias, h, var, h_value, eps, groups,
                          batch_stats, needs, channels, count):
    """See :func:`pyeuler.ops.norm_algebra.backward_coefficients`; one launch."""
    _check(var, sum_g=sum_g, sum_gxc=sum_gxc, dmean=dmean, dvar=dvar, weight=weight, bias=bias,
           h=h)
    geometry = _geometry(groups, channels, var, h)
    if geometry is None:
        return norm_algebra.backward_coefficients(sum_g, sum_gxc, dmean, dvar, weight, bias, h, var,
                                                  h_value, eps, groups, batch_stats, needs,
                                                  channels, count)
    rows, n_groups, cpg, block_g, block_j = geometry
    need_x, _, need_weight, need_bias, need_h = needs
    has_sums = sum_g is not None
    need_weight, need_bias = need_weight and has_sums, need_bias and has_sums
    need_h = need_h and has_sums and h is not None
    shape = (channels,) if groups == 0 else (rows, channels)
    a, b, c = var.new_empty(shape), var.new_empty(shape), var.new_empty(shape)
    dweight = var.new_empty(channels) if need_weight else None
    dbias = var.new_empty(channels) if need_bias else None
    dh = var.new_empty(h.shape) if need_h else None
    _backward_coefficients_kernel[(1,)](
        _dummy(sum_g, var), _dummy(sum_gxc, var), _dummy(dmean, var), _dummy(dvar, var),
        _dummy(weight, var), _dummy(bias, var), _dummy(h, var), var.contiguous(), a, b, c,
        _dummy(dweight, var), _dummy(dbias, var), _dummy(dh, var),
        rows, channels, n_groups, cpg, float(h_value), float(eps), 1.0 / count,
        HAS_SUMS=has_sums, HAS_DMEAN=dmean is not None, HAS_DVAR=dvar is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, H_MODE=_h_mode(h),
        NEED_WEIGHT=need_weight, NEED_BIAS=need_bias, NEED_H=need_h,
        CENTERED=need_x and batch_stats, PER_SAMPLE=groups > 0,
        BLOCK_G=block_g, BLOCK_J=block_j)
    return a, b, c, dweight, dbias, dh


def _vjp_passes(launch) -> dict[str, int]:
    """One pass over each vector the VJP kernel's flags read (a cotangent given, ``COT_*``)
    or write (a gradient wanted, ``WANT_*``); none over the placeholders of the rest."""
    h = launch["H_MODE"] != 0
    passes = {"sum_g_ptr": launch["HAS_SUMS"], "sum_gxc_ptr": launch["HAS_SUMS"],
              "dvar_ptr": launch["WANT_AB"] and launch["CENTERED"] and launch["HAS_DVAR"],
              "weight_ptr": launch["HAS_WEIGHT"],
              "bias_ptr": launch["HAS_SUMS"] and launch["HAS_BIAS"],
              "h_ptr": h, "var_ptr": True, "cot_dh_ptr": launch["COT_DH"] and h,
              "a_ptr": launch["WANT_AB"], "b_ptr": launch["WANT_AB"],
              "d_mean_ptr": launch["WANT_AB"] and launch["WANT_D_MEAN"],
              "d_h_ptr": launch["WANT_D_H"] and h}
    for name in ("a", "b", "c", "dweight", "dbias", "sum_g", "sum_gxc"):
        passes[f"cot_{name}_ptr"] = launch[f"COT_{name.upper()}"]
    for name in ("sum_g", "sum_gxc", "dmean", "dvar", "weight", "bias", "var"):
        passes[f"d_{name}_ptr"] = launch[f"WANT_D_{name.upper()}"]
    return {name: int(bool(read)) for name, read in passes.items()}


@declare_passes(_vjp_passes)
@triton.jit
def _backward_coefficients_vjp_kernel(
    sum_g_ptr, sum_gxc_ptr, dvar_ptr, weight_ptr, bias_ptr, h_ptr, var_ptr,
    cot_a_ptr, cot_b_ptr, cot_c_ptr, cot_dweight_ptr, cot_dbias_ptr, cot_dh_ptr,
    cot_sum_g_ptr, cot_sum_gxc_ptr,
    a_ptr, b_ptr, d_sum_g_ptr, d_sum_gxc_ptr, d_dmean_ptr, d_dvar_ptr, d_weight_ptr, d_bias_ptr,
    d_h_ptr, d_var_ptr, d_mean_ptr,
    n_rows, C, G, CPG, h_value, eps, inv_count,
    HAS_SUMS: tl.constexpr, HAS_DVAR: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, H_MODE: tl.constexpr, LEARNABLE_STEP_W: tl.constexpr,
    COT_A: tl.constexpr, COT_B: tl.constexpr, COT_C: tl.constexpr,
    COT_DWEIGHT: tl.constexpr, COT_DBIAS: tl.constexpr, COT_DH: tl.constexpr,
    COT_SUM_G: tl.constexpr, COT_SUM_GXC: tl.constexpr, WANT_AB: tl.constexpr,
    WANT_D_SUM_G: tl.constexpr, WANT_D_SUM_GXC: tl.constexpr, WANT_D_DMEAN: tl.constexpr,
    WANT_D_DVAR: tl.constexpr, WANT_D_WEIGHT: tl.constexpr, WANT_D_BIAS: tl.constexpr,
    WANT_D_H: tl.constexpr, WANT_D_VAR: tl.constexpr, WANT_D_MEAN: tl.constexpr,
    CENTERED: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """The transpose of ``_backward_coefficients_kernel``: term by term the adjoint of
    :func:`pyeuler.ops.norm_algebra.backward_coefficients_vjp`.  ``COT_*``: which cotangents
    are given (the dweight/dbias/dh ones only where that gradient was computed);
    ``WANT_*``: which gradients are returned (the rest are structurally zero).

    With ``WANT_AB`` it is :func:`~pyeuler.ops.norm_algebra.double_backward_coefficients`:
    also the backward's a and b, the sums' own cotangents (``COT_SUM_*``) added to their
    gradients, and (``WANT_D_MEAN``) the centre's gradient ``−(b·cot_c + q·Σg)``."""
    d_h_total = tl.zeros([BLOCK_G, BLOCK_J], dtype=tl.float32)  # a 0-dim h's, over chunks
    for chunk in range(tl.cdiv(G, BLOCK_G)):
        channel, g, ok = _tile(chunk, G, CPG, BLOCK_G, BLOCK_J)
        w = _load_or(weight_ptr, channel, ok, HAS_WEIGHT, 1.0)
        step = _step(h_ptr, channel, ok, h_value, H_MODE)
        step_w = step * w
        cot_dweight = _load_or(cot_dweight_ptr, channel, ok, COT_DWEIGHT, 0.0)
        cot_dbias = _load_or(cot_dbias_ptr, channel, ok, COT_DBIAS, 0.0)
        if COT_DH:  # h's shape: [C] or 0-dim
            cot_dh = _step(cot_dh_ptr, channel, ok, 0.0, H_MODE)
        else:
            cot_dh = tl.zeros([BLOCK_G, BLOCK_J], dtype=tl.float32)
        # per-channel accumulators, summed over the samples (GroupNorm)
        d_step_w = tl.zeros([BLOCK_G, BLOCK_J], dtype=tl.float32)
        d_step = tl.zeros([BLOCK_G, BLOCK_J], dtype=tl.float32)
        d_w = tl.zeros([BLOCK_G, BLOCK_J], dtype=tl.float32)
        d_bias = tl.zeros([BLOCK_G, BLOCK_J], dtype=tl.float32)
        for n in range(n_rows):
            stat_g = n * G + chunk * BLOCK_G + tl.arange(0, BLOCK_G)
            stat_ok = (chunk * BLOCK_G + tl.arange(0, BLOCK_G)) < G
            stat = n * G + g
            out = n * C + channel
            invstd = tl.rsqrt(tl.load(var_ptr + stat, mask=ok, other=1.0) + eps)
            cot_a = _load_or(cot_a_ptr, out, ok, COT_A, 0.0)
            cot_b = _load_or(cot_b_ptr, out, ok, COT_B, 0.0)
            cot_c = _load_or(cot_c_ptr, out, ok, COT_C, 0.0)
            d_invstd = step_w * cot_a
            if LEARNABLE_STEP_W:
                d_step_w += cot_a * invstd
            d_sum_g = tl.zeros([BLOCK_G, BLOCK_J], dtype=tl.float32)
            d_sum_gxhat = tl.zeros([BLOCK_G, BLOCK_J], dtype=tl.float32)
            if HAS_SUMS:
                sum_g = tl.load(sum_g_ptr + out, mask=ok, other=0.0)
                sum_gxc = tl.load(sum_gxc_ptr + out, mask=ok, other=0.0)
                sum_gxhat = sum_gxc * invstd
                d_step += cot_dweight * sum_gxhat + cot_dbias * sum_g
                d_sum_gxhat += step * cot_dweight + w * cot_dh
                d_sum_g += step * cot_dbias
                d_w += cot_dh * sum_gxhat
                if HAS_BIAS:
                    d_bias += cot_dh * sum_g
                    d_sum_g += tl.load(bias_ptr + channel, mask=ok, other=0.0).to(tl.float32) * cot_dh
                if CENTERED:
                    mean_dxhat = tl.sum(tl.where(ok, step_w * sum_g, 0.0), axis=1)[:, None]
                    mean_dxhat_xhat = tl.sum(tl.where(ok, step_w * sum_gxhat, 0.0), axis=1)[:, None]
                    d_invstd += cot_c * mean_dxhat * -inv_count
                    d_invstd += cot_b * mean_dxhat_xhat * invstd * (-2.0 * inv_count)
                    u_c = tl.sum(tl.where(ok, cot_c * (-invstd * inv_count), 0.0), axis=1)[:, None]
                    u_b = tl.sum(tl.where(ok, cot_b * (invstd * invstd * -inv_count), 0.0),
                                 axis=1)[:, None]
                    if LEARNABLE_STEP_W:
                        d_step_w += u_c * sum_g + u_b * sum_gxhat
                    d_sum_g += step_w * u_c
                    d_sum_gxhat += step_w * u_b
                d_invstd += d_sum_gxhat * sum_gxc
            d_sum_gxc = d_sum_gxhat * invstd
            if COT_SUM_G:
                d_sum_g += tl.load(cot_sum_g_ptr + out, mask=ok, other=0.0)
            if COT_SUM_GXC:
                d_sum_gxc += tl.load(cot_sum_gxc_ptr + out, mask=ok, other=0.0)
            if WANT_AB:  # as _backward_coefficients_kernel computes them
                tl.store(a_ptr + out, step_w * invstd, mask=ok)
                b = tl.zeros([BLOCK_G, BLOCK_J], dtype=tl.float32)
                if CENTERED:
                    if HAS_SUMS:
                        b = mean_dxhat_xhat * (invstd * invstd * -inv_count)
                    if HAS_DVAR:
                        b += tl.load(dvar_ptr + stat, mask=ok, other=0.0) * (2.0 * inv_count)
                tl.store(b_ptr + out, b, mask=ok)
                if WANT_D_MEAN:  # the centre enters dx via b·(x − center) and Σg·(x − center)
                    d_center = tl.zeros([BLOCK_G, BLOCK_J], dtype=tl.float32)
                    if CENTERED:
                        d_center -= b * cot_c
                    if HAS_SUMS:
                        d_center -= d_sum_gxc * sum_g
                    tl.store(d_mean_ptr + stat_g, tl.sum(tl.where(ok, d_center, 0.0), axis=1),
                             mask=stat_ok)
            if WANT_D_SUM_G:
                tl.store(d_sum_g_ptr + out, d_sum_g, mask=ok)
            if WANT_D_SUM_GXC:
                tl.store(d_sum_gxc_ptr + out, d_sum_gxc, mask=ok)
            if WANT_D_DMEAN:
                tl.store(d_dmean_ptr + stat_g, tl.sum(tl.where(ok, cot_c, 0.0), axis=1) * inv_count,
                         mask=stat_ok)
            if WANT_D_DVAR:
                tl.store(d_dvar_ptr + stat_g,
                         tl.sum(tl.where(ok, cot_b, 0.0), axis=1) * (2.0 * inv_count), mask=stat_ok)
            if WANT_D_VAR:
                invstd_g = tl.rsqrt(tl.load(var_ptr + stat_g, mask=stat_ok, other=1.0) + eps)
                d_var = tl.sum(tl.where(ok, d_invstd, 0.0), axis=1) * (invstd_g * invstd_g * invstd_g * -0.5)
                tl.store(d_var_ptr + stat_g, d_var, mask=stat_ok)
        # h·w's gradient splits into h's and w's
        d_w += step * d_step_w
        d_step += d_step_w * w
        d_h_total = _store_parameter_grads(d_weight_ptr, d_bias_ptr, d_h_ptr, d_w, d_bias, d_step,
                                           d_h_total, channel, ok, WANT_D_WEIGHT, WANT_D_BIAS,
                                           WANT_D_H, H_MODE)
    if WANT_D_H:
        if H_MODE == 1:
            tl.store(d_h_ptr, tl.sum(tl.sum(d_h_total, axis=1), axis=0))


def backward_coefficients_vjp(sum_g, sum_gxc, dmean, dvar, weight, bias, h, var, h_value, eps,
                              groups, batch_stats, needs, channels, count, cotangents):
    """See :func:`pyeuler.ops.norm_algebra.backward_coefficients_vjp`; one launch.  Not
    differentiable: for a second-order backward that builds no graph."""
    return _vjp(sum_g, sum_gxc, dmean, dvar, weight, bias, h, var, h_value, eps, groups,
                batch_stats, needs, channels, count, cotangents, None)


def double_backward_coefficients(sum_g, sum_gxc, dmean, dvar, weight, bias, h, var, h_value, eps,
                                 groups, batch_stats, needs, channels, count, cotangents,
                                 sum_cotangents=(None, None)):
    """See :func:`pyeuler.ops.norm_algebra.double_backward_coefficients`; one launch.  Not
    differentiable: for a second-order backward that builds no graph."""
    return _vjp(sum_g, sum_gxc, dmean, dvar, weight, bias, h, var, h_value, eps, groups,
                batch_stats, needs, channels, count, cotangents, tuple(sum_cotangents))


def _vjp(sum_g, sum_gxc, dmean, dvar, weight, bias, h, var, h_value, eps, groups, batch_stats,
         needs, channels, count, cotangents, sum_cotangents):
    """The VJP kernel; ``sum_cotangents`` None: backward_coefficients_vjp, else
    double_backward_coefficients."""
    double = sum_cotangents is not None
    _check(var, sum_g=sum_g, sum_gxc=sum_gxc, dmean=dmean, dvar=dvar, weight=weight, bias=bias,
           h=h)
    geometry = _geometry(groups, channels, var, h)
    if geometry is None:
        if double:
            return norm_algebra.double_backward_coefficients(
                sum_g, sum_gxc, dmean, dvar, weight, bias, h, var, h_value, eps, groups,
                batch_stats, needs, channels, count, cotangents, sum_cotangents)
        return norm_algebra.backward_coefficients_vjp(sum_g, sum_gxc, dmean, dvar, weight, bias, h,
                                                      var, h_value, eps, groups, batch_stats,
                                                      needs, channels, count, cotangents)
    rows, n_groups, cpg, block_g, block_j = geometry
    if double:
        present, cotangents = norm_algebra.double_backward_presence(
            sum_g, dmean, dvar, weight, bias, h, batch_stats, needs, cotangents, sum_cotangents)
        keys = norm_algebra.DOUBLE_BACKWARD_KEYS
        cot_sum_g, cot_sum_gxc = sum_cotangents if sum_g is not None else (None, None)
    else:
        present, cotangents = norm_algebra.vjp_presence(sum_g, dmean, dvar, weight, bias, h,
                                                        batch_stats, needs, cotangents)
        keys = norm_algebra.VJP_KEYS
        cot_sum_g = cot_sum_gxc = None
    want = dict.fromkeys(norm_algebra.DOUBLE_BACKWARD_KEYS, False)
    want.update((k, bool(p)) for k, p in zip(keys, present))
    cot_a, cot_b, cot_c, cot_dweight, cot_dbias, cot_dh = cotangents
    sums, centered = sum_g is not None, bool(needs[0] and batch_stats)
    sum_shape = (channels,) if groups == 0 else (rows, channels)
    stat_shape = var.shape

    def new(flag, shape):
        return var.new_empty(shape) if flag else None

    shapes = dict(a=sum_shape, b=sum_shape, sum_g=sum_shape, sum_gxc=sum_shape,
                  dmean=stat_shape, dvar=stat_shape, weight=(channels,), bias=(channels,),
                  h=h.shape if h is not None else (), var=stat_shape, mean=stat_shape)
    out = {k: new(want[k], shapes[k]) for k in norm_algebra.DOUBLE_BACKWARD_KEYS}
    has_dvar = double and dvar is not None
    _backward_coefficients_vjp_kernel[(1,)](
        _dummy(sum_g, var), _dummy(sum_gxc, var), dvar if has_dvar else var, _dummy(weight, var),
        _dummy(bias, var), _dummy(h, var), var.contiguous(),
        *(_dummy(t, var) for t in (cot_a, cot_b, cot_c, cot_dweight, cot_dbias, cot_dh,
                                   cot_sum_g, cot_sum_gxc)),
        *(_dummy(out[k], var) for k in norm_algebra.DOUBLE_BACKWARD_KEYS),
        rows, channels, n_groups, cpg, float(h_value), float(eps), 1.0 / count,
        HAS_SUMS=sums, HAS_DVAR=has_dvar, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, H_MODE=_h_mode(h),
        LEARNABLE_STEP_W=weight is not None or h is not None,
        COT_A=cot_a is not None, COT_B=cot_b is not None, COT_C=cot_c is not None,
        COT_DWEIGHT=cot_dweight is not None, COT_DBIAS=cot_dbias is not None,
        COT_DH=cot_dh is not None, COT_SUM_G=cot_sum_g is not None,
        COT_SUM_GXC=cot_sum_gxc is not None, WANT_AB=double,
        WANT_D_SUM_G=want["sum_g"], WANT_D_SUM_GXC=want["sum_gxc"], WANT_D_DMEAN=want["dmean"],
        WANT_D_DVAR=want["dvar"], WANT_D_WEIGHT=want["weight"], WANT_D_BIAS=want["bias"],
        WANT_D_H=want["h"], WANT_D_VAR=want["var"], WANT_D_MEAN=want["mean"],
        CENTERED=centered, BLOCK_G=block_g, BLOCK_J=block_j)
    for name, param in (("weight", weight), ("bias", bias), ("h", h)):
        if out[name] is not None and out[name].dtype != param.dtype:
            out[name] = out[name].to(param.dtype)
    return out if double else {k: out[k] for k in norm_algebra.VJP_KEYS}


@triton.jit
def _lerp_in_place(running_ptr, channel, ok, end, rate):
    """``running ← lerp(running, end, rate)`` as torch computes it: from the nearer end, so
    rate 1 gives exactly ``end``; in float32, stored in the buffer's dtype."""
    running = tl.load(running_ptr + channel, mask=ok, other=0.0).to(tl.float32)
    value = tl.where(rate < 0.5, running + rate * (end - running),
                     end - (end - running) * (1.0 - rate))
    tl.store(running_ptr + channel, value.to(running_ptr.dtype.element_ty), mask=ok)


# the buffers are read and written in place: two passes each
@declare_passes(lambda launch: {
    "running_mean_ptr": 2, "running_var_ptr": 2, "counter_ptr": 2 * int(launch["HAS_COUNTER"]),
    "mean_ptr": 1, "var_ptr": 1, "momentum_ptr": int(launch["MOMENTUM_MODE"] == 1)})
@triton.jit
def _update_running_stats_kernel(
    running_mean_ptr, running_var_ptr, counter_ptr, mean_ptr, var_ptr, momentum_ptr,
    momentum, unbiased_factor, C,
    HAS_COUNTER: tl.constexpr, MOMENTUM_MODE: tl.constexpr, BLOCK: tl.constexpr,
):
    """nn.BatchNorm's update in one program: the counter is read and written once, so no
    other program can see it half-updated.  ``MOMENTUM_MODE``: 0 the float ``momentum``,
    1 a 0-dim tensor, 2 the cumulative average 1/num_batches_tracked (in the buffers'
    dtype, as ``1.0 / num_batches_tracked.to(dtype)`` rounds it)."""
    dtype = running_mean_ptr.dtype.element_ty
    if HAS_COUNTER:
        batches = tl.load(counter_ptr) + 1
        tl.store(counter_ptr, batches)
    if MOMENTUM_MODE == 2:
        rate = (1.0 / batches.to(tl.float32).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    elif MOMENTUM_MODE == 1:
        rate = tl.load(momentum_ptr).to(tl.float32)
    else:
        rate = momentum
    for start in range(0, C, BLOCK):
        channel = start + tl.arange(0, BLOCK)
        ok = channel < C
        batch_mean = tl.load(mean_ptr + channel, mask=ok, other=0.0).to(dtype).to(tl.float32)
        unbiased = (tl.load(var_ptr + channel, mask=ok, other=0.0) * unbiased_factor)
        unbiased = unbiased.to(dtype).to(tl.float32)
        _lerp_in_place(running_mean_ptr, channel, ok, batch_mean, rate)
        _lerp_in_place(running_var_ptr, channel, ok, unbiased, rate)


def update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count,
                         momentum):
    """See :func:`pyeuler.ops.norm_algebra.update_running_stats`; one launch, no host
    synchronisation.  Float64 or strided buffers take the torch-op version."""
    if count < 2 or (momentum is None and num_batches_tracked is None):
        return norm_algebra.update_running_stats(running_mean, running_var, num_batches_tracked,
                                                 mean, var, count, momentum)  # raises
    check_device(running_mean, "running_mean")
    buffers = (running_mean, running_var) + (() if num_batches_tracked is None
                                              else (num_batches_tracked,))
    if (running_mean.dtype == torch.float64 or running_var.dtype != running_mean.dtype
            or not all(t.is_contiguous() for t in buffers)):
        return norm_algebra.update_running_stats(running_mean, running_var, num_batches_tracked,
                                                 mean, var, count, momentum)
    mode = 2 if momentum is None else (1 if isinstance(momentum, torch.Tensor) else 0)
    _update_running_stats_kernel[(1,)](
        running_mean, running_var, num_batches_tracked, mean.detach().contiguous(),
        var.detach().contiguous(), momentum if mode == 1 else None,
        float(momentum) if mode == 0 else 0.0, count / (count - 1), running_mean.shape[0],
        HAS_COUNTER=num_batches_tracked is not None, MOMENTUM_MODE=mode,
        BLOCK=min(_BLOCK, triton.next_power_of_2(max(running_mean.shape[0], 1))))
    return None
