"""Shared test utilities: tolerances per docs/semantics.md §6 and model/gradient comparison."""

from __future__ import annotations

import contextlib
import copy

import torch

# float32 parity with TF32 off (docs/semantics.md §6).
F32 = dict(rtol=1e-4, atol=1e-5)
F64 = dict(rtol=1e-9, atol=1e-10)


def tol(dtype: torch.dtype) -> dict:
    return F64 if dtype == torch.float64 else F32


def assert_close_low_precision(out, out_lowp_ref, out_f64, floor=1e-2):
    """docs/semantics.md §6: error vs float64 at most 2× the eager low-precision reference's,
    plus a floor."""
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


def make_input(shape, layout="contiguous", dtype=torch.float32, device="cpu", mean=0.0, std=1.0):
    """A random (N, C, *spatial) tensor: "contiguous", "channels_last" or "strided" (a view
    with gaps: every other element of a wider tensor)."""
    if layout == "strided":
        return (torch.randn(*shape, 2, device=device) * std + mean).to(dtype)[..., 0]
    x = (torch.randn(shape, device=device) * std + mean).to(dtype)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x


def layout_cases(shapes, layouts):
    """(shape, layout) params; 2-D tensors have one dense layout, so no channels_last."""
    import pytest

    return [pytest.param(s, lay, id=f"{'x'.join(map(str, s))}-{lay}")
            for s in shapes for lay in layouts if not (len(s) == 2 and lay == "channels_last")]


def random_coef(x, per_sample, positive=False):
    """A float32 [C] (or [N, C] when ``per_sample``) coefficient for ``x``."""
    n, c = x.shape[:2]
    v = torch.randn((n, c) if per_sample else (c,), device=x.device)
    return v.abs() + 0.5 if positive else v


@contextlib.contextmanager
def swapped_parameters(module: torch.nn.Module, **tensors):
    """``module.<name>`` is the given plain tensor (one gradcheck perturbs) inside the block;
    the parameters are put back after."""
    originals = {name: module._parameters.pop(name) for name in tensors}
    for name, tensor in tensors.items():
        setattr(module, name, tensor)
    try:
        yield
    finally:
        for name, original in originals.items():
            delattr(module, name)
            module._parameters[name] = original


def nan_inf_inputs(layout, per_sample, device, width):
    """x, dy, ddx, e, shortcut and coefficients of shape (3, 4, 5, ``width``) with NaN /
    ±inf placed per channel: 1 holds NaN, +inf and −inf activations, 2 a NaN shortcut, 3
    NaN / inf gradients behind a gate closed by x = −inf (the scale is positive)."""
    shape = (3, 4, 5, width)
    x, dy, ddx, e, shortcut = (make_input(shape, layout, device=device) for _ in range(5))
    x[0, 1, 0, 0], x[1, 1, 2, 1], x[2, 1, 4, 0] = float("nan"), float("inf"), float("-inf")
    shortcut[0, 2, 1, 1] = float("nan")
    x[1, 3, 0, 0], dy[1, 3, 0, 0], ddx[1, 3, 0, 0] = float("-inf"), float("nan"), float("inf")
    dy[2, 0, 1, 1] = float("inf")
    scale = random_coef(x, per_sample, positive=True)
    shift, a, b, c, center = (random_coef(x, per_sample) for _ in range(5))
    return x, dy, ddx, e, shortcut, scale, shift, a, b, c, center
