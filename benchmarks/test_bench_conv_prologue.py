"""Prologue-fused Triton 3×3 convolution against cuDNN at the WRN-34-10 shapes (GPU only).

    bash benchmarks/gpu_session.sh conv    # -> benchmarks/results/conv-<gpu>-<date>.json

bf16, channels-last, batch 128.  Rows per convolution shape and direction (forward, weight
gradient), named by ``impl``:

- ``cudnn``: torch's convolution of the activation ``a``, already in memory;
- ``apply+cudnn``: pyeuler's Triton apply pass ``a = relu(scale·x + shift)`` (read x,
  write a), then cuDNN: what the fused path runs today;
- ``triton``: the Triton convolution of ``a`` (conv_prologue.py), no prologue: its gap to
  cuDNN alone;
- ``triton+prologue``: the Triton convolution of x, applying the norm in its loads: the
  candidate, which pays where it beats ``apply+cudnn`` (docs/benchmarks.md §10).

The Triton rows run each tiling of ``conv_prologue.TILINGS``.  Before timing, every row's
result is checked against cuDNN's in float32 (bound as in test_conv_prologue.py).
"""

import pytest
import torch
import torch.nn.functional as F

import pyeuler
from conftest import median_seconds, requires_cuda

DEVICE = "cuda"
# (N, C, H, W, K, stride): the 3×3 convolutions of a WRN-34-10 block (the first of a group
# strided); the stem's 16-channel one is left out
SHAPES = [(128, 160, 32, 32, 160, 1), (128, 320, 16, 16, 320, 1), (128, 640, 8, 8, 640, 1),
          (128, 160, 32, 32, 320, 2), (128, 320, 16, 16, 640, 2)]
ROWS = [("cudnn", None), ("apply+cudnn", None)] + [
    (impl, index) for impl in ("triton", "triton+prologue") for index in range(4)]


def _shape_id(shape):
    n, c, h, w, k, stride = shape
    return f"{n}x{c}x{h}x{w}-k{k}-s{stride}"


def _weight_grad(dy, a, weight, stride):
    return torch.ops.aten.convolution_backward(
        dy, a, weight, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1,
        [False, True, False])[1]


def _check(result, expected, bound, what):
    worst = ((result.float() - expected).abs() / bound).max().item()
    assert worst <= 1, f"{what}: error {worst:.2f}× the bound"
    return worst


@requires_cuda
@pytest.mark.parametrize("impl, tiling", ROWS, ids=[
    impl if tiling is None else f"{impl}-tiling{tiling}" for impl, tiling in ROWS])
@pytest.mark.parametrize("direction", ["fwd", "wgrad"])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_conv(benchmark, shape, direction, impl, tiling):
    import conv_prologue as cp

    ok, why = pyeuler.available_backends()["triton"]
    if not ok:
        pytest.skip(f"triton: {why}")
    from pyeuler import triton as triton_backend

    n, c, h, w, k, stride = shape
    dev, dtype = DEVICE, torch.bfloat16
    x = torch.randn(n, c, h, w, device=dev, dtype=dtype).to(memory_format=torch.channels_last)
    weight = (torch.randn(k, c, 3, 3, device=dev) / (3 * c**0.5)).to(dtype).to(
        memory_format=torch.channels_last)
    scale, shift = 1 + 0.1 * torch.randn(c, device=dev), 0.1 * torch.randn(c, device=dev)
    a, _ = triton_backend.affine_act_forward(x, scale, shift, None, True, False)
    p, q = (h - 1) // stride + 1, (w - 1) // stride + 1
    dy = torch.randn(n, k, p, q, device=dev, dtype=dtype).to(memory_format=torch.channels_last)
    tiles = cp.TILINGS[tiling] if tiling is not None else None
    weight_rsck = cp.gemm_weight(weight)  # once per step in a fused path, as the weight cast

    def apply():
        return triton_backend.affine_act_forward(x, scale, shift, None, True, False)[0]

    if direction == "fwd":
        run = {"cudnn": lambda: F.conv2d(a, weight, padding=1, stride=stride),
               "apply+cudnn": lambda: F.conv2d(apply(), weight, padding=1, stride=stride),
               "triton": lambda: cp.conv3x3(a, weight_rsck, stride=stride, tiles=tiles),
               "triton+prologue": lambda: cp.conv3x3(x, weight_rsck, scale, shift, stride,
                                                     tiles=tiles)}[impl]
    else:
        run = {"cudnn": lambda: _weight_grad(dy, a, weight, stride),
               "apply+cudnn": lambda: _weight_grad(dy, apply(), weight, stride),
               "triton": lambda: cp.conv3x3_weight_grad(a, dy, stride=stride, tiles=tiles),
               "triton+prologue": lambda: cp.conv3x3_weight_grad(x, dy, scale, shift, stride,
                                                                 tiles=tiles)}[impl]

    eps = torch.finfo(dtype).eps
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        if direction == "fwd":
            expected = F.conv2d(a.float(), weight.float(), padding=1, stride=stride)
            bound = 2 * eps * F.conv2d(a.float().abs(), weight.float().abs(), padding=1,
                                     stride=stride) + eps * expected.abs() + 1e-3
        else:
            expected = _weight_grad(dy.float(), a.float(), weight.float(), stride)
            bound = 2 * eps * _weight_grad(dy.float().abs(), a.float().abs(), weight.float(),
                                         stride) + eps * expected.abs() + 1e-3
    worst = _check(run(), expected, bound, f"{impl} {direction}")

    median = median_seconds(benchmark, run)
    if median is None:
        return
    flops = 2 * n * p * q * k * c * 9
    benchmark.extra_info.update({
        "impl": impl, "tiling": None if tiles is None else repr(tiles), "direction": direction,
        "shape": list(shape), "TFLOP/s": flops / median / 1e12,
        "error / bound": worst})
