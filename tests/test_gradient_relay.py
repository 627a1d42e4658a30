"""Gradient relays (pyeuler.ops.gradient_relay): inside an IE step on a fused backend, the
shares of x's gradient (read by the branch evaluation, the residual and the update) and of
conv1's output (read by the evaluation and the VJP) are summed in the backward kernels'
epilogues instead of by the autograd engine.  The gradients must be those of the same step
with the relays off, whatever part of the graph a backward runs, and however often."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode

import pyeuler.ops.ie_skip as ie_skip
from pyeuler.ops.gradient_relay import GradientRelay
from conftest import backend_device, requires_triton
from pyeuler.nn.blocks import PreActBlock

pytestmark = requires_triton

DEVICE = backend_device("triton")


class _ActivationAdds(TorchDispatchMode):
    """Counts the activation-sized (4-D) adds dispatched: the engine's sums of shares."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor) and args[0].dim() == 4:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _relays(on: bool):
    if on:
        yield
        return
    original = GradientRelay._active
    GradientRelay._active = lambda self: False
    try:
        yield
    finally:
        GradientRelay._active = original


def _block(steps=1, theta=1.0, recompute="selective", channels_last=False, dtype=torch.float32,
           **options):
    torch.manual_seed(0)
    block = PreActBlock(6, 6, ie_steps=steps, theta=theta, recompute=recompute,
                        backend="triton", **options).to(DEVICE, dtype).train()
    x = torch.randn(3, 6, 5, 5, device=DEVICE, dtype=dtype)
    if channels_last:
        block, x = block.to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
    return block, x.requires_grad_()


def _gradients(on, inputs_of=None, **kwargs):
    block, x = _block(**kwargs)
    wrt = inputs_of(block, x) if inputs_of else [x, *block.parameters()]
    with _relays(on):
        y = block(x * 1.0)  # x's producer is a node, as inside a network
        adds = _ActivationAdds()
        with adds:
            grads = torch.autograd.grad(y.square().sum(), wrt)
    return grads, adds.count


@pytest.mark.parametrize("steps,theta,recompute,channels_last", [
    (1, 1.0, "selective", False), (2, 1.0, "full", True), (1, 0.5, "selective", True),
    (3, 0.7, "full", False), (3, 1.0, "selective", False)])
def test_relayed_gradients_equal_the_engine_summed_ones(steps, theta, recompute, channels_last):
    got, adds = _gradients(True, steps=steps, theta=theta, recompute=recompute,
                           channels_last=channels_last)
    want, engine_adds = _gradients(False, steps=steps, theta=theta, recompute=recompute,
                                   channels_last=channels_last)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # per IE step: x's three readers' two sums and conv1's output's one sum; and of x0's
    # readers, the explicit step's share and (θ = 1) the residuals', the branch evaluation
    # at x0 adding two shares in its kernel (the residuals' beyond the first cost an add)
    x0_sums_saved = 2 if theta == 1.0 else 1
    assert engine_adds - adds == 3 * steps + x0_sums_saved


@pytest.mark.parametrize("options,sums_saved", [
    (dict(steps=0), 1),  # a plain block: the residual add's share, to the first norm
    (dict(steps=1, grad="detached"), 1),  # the explicit step's, to the unfused evaluation
    (dict(steps=1, recompute="none"), 4),  # x's two sums, x0's two; conv1's output unrelayed
    (dict(steps=1, dropout=0.3), 4),  # the same: dropout runs conv2's half unfused
], ids=["plain", "detached", "none", "dropout"])
def test_unfused_first_readers_relay_too(options, sums_saved):
    """Where the branch's first norm runs unfused (``norm_act_fwd`` then torch's conv), it
    adds the shares handed to it in its apply pass all the same."""
    got, adds = _gradients(True, **options)
    want, engine_adds = _gradients(False, **options)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert engine_adds - adds == sums_saved


@pytest.mark.parametrize("steps,theta,options", [
    (1, 1.0, {}), (2, 0.5, {}), (0, 1.0, {}), (1, 1.0, dict(grad="detached")),
    (1, 1.0, dict(recompute="none"))], ids=["K1", "K2-theta0.5", "plain", "detached", "none"])
def test_relayed_gradients_equal_the_reference_backends(steps, theta, options):
    """The fast path with relays against the oracle (backend="reference", plain autograd
    through the literal composition): input and parameter gradients."""
    results = []
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        block = PreActBlock(6, 6, ie_steps=steps, theta=theta, backend=backend,
                            **options).to(DEVICE)
        x = torch.randn(3, 6, 5, 5, device=DEVICE, requires_grad=True)
        y = block(x * 1.0)
        results.append(torch.autograd.grad(y.square().sum(), [x, *block.parameters()]))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("inputs_of", [
    lambda block, x: [x], lambda block, x: [block.branch.bn1.weight],
    lambda block, x: [block.branch.conv2.weight, x]], ids=["x", "bn1.weight", "conv2.weight+x"])
