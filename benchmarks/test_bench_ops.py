"""Fused-op throughput at the WRN-34-10 shapes (docs/benchmarks.md), pytest-benchmark.

    pytest benchmarks/test_bench_ops.py --benchmark-json benchmarks/results/ops-<device>.json

Each case records achieved GB/s (bytes the op must move, "ideal" in docs/benchmarks.md) and
its share of the measured device copy bandwidth in extra_info.
Compares eager PyTorch, torch.compile of eager, and every available fused backend.
"""

import pytest
import torch
import torch.nn.functional as F

import pyeuler
from pyeuler import functional as PF
from pyeuler.benchmark import op_bytes
from conftest import copy_bandwidth_gbs, median_seconds, requires_cuda

SHAPES = [(128, 160, 32, 32), (128, 320, 16, 16), (128, 640, 8, 8)]
IMPLS = ["eager", "compile", "triton", "cuda"]


def _eager(op):
    if op == "bn_relu":
        return lambda x, s, w, b: torch.relu(F.batch_norm(x, None, None, w, b, True))
    return lambda x, s, w, b: torch.relu(s + 0.1 * F.batch_norm(x, None, None, w, b, True))


def _fused(op, backend):
    if op == "bn_relu":
        return lambda x, s, w, b: PF.bn_relu(x, w, b, backend=backend)
    return lambda x, s, w, b: PF.bn_add_relu(x, s, 0.1, w, b, backend=backend)


@requires_cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", ["bn_relu", "bn_add_relu"])
def test_op(benchmark, op, shape, dtype, layout, backward, impl):
    if impl in ("triton", "cuda") and not pyeuler.available_backends()[impl][0]:
        pytest.skip(f"{impl}: {pyeuler.available_backends()[impl][1]}")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, device="cuda", dtype=dtype).to(memory_format=fmt).requires_grad_(backward)
    s = torch.randn_like(x).requires_grad_(backward)
    w = torch.ones(shape[1], device="cuda", requires_grad=backward)
    b = torch.zeros(shape[1], device="cuda", requires_grad=backward)
    fn = {"eager": _eager(op), "compile": torch.compile(_eager(op))}.get(impl) or _fused(op, impl)
    dy = torch.randn_like(x)

    def run():
        y = fn(x, s, w, b)
        if backward:
            torch.autograd.backward(y, dy)
        return y

    median = median_seconds(benchmark, run)
    if median is None:
        return
    moved = op_bytes(x.numel(), x.element_size(), op, backward)
    achieved = moved / median / 1e9
    benchmark.extra_info.update({"bytes": moved, "GB/s": achieved,
                                 "% of copy bandwidth": 100 * achieved / copy_bandwidth_gbs()})
