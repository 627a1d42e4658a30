"""The conv-weight cast cache of one IE-Skip call (``cached_weight_casts``): each weight is
cast to the autocast dtype once per grad mode, never reused across an in-place change or
from a graph-less cast into a differentiable use, and the gradients stay those of autocast.
"""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torch.func import functional_call

from conftest import requires_triton
from pyeuler.functional import ie_skip
from pyeuler.nn import PreActBlock, PreActBranch
from pyeuler.ops.norm_act_fusions import cached_weight_casts, conv_weight_for


_CASTS = (torch.ops.aten._to_copy.default, torch.ops.pyeuler.cast_weight.default)


class _WeightCasts(TorchDispatchMode):
    """Counts casts of the given weights: torch's (autocast's own) and pyeuler's
    (``conv_weight_for``)."""

    def __init__(self, weights):
        super().__init__()
        self.weights = {w.untyped_storage()._cdata for w in weights}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _CASTS and args[0].untyped_storage()._cdata in self.weights:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _casts_in_ie_skip(grad: str, steps: int) -> int:
    torch.manual_seed(0)
    branch = PreActBranch(4, norm="group")
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    weights = [branch.conv1.weight, branch.conv2.weight]
    with torch.autocast("cpu", dtype=torch.bfloat16), _WeightCasts(weights) as casts:
        y = ie_skip(branch, x, steps=steps, grad=grad, backend="eager")
    y.float().sum().backward()
    assert all(w.grad is not None and w.grad.dtype == torch.float32 for w in weights)
    return casts.count


@pytest.mark.parametrize("grad", ["unrolled", "detached"])
def test_each_weight_cast_once_per_grad_mode(grad, monkeypatch):
    """On the eager backend the branch's convolutions are nn.Conv2d calls, whose casts
    autocast's own cache makes once per weight; the VJP's transposed convolutions go through
    conv_weight_for: K steps use each weight K times, cast once (per grad mode)."""
    steps = 3
    assert _casts_in_ie_skip(grad, steps) == 2 + 2
    monkeypatch.setattr("pyeuler.ops.ie_skip.cached_weight_casts", contextlib.nullcontext)
    assert _casts_in_ie_skip(grad, steps) == 2 + 2 * steps


def test_gradient_equals_one_cast_per_use():
    """The summed weight gradient through one cached cast equals the sum over per-use casts
    (float32 autocast dtype is not low precision on CPU: use float64 weights, bf16 casts,
    and compare against explicit per-use casts)."""
    torch.manual_seed(0)
    weight = torch.randn(3, 3, requires_grad=True)
    inputs = [torch.randn(3) for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with cached_weight_casts():
            cached = sum((conv_weight_for(u, weight) * u.bfloat16()).float().sum() for u in inputs)
        per_use = sum((weight.bfloat16() * u.bfloat16()).float().sum() for u in inputs)
    (g_cached,) = torch.autograd.grad(cached, weight)
    (g_per_use,) = torch.autograd.grad(per_use, weight)
    torch.testing.assert_close(g_cached, g_per_use, rtol=1e-2, atol=1e-2)


def test_in_place_change_and_grad_mode_recast():
    weight = torch.randn(2, 2, requires_grad=True)
    x = torch.randn(2)
    with torch.autocast("cpu", dtype=torch.bfloat16), cached_weight_casts():
        with torch.no_grad():
            plain = conv_weight_for(x, weight)
        tracked = conv_weight_for(x, weight)
        assert plain.grad_fn is None and tracked.grad_fn is not None
        assert conv_weight_for(x, weight) is tracked
        with torch.no_grad():
            weight.add_(1.0)
        recast = conv_weight_for(x, weight)
        assert recast is not tracked
        torch.testing.assert_close(recast.float(), weight.detach().bfloat16().float())


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_weight_gradient_comes_in_the_weights_strides(memory_format):
    """The cast's backward writes the float32 gradient in the weight's own strides, whatever
    the summed bf16 gradient's (a transposed convolution's double backward gives it
    transposed), so that AccumulateGrad can take it without another copy."""
    weight = torch.randn(4, 3, 3, 3).to(memory_format=memory_format).requires_grad_()
    x = torch.randn(2, 3, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = conv_weight_for(x, weight)
    transposed = torch.randn(3, 4, 3, 3, dtype=torch.bfloat16).transpose(0, 1)
    (grad,) = torch.autograd.grad(cast, weight, transposed)
    assert grad.dtype == torch.float32 and grad.stride() == weight.stride()
    torch.testing.assert_close(grad, transposed.float(), rtol=0, atol=0)


def test_cast_op_gradcheck_gradgradcheck_and_opcheck():
    """The cast op's backward, a copy into the weight's strides, to every order (float64 to
    float64 here: gradcheck needs the precision), and its registrations."""
    cast = torch.ops.pyeuler.cast_weight.default
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64).to(
        memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda w: cast(w, torch.float64), (weight,))
    assert torch.autograd.gradgradcheck(lambda w: cast(w, torch.float64), (weight,))
    for dtype in (torch.float64, torch.bfloat16):
        torch.library.opcheck(cast, (weight, dtype))


def test_no_cache_outside_a_scope():
    weight = torch.randn(2, 2, requires_grad=True)
    x = torch.randn(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv_weight_for(x, weight) is not conv_weight_for(x, weight)


def test_an_expanded_weight_gets_its_gradient():
    """A weight in no dense format (here expanded, stride 0) gets the gradient torch's own
    cast would give it, in the gradient's strides."""
    base = torch.randn(4, 1, 3, 3, requires_grad=True)
    weight = base.expand(4, 3, 3, 3)
    x = torch.randn(2, 3, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = conv_weight_for(x, weight)
        want_cast = weight.to(torch.bfloat16)
    seed = torch.randn(4, 3, 3, 3, dtype=torch.bfloat16)
    (got,) = torch.autograd.grad(cast, base, seed)
    (want,) = torch.autograd.grad(want_cast, base, seed)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


_FUNC_BACKENDS = ["eager", pytest.param("triton", marks=requires_triton)]


@pytest.mark.parametrize("backend", _FUNC_BACKENDS)
@pytest.mark.parametrize("steps", [0, 1])
def test_forward_mode_and_func_grad_in_the_weights_under_autocast(backend, steps):
    """The cast op has a reverse-mode formula only: under forward mode and torch.func the
    weights take torch's cast, so a conv weight's tangent is the reference's (a dropped one
    was off by 4-35 %, silently), and torch.func.grad runs and agrees."""
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    results = {}
    for name in ("reference", backend):
        torch.manual_seed(0)
        block = PreActBlock(4, 4, ie_steps=steps, norm="group", backend=name)
        params = {k: v.detach() for k, v in block.named_parameters()}
        weight = params["branch.conv1.weight"]
        tangent = torch.randn(weight.shape, generator=torch.Generator().manual_seed(2))

        def out(p):
            return functional_call(block, p, (x,)).float()

        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, jvp = torch.func.jvp(lambda w: out({**params, "branch.conv1.weight": w}),
                                    (weight,), (tangent,))
            gradient = torch.func.grad(lambda p: out(p).square().sum())(params)
        results[name] = (jvp, gradient["branch.conv1.weight"], gradient["branch.conv2.weight"])

    def relative_error(got, want):
        return ((got - want).norm() / want.norm()).item()

    (jvp, *grads), (jvp_ref, *grads_ref) = results[backend], results["reference"]
    assert relative_error(jvp, jvp_ref) < 1e-4
    for got, want in zip(grads, grads_ref):
        assert relative_error(got, want) < 2e-2  # bf16 rounding of two op orders
