"""Every Triton kernel compiles for sm_90 (H100) down to cubin, without a GPU.

The CPU interpreter that runs the other Triton tests never lowers a kernel, so this runs
``python -m pyeuler.triton.compile_check`` in a fresh process without TRITON_INTERPRET
(the interpreter replaces JIT functions in any process that imported triton with it set).
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_compile_check(*args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.6's default; silences 3.9's warning
    return subprocess.run([sys.executable, "-m", "pyeuler.triton.compile_check", *args],
                          env=env, capture_output=True, text=True, timeout=600)


def test_compile_jobs_cover_every_kernel():
    """Each ``@triton.jit`` kernel in pyeuler/triton (helpers excepted) has compile jobs."""
    import importlib
    import pkgutil

    import pyeuler.triton as package
    from pyeuler.triton import compile_check

    listed = {(spec.module, spec.name) for spec in compile_check.SPECS}
    kernels = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"pyeuler.triton.{info.name}")
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and hasattr(obj, "run"):
                kernels.add((module.__name__, name))
    assert kernels and kernels == listed


def test_every_kernel_compiles_for_sm90():
    done = _run_compile_check("--arch", "90")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kernels compiled for sm_90" in done.stdout
