"""Experiment: a Triton 3×3 convolution that applies the norm and ReLU as it loads its input.

The question it answers (docs/benchmarks.md §10): in a pre-activation block the fused path
runs ``a = relu(scale·x + shift)`` as one pass (read x, write a) and cuDNN then reads ``a``
for the forward convolution and again for the weight gradient.  If a convolution applied
the affine map and the ReLU to each tile it loads, ``a`` would never reach memory: about
4.7 GB of an IE-WRN-34-10 K = 1 step (96 forward and weight-gradient convolutions,
``pyeuler cost``), the only lever left that reaches the 37 GB target.  It pays only if the
Triton convolution is not slower than cuDNN's by more than the apply pass costs; that needs
a GPU to measure (``benchmarks/test_bench_conv_prologue.py``, ``gpu_session.sh conv``).
Until then nothing in pyeuler uses these kernels.

Both kernels are implicit GEMMs over channels-last 16-bit tensors (``x`` of shape (N, H, W, C)
in memory, ``stride(1) == 1``; bf16 or fp16, the precisions the byte target is about),
padding 1, stride 1 or 2, accumulating in float32:

- forward: ``y[n, p, q, k] = Σ_{r, s, c} a[n, p·st − 1 + r, q·st − 1 + s, c] · w[k, c, r, s]``,
  GEMM rows ``m = (n, p, q)``, columns ``k``, reduction over ``(r, s, c)``;
- weight gradient: ``dw[k, c, r, s] = Σ_{n, p, q} a[n, p·st − 1 + r, q·st − 1 + s, c] ·
  dy[n, p, q, k]``, GEMM rows ``(r, s, c)``, columns ``k``, reduction over ``m``, split
  over ``SPLIT_M`` programs that add their float32 partial sums atomically (so the result
  is not bitwise reproducible run to run; the experiment measures time, not bits).

``a`` is ``relu(scale·x + shift)`` computed in float32 and rounded to x's dtype, exactly
as ``pyeuler.ops.primitives.affine_act_forward`` writes it, and 0 at padded positions (the
convolution pads the activation, not x); without a prologue ``a = x``.  ReLU keeps NaN
(``not (a <= 0)``), as the primitives do.

    python benchmarks/conv_prologue.py --compile-check 90   # lower both kernels to cubin
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class ConvTiles:
    """A GEMM tiling: ``block_m`` output rows, ``block_n`` output channels and ``block_k``
    input channels per step of the reduction (each a power of two, at least 16, as
    ``tl.dot`` needs); ``split_m`` programs share the weight gradient's reduction."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    split_m: int = 8

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"{name}: expected a power of two of at least 16, got {value!r}")
        for name in ("num_warps", "num_stages", "split_m"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")


# tilings the GPU benchmark compares; the first is the default.  The weight gradient's
# GEMM rows are block_k channels: Hopper's wgmma needs 64 of them, else it falls back to mma.
TILINGS = (ConvTiles(), ConvTiles(128, 64, 64, 4, 4, 16), ConvTiles(64, 128, 64, 4, 4, 16),
           ConvTiles(128, 128, 32, 8, 4, 8))


@triton.jit
def _load_activation(x_ptr, scale_ptr, shift_ptr, n, h, w, valid_m, offs_c, C, H, W,
                     PROLOGUE: tl.constexpr, TRANSPOSED: tl.constexpr):
    """A [rows, channels] tile of ``a`` (``[channels, rows]`` if TRANSPOSED), 0 where the
    tap falls in the padding or past the tensor."""
    inside = valid_m & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    row = ((n * H + h) * W + w) * C
    if TRANSPOSED:
        mask = inside[None, :] & (offs_c < C)[:, None]
        x = tl.load(x_ptr + row[None, :] + offs_c[:, None], mask=mask, other=0.0)
    else:
        mask = inside[:, None] & (offs_c < C)[None, :]
        x = tl.load(x_ptr + row[:, None] + offs_c[None, :], mask=mask, other=0.0)
    if PROLOGUE:
        scale = tl.load(scale_ptr + offs_c, mask=offs_c < C, other=0.0)
        shift = tl.load(shift_ptr + offs_c, mask=offs_c < C, other=0.0)
        if TRANSPOSED:
            a = x.to(tl.float32) * scale[:, None] + shift[:, None]
        else:
            a = x.to(tl.float32) * scale[None, :] + shift[None, :]
        a = tl.where(a <= 0.0, 0.0, a)
        x = tl.where(mask, a, 0.0).to(x_ptr.dtype.element_ty)
    return x


@triton.jit
def _conv3x3_forward_kernel(x_ptr, scale_ptr, shift_ptr, w_ptr, y_ptr, N, H, W, C, P, Q, K,
                            STRIDE: tl.constexpr, PROLOGUE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr):
    """y (N, P, Q, K) from x (N, H, W, C) and w laid out (3, 3, C, K), all contiguous."""
    M = N * P * Q
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(K, BLOCK_N)
    # groups of GROUP_M row tiles sweep the columns together, so their x rows stay in L2
    pid = tl.program_id(0)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
    pid_n = (pid % (GROUP_M * tiles_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_m = offs_m < M
    n = offs_m // (P * Q)
    p = (offs_m // Q) % P
    q = offs_m % Q
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    tiles_c = tl.cdiv(C, BLOCK_K)
    # one loop over (tap, channel tile), not two nested: the pipeliner overlaps the loads of
    # the innermost loop only, and C / BLOCK_K alone is a handful of steps
    for step in range(9 * tiles_c):
        tap = step // tiles_c
        offs_c = (step % tiles_c) * BLOCK_K + tl.arange(0, BLOCK_K)
        h = p * STRIDE - 1 + tap // 3
        w = q * STRIDE - 1 + tap % 3
        a = _load_activation(x_ptr, scale_ptr, shift_ptr, n, h, w, valid_m, offs_c, C, H, W,
                             PROLOGUE, False)
        b = tl.load(w_ptr + (tap * C + offs_c)[:, None] * K + offs_k[None, :],
                    mask=(offs_c < C)[:, None] & (offs_k < K)[None, :], other=0.0)
        if DOT_FP32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc)
    tl.store(y_ptr + offs_m[:, None] * K + offs_k[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=valid_m[:, None] & (offs_k < K)[None, :])


@triton.jit
def _conv3x3_weight_grad_kernel(x_ptr, scale_ptr, shift_ptr, dy_ptr, dw_ptr, N, H, W, C, P, Q, K,
                                STRIDE: tl.constexpr, PROLOGUE: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr, SPLIT_M: tl.constexpr,
                                DOT_FP32: tl.constexpr):
    """dw (3, 3, C, K) float32, zeroed by the host, += aᵀ·dy over this program's rows m of
    dy (N, P, Q, K); ``BLOCK_K`` channels by ``BLOCK_N`` output channels per program."""
    tiles_c = tl.cdiv(C, BLOCK_K)
    pid_rc = tl.program_id(0)  # (tap, channel tile)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    tap = pid_rc // tiles_c
    offs_c = (pid_rc % tiles_c) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    M = N * P * Q
    rows_per_split = tl.cdiv(tl.cdiv(M, SPLIT_M), BLOCK_M) * BLOCK_M
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(split * rows_per_split, tl.minimum(M, (split + 1) * rows_per_split), BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        valid_m = offs_m < M
        n = offs_m // (P * Q)
        h = ((offs_m // Q) % P) * STRIDE - 1 + tap // 3
        w = (offs_m % Q) * STRIDE - 1 + tap % 3
        a_t = _load_activation(x_ptr, scale_ptr, shift_ptr, n, h, w, valid_m, offs_c, C, H, W,
                               PROLOGUE, True)
        dy = tl.load(dy_ptr + offs_m[:, None] * K + offs_k[None, :],
                     mask=valid_m[:, None] & (offs_k < K)[None, :], other=0.0)
        if DOT_FP32:
            a_t, dy = a_t.to(tl.float32), dy.to(tl.float32)
        acc = tl.dot(a_t, dy, acc)
    tl.atomic_add(dw_ptr + (tap * C + offs_c)[:, None] * K + offs_k[None, :], acc,
                  mask=(offs_c < C)[:, None] & (offs_k < K)[None, :])


def _dot_fp32(x: torch.Tensor) -> bool:
    """Whether the kernels multiply in float32: only in the CPU interpreter, whose
    ``tl.dot`` of bf16 operands returns garbage (Triton 3.9).  The products of 16-bit
    values are exact in float32, so the sums differ from the GPU's only in their order."""
    return x.device.type == "cpu"


def _check(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
           stride: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Raise on what the kernels do not take; returns scale and shift contiguous (the kernels
    index them densely)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 \
            or not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"x: expected a channels-last (N, C, H, W) tensor, got "
                         f"{getattr(x, 'shape', type(x).__name__)} with strides "
                         f"{x.stride() if isinstance(x, torch.Tensor) else None}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"x: expected bfloat16 or float16, got {x.dtype}")
    if not isinstance(stride, int) or isinstance(stride, bool) or stride not in (1, 2):
        raise ValueError(f"stride: expected the int 1 or 2, got {stride!r}")
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift: give both (the norm's prologue) or neither")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and (t.shape != (x.shape[1],) or t.dtype != torch.float32
                              or t.device != x.device):
            raise ValueError(f"{name}: expected float32 of shape ({x.shape[1]},) on {x.device}, "
                             f"got {t.dtype} of shape {tuple(t.shape)} on {t.device}")
    return (None, None) if scale is None else (scale.contiguous(), shift.contiguous())


def gemm_weight(weight: torch.Tensor) -> torch.Tensor:
    """(K, C, 3, 3) → (3, 3, C, K) contiguous, the forward kernel's B operand.  The fused
    path would write this layout once per step where it casts the weight."""
    if weight.dim() != 4 or weight.shape[2:] != (3, 3):
        raise ValueError(f"weight: expected (K, C, 3, 3), got {tuple(weight.shape)}")
    return weight.permute(2, 3, 1, 0).contiguous()


def conv3x3(x: torch.Tensor, weight_rsck: torch.Tensor, scale: torch.Tensor | None = None,
            shift: torch.Tensor | None = None, stride: int = 1,
            tiles: ConvTiles = TILINGS[0]) -> torch.Tensor:
    """``conv2d(relu(scale·x + shift), w, padding=1, stride)`` (``conv2d(x, w, …)`` without
    scale and shift).

    Args:
        x: (N, C, H, W) channels-last, bfloat16 or float16.
        weight_rsck: (3, 3, C, K) contiguous, x's dtype (:func:`gemm_weight`).
        scale, shift: (C,) float32, or both None.
        stride: 1 or 2.
    Returns:
        (N, K, P, Q) channels-last in x's dtype, P = ⌈H / stride⌉, Q = ⌈W / stride⌉.
    Raises:
        ValueError, TypeError: a layout, shape or dtype the kernel does not take.
    """
    scale, shift = _check(x, scale, shift, stride)
    N, C, H, W = x.shape
    if weight_rsck.dim() != 4 or weight_rsck.shape[:3] != (3, 3, C) \
            or weight_rsck.dtype != x.dtype or weight_rsck.device != x.device \
            or not weight_rsck.is_contiguous():
        raise ValueError(f"weight_rsck: expected contiguous (3, 3, {C}, K) in {x.dtype} on "
                         f"{x.device}, got {weight_rsck.dtype} of shape "
                         f"{tuple(weight_rsck.shape)} on {weight_rsck.device}")
    K = weight_rsck.shape[3]
    P, Q = (H - 1) // stride + 1, (W - 1) // stride + 1
    y = torch.empty((N, K, P, Q), device=x.device, dtype=x.dtype,
                    memory_format=torch.channels_last)
    grid = (triton.cdiv(N * P * Q, tiles.block_m) * triton.cdiv(K, tiles.block_n),)
    prologue = scale is not None
    _conv3x3_forward_kernel[grid](
        x, scale if prologue else x, shift if prologue else x, weight_rsck, y,
        N, H, W, C, P, Q, K, STRIDE=stride, PROLOGUE=prologue, BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=8, DOT_FP32=_dot_fp32(x),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return y


def conv3x3_weight_grad(x: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor | None = None,
                        shift: torch.Tensor | None = None, stride: int = 1,
                        tiles: ConvTiles = TILINGS[0]) -> torch.Tensor:
    """The weight gradient of :func:`conv3x3`: ``Σ_{n,p,q} a ⊗ dy`` over each tap.

    Args:
        x: as in :func:`conv3x3`.
        dy: (N, K, P, Q) channels-last, x's dtype; K is taken from it.
    Returns:
        (K, C, 3, 3) float32 (a view of the (3, 3, C, K) sums).
    Raises:
        ValueError, TypeError: a layout, shape or dtype the kernel does not take.
    """
    scale, shift = _check(x, scale, shift, stride)
    N, C, H, W = x.shape
    P, Q = (H - 1) // stride + 1, (W - 1) // stride + 1
    if dy.dim() != 4 or dy.shape[0] != N or dy.shape[2:] != (P, Q) or dy.dtype != x.dtype \
            or dy.device != x.device or not dy.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"dy: expected channels-last ({N}, K, {P}, {Q}) in {x.dtype} on "
                         f"{x.device}, got {dy.dtype} of shape {tuple(dy.shape)} with strides "
                         f"{dy.stride()} on {dy.device}")
    K = dy.shape[1]
    dw = torch.zeros((3, 3, C, K), device=x.device, dtype=torch.float32)
    grid = (9 * triton.cdiv(C, tiles.block_k), triton.cdiv(K, tiles.block_n), tiles.split_m)
    prologue = scale is not None
    _conv3x3_weight_grad_kernel[grid](
        x, scale if prologue else x, shift if prologue else x, dy, dw, N, H, W, C, P, Q, K,
        STRIDE=stride, PROLOGUE=prologue, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k, SPLIT_M=tiles.split_m, DOT_FP32=_dot_fp32(x),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return dw.permute(3, 2, 0, 1)


# the most shared memory one block may use (bytes), per compute capability
_MAX_SHARED = {80: 166912, 90: 232448}


def _check_launchable(shared: int, arch: int) -> None:
    """A kernel that needs more shared memory than a block may have compiles, but raises
    OutOfResources at its first launch."""
    if shared > _MAX_SHARED.get(arch, shared):
        raise RuntimeError(f"needs {shared} B of shared memory, sm_{arch} gives a block at most "
                           f"{_MAX_SHARED[arch]} B")


def _check_hopper_path(ttgir: str, arch: int, dtype: str, tiles: ConvTiles) -> None:
    """On sm_90, a tile of 64 channels must multiply with wgmma and load through
    pipelined asynchronous copies: without either the timing would say nothing of what a
    good Triton convolution can do."""
    if arch < 90 or tiles.block_k < 64:
        return
    missing = [op for op in ("ttng.warp_group_dot", "ttg.async_copy_global_to_local")
               if op not in ttgir]
    if missing:
        raise RuntimeError(f"no {' or '.join(missing)} in the TTGIR: not Hopper's wgmma with "
                           "pipelined loads")


def compile_check(arch: int, tilings: tuple[ConvTiles, ...] = TILINGS) -> list[str]:
    """Lower both kernels, with and without the prologue, stride 1 and 2, bf16 and fp16,
    each of ``tilings``, to cubin for sm_``arch``, and check that each fits the block's
    shared memory (:func:`_check_launchable`) and takes the Hopper code path
    (:func:`_check_hopper_path`); returns the failures (empty: all passed).  Run without
    ``TRITON_INTERPRET`` (the interpreter replaces the kernels)."""
    from triton.backends.compiler import GPUTarget

    failures = []
    for kernel, tensors in ((_conv3x3_forward_kernel, ("x_ptr", "w_ptr", "y_ptr")),
                            (_conv3x3_weight_grad_kernel, ("x_ptr", "dy_ptr"))):
        for dtype in ("bf16", "fp16"):
            for tiles in tilings:
                for stride in (1, 2):
                    for prologue in (False, True):
                        constexprs = dict(BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                                          BLOCK_K=tiles.block_k, STRIDE=stride,
                                          PROLOGUE=prologue, DOT_FP32=False)
                        if "GROUP_M" in kernel.arg_names:
                            constexprs["GROUP_M"] = 8
                        else:
                            constexprs["SPLIT_M"] = tiles.split_m
                        signature = {}
                        for name in kernel.arg_names:
                            signature[name] = ("constexpr" if name in constexprs
                                               else f"*{dtype}" if name in tensors
                                               else "*fp32" if name.endswith("_ptr") else "i32")
                        label = f"{kernel.__name__}[{dtype} {tiles} stride={stride} " \
                                f"prologue={prologue}]"
                        # as the JIT specializes at the WRN shapes: 16-byte aligned tensors,
                        # C and K multiples of 16 (without it, no load is pipelined)
                        attrs = {(index,): [["tt.divisibility", 16]]
                                 for index, name in enumerate(kernel.arg_names)
                                 if name.endswith("_ptr") or name in ("C", "K")}
                        try:
                            source = triton.compiler.ASTSource(fn=kernel, signature=signature,
                                                               constexprs=constexprs, attrs=attrs)
                            compiled = triton.compile(
                                source, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": tiles.num_warps,
                                         "num_stages": tiles.num_stages})
                            if not compiled.asm.get("cubin"):
                                raise RuntimeError("no cubin produced")
                            _check_launchable(compiled.metadata.shared, arch)
                            _check_hopper_path(compiled.asm["ttgir"], arch, dtype, tiles)
                        except Exception as exc:  # report every failure, not only the first
                            failures.append(f"{label}: {type(exc).__name__}: {exc}")
    return failures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile-check", type=int, metavar="ARCH", required=True,
                        help="lower every kernel variant to cubin for sm_ARCH, e.g. 90")
    arch = parser.parse_args().compile_check
    failed = compile_check(arch)
    print("\n".join(failed) or f"conv_prologue: every kernel variant compiled for sm_{arch}")
    sys.exit(1 if failed else 0)
