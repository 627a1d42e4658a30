"""The headline training step (docs/benchmarks.md): IE-WRN-34-10 per backend,
pytest-benchmark.

On a GPU: batch 128 at 32×32; on a CPU a tiny WRN-10-1 so the suite still exercises every
path (run with --benchmark-disable in CI).  ``pyeuler bench`` writes the full table with
ratios, peak memory and the convolution share.  The "reference" rows are the baseline: plain
PyTorch with native norms (``time_train_step`` runs them under ``native_norms()``).
"""

import pytest
import torch

import pyeuler
from pyeuler.benchmark import StepCase, time_train_step

GPU = torch.cuda.is_available()
SIZE = (dict(depth=34, widen_factor=10, batch_size=128, image_size=32) if GPU
        else dict(depth=10, widen_factor=1, batch_size=4, image_size=8))
CASES = [(0, "unrolled"), (1, "unrolled"), (1, "detached"), (3, "unrolled")]


@pytest.mark.parametrize("backend", ["reference", "eager", "triton", "cuda"])
@pytest.mark.parametrize("steps, grad", CASES, ids=[f"K{k}-{g}" for k, g in CASES])
@pytest.mark.parametrize("precision", ["bf16", "fp32"] if GPU else ["fp32"])
def test_train_step(benchmark, steps, grad, precision, backend):
    ok, why = pyeuler.available_backends()[backend]
    if backend in ("triton", "cuda") and not (ok and GPU):
        pytest.skip(f"{backend}: {why if not ok else 'timed on a GPU only'}")
    case = StepCase(steps, grad, precision, backend)
    result = benchmark.pedantic(time_train_step, args=(case,), kwargs=dict(SIZE, iters=3, warmup=1),
                                rounds=1, iterations=1)
    benchmark.extra_info.update(median_step_ms=result.median_ms, images_per_s=result.images_per_s,
                                peak_mem_gib=result.peak_mem_gib, saved_mib=result.saved_mib)
