"""BatchNorm / GroupNorm statistics: Welford partials, then a deterministic Chan merge.

Two stages, no atomics and a fixed tiling, so results are bitwise reproducible on a device:

1. each program streams one chunk of the reduction domain and keeps a Welford state
   ``(count, mean, M2)`` per register lane (no cross-thread reduction inside the loop), then
   merges its lanes with Chan's formula into one partial per channel (BN) or per
   (sample, group) (GN), written to ``[n_splits, K]`` buffers;
2. one small kernel merges the partials in split order and also writes ``var = M2/count``,
   NaN where that overflowed to +inf (see :func:`pyeuler.ops.primitives.norm_stats`).

``norm_stats_partials`` and ``merge_stats`` are exposed separately so that SyncBatchNorm
style code can all-gather the per-rank ``(count, mean, M2)`` between the stages
(docs/semantics.md §8, §10).
Welford never forms E[x²] − E[x]², and each program first subtracts one of its own
elements (the shifted-data trick: x − shift is exact for nearby values), so inputs with
|mean| ≫ std keep their variance to float32 rounding of the deviations, not of the mean.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyeuler.ops import norm_algebra
from pyeuler.triton.coefficients import forward_coefficient_passes, store_forward_coefficients
from pyeuler.triton._utils import (
    REDUCTION_TILE,
    REDUCTION_WARPS,
    check_activation,
    declare_passes,
    dense_layout,
    inner_block,
    needs_wide_index,
    num_splits,
    outer_block,
    spatial_size,
)

__all__ = ["norm_stats", "norm_stats_and_coefficients", "norm_stats_partials", "merge_stats"]


@triton.jit
def _welford_lanes_to_partial(count, mean, m2, AXIS: tl.constexpr):
    """Chan-merge per-lane Welford states along ``AXIS`` (all axes if None)."""
    total = tl.sum(count, axis=AXIS)
    safe_total = tl.maximum(total, 1.0)
    merged_mean = tl.sum(count * mean, axis=AXIS) / safe_total
    if AXIS is None:
        deviation = mean - merged_mean
    else:
        deviation = mean - tl.expand_dims(merged_mean, AXIS)
    merged_m2 = tl.sum(m2 + count * deviation * deviation, axis=AXIS)
    return total, merged_mean, merged_m2


_PARTIALS_PASSES = {"x_ptr": 1, "count_ptr": 1, "mean_ptr": 1, "m2_ptr": 1}


@declare_passes(_PARTIALS_PASSES)  # the shift, one element per split, is not a pass
@triton.heuristics({"BLOCK_R": lambda a: outer_block(a["TILE"], a["BLOCK_C"], a["rows_per_split"])})
@triton.jit
def _channel_stats_partials_kernel(
    x_ptr, count_ptr, mean_ptr, m2_ptr,
    n_rows, C, rows_per_split,
    BLOCK_C: tl.constexpr, TILE: tl.constexpr, BLOCK_R: tl.constexpr, WIDE_INDEX: tl.constexpr,
):
    """Per-channel partials of a channels-last x viewed as ``[n_rows = N·S, C]``.

    Grid ``(n_splits, cdiv(C, BLOCK_C))``.  Tiles are ``[BLOCK_R, BLOCK_C]`` with C the
    contiguous axis, so each warp reads whole cache lines of consecutive channels.
    """
    split = tl.program_id(0)
    if WIDE_INDEX:
        split = split.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    row_start = split * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, n_rows)
    shift = tl.load(x_ptr + row_start * C + cols, mask=col_ok, other=0.0).to(tl.float32)

    count = tl.zeros([BLOCK_R], dtype=tl.float32)
    mean = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for r0 in range(row_start, row_stop, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < row_stop
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        x -= shift[None, :]
        # Every lane that is valid in this iteration has seen exactly one element per earlier
        # iteration (only the chunk's last tile is partial), so 1/count is one scalar.
        inv_count = 1.0 / ((r0 - row_start) // BLOCK_R + 1).to(tl.float32)
        delta = x - mean
        new_mean = mean + delta * inv_count
        mean = tl.where(ok, new_mean, mean)
        m2 = tl.where(ok, m2 + delta * (x - new_mean), m2)
        count = tl.where(row_ok, count + 1.0, count)

    total, part_mean, part_m2 = _welford_lanes_to_partial(
        tl.broadcast_to(count[:, None], [BLOCK_R, BLOCK_C]), mean, m2, 0)
    out = split * C + cols
    tl.store(count_ptr + out, total, mask=col_ok)
    tl.store(mean_ptr + out, shift + part_mean, mask=col_ok)
    tl.store(m2_ptr + out, part_m2, mask=col_ok)


@declare_passes(_PARTIALS_PASSES)
@triton.heuristics({"BLOCK_O": lambda a: outer_block(a["TILE"], a["BLOCK_I"], a["outer_per_split"])})
@triton.jit
def _segment_stats_partials_kernel(
    x_ptr, count_ptr, mean_ptr, m2_ptr,
    n_segments, segments_per_block, segment_block_stride, segment_stride,
    n_outer, outer_stride, n_inner, outer_per_split,
    BLOCK_I: tl.constexpr, TILE: tl.constexpr, BLOCK_O: tl.constexpr, WIDE_INDEX: tl.constexpr,
):
    """One partial per segment (a BN channel of planar x, or a GN (sample, group)).

    Segment ``k`` is the strided box ``base(k) + o·outer_stride + i`` for ``o < n_outer``,
    ``i < n_inner`` (``i`` contiguous), with
    ``base(k) = (k // segments_per_block)·segment_block_stride + (k % segments_per_block)·segment_stride``.
    Grid ``(n_segments, n_splits)``; split ``j`` covers ``o`` in ``[j·outer_per_split, …)``.
    """
    segment = tl.program_id(0)
    split = tl.program_id(1)
    if WIDE_INDEX:
        segment = segment.to(tl.int64)
        split = split.to(tl.int64)
    base = (segment // segments_per_block) * segment_block_stride + (segment % segments_per_block) * segment_stride
    o_start = split * outer_per_split
    o_stop = tl.minimum(o_start + outer_per_split, n_outer)
    shift = tl.load(x_ptr + base + o_start * outer_stride).to(tl.float32)

    count = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    mean = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    for o0 in range(o_start, o_stop, BLOCK_O):
        outer = o0 + tl.arange(0, BLOCK_O)
        row_ptr = x_ptr + base + outer[:, None] * outer_stride
        outer_ok = outer[:, None] < o_stop
        for i0 in range(0, n_inner, BLOCK_I):
            inner = i0 + tl.arange(0, BLOCK_I)
            ok = outer_ok & (inner[None, :] < n_inner)
            x = tl.load(row_ptr + inner[None, :], mask=ok, other=0.0).to(tl.float32) - shift
            # Lane counts differ here (partial blocks along both axes), hence the division.
            new_count = tl.where(ok, count + 1.0, count)
            delta = x - mean
            new_mean = mean + delta / tl.maximum(new_count, 1.0)
            mean = tl.where(ok, new_mean, mean)
            m2 = tl.where(ok, m2 + delta * (x - new_mean), m2)
            count = new_count

    total, part_mean, part_m2 = _welford_lanes_to_partial(count, mean, m2, None)
    out = split * n_segments + segment
    tl.store(count_ptr + out, total)
    tl.store(mean_ptr + out, shift + part_mean)
    tl.store(m2_ptr + out, part_m2)


@declare_passes(lambda launch: {
    "count_ptr": 1, "mean_ptr": 1, "m2_ptr": 1, "out_count_ptr": 1, "out_mean_ptr": 1,
    "out_m2_ptr": 1, "out_var_ptr": 1,
    **forward_coefficient_passes(launch, launch["COEFFICIENTS"])})
@triton.jit
def _merge_stats_kernel(
    count_ptr, mean_ptr, m2_ptr,
    out_count_ptr, out_mean_ptr, out_m2_ptr, out_var_ptr,
    weight_ptr, bias_ptr, h_ptr, scale_ptr, shift_ptr,
    n_parts, K, G, CPG, h_value, eps,
    COEFFICIENTS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    H_MODE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Chan-merge ``[n_parts, K]`` partials along the parts axis, in order (deterministic).

    With ``COEFFICIENTS`` the forward's ``scale``/``shift`` follow in the same program:
    statistic ``k = n·G + g`` covers channels ``g·CPG + j`` of sample n (BatchNorm: G = K,
    CPG = 1), written at ``n·C + channel``."""
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = ks < K
    count = tl.zeros([BLOCK_K], dtype=tl.float32)
    mean = tl.zeros([BLOCK_K], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_K], dtype=tl.float32)
    for p in range(0, n_parts):
        part = p * K + ks
        part_count = tl.load(count_ptr + part, mask=ok, other=0.0)
        part_mean = tl.load(mean_ptr + part, mask=ok, other=0.0)
        part_m2 = tl.load(m2_ptr + part, mask=ok, other=0.0)
        merged = count + part_count
        weight = part_count / tl.maximum(merged, 1.0)
        delta = part_mean - mean
        mean = mean + delta * weight
        # (delta·count)·(delta·weight), not delta²·count: with count = 0 (the first part)
        # a |mean| > 1.8e19 would make that inf·0 = NaN.
        m2 = m2 + part_m2 + (delta * count) * (delta * weight)
        count = merged
    var = m2 / tl.maximum(count, 1.0)  # lanes past K hold 0/0
    # Deliberately unlike torch: an overflowed (+inf) variance becomes NaN, so the output is
    # NaN rather than a confident relu(bias) from invstd = 0.
    var = tl.where(var == float("inf"), float("nan"), var)
    tl.store(out_count_ptr + ks, count, mask=ok)
    tl.store(out_mean_ptr + ks, mean, mask=ok)
    tl.store(out_m2_ptr + ks, m2, mask=ok)
    tl.store(out_var_ptr + ks, var, mask=ok)
    if COEFFICIENTS:
        sample, group = ks // G, ks % G
        for j in range(CPG):
            channel = group * CPG + j
            store_forward_coefficients(mean, var, channel, sample * (G * CPG) + channel, ok,
                                       weight_ptr, bias_ptr, h_ptr, scale_ptr, shift_ptr,
                                       h_value, eps, HAS_WEIGHT, HAS_BIAS, H_MODE)


