"""Test configuration: without a GPU, Triton kernels run in the CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, before
any test module imports pyeuler's Triton backend.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests use tiny tensors, where intra-op threads only add synchronisation; on a busy
# 2-core machine they made gradgradcheck ~7x slower.
torch.set_num_threads(1)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def triton_usable() -> tuple[bool, str]:
    from pyeuler import triton as triton_backend

    return triton_backend.is_available()


requires_triton = pytest.mark.skipif(not triton_usable()[0], reason=f"triton: {triton_usable()[1]}")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="needs a CUDA GPU; none on this machine")
# Every backend as a test parameter; a fused one skips, saying why, where it cannot run.
ALL_BACKENDS = ["eager", "reference", pytest.param("triton", marks=requires_triton),
                pytest.param("cuda", marks=requires_cuda)]


def backend_device(backend: str) -> str:
    """Where a backend's test tensors live: the GPU when there is one (Triton then runs
    compiled), else the CPU (Triton in the interpreter)."""
    return "cuda" if backend == "cuda" or torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
