"""IE-Skip elementwise steps (docs/semantics.md §2): the residual e (with its term ``−2γ·e``
of the step), that map's adjoint, and the gradient step on x.

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

__all__ = ["ie_residual", "ie_residual_with_term", "ie_residual_with_term_adjoint", "ie_update"]

_CONFIGS = autotune_configs([(2048, 4), (4096, 8)], interpreter_tile=4096)


@triton.jit
def _flat_offsets(numel, TILE: tl.constexpr, WIDE_INDEX: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE_INDEX:
        pid = pid.to(tl.int64)
    offsets = pid * TILE + tl.arange(0, TILE)
    return offsets, offsets < numel


@declare_passes(lambda launch: {"x_ptr": 1, "c_ptr": 1, "fx_ptr": 1, "e_ptr": 1,
                                 "term_ptr": int(launch["WITH_TERM"])})
@triton.autotune(configs=_CONFIGS, key=["numel"])
@triton.jit
def _ie_residual_kernel(x_ptr, c_ptr, fx_ptr, e_ptr, term_ptr, numel, theta, two_step_size,
                        WITH_TERM: tl.constexpr, TILE: tl.constexpr, WIDE_INDEX: tl.constexpr):
    """``e = x − c − θ·fx``; with ``WITH_TERM`` also ``−2γ·e`` (from e unrounded)."""
    offsets, ok = _flat_offsets(numel, TILE, WIDE_INDEX)
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    fx = tl.load(fx_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    e = x - c - theta * fx
    tl.store(e_ptr + offsets, e.to(e_ptr.dtype.element_ty), mask=ok)
    if WITH_TERM:
        tl.store(term_ptr + offsets, (-two_step_size * e).to(term_ptr.dtype.element_ty), mask=ok)


@declare_passes(lambda launch: {"de_ptr": 1, "dterm_ptr": 1, "dx_ptr": 1, "dc_ptr": 1,
                                 "dfx_ptr": int(launch["WRITE_DFX"]),
                                 "dx_addend_ptr": int(launch["HAS_DX_ADDEND"])})
@triton.autotune(configs=_CONFIGS, key=["numel"])
@triton.jit
def _ie_residual_adjoint_kernel(de_ptr, dterm_ptr, dx_addend_ptr, dx_ptr, dc_ptr, dfx_ptr, numel,
                                theta, two_step_size, WRITE_DFX: tl.constexpr,
                                HAS_DX_ADDEND: tl.constexpr, TILE: tl.constexpr,
                                WIDE_INDEX: tl.constexpr):
    """``u = de − 2γ·dterm``: ``dx = u (+ dx_addend)``, ``dc = −u``, ``dfx = −θ·u``
    (``WRITE_DFX``)."""
    offsets, ok = _flat_offsets(numel, TILE, WIDE_INDEX)
    de = tl.load(de_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    dterm = tl.load(dterm_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    u = de - two_step_size * dterm
    dx = u
    if HAS_DX_ADDEND:
        dx += tl.load(dx_addend_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    tl.store(dc_ptr + offsets, (-u).to(dc_ptr.dtype.element_ty), mask=ok)
    if WRITE_DFX:
        tl.store(dfx_ptr + offsets, (-theta * u).to(dfx_ptr.dtype.element_ty), mask=ok)


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


def _prepare(x: torch.Tensor, first: str = "x", **others: torch.Tensor) -> list[torch.Tensor]:
    """Validate; return x (dense) and the others in x's layout, so storage order matches.
    ``first``: x's argument name, for the errors."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{first} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{first} must be float32, float16 or bfloat16 for the Triton backend, "
                        f"got {x.dtype}")
    check_device(x, first)
    for name, t in others.items():
        check_like(t, name, x)
    x = _dense(x)
    return [x] + [same_layout(t, x) for t in others.values()]


def _grid(numel: int):
    return lambda meta: (triton.cdiv(numel, meta["TILE"]),)


def _residual(x, c, fx, theta, step_size):
    theta = check_float(theta, "theta")
    x, c, fx = _prepare(x, c=c, fx=fx)
    e = torch.empty_like(x)
    term = None if step_size is None else torch.empty_like(x)
    if x.numel():
        _ie_residual_kernel[_grid(x.numel())](
            x, c, fx, e, term, x.numel(), theta,
            0.0 if step_size is None else 2.0 * check_float(step_size, "step_size"),
            WITH_TERM=term is not None, WIDE_INDEX=needs_wide_index(x))
    return e, term


def ie_residual(x: torch.Tensor, c: torch.Tensor, fx: torch.Tensor, theta: float) -> torch.Tensor:
    """IE-Skip residual ``e = x − c − θ·f(x)`` in x's dtype and layout."""
    return _residual(x, c, fx, theta, None)[0]


def ie_residual_with_term(x: torch.Tensor, c: torch.Tensor, fx: torch.Tensor, theta: float,
                          step_size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e, −2γ·e)`` in x's dtype and layout, one pass."""
    return _residual(x, c, fx, theta, step_size)


def ie_residual_with_term_adjoint(de: torch.Tensor, dterm: torch.Tensor, theta: float,
                                  step_size: float, dx_addend: torch.Tensor | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dc, dfx)`` of :func:`ie_residual_with_term` in de's dtype and layout, plus
    ``dx_addend`` (optional, de's shape) in dx; at θ = 1 ``dfx`` is ``dc`` itself (one
    tensor written, not two)."""
    theta = check_float(theta, "theta")
    two_step_size = 2.0 * check_float(step_size, "step_size")
    addend = {} if dx_addend is None else {"dx_addend": dx_addend}
    de, dterm, *addend = _prepare(de, "de", dterm=dterm, **addend)
    dx_addend = addend[0] if addend else None
    dx, dc = torch.empty_like(de), torch.empty_like(de)
    dfx = dc if theta == 1.0 else torch.empty_like(de)
    if de.numel():
        _ie_residual_adjoint_kernel[_grid(de.numel())](
            de, dterm, dx_addend, dx, dc, dfx, de.numel(), theta, two_step_size,
            WRITE_DFX=theta != 1.0, HAS_DX_ADDEND=dx_addend is not None,
            WIDE_INDEX=needs_wide_index(de))
    return dx, dc, dfx


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
