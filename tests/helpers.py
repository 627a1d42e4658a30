"""Shared test utilities: tolerances per SPEC §6 and model/gradient comparison."""

from __future__ import annotations

import copy

import torch

# float32 parity with TF32 off (SPEC §6).
F32 = dict(rtol=1e-4, atol=1e-5)
F64 = dict(rtol=1e-9, atol=1e-10)


def tol(dtype: torch.dtype) -> dict:
    return F64 if dtype == torch.float64 else F32


def assert_close_low_precision(out, out_lowp_ref, out_f64, floor=1e-2):
    """SPEC §6: error vs float64 at most 2× the eager low-precision reference's, plus a floor."""
    err = (out.double() - out_f64).abs().max().item()
    ref_err = (out_lowp_ref.double() - out_f64).abs().max().item()
    assert err <= 2 * ref_err + floor, f"error {err:.3g} vs low-precision reference {ref_err:.3g}"


def twin(model: torch.nn.Module, **overrides) -> torch.nn.Module:
    """A deep copy of ``model`` with attributes (e.g. ``backend``) overridden on every module."""
    other = copy.deepcopy(model)
    for module in other.modules():
        for name, value in overrides.items():
            if hasattr(module, name):
                setattr(module, name, value)
    return other


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def assert_tensors_close(a, b, **kw):
    for i, (x, y) in enumerate(zip(a, b)):
        if x is None or y is None:
            assert x is None and y is None, f"entry {i}: one side has no gradient"
            continue
        torch.testing.assert_close(x, y, msg=lambda m: f"entry {i}: {m}", **kw)
