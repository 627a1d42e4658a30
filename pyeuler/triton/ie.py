"""IE-Skip elementwise steps (docs/semantics.md §2): the residual e and the gradient step on x.

Both are pure streams over dense tensors of one layout, so they run as flat 1-D kernels
over storage order (any dense layout, channels-last included) with 16-byte vector loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyeuler.triton._utils import (
    SUPPORTED_DTYPES,
    autotune_configs,
    check_device,
    check_float,
    check_like,
    declare_passes,
    needs_wide_index,
    same_layout,
)

__all__ = ["ie_residual", "ie_update"]

_CONFIGS = autotune_configs([(2048, 4), (4096, 8)], interpreter_tile=4096)


@triton.jit
def _flat_offsets(numel, TILE: tl.constexpr, WIDE_INDEX: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE_INDEX:
        pid = pid.to(tl.int64)
    offsets = pid * TILE + tl.arange(0, TILE)
    return offsets, offsets < numel


@declare_passes({"x_ptr": 1, "c_ptr": 1, "fx_ptr": 1, "e_ptr": 1})
@triton.autotune(configs=_CONFIGS, key=["numel"])
@triton.jit
def _ie_residual_kernel(x_ptr, c_ptr, fx_ptr, e_ptr, numel, theta,
                        TILE: tl.constexpr, WIDE_INDEX: tl.constexpr):
    offsets, ok = _flat_offsets(numel, TILE, WIDE_INDEX)
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    fx = tl.load(fx_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    e = x - c - theta * fx
    tl.store(e_ptr + offsets, e.to(e_ptr.dtype.element_ty), mask=ok)


@declare_passes({"x_ptr": 1, "e_ptr": 1, "v_ptr": 1, "out_ptr": 1})
@triton.autotune(configs=_CONFIGS, key=["numel"])
@triton.jit
def _ie_update_kernel(x_ptr, e_ptr, v_ptr, out_ptr, numel, two_step_size, theta,
                      TILE: tl.constexpr, WIDE_INDEX: tl.constexpr):
    offsets, ok = _flat_offsets(numel, TILE, WIDE_INDEX)
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    out = x - two_step_size * (e - theta * v)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=ok)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x if its storage is one dense block (contiguous, channels-last, ...), else a copy."""
    order = sorted((stride, size) for size, stride in zip(x.shape, x.stride()) if size > 1)
    expected = 1
    for stride, size in order:
        if stride != expected:
            return x.contiguous()
        expected *= size
    return x


def _prepare(x: torch.Tensor, **others: torch.Tensor) -> list[torch.Tensor]:
    """Validate; return x (dense) and the others in x's layout, so storage order matches."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16 for the Triton backend, got {x.dtype}")
    check_device(x, "x")
    for name, t in others.items():
        check_like(t, name, x)
    x = _dense(x)
    return [x] + [same_layout(t, x) for t in others.values()]


def _grid(numel: int):
    return lambda meta: (triton.cdiv(numel, meta["TILE"]),)


def ie_residual(x: torch.Tensor, c: torch.Tensor, fx: torch.Tensor, theta: float) -> torch.Tensor:
    """IE-Skip residual ``e = x − c − θ·f(x)`` in x's dtype and layout."""
    theta = check_float(theta, "theta")
    x, c, fx = _prepare(x, c=c, fx=fx)
    e = torch.empty_like(x)
    if x.numel():
        _ie_residual_kernel[_grid(x.numel())](x, c, fx, e, x.numel(), theta,
                                              WIDE_INDEX=needs_wide_index(x))
    return e


def ie_update(x: torch.Tensor, e: torch.Tensor, v: torch.Tensor, step_size: float, theta: float) -> torch.Tensor:
    """IE-Skip gradient step ``x − 2γ·(e − θ·v)`` with ``v = J_fᵀ e``, in x's dtype and layout."""
    step_size = check_float(step_size, "step_size")
    theta = check_float(theta, "theta")
    x, e, v = _prepare(x, e=e, v=v)
    out = torch.empty_like(x)
    if x.numel():
        _ie_update_kernel[_grid(x.numel())](x, e, v, out, x.numel(), 2.0 * step_size, theta,
                                            WIDE_INDEX=needs_wide_index(x))
    return out