def _check_groups(x: torch.Tensor, groups: int) -> None:
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 0:
        raise ValueError(f"groups must be an int >= 0 (0 = BatchNorm), got {groups!r}")
    if groups > 0 and x.shape[1] % groups:
        raise ValueError(f"groups={groups} must divide the channel count C={x.shape[1]}")
    if x.numel() == 0:
        raise ValueError(f"x has no elements (shape {tuple(x.shape)}): statistics are undefined")


def norm_stats_partials(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Welford partials ``(count, mean, M2)``, each float32 ``[n_parts, K]``.

    K = C for BatchNorm (``groups == 0``), N·groups for GroupNorm (row-major ``[N, groups]``).
    Merge them with :func:`merge_stats` (after an all-gather across ranks, if distributed).
    """
    check_activation(x)
    _check_groups(x, groups)
    x, channels_last = dense_layout(x)
    n, c, s = x.shape[0], x.shape[1], spatial_size(x)
    wide = needs_wide_index(x)

    if groups == 0 and channels_last:
        block_c = inner_block(c, 128)
        channel_blocks = triton.cdiv(c, block_c)
        splits, rows_per_split = num_splits(n * s, c, channel_blocks, x.device)
        parts = [torch.empty((splits, c), device=x.device, dtype=torch.float32) for _ in range(3)]
        _channel_stats_partials_kernel[(splits, channel_blocks)](
            x, *parts, n * s, c, rows_per_split, BLOCK_C=block_c, WIDE_INDEX=wide,
            TILE=REDUCTION_TILE, num_warps=REDUCTION_WARPS)
        return tuple(parts)

    if groups == 0:  # planar BN: channel k, planes n at stride C·S, S contiguous
        segments, per_block, block_stride, seg_stride = c, c, 0, s
        n_outer, outer_stride, n_inner = n, c * s, s
    elif channels_last:  # GN: (n, g), spatial rows at stride C, C/groups contiguous channels
        cg = c // groups
        segments, per_block, block_stride, seg_stride = n * groups, groups, s * c, cg
        n_outer, outer_stride, n_inner = s, c, cg
    else:  # planar GN: (n, g), the group's planes at stride S, S contiguous
        cg = c // groups
        segments, per_block, block_stride, seg_stride = n * groups, groups, c * s, cg * s
        n_outer, outer_stride, n_inner = cg, s, s
    splits, outer_per_split = num_splits(n_outer, n_inner, segments, x.device)
    parts = [torch.empty((splits, segments), device=x.device, dtype=torch.float32) for _ in range(3)]
    _segment_stats_partials_kernel[(segments, splits)](
        x, *parts, segments, per_block, block_stride, seg_stride,
        n_outer, outer_stride, n_inner, outer_per_split,
        BLOCK_I=inner_block(n_inner, 1024), WIDE_INDEX=wide, TILE=REDUCTION_TILE, num_warps=REDUCTION_WARPS)
    return tuple(parts)


def _merge(count, mean, m2, affine=None):
    """``[count, mean, M2, var]`` from the partials; with ``affine`` = (weight, bias, h,
    h_value, eps, groups, channels) also the forward coefficients ``scale, shift``."""
    n_parts, k = mean.shape
    outs = [torch.empty(k, device=mean.device, dtype=torch.float32) for _ in range(4)]
    block_k = min(1024, triton.next_power_of_2(k))
    weight = bias = h = None
    coefficients, stat_groups, per_group, h_value, eps = [], k, 1, 1.0, 1.0
    if affine is not None:
        weight, bias, h, h_value, eps, groups, channels = affine
        stat_groups = groups or channels
        per_group = channels // stat_groups
        shape = (channels,) if groups == 0 else (k // groups, channels)
        coefficients = [torch.empty(shape, device=mean.device, dtype=torch.float32)
                        for _ in range(2)]
    _merge_stats_kernel[(triton.cdiv(k, block_k),)](
        count, mean, m2, *outs, weight, bias, h, *(coefficients or (None, None)),
        n_parts, k, stat_groups, per_group, float(h_value), float(eps),
        COEFFICIENTS=affine is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        H_MODE=0 if h is None else (1 if h.dim() == 0 else 2), BLOCK_K=block_k)
    return outs + coefficients


def merge_stats(count: torch.Tensor, mean: torch.Tensor,
                m2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan-merge float32 ``[n_parts, K]`` Welford partials along dim 0 -> ``[K]`` each.

    Order-deterministic.  Also merges per-rank results stacked by an all-gather.
    """
    for name, t in (("count", count), ("mean", mean), ("m2", m2)):
        if t.dim() != 2 or t.shape != mean.shape or t.dtype != torch.float32 or t.device != mean.device:
            raise ValueError(f"{name} must be float32 [n_parts, K] like mean {list(mean.shape)} on {mean.device}, "
                             f"got {t.dtype} {list(t.shape)} on {t.device}")
    total, merged_mean, merged_m2, _ = _merge(count.contiguous(), mean.contiguous(), m2.contiguous())
    return total, merged_mean, merged_m2


def norm_stats(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased mean and variance, float32: ``[C]`` (groups == 0) or ``[N, groups]``."""
    _, mean, _, var = _merge(*norm_stats_partials(x, groups))
    if groups == 0:
        return mean, var
    return mean.view(x.shape[0], groups), var.view(x.shape[0], groups)


def norm_stats_and_coefficients(x, groups, weight, bias, h, h_value, eps):
    """:func:`norm_stats` and the forward coefficients
    (:func:`~pyeuler.ops.norm_algebra.forward_coefficients`) from its final stage: two
    launches where the two functions take three.  ``(mean, var, scale, shift)``."""
    channels = x.shape[1]
    if h is not None and h.dim() == 1 and h.shape[0] != channels:
        mean, var = norm_stats(x, groups)
        return mean, var, *norm_algebra.forward_coefficients(mean, var, weight, bias, h, h_value,
                                                             eps, groups, channels)
    for name, t in (("weight", weight), ("bias", bias), ("h", h)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    _, mean, _, var, scale, shift = _merge(*norm_stats_partials(x, groups),
                                           (weight, bias, h, h_value, eps, groups, channels))
    if groups:
        mean, var = mean.view(x.shape[0], groups), var.view(x.shape[0], groups)
    return mean, var, scale, shift
