"""Finding, building and loading the compiled CUDA extension.

Two ways in, tried in order:

1. ``pyeuler._C``, built by ``setup.py`` (``pip install`` with nvcc and a CUDA torch);
2. a JIT build of the same sources with ``torch.utils.cpp_extension.load`` (ninja + nvcc),
   into ``$PYEULER_CACHE/cuda-ext-<hash>`` (default ``~/.cache/pyeuler``), where the hash
   covers the sources, torch and CUDA versions, so an edit or an upgrade rebuilds.

The JIT build needs the sources: ``csrc/`` and ``kernels/`` next to the ``pyeuler`` package,
as in a repository checkout or an editable install.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

# <root>/pyeuler/cuda/_build.py -> <root>
SOURCE_ROOT = Path(__file__).resolve().parents[2]
KERNELS_DIR = SOURCE_ROOT / "kernels"
CSRC_DIR = SOURCE_ROOT / "csrc"


def compiled_sources() -> list[Path]:
    """The translation units of the extension: csrc/*.cpp, then kernels/*.cu."""
    return sorted(CSRC_DIR.glob("*.cpp")) + sorted(KERNELS_DIR.glob("*.cu"))


def _hashed_files() -> list[Path]:
    headers = sorted(KERNELS_DIR.glob("*.cuh")) + sorted(KERNELS_DIR.glob("*.h"))
    return compiled_sources() + headers


def build_directory() -> Path:
    digest = hashlib.sha256()
    digest.update(f"torch {torch.__version__} cuda {torch.version.cuda}".encode())
    for path in _hashed_files():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    cache = Path(os.environ.get("PYEULER_CACHE", Path.home() / ".cache" / "pyeuler"))
    return cache / f"cuda-ext-{digest.hexdigest()[:16]}"


def load_extension() -> ModuleType:
    """Import ``pyeuler._C`` or JIT-build it; raises RuntimeError saying why it cannot."""
    try:
        prebuilt = importlib.import_module("pyeuler._C")
    except ModuleNotFoundError as exc:
        if exc.name != "pyeuler._C":
            raise
    except ImportError as exc:  # built, but for another torch: say so, then rebuild
        print(f"pyeuler.cuda: the installed pyeuler._C does not load ({exc}); "
              "falling back to a JIT build", file=sys.stderr)
    else:
        return prebuilt
    sources = compiled_sources()
    if not any(p.suffix == ".cu" for p in sources) or not any(p.suffix == ".cpp" for p in sources):
        raise RuntimeError(
            "pyeuler._C is not installed and the CUDA sources (csrc/*.cpp, kernels/*.cu) are "
            f"not under {SOURCE_ROOT}, so it cannot be JIT-built either; install pyeuler from "
            "a source checkout on a machine with nvcc and a CUDA build of torch"
        )
    from torch.utils import cpp_extension

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    print(f"pyeuler.cuda: pyeuler._C is not installed; building the CUDA extension from "
          f"{SOURCE_ROOT} in {directory} (ninja + nvcc; the first time takes a minute or two)",
          file=sys.stderr)
    module = cpp_extension.load(
        name="pyeuler_cuda_ext",
        sources=[str(p) for p in sources],
        extra_include_paths=[str(KERNELS_DIR)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo", "-std=c++17"],
        build_directory=str(directory),
        verbose=os.environ.get("PYEULER_VERBOSE_BUILD", "0") not in ("", "0"),
    )
    print(f"pyeuler.cuda: loaded {module.__file__}", file=sys.stderr)
    return module