def test_a_backward_through_part_of_the_graph_loses_no_share(inputs_of):
    got, _ = _gradients(True, inputs_of=inputs_of, steps=2)
    want, _ = _gradients(False, inputs_of=inputs_of, steps=2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_a_retained_graph_relays_each_backward_afresh():
    block, x = _block(steps=2)
    y = block(x * 1.0)
    loss = y.square().sum()
    first = torch.autograd.grad(loss, [x, *block.parameters()], retain_graph=True)
    second = torch.autograd.grad(loss, [x, *block.parameters()])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_share_left_by_an_interrupted_backward_is_not_reused():
    """A backward stopped after the update's node handed its share on, before the residual's
    took it: the next backward of the same graph starts afresh."""
    block, x = _block(steps=1)
    y = block(x * 1.0)
    loss = y.square().sum()
    residual = _find_node(y.grad_fn, "ie_residual_with_term")
    interrupted = []

    def stop_once(grad_outputs):
        if not interrupted:
            interrupted.append(True)
            raise RuntimeError("stopped")

    handle = residual.register_prehook(stop_once)
    with pytest.raises(RuntimeError, match="stopped"):
        torch.autograd.grad(loss, [x], retain_graph=True)
    handle.remove()
    (got,) = torch.autograd.grad(loss, [x])
    (want,), _ = _gradients(False, inputs_of=lambda block, x: [x], steps=1)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("on", [True, False], ids=["relays", "engine sums"])
def test_a_backward_started_inside_another_keeps_its_own_shares(on):
    """A backward of the same graph run from a hook of another (as two threads could run
    them): each call sees only the shares its own nodes handed on."""
    block, x = _block(steps=1)
    params = list(block.parameters())
    with _relays(on):
        y = block(x * 1.0)
        outer_seed, inner_seed = torch.randn_like(y), torch.randn_like(y)
        inner = []

        def nested_backward(grad_outputs):
            if not inner:  # once: the nested backward passes this node too
                inner.append(None)
                inner[0] = torch.autograd.grad(y, [x], inner_seed, retain_graph=True)

        _find_node(y.grad_fn, "ie_residual_with_term").register_prehook(nested_backward)
        outer = torch.autograd.grad(y, [x, *params], outer_seed, retain_graph=True)
        (want_inner,) = torch.autograd.grad(y, [x], inner_seed, retain_graph=True)
        want_outer = torch.autograd.grad(y, [x, *params], outer_seed)
    torch.testing.assert_close(inner[0][0], want_inner)
    for got, want in zip(outer, want_outer):
        torch.testing.assert_close(got, want)


def test_a_share_left_by_an_interrupted_backward_is_unseen_from_inside_the_step(monkeypatch):
    """After a backward stopped with a share handed on, a backward that starts inside the
    IE step (from conv1's output at x, which the stopped one never reached) gets the
    gradients it gets without the stopped one."""
    relays = []

    def recording(*args):
        made = original(*args)
        relays.append(made)
        return made

    original = ie_skip._step_relays
    monkeypatch.setattr(ie_skip, "_step_relays", recording)
    results = []
    for interrupt in (True, False):
        relays.clear()
        block, x = _block(steps=1)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                      lambda t: t):
            y = block(x * 1.0)
        first_reader = relays[0][0]._nodes[0]()  # the evaluation at x, producing conv1's output
        hidden = next(t for t in saved if t.grad_fn is first_reader)
        if interrupt:
            def stop(grad_outputs):
                raise RuntimeError("stopped")

            handle = _find_node(y.grad_fn, "ie_residual_with_term").register_prehook(stop)
            with pytest.raises(RuntimeError, match="stopped"):
                y.square().sum().backward(retain_graph=True)
            handle.remove()
            block.zero_grad()
        seed = torch.randn_like(hidden, generator=torch.Generator().manual_seed(1))
        results.append(torch.autograd.grad((hidden * seed).sum(), [x, *block.parameters()],
                                           allow_unused=True))
    for got, want in zip(*results):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want)


def test_create_graph_does_not_relay_and_stays_exact():
    """Under create_graph every reader returns its own share (autograd sums them
    differentiably): second derivatives as without relays."""
    results = []
    for on in (True, False):
        block, x = _block(steps=1)
        with _relays(on):
            y = block(x * 1.0)
            adds = _ActivationAdds()
            with adds:
                (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
            (ggx,) = torch.autograd.grad(gx.square().sum(), x)
        results.append((gx.detach(), ggx, adds.count))
    (gx_on, ggx_on, adds_on), (gx_off, ggx_off, adds_off) = results
    torch.testing.assert_close(gx_on, gx_off)
    torch.testing.assert_close(ggx_on, ggx_off)
    assert adds_on == adds_off


def test_no_relay_without_grad_or_when_x_needs_none():
    block, x = _block(steps=1)
    with torch.no_grad():
        block(x)  # no graph: nothing to relay, nothing fails
    y = block(x.detach())  # x needs no gradient: the parameters' still come out right
    grads = torch.autograd.grad(y.square().sum(), list(block.parameters()))
    want, _ = _gradients(False, inputs_of=lambda block, x: list(block.parameters()), steps=1)
    # the detached input differs from x * 1.0 only in x's own gradient, not the parameters'
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


def _find_node(root, name):
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if name in type(node).__name__:
            return node
        stack.extend(next_node for next_node, _ in node.next_functions)
    raise AssertionError(f"no {name} node in the graph")


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_relaying_ops_stay_out_of_forward_mode_and_torch_func(backend):
    """The relaying ops have reverse-mode formulas only.  Forward mode (an input that also
    requires grad) and torch.func (a Hessian-vector product, jvp over grad) must run
    without them, and agree with the reference."""
    results = {}
    for name in ("reference", backend):
        torch.manual_seed(0)
        block = PreActBlock(4, 4, ie_steps=1, norm="group", backend=name).to(DEVICE)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, 5, 5, generator=gen).to(DEVICE).requires_grad_()
        t = torch.randn(2, 4, 5, 5, generator=gen).to(DEVICE)
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(block(fwAD.make_dual(x, t))).tangent
        _, hvp = torch.func.jvp(torch.func.grad(lambda z: block(z).square().sum()),
                                (x.detach(),), (t,))
        results[name] = (tangent, hvp)
    for got, want in zip(results[backend], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
