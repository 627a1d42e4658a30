"""Build script: a plain Python package, plus the CUDA extension ``pyeuler._C`` when possible.

The extension is built only when a CUDA build of torch and nvcc are both present and
``PYEULER_SKIP_CUDA_BUILD`` is not set.  Without it, ``backend="cuda"`` JIT-builds the same
sources on first use (see ``pyeuler/cuda/``).  ``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0".
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _cuda_extension():
    if os.environ.get("PYEULER_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        print("pyeuler: PYEULER_SKIP_CUDA_BUILD set, not building the CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None or shutil.which("nvcc") is None and not (
        Path(CUDA_HOME) / "bin" / "nvcc"
    ).exists():
        print("pyeuler: no CUDA build of torch or no nvcc, installing without the CUDA extension")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "kernels").glob("*.cu"))
    if not sources:
        return [], {}
    ext = CUDAExtension(
        name="pyeuler._C",
        sources=sources,
        include_dirs=[str(ROOT / "kernels")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
