"""Fused affine + residual add + ReLU: forward, and the two backward passes.

- forward: ``y = act(shortcut + scale·x + shift)`` (+ the ReLU mask), one read of x (and the
  shortcut), one write of y;
- backward reduce: per-channel or per-(sample, channel) sums of ``g = dy·m`` and
  ``g·(x − center)``: partials per chunk, then an in-order second stage (no float atomics,
  so deterministic); the ``[C]`` sums are what SyncBatchNorm would all-reduce.  Optionally
  the same pass writes the forward's ``y = act(scale·x + shift)`` again, for a backward that
  recomputes it (a convolution's weight gradient), instead of a pass of its own;
- backward apply: ``dx = a·g + b·(x − center) + c`` and optionally ``g`` for the shortcut;
  or, as the IE-Skip's last VJP pass, the step ``x − 2γ·(e − θ·dx)`` in dx's place (one more
  read, e or its term ``−2γ·e``; v = dx is never written);
- double backward (the backward of backward apply, for second-order gradients): the same
  reduce over ``ddx`` with a third sum ``ddx·g``, and one elementwise pass writing both
  ``ddy = m·(a·ddx + p + q·(x − center) + ddshortcut)`` and ``dxx = b·ddx + q·g``.

The ReLU and its gate follow torch (see :mod:`pyeuler.ops.primitives`): a NaN stays NaN,
the gate is ``not (y <= 0)``, and gating is a select, never a NaN-dropping max or product.

Tiles are ``[outer, inner]`` with ``inner`` the contiguous axis (see ``_utils``): planar x
tiles ``[planes, S]`` (a coefficient per tile row), channels-last x tiles ``[N·S rows, C]``
(a coefficient vector per tile, loaded once), so every load and store is coalesced and
vectorised along the contiguous dim and no per-element integer division is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyeuler.triton._utils import (
    REDUCTION_TILE,
    REDUCTION_WARPS,
    autotune_configs,
    check_activation,
    check_float,
    check_like,
    coefficients,
    declare_passes,
    dense_layout,
    inner_block,
    needs_wide_index,
    num_splits,
    outer_block,
    same_layout,
    spatial_size,
)

__all__ = [
    "affine_act_forward",
    "affine_act_backward_reduce",
    "affine_act_backward_reduce_recompute",
    "affine_act_backward_apply",
    "affine_act_backward_apply_ie_update",
    "affine_act_double_backward_reduce",
    "affine_act_double_backward_apply",
]

# Elementwise passes are autotuned (their results do not depend on the tiling): 2-4K-element
# tiles, i.e. 16-byte vectors per thread per tensor in bf16.  Reductions use the fixed
# REDUCTION_TILE (see _utils) so their summation order never changes.
_ELEMENTWISE_CONFIGS = autotune_configs([(2048, 4), (4096, 8)], interpreter_tile=2048)
_MAX_CHANNEL_BLOCK = 128  # 128 bf16 channels = 256 B per row: two full cache lines
_MAX_SPATIAL_BLOCK = 1024


@triton.jit
def _plane_coef_index(planes, C, PER_SAMPLE: tl.constexpr):
    """Coefficient offset of planar planes ``n·C + c`` ([N, C] coefficients are row-major)."""
    if PER_SAMPLE:
        index = planes
    else:
        index = planes % C
    return index


@triton.jit
def _coef_index(outer, inner, outer_ok, inner_ok, C, S,
                CHANNELS_LAST: tl.constexpr, PER_SAMPLE: tl.constexpr):
    """Offsets (and mask) into a ``[C]`` / ``[N, C]`` coefficient, broadcastable to the tile."""
    if CHANNELS_LAST:  # outer = n·S + s, inner = c
        if PER_SAMPLE:
            index = (outer // S)[:, None] * C + inner[None, :]
            ok = outer_ok[:, None] & inner_ok[None, :]
        else:
            index = inner[None, :]
            ok = inner_ok[None, :]
    else:  # outer = n·C + c, inner = s
        index = _plane_coef_index(outer, C, PER_SAMPLE)[:, None]
        ok = outer_ok[:, None]
    return index, ok


@triton.jit
def _elementwise_tile(n_outer, n_inner, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                      WIDE_INDEX: tl.constexpr):
    pid_outer = tl.program_id(0)
    if WIDE_INDEX:
        pid_outer = pid_outer.to(tl.int64)
    outer = pid_outer * BLOCK_O + tl.arange(0, BLOCK_O)
    inner = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    outer_ok = outer < n_outer
    inner_ok = inner < n_inner
    offsets = outer[:, None] * n_inner + inner[None, :]
    return outer, inner, outer_ok, inner_ok, offsets, outer_ok[:, None] & inner_ok[None, :]


@triton.jit
def _gate(x, mask_ptr, offsets, ok, scale_ptr, shift_ptr, coef, coef_ok,
          LOAD_MASK: tl.constexpr, RECOMPUTE_MASK: tl.constexpr):
    """The boolean ReLU gate ``m``: the saved mask, else ``not (scale·x + shift <= 0)``
    (open at NaN, as torch's threshold_backward), else all open."""
    if LOAD_MASK:
        m = tl.load(mask_ptr + offsets, mask=ok, other=0).to(tl.int1)
    elif RECOMPUTE_MASK:
        scale = tl.load(scale_ptr + coef, mask=coef_ok, other=0.0)
        shift = tl.load(shift_ptr + coef, mask=coef_ok, other=0.0)
        m = ~(scale * x + shift <= 0)
    else:
        m = tl.full(x.shape, 1, tl.int1)  # the selects by it fold away when compiled
    return m


@triton.jit
def _gated_grad(dy, x, mask_ptr, offsets, ok, scale_ptr, shift_ptr, coef, coef_ok,
                LOAD_MASK: tl.constexpr, RECOMPUTE_MASK: tl.constexpr):
    """``g = dy·m`` (see ``_gate``) as a select: a closed gate gives 0 even for NaN/inf dy."""
    m = _gate(x, mask_ptr, offsets, ok, scale_ptr, shift_ptr, coef, coef_ok,
              LOAD_MASK, RECOMPUTE_MASK)
    return tl.where(m, dy, 0.0)


@triton.jit
def _gated_grad_and_activation(dy, x, scale_ptr, shift_ptr, coef, coef_ok, RELU: tl.constexpr):
    """``(g, y)`` from one pre-activation ``scale·x + shift``: the gradient gated by the
    recomputed ReLU (see ``_gate``) and the forward's ``y = act(scale·x + shift)``."""
    scale = tl.load(scale_ptr + coef, mask=coef_ok, other=0.0)
    shift = tl.load(shift_ptr + coef, mask=coef_ok, other=0.0)
    pre = scale * x + shift
    if RELU:
        return tl.where(pre <= 0, 0.0, dy), tl.where(pre < 0, 0.0, pre)  # NaN: open, kept
    return dy, pre


def _gate_passes(launch) -> dict[str, int]:
    """Passes of ``_gate``'s operands: the saved mask, or scale and shift to recompute it."""
    recompute = not launch["LOAD_MASK"] and launch["RECOMPUTE_MASK"]
    return {"mask_ptr": int(launch["LOAD_MASK"]), "scale_ptr": int(recompute),
            "shift_ptr": int(recompute)}


@declare_passes(lambda launch: {
    "x_ptr": 1, "scale_ptr": 1, "shift_ptr": 1, "y_ptr": 1,
    "shortcut_ptr": int(launch["HAS_SHORTCUT"]), "mask_ptr": int(launch["SAVE_MASK"])})
@triton.autotune(configs=_ELEMENTWISE_CONFIGS, key=["n_outer", "n_inner"])
@triton.heuristics({"BLOCK_O": lambda a: outer_block(a["TILE"], a["BLOCK_I"], a["n_outer"])})
@triton.jit
def _affine_act_forward_kernel(
    x_ptr, scale_ptr, shift_ptr, shortcut_ptr, y_ptr, mask_ptr,
    n_outer, n_inner, C, S,
    CHANNELS_LAST: tl.constexpr, PER_SAMPLE: tl.constexpr, HAS_SHORTCUT: tl.constexpr,
    RELU: tl.constexpr, SAVE_MASK: tl.constexpr,
    BLOCK_I: tl.constexpr, TILE: tl.constexpr, BLOCK_O: tl.constexpr, WIDE_INDEX: tl.constexpr,
):
    outer, inner, outer_ok, inner_ok, offsets, ok = _elementwise_tile(
        n_outer, n_inner, BLOCK_O, BLOCK_I, WIDE_INDEX)
    coef, coef_ok = _coef_index(outer, inner, outer_ok, inner_ok, C, S, CHANNELS_LAST, PER_SAMPLE)
    scale = tl.load(scale_ptr + coef, mask=coef_ok, other=0.0)
    shift = tl.load(shift_ptr + coef, mask=coef_ok, other=0.0)
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    y = scale * x + shift
    if HAS_SHORTCUT:
        y += tl.load(shortcut_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y < 0, 0.0, y)  # keeps NaN, as torch.relu (tl.maximum would drop it)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=ok)
    if SAVE_MASK:
        tl.store(mask_ptr + offsets, ~(y <= 0), mask=ok)


def _grad_sums_passes(launch) -> dict[str, int]:
    """Both grad-sum kernels: one read of dy and x (and ddx), one write of each partial
    (and of y)."""
    double = int(launch["DOUBLE_BACKWARD"])
    activation = int(launch["ACTIVATION_OUT"])
    passes = {"dy_ptr": 1, "x_ptr": 1, "ddx_ptr": double, "center_ptr": 1, "w_parts_ptr": 1,
              "wx_parts_ptr": 1, "wg_parts_ptr": double, "y_ptr": activation,
              **_gate_passes(launch)}
    if activation:
        passes.update(scale_ptr=1, shift_ptr=1)
    return passes


@declare_passes(_grad_sums_passes)
@triton.heuristics({"BLOCK_R": lambda a: outer_block(a["TILE"], a["BLOCK_C"], a["rows_per_split"])})
@triton.jit
def _grad_sums_columns_kernel(
    dy_ptr, x_ptr, ddx_ptr, scale_ptr, shift_ptr, center_ptr, mask_ptr,
    w_parts_ptr, wx_parts_ptr, wg_parts_ptr, y_ptr,
    rows_per_segment, C, S, rows_per_split, n_segments,
    PER_SAMPLE: tl.constexpr, LOAD_MASK: tl.constexpr, RECOMPUTE_MASK: tl.constexpr,
    DOUBLE_BACKWARD: tl.constexpr, ACTIVATION_OUT: tl.constexpr,
    BLOCK_C: tl.constexpr, TILE: tl.constexpr, BLOCK_R: tl.constexpr, WIDE_INDEX: tl.constexpr,
):
    """Channels-last partial sums of ``w``, ``w·(x − center)`` (and ``w·g``) over rows ``n·S + s``.

    ``w = g = dy·m``; with ``DOUBLE_BACKWARD``, ``w = ddx`` and the third sum is added.
    ``ACTIVATION_OUT`` (no saved mask; the ReLU iff ``RECOMPUTE_MASK``): also write
    ``y = act(scale·x + shift)`` to ``y_ptr``.

    Grid ``(n_segments, cdiv(C, BLOCK_C), n_splits)``: segment = sample (per-sample sums,
    ``rows_per_segment = S``) or the whole batch (``n_segments = 1``).  Partials of each
    sum go to its own ``[n_splits, n_segments·C]`` buffer.  Accumulates whole tiles in
    registers and reduces across rows once at the end.
    """
    segment = tl.program_id(0)
    split = tl.program_id(2)
    if WIDE_INDEX:
        segment = segment.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    segment_start = segment * rows_per_segment
    row_start = segment_start + split * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, segment_start + rows_per_segment)

    acc_w = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_wx = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_wg = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)  # compiled away unless DOUBLE_BACKWARD
    for r0 in range(row_start, row_stop, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < row_stop
        ok = row_ok[:, None] & col_ok[None, :]
        offsets = rows[:, None] * C + cols[None, :]
        coef, coef_ok = _coef_index(rows, cols, row_ok, col_ok, C, S, True, PER_SAMPLE)
        dy = tl.load(dy_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        if ACTIVATION_OUT:
            g, y = _gated_grad_and_activation(dy, x, scale_ptr, shift_ptr, coef, coef_ok,
                                              RECOMPUTE_MASK)
            tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=ok)
        else:
            g = _gated_grad(dy, x, mask_ptr, offsets, ok, scale_ptr, shift_ptr, coef, coef_ok,
                            LOAD_MASK, RECOMPUTE_MASK)
        center = tl.load(center_ptr + coef, mask=coef_ok, other=0.0)
        if DOUBLE_BACKWARD:
            w = tl.load(ddx_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            acc_wg += w * g
        else:
            w = g
        acc_w += w
        acc_wx += w * (x - center)  # w is 0 on masked lanes

    out = (split * n_segments + segment) * C + cols
    tl.store(w_parts_ptr + out, tl.sum(acc_w, axis=0), mask=col_ok)
    tl.store(wx_parts_ptr + out, tl.sum(acc_wx, axis=0), mask=col_ok)
    if DOUBLE_BACKWARD:
        tl.store(wg_parts_ptr + out, tl.sum(acc_wg, axis=0), mask=col_ok)


@declare_passes(_grad_sums_passes)
@triton.heuristics({"BLOCK_P": lambda a: outer_block(a["TILE"], a["BLOCK_S"], a["planes_per_split"])})
@triton.jit
def _grad_sums_planes_kernel(
    dy_ptr, x_ptr, ddx_ptr, scale_ptr, shift_ptr, center_ptr, mask_ptr,
    w_parts_ptr, wx_parts_ptr, wg_parts_ptr, y_ptr,
    n_results, planes_per_result, planes_per_split, C, S,
    PER_SAMPLE: tl.constexpr, LOAD_MASK: tl.constexpr, RECOMPUTE_MASK: tl.constexpr,
    DOUBLE_BACKWARD: tl.constexpr, ACTIVATION_OUT: tl.constexpr,
    BLOCK_S: tl.constexpr, TILE: tl.constexpr, BLOCK_P: tl.constexpr, WIDE_INDEX: tl.constexpr,
):
    """Planar partial sums (terms as in the columns kernel): result ``k`` sums planes
    ``k + o·C`` (o < planes_per_result).

    Per-channel: k = c, planes_per_result = N.  Per-sample: k = n·C + c, one plane.
    Grid ``(n_results, n_splits)``; partials of each sum go to its own
    ``[n_splits, n_results]`` buffer.
    """
    result = tl.program_id(0)
    split = tl.program_id(1)
    if WIDE_INDEX:
        result = result.to(tl.int64)
    o_start = split * planes_per_split
    o_stop = tl.minimum(o_start + planes_per_split, planes_per_result)

    acc_w = tl.zeros([BLOCK_P, BLOCK_S], dtype=tl.float32)
    acc_wx = tl.zeros([BLOCK_P, BLOCK_S], dtype=tl.float32)
    acc_wg = tl.zeros([BLOCK_P, BLOCK_S], dtype=tl.float32)  # compiled away unless DOUBLE_BACKWARD
    for o0 in range(o_start, o_stop, BLOCK_P):
        o = o0 + tl.arange(0, BLOCK_P)
        plane_ok = o < o_stop
        planes = result + o * C
        coef = _plane_coef_index(planes, C, PER_SAMPLE)[:, None]
        coef_ok = plane_ok[:, None]
        center = tl.load(center_ptr + coef, mask=coef_ok, other=0.0)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            ok = coef_ok & (s[None, :] < S)
            offsets = planes[:, None] * S + s[None, :]
            dy = tl.load(dy_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            if ACTIVATION_OUT:
                g, y = _gated_grad_and_activation(dy, x, scale_ptr, shift_ptr, coef, coef_ok,
                                                  RECOMPUTE_MASK)
                tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=ok)
            else:
                g = _gated_grad(dy, x, mask_ptr, offsets, ok, scale_ptr, shift_ptr, coef,
                                coef_ok, LOAD_MASK, RECOMPUTE_MASK)
            if DOUBLE_BACKWARD:
                w = tl.load(ddx_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
                acc_wg += w * g
            else:
                w = g
            acc_w += w
            acc_wx += w * (x - center)  # w is 0 on masked lanes

    out = split * n_results + result
    tl.store(w_parts_ptr + out, tl.sum(acc_w))
    tl.store(wx_parts_ptr + out, tl.sum(acc_wx))
    if DOUBLE_BACKWARD:
        tl.store(wg_parts_ptr + out, tl.sum(acc_wg))


@declare_passes(lambda launch: {
    "w_parts_ptr": 1, "wx_parts_ptr": 1, "w_sum_ptr": 1, "wx_sum_ptr": 1,
    "wg_parts_ptr": int(launch["THREE_SUMS"]), "wg_sum_ptr": int(launch["THREE_SUMS"])})
@triton.jit
def _sum_partials_kernel(w_parts_ptr, wx_parts_ptr, wg_parts_ptr, w_sum_ptr, wx_sum_ptr,
                         wg_sum_ptr, n_parts, K, THREE_SUMS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Sum each ``[n_parts, K]`` partials buffer along parts, in order (deterministic), into
    its own ``[K]`` output (separate buffers: the sums leave custom ops unaliased).

    Grid ``(cdiv(K, BLOCK_K),)``; the third sum only with ``THREE_SUMS``.
    """
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = ks < K
    total_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    total_wx = tl.zeros([BLOCK_K], dtype=tl.float32)
    total_wg = tl.zeros([BLOCK_K], dtype=tl.float32)  # compiled away unless THREE_SUMS
    for p in range(0, n_parts):
        total_w += tl.load(w_parts_ptr + p * K + ks, mask=ok, other=0.0)
        total_wx += tl.load(wx_parts_ptr + p * K + ks, mask=ok, other=0.0)
        if THREE_SUMS:
            total_wg += tl.load(wg_parts_ptr + p * K + ks, mask=ok, other=0.0)
    tl.store(w_sum_ptr + ks, total_w, mask=ok)
    tl.store(wx_sum_ptr + ks, total_wx, mask=ok)
    if THREE_SUMS:
        tl.store(wg_sum_ptr + ks, total_wg, mask=ok)


@declare_passes(lambda launch: {
    "dy_ptr": 1, "x_ptr": 1, "a_ptr": 1, "b_ptr": 1, "c_ptr": 1, "center_ptr": 1, "dx_ptr": 1,
    "dshortcut_ptr": int(launch["WANT_DSHORTCUT"]), "residual_ptr": int(launch["IE_UPDATE"]),
    "dx_addend_ptr": int(launch["HAS_DX_ADDEND"]),
    "dx_addend2_ptr": int(launch["HAS_DX_ADDEND2"]), **_gate_passes(launch)})
@triton.autotune(configs=_ELEMENTWISE_CONFIGS, key=["n_outer", "n_inner"])
@triton.heuristics({"BLOCK_O": lambda a: outer_block(a["TILE"], a["BLOCK_I"], a["n_outer"])})
@triton.jit
def _affine_act_backward_apply_kernel(
    dy_ptr, x_ptr, scale_ptr, shift_ptr, mask_ptr, a_ptr, b_ptr, c_ptr, center_ptr,
    dx_ptr, dshortcut_ptr, residual_ptr, dx_addend_ptr, dx_addend2_ptr,
    n_outer, n_inner, C, S, residual_coef, v_coef,
    CHANNELS_LAST: tl.constexpr, PER_SAMPLE: tl.constexpr, LOAD_MASK: tl.constexpr,
    RECOMPUTE_MASK: tl.constexpr, WANT_DSHORTCUT: tl.constexpr, IE_UPDATE: tl.constexpr,
    HAS_DX_ADDEND: tl.constexpr, HAS_DX_ADDEND2: tl.constexpr, BLOCK_I: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_O: tl.constexpr, WIDE_INDEX: tl.constexpr,
):
    """``dx = a·g + b·(x − center) + c`` into ``dx_ptr``, and ``g`` into ``dshortcut_ptr``.

    ``HAS_DX_ADDEND``, ``HAS_DX_ADDEND2``: one or two other shares of x's gradient are added
    to dx, in that order, before it is rounded (the host passes the second only with the
    first).
    ``IE_UPDATE``: ``dx`` is the IE-Skip VJP ``v``, and ``dx_ptr`` receives the step
    ``x + residual_coef·r + v_coef·v = x − 2γ·(e − θ·v)`` instead (r = e with coefficient
    −2γ, or its term −2γ·e with 1; ``v_coef`` = 2γθ), so v is never written.
    """
    outer, inner, outer_ok, inner_ok, offsets, ok = _elementwise_tile(
        n_outer, n_inner, BLOCK_O, BLOCK_I, WIDE_INDEX)
    coef, coef_ok = _coef_index(outer, inner, outer_ok, inner_ok, C, S, CHANNELS_LAST, PER_SAMPLE)
    dy = tl.load(dy_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    g = _gated_grad(dy, x, mask_ptr, offsets, ok, scale_ptr, shift_ptr, coef, coef_ok,
                    LOAD_MASK, RECOMPUTE_MASK)
    a = tl.load(a_ptr + coef, mask=coef_ok, other=0.0)
    b = tl.load(b_ptr + coef, mask=coef_ok, other=0.0)
    c = tl.load(c_ptr + coef, mask=coef_ok, other=0.0)
    center = tl.load(center_ptr + coef, mask=coef_ok, other=0.0)
    # a zero b (running statistics) contributes nothing, even at x = ±inf (0·inf is NaN)
    dx = a * g + tl.where(b == 0, 0.0, b * (x - center)) + c
    if HAS_DX_ADDEND:
        dx += tl.load(dx_addend_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    if HAS_DX_ADDEND2:
        dx += tl.load(dx_addend2_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    if IE_UPDATE:
        r = tl.load(residual_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        dx = x + residual_coef * r + v_coef * dx
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    if WANT_DSHORTCUT:
        tl.store(dshortcut_ptr + offsets, g.to(dshortcut_ptr.dtype.element_ty), mask=ok)


@declare_passes(lambda launch: {
    "ddx_ptr": 1, "dy_ptr": 1, "x_ptr": 1, "a_ptr": 1, "b_ptr": 1, "p_ptr": 1, "q_ptr": 1,
    "center_ptr": 1, "ddy_ptr": 1, "dxx_ptr": 1,
    "ddshortcut_ptr": int(launch["HAS_DDSHORTCUT"]),
    "dxx_addend_ptr": int(launch["HAS_DXX_ADDEND"]), **_gate_passes(launch)})
@triton.autotune(configs=_ELEMENTWISE_CONFIGS, key=["n_outer", "n_inner"])
@triton.heuristics({"BLOCK_O": lambda a: outer_block(a["TILE"], a["BLOCK_I"], a["n_outer"])})
@triton.jit
def _affine_act_double_backward_apply_kernel(
    ddx_ptr, dy_ptr, x_ptr, scale_ptr, shift_ptr, mask_ptr, a_ptr, b_ptr, p_ptr, q_ptr,
    center_ptr, ddshortcut_ptr, dxx_addend_ptr, ddy_ptr, dxx_ptr,
    n_outer, n_inner, C, S, ddx_scale,
    CHANNELS_LAST: tl.constexpr, PER_SAMPLE: tl.constexpr, LOAD_MASK: tl.constexpr,
    RECOMPUTE_MASK: tl.constexpr, HAS_DDSHORTCUT: tl.constexpr, SCALE_DDX: tl.constexpr,
    HAS_DXX_ADDEND: tl.constexpr,
    BLOCK_I: tl.constexpr, TILE: tl.constexpr, BLOCK_O: tl.constexpr, WIDE_INDEX: tl.constexpr,
):
    """``ddy = m·(a·dd + p + q·(x − center) + ddshortcut)`` and
    ``dxx = b·dd + q·g + dxx_addend``, ``dd = ddx_scale·ddx``."""
    outer, inner, outer_ok, inner_ok, offsets, ok = _elementwise_tile(
        n_outer, n_inner, BLOCK_O, BLOCK_I, WIDE_INDEX)
    coef, coef_ok = _coef_index(outer, inner, outer_ok, inner_ok, C, S, CHANNELS_LAST, PER_SAMPLE)
    ddx = tl.load(ddx_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    if HAS_DXX_ADDEND:  # read before ddx is scaled: the IE update passes one tensor as both
        dxx_addend = tl.load(dxx_addend_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    if SCALE_DDX:
        ddx = ddx_scale * ddx
    dy = tl.load(dy_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    m = _gate(x, mask_ptr, offsets, ok, scale_ptr, shift_ptr, coef, coef_ok, LOAD_MASK, RECOMPUTE_MASK)
    a = tl.load(a_ptr + coef, mask=coef_ok, other=0.0)
    b = tl.load(b_ptr + coef, mask=coef_ok, other=0.0)
    p = tl.load(p_ptr + coef, mask=coef_ok, other=0.0)
    q = tl.load(q_ptr + coef, mask=coef_ok, other=0.0)
    center = tl.load(center_ptr + coef, mask=coef_ok, other=0.0)
    ddy = a * ddx + p + tl.where(q == 0, 0.0, q * (x - center))
    if HAS_DDSHORTCUT:
        ddy += tl.load(ddshortcut_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    # a zero b or q is an absent term (eval mode): exactly 0, even where ddx or dy is NaN
    dxx = tl.where(b == 0, 0.0, b * ddx) + tl.where(q == 0, 0.0, q * tl.where(m, dy, 0.0))
    if HAS_DXX_ADDEND:
        dxx += dxx_addend
    tl.store(ddy_ptr + offsets, tl.where(m, ddy, 0.0).to(ddy_ptr.dtype.element_ty), mask=ok)
    tl.store(dxx_ptr + offsets, dxx.to(dxx_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- host side


def _elementwise_geometry(x: torch.Tensor, channels_last: bool) -> tuple[int, int, int]:
    """``(n_outer, n_inner, BLOCK_I)`` of the ``[outer, inner]`` view of a dense x."""
    n, c, s = x.shape[0], x.shape[1], spatial_size(x)
    if channels_last:
        return n * s, c, inner_block(c, _MAX_CHANNEL_BLOCK)
    return n * c, s, inner_block(s, _MAX_SPATIAL_BLOCK)


def _elementwise_grid(n_outer: int, n_inner: int):
    return lambda meta: (triton.cdiv(n_outer, meta["BLOCK_O"]), triton.cdiv(n_inner, meta["BLOCK_I"]))


def _check_mask(mask: torch.Tensor | None, x: torch.Tensor) -> None:
    if mask is not None:
        check_like(mask, "mask", x, dtypes=(torch.bool,))


def affine_act_forward(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    shortcut: torch.Tensor | None,
    relu: bool,
    save_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y = act(shortcut + scale·x + shift)``; y in x's dtype and layout, mask iff save_mask."""
    check_activation(x)
    per_sample, (scale, shift) = coefficients(x, scale=scale, shift=shift)
    if shortcut is not None:
        check_like(shortcut, "shortcut", x)
    x, channels_last = dense_layout(x)
    if shortcut is not None:
        shortcut = same_layout(shortcut, x)
    y = torch.empty_like(x)
    mask = torch.empty_like(x, dtype=torch.bool) if save_mask else None
    if x.numel() == 0:
        return y, mask
    n_outer, n_inner, block_i = _elementwise_geometry(x, channels_last)
    _affine_act_forward_kernel[_elementwise_grid(n_outer, n_inner)](
        x, scale, shift, shortcut, y, mask,
        n_outer, n_inner, x.shape[1], spatial_size(x),
        CHANNELS_LAST=channels_last, PER_SAMPLE=per_sample, HAS_SHORTCUT=shortcut is not None,
        RELU=bool(relu), SAVE_MASK=bool(save_mask), BLOCK_I=block_i, WIDE_INDEX=needs_wide_index(x))
    return y, mask


def _grad_sums(dy, x, scale, shift, center, mask, relu, per_sample, ddx=None, y_dtype=None):
    """Validate and launch the split reduction, then merge its partials in order.

    Sums of ``g``, ``g·(x − center)``; with ``ddx``, of ``ddx``, ``ddx·(x − center)``,
    ``ddx·g``.  Each float32, ``[C]`` or ``[N, C]`` if per_sample.  With ``y_dtype`` (no
    mask), the pass also writes ``y = act(scale·x + shift)`` in x's layout, returned last.
    """
    check_activation(x)
    check_like(dy, "dy", x)
    if ddx is not None:
        check_like(ddx, "ddx", x)
    _check_mask(mask, x)
    per_sample_coef, (scale, shift, center) = coefficients(x, scale=scale, shift=shift, center=center)
    x, channels_last = dense_layout(x)
    dy = same_layout(dy, x)
    if ddx is not None:
        ddx = same_layout(ddx, x)
    if mask is not None:
        mask = same_layout(mask, x)
    n, c, s = x.shape[0], x.shape[1], spatial_size(x)
    out_shape = (n, c) if per_sample else (c,)
    n_sums = 2 if ddx is None else 3
    y = None if y_dtype is None else torch.empty_like(x, dtype=y_dtype)
    activation = () if y is None else (y,)
    if x.numel() == 0:
        return tuple(torch.zeros(out_shape, device=x.device, dtype=torch.float32)
                     for _ in range(n_sums)) + activation
    flags = dict(PER_SAMPLE=per_sample_coef, LOAD_MASK=mask is not None,
                 RECOMPUTE_MASK=mask is None and bool(relu), DOUBLE_BACKWARD=ddx is not None,
                 ACTIVATION_OUT=y is not None, WIDE_INDEX=needs_wide_index(x))
    k = n * c if per_sample else c

    def buffers(rows):
        # one buffer per sum, so the sums never alias each other
        return [torch.empty((rows, k), device=x.device, dtype=torch.float32)
                for _ in range(n_sums)] + [None] * (3 - n_sums)

    if channels_last:
        n_segments, rows_per_segment = (n, s) if per_sample else (1, n * s)
        block_c = inner_block(c, _MAX_CHANNEL_BLOCK)
        channel_blocks = triton.cdiv(c, block_c)
        splits, rows_per_split = num_splits(rows_per_segment, c, channel_blocks * n_segments, x.device)
        parts = buffers(splits)
        _grad_sums_columns_kernel[(n_segments, channel_blocks, splits)](
            dy, x, ddx, scale, shift, center, mask, *parts, y,
            rows_per_segment, c, s, rows_per_split, n_segments, BLOCK_C=block_c, **flags,
            TILE=REDUCTION_TILE, num_warps=REDUCTION_WARPS)
    else:
        planes_per_result = 1 if per_sample else n
        splits, planes_per_split = num_splits(planes_per_result, s, k, x.device)
        parts = buffers(splits)
        _grad_sums_planes_kernel[(k, splits)](
            dy, x, ddx, scale, shift, center, mask, *parts, y,
            k, planes_per_result, planes_per_split, c, s,
            BLOCK_S=inner_block(s, _MAX_SPATIAL_BLOCK), **flags, TILE=REDUCTION_TILE, num_warps=REDUCTION_WARPS)

    if splits == 1:
        return tuple(part.view(out_shape) for part in parts[:n_sums]) + activation
    sums = buffers(1)
    block_k = min(1024, triton.next_power_of_2(k))
    _sum_partials_kernel[(triton.cdiv(k, block_k),)](*parts, *sums, splits, k,
                                                     THREE_SUMS=n_sums == 3, BLOCK_K=block_k)
    return tuple(total.view(out_shape) for total in sums[:n_sums]) + activation


def affine_act_backward_reduce(
    dy: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    center: torch.Tensor,
    mask: torch.Tensor | None,
    relu: bool,
    per_sample: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 sums of ``g = dy·m`` and ``g·(x − center)``: ``[C]``, or ``[N, C]`` if per_sample."""
    return _grad_sums(dy, x, scale, shift, center, mask, relu, per_sample)


def affine_act_backward_reduce_recompute(
    dy: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    center: torch.Tensor,
    relu: bool,
    per_sample: bool,
    y_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 sums of ``g = dy·m`` (gate recomputed) and ``g·(x − center)``, and
    ``y = act(scale·x + shift)`` in ``y_dtype`` and x's layout, from one pass over x."""
    if y_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"y_dtype must be float32, float16 or bfloat16, got {y_dtype}")
    return _grad_sums(dy, x, scale, shift, center, None, relu, per_sample, y_dtype=y_dtype)


def affine_act_double_backward_reduce(
    ddx: torch.Tensor,
    dy: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    center: torch.Tensor,
    mask: torch.Tensor | None,
    relu: bool,
    per_sample: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 sums of ``ddx``, ``ddx·(x − center)``, ``ddx·g``: ``[C]``, or ``[N, C]`` if per_sample."""
    return _grad_sums(dy, x, scale, shift, center, mask, relu, per_sample, ddx=ddx)


def _backward_apply(dy, x, scale, shift, mask, relu, a, b, c, center, want_dshortcut,
                    residual=None, residual_coef=0.0, v_coef=0.0, dx_addends=()):
    """Validate and launch the apply kernel; with ``residual``, its IE-update epilogue;
    ``dx_addends``: at most two tensors added to dx in order, checked by the caller."""
    check_activation(x)
    check_like(dy, "dy", x)
    _check_mask(mask, x)
    if residual is not None:
        check_like(residual, "residual", x)
    per_sample, (scale, shift, a, b, c, center) = coefficients(
        x, scale=scale, shift=shift, a=a, b=b, c=c, center=center)
    x, channels_last = dense_layout(x)
    dy = same_layout(dy, x)
    if mask is not None:
        mask = same_layout(mask, x)
    if residual is not None:
        residual = same_layout(residual, x)
    dx_addends = [same_layout(addend, x) for addend in dx_addends]
    dx_addend, dx_addend2 = dx_addends + [None] * (2 - len(dx_addends))
    dx = torch.empty_like(x)
    dshortcut = torch.empty_like(x, dtype=dy.dtype) if want_dshortcut else None
    if x.numel() == 0:
        return dx, dshortcut
    n_outer, n_inner, block_i = _elementwise_geometry(x, channels_last)
    _affine_act_backward_apply_kernel[_elementwise_grid(n_outer, n_inner)](
        dy, x, scale, shift, mask, a, b, c, center, dx, dshortcut, residual, dx_addend,
        dx_addend2, n_outer, n_inner, x.shape[1], spatial_size(x), residual_coef, v_coef,
        CHANNELS_LAST=channels_last, PER_SAMPLE=per_sample, LOAD_MASK=mask is not None,
        RECOMPUTE_MASK=mask is None and bool(relu), WANT_DSHORTCUT=bool(want_dshortcut),
        IE_UPDATE=residual is not None, HAS_DX_ADDEND=dx_addend is not None,
        HAS_DX_ADDEND2=dx_addend2 is not None, BLOCK_I=block_i, WIDE_INDEX=needs_wide_index(x))
    return dx, dshortcut


def affine_act_backward_apply(
    dy: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    mask: torch.Tensor | None,
    relu: bool,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    center: torch.Tensor,
    want_dshortcut: bool,
    dx_addend: torch.Tensor | None = None,
    dx_addend2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``dx = ((a·g + b·(x − center) + c) + dx_addend) + dx_addend2`` (x's dtype and layout;
    each addend optional, x's shape); ``g`` (dy's dtype) iff asked."""
    addends = {"dx_addend": dx_addend, "dx_addend2": dx_addend2}
    for name, addend in addends.items():
        if addend is not None:
            check_like(addend, name, x)
    # an absent first addend moves the second into its place: the same sum
    addends = tuple(t for t in addends.values() if t is not None)
    return _backward_apply(dy, x, scale, shift, mask, relu, a, b, c, center, want_dshortcut,
                           dx_addends=addends)


def affine_act_backward_apply_ie_update(
    dy: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    mask: torch.Tensor | None,
    relu: bool,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    center: torch.Tensor,
    residual: torch.Tensor,
    step_size: float,
    theta: float,
    residual_is_term: bool,
) -> torch.Tensor:
    """The IE step ``x − 2γ·(e − θ·v)`` with ``v = a·g + b·(x − center) + c`` never written
    (x's dtype and layout); ``residual`` is e, or with ``residual_is_term`` its term
    ``−2γ·e``."""
    step_size = check_float(step_size, "step_size")
    theta = check_float(theta, "theta")
    residual_coef = 1.0 if residual_is_term else -2.0 * step_size
    x_new, _ = _backward_apply(dy, x, scale, shift, mask, relu, a, b, c, center, False,
                               residual=residual, residual_coef=residual_coef,
                               v_coef=2.0 * step_size * theta)
    return x_new


def affine_act_double_backward_apply(
    ddx: torch.Tensor,
    dy: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    mask: torch.Tensor | None,
    relu: bool,
    a: torch.Tensor,
    b: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    center: torch.Tensor,
    ddshortcut: torch.Tensor | None,
    ddx_scale: float = 1.0,
    dxx_addend: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ddy = m·(a·dd + p + q·(x − center) + ddshortcut)`` (dy's dtype) and
    ``dxx = b·dd + q·g + dxx_addend`` (x's dtype), ``dd = ddx_scale·ddx``, both in x's
    layout (pyeuler.ops.primitives.affine_act_double_backward_apply)."""
    check_activation(x)
    check_like(ddx, "ddx", x)
    check_like(dy, "dy", x)
    _check_mask(mask, x)
    if ddshortcut is not None:
        check_like(ddshortcut, "ddshortcut", x)
    if dxx_addend is not None:
        check_like(dxx_addend, "dxx_addend", x)
    ddx_scale = check_float(ddx_scale, "ddx_scale")
    per_sample, (scale, shift, a, b, p, q, center) = coefficients(
        x, scale=scale, shift=shift, a=a, b=b, p=p, q=q, center=center)
    x, channels_last = dense_layout(x)
    ddx = same_layout(ddx, x)
    dy = same_layout(dy, x)
    if mask is not None:
        mask = same_layout(mask, x)
    if ddshortcut is not None:
        ddshortcut = same_layout(ddshortcut, x)
    if dxx_addend is not None:
        dxx_addend = same_layout(dxx_addend, x)
    ddy = torch.empty_like(x, dtype=dy.dtype)
    dxx = torch.empty_like(x)
    if x.numel() == 0:
        return ddy, dxx
    n_outer, n_inner, block_i = _elementwise_geometry(x, channels_last)
    _affine_act_double_backward_apply_kernel[_elementwise_grid(n_outer, n_inner)](
        ddx, dy, x, scale, shift, mask, a, b, p, q, center, ddshortcut, dxx_addend, ddy, dxx,
        n_outer, n_inner, x.shape[1], spatial_size(x), ddx_scale,
        CHANNELS_LAST=channels_last, PER_SAMPLE=per_sample, LOAD_MASK=mask is not None,
        RECOMPUTE_MASK=mask is None and bool(relu), HAS_DDSHORTCUT=ddshortcut is not None,
        SCALE_DDX=ddx_scale != 1.0, HAS_DXX_ADDEND=dxx_addend is not None,
        BLOCK_I=block_i, WIDE_INDEX=needs_wide_index(x))
    return ddy, dxx
