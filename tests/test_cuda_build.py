"""Compile every CUDA kernel translation unit with nvcc (no GPU needed).

Catches broken kernels from a plain ``pytest`` run on CPU-only CI; the full standalone build
and the GPU tests are ``.ci/build_kernels.sh``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
NVCC = os.environ.get("CUDACXX") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"

pytestmark = pytest.mark.skipif(not Path(NVCC).exists() and shutil.which(NVCC) is None,
                                reason="nvcc not found (set CUDACXX)")


@pytest.mark.parametrize("source", sorted(KERNELS.glob("*.cu")), ids=lambda p: p.name)
def test_kernel_compiles_for_sm90(source: Path, tmp_path: Path):
    command = [NVCC, "-c", str(source), "-o", str(tmp_path / (source.stem + ".o")),
               "-std=c++17", "-O3", "-gencode", "arch=compute_90,code=sm_90",
               "-I", str(KERNELS), "--Werror", "all-warnings"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}{result.stderr}"
