"""Backend selection and availability reporting."""

import os
import subprocess
import sys

import pytest
import torch

import pyeuler
from pyeuler.backend import resolve_backend


def test_available_backends_reports_reasons():
    report = pyeuler.available_backends()
    assert set(report) == {"reference", "eager", "triton", "cuda"}
    for available, reason in report.values():
        assert isinstance(available, bool) and reason


def test_set_backend_and_auto_on_cpu():
    old = pyeuler.get_backend()
    try:
        pyeuler.set_backend("reference")
        assert resolve_backend(None, torch.device("cpu")) == "reference"
        pyeuler.set_backend("auto")
        assert resolve_backend(None, torch.device("cpu")) == "eager"
        with pytest.raises(ValueError, match="backend must be one of"):
            pyeuler.set_backend("fast")
    finally:
        pyeuler.set_backend(old)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_unavailable_backend_says_which_are_and_why():
    with pytest.raises(RuntimeError, match=r"backend='cuda' is not available: .*Available for cpu"):
        resolve_backend("cuda", torch.device("cpu"))


def test_env_var_sets_default_and_is_validated():
    code = "import pyeuler; print(pyeuler.get_backend())"
    env = dict(os.environ, PYEULER_BACKEND="eager")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "eager"
    env["PYEULER_BACKEND"] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "PYEULER_BACKEND must be one of" in out.stderr


def test_submodules_are_attributes_of_the_package():
    """``import pyeuler; pyeuler.nn.PreActBranch`` works, as torch exposes its submodules,
    and the central op is part of the functional API."""
    import pyeuler

    assert pyeuler.nn.PreActBranch is not None and pyeuler.models.wide_resnet is not None
    assert pyeuler.functional.norm_act is pyeuler.ops.norm_act.norm_act
    for name in pyeuler.SUBMODULES:
        assert name in dir(pyeuler) and getattr(pyeuler, name).__name__ == f"pyeuler.{name}"
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        pyeuler.nonexistent
