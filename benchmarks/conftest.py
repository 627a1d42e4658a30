import functools
import os

import pytest
import torch

# Without a GPU the Triton experiments' parity tests run in the CPU interpreter, which must
# be chosen before triton is first imported (as tests/conftest.py does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="op benchmarks run at WRN-34-10 sizes on a GPU only")


@functools.cache
def copy_bandwidth_gbs() -> float:
    """Measured device copy bandwidth (read + write), the 100 % of "ideal" in
    docs/benchmarks.md."""
    src = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 20 / (start.elapsed_time(end) / 1e3) / 1e9


def median_seconds(benchmark, run) -> float | None:
    """Time ``run`` on the GPU with pytest-benchmark (three untimed calls, then 30 rounds,
    each synchronised); the median in seconds, or None under ``--benchmark-disable`` (one
    call, no statistics)."""
    for _ in range(3):
        run()
    torch.cuda.synchronize()

    def timed():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=30, warmup_rounds=2)
    return None if benchmark.disabled else benchmark.stats["median"]
