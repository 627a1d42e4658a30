"""A training step that can be captured (pyeuler.robust.capture, docs/benchmarks.md §9).

- No host synchronisation anywhere in a full step (attack, forward, loss, backward,
  optimizer), every backend and gradient mode, BatchNorm and GroupNorm: a dispatch mode
  raises on the ops that read device values on the host.
- ``grad="implicit"`` with ``tol`` reads the residual on the host by design: it refuses
  capture and compilation with a clear error.
- ``torch.compile(fullgraph=True)`` of forward, loss and backward (``backward()`` traced,
  ``trace_autograd_ops``) with aot_eager and inductor equals eager; the compiled whole
  step with its optimizer step compiled apart trains as eager does.
- ``pyeuler train`` / ``bench`` ``--cuda-graph`` / ``--compile`` need CUDA and say so.
- On a GPU (marked ``gpu``): the CUDA-graph step equals the eager step.
"""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import requires_triton
from pyeuler.robust.capture import CapturedStep, CapturedTraining, step_loss
from pyeuler.robust.zoo import build_model

DIGITS = (1, 8, 8)
_SYNCS = {torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten.is_nonzero,
          torch.ops.aten.item}


class NoHostSync(TorchDispatchMode):
    """Raises on every op that reads a device value on the host or has a data-dependent
    shape: what a CUDA graph cannot capture."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in _SYNCS:
            raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))


def _model(backend, norm="batch", k=1, grad="unrolled", seed=0, name="wrn-10-1"):
    torch.manual_seed(seed)
    return build_model(name, DIGITS, 10, ie_steps=k, grad=grad, norm=norm, backend=backend)


def _batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *DIGITS, generator=g), torch.randint(0, 10, (n,), generator=g)


def _train_step(model, optimizer, x, y, adv="none"):
    optimizer.zero_grad(set_to_none=True)
    loss, _ = step_loss(model, x, y, adv, eps=0.1, steps=1)
    loss.backward()
    optimizer.step()
    return loss.detach()


def test_the_dispatch_mode_sees_host_reads():
    """The check can fail: each kind of host read it is meant to catch raises."""
    t = torch.ones(3)
    for read in (lambda: t.sum().item(), lambda: bool(t.sum() > 0), lambda: t.nonzero(),
                 lambda: float(t[0])):
        with NoHostSync(), pytest.raises(AssertionError, match="host synchronisation"):
            read()


_MODES = [(0, "unrolled"), (1, "unrolled"), (1, "detached"), (2, "implicit")]
# Triton in the interpreter takes 10-40 s a step here: two of its cases run; the others,
# and the CUDA backend, are checked on the emulated GPU path by the counter
# (tests/test_cost.py::test_gpu_path_step_is_capturable).
_CASES = [(backend, norm, k, grad) for backend in ("eager", "reference")
          for norm in ("batch", "group") for k, grad in _MODES] + [
    pytest.param("triton", "batch", 1, "unrolled", marks=requires_triton),
    pytest.param("triton", "group", 2, "implicit", marks=requires_triton)]


@pytest.mark.parametrize("backend,norm,k,grad", _CASES)
def test_training_step_never_reads_the_device(backend, norm, k, grad):
    """The step after the first (the one a graph would replay: the optimizer's state
    exists) runs forward, loss, backward and an SGD-momentum step without a host read."""
    model = _model(backend, norm, k, grad)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = _batch()
    _train_step(model, optimizer, x, y)
    with NoHostSync():
        loss = _train_step(model, optimizer, x, y)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("adv", ["pgd", "trades"])
@pytest.mark.parametrize("backend", ["eager", "reference"])
def test_adversarial_step_never_reads_the_device(backend, adv, monkeypatch):
    """The attack's passes (eval mode, input gradients, random start) are inside the
    captured region too; only their [0, 1] input check reads x, and it is skipped where
    values cannot be read (capture_active: emulated here)."""
    import pyeuler.robust.attacks as attacks

    model = _model(backend, "group")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _batch()
    _train_step(model, optimizer, x, y, adv)
    with NoHostSync(), pytest.raises(AssertionError, match="host synchronisation"):
        _train_step(model, optimizer, x, y, adv)  # outside a capture the check reads x
    monkeypatch.setattr(attacks, "capture_active", lambda: True)
    with NoHostSync():
        _train_step(model, optimizer, x, y, adv)


def test_implicit_with_tol_refuses_capture(monkeypatch):
    """tol reads the residual on the host every iteration: under a CUDA-graph capture
    (emulated: the stream reports capturing) and under torch.compile it raises, naming
    tol=None; without capture it runs, and tol=None runs in both."""
    from pyeuler.nn import IESkip, PreActBranch

    x = torch.randn(2, 4, 4, 4)
    with_tol = IESkip(PreActBranch(4, norm="group"), steps=3, grad="implicit", tol=1e-4,
                      backend="eager")
    without = IESkip(PreActBranch(4, norm="group"), steps=3, grad="implicit", backend="eager")
    with_tol(x)
    with pytest.raises(Exception, match=r"tol=0\.0001 reads the residual.*use tol=None"):
        torch.compile(with_tol, fullgraph=True, backend="eager")(x)
    torch.compile(without, fullgraph=True, backend="eager")(x)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"CUDA graph capture or torch.compile cannot"):
        with_tol(x)
    without(x)


# ------------------------------------------------------------------ torch.compile


def _forward_backward(model):
    def forward_backward(x, y):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()
    return forward_backward


def _compiled_gradients(backend, norm, k, grad, compile_backend, model="wrn-10-1"):
    x, y = _batch()
    model = _model(backend, norm, k, grad, name=model)
    want = _forward_backward(model)(x, y)
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True), \
            torch._functorch.config.patch(donated_buffer=False):
        got = torch.compile(_forward_backward(model), fullgraph=True,
                            backend=compile_backend)(x, y)
    torch.testing.assert_close(got, want)
    assert not got.requires_grad
    torch.testing.assert_close([p.grad for p in model.parameters()], want_grads)


@pytest.mark.parametrize("backend,norm,k,grad", [
    pytest.param("triton", "batch", 1, "unrolled", marks=requires_triton),
    ("eager", "group", 1, "detached"),
    ("eager", "group", 2, "implicit"),
    ("reference", "batch", 1, "unrolled"),  # autograd.grad(create_graph=True) in the forward
])
def test_fullgraph_compile_of_forward_loss_backward_aot_eager(backend, norm, k, grad):
    _compiled_gradients(backend, norm, k, grad, "aot_eager")


def test_fullgraph_compile_of_forward_loss_backward_inductor():
    """Inductor generates and compiles C++ on the CPU, about a minute on two cores even
    for the smallest IE model: one residual MLP block, K = 1 unrolled (double backward)."""
    _compiled_gradients("eager", "batch", 1, "unrolled", "inductor", model="mlp-8-1")


@pytest.mark.parametrize("adv,optimizer", [("none", "adam"), ("pgd", "sgd")])
def test_compiled_whole_step_trains_as_eager(adv, optimizer):
    """CapturedStep(mode="compile"): forward, loss and backward in one graph, the optimizer
    step compiled apart, the learning rate a device tensor; a schedule's change takes
    effect without a recompile; parameters, buffers and the losses equal eager's."""
    def make():
        model = _model("eager", "batch")
        if optimizer == "sgd":
            return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                                          weight_decay=1e-4)
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    x, y = _batch()
    model, opt = make()
    want = []
    for i in range(3):
        torch.manual_seed(i)
        want.append(_train_step(model, opt, x, y, adv))
        for group in opt.param_groups:
            group["lr"] *= 0.5
    compiled_model, compiled_opt = make()

    def forward_backward(xb, yb):
        loss, _ = step_loss(compiled_model, xb, yb, adv, eps=0.1, steps=1)
        loss.backward()
        return loss.detach()

    torch._dynamo.reset()
    step = CapturedStep(forward_backward, compiled_model, compiled_opt, mode="compile",
                        compile_mode=None, compile_backend="aot_eager")
    for i in range(3):
        torch.manual_seed(i)
        torch.testing.assert_close(step(x, y), want[i])
        for group in compiled_opt.param_groups:
            group["lr"] *= 0.5
    assert all(isinstance(group["lr"], float) for group in compiled_opt.param_groups)
    torch.testing.assert_close(compiled_model.state_dict(), model.state_dict())
    with pytest.raises(ValueError, match="x: a captured step replays fixed shapes"):
        step(x[:2], y[:2])


def test_captured_training_drops_the_last_partial_batch():
    """An epoch of CapturedTraining trains on the full batches of train_epoch's shuffle,
    as eager steps do, reports only the samples it trained on, and refuses what it
    cannot do."""
    x, y = _batch(n=10)
    model, captured_model = _model("eager", "group"), _model("eager", "group")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    captured_opt = torch.optim.SGD(captured_model.parameters(), lr=0.1, momentum=0.9)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    losses = [_train_step(model, opt, x[idx], y[idx]) for idx in (order[:4], order[4:8])]
    torch._dynamo.reset()
    train = CapturedTraining("compile", compile_mode=None, compile_backend="aot_eager")
    got = train(captured_model, x, y, captured_opt, batch_size=4, progress=False,
                generator=torch.Generator().manual_seed(3))
    assert got.samples == 8
    assert got.loss == pytest.approx(sum(losses).item() / 2, rel=1e-5)
    torch.testing.assert_close(captured_model.state_dict(), model.state_dict())
    with pytest.raises(ValueError, match="scheduler_step"):
        train(captured_model, x, y, captured_opt, batch_size=4, scheduler_step=lambda: None)
    with pytest.raises(ValueError, match="nothing would be trained"):
        train(captured_model, x, y, captured_opt, batch_size=16)
    with pytest.raises(ValueError, match=r"inputs in \[0, 1\]"):
        train(captured_model, x * 2, y, captured_opt, batch_size=4, adv="pgd", eps=0.1)
    with pytest.raises(TypeError, match="optimizer: capture supports SGD, Adam, AdamW"):
        CapturedStep(lambda a, b: a, captured_model,
                     torch.optim.RMSprop(captured_model.parameters()), mode="compile")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        CapturedStep(lambda a, b: a, captured_model, captured_opt, mode="cuda-graph")(x, y)


# ------------------------------------------------------------------ command line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine "
                                                      "without CUDA")
@pytest.mark.parametrize("command", ["train", "bench"])
@pytest.mark.parametrize("flag", ["--cuda-graph", "--compile"])
def test_capture_flags_need_cuda(command, flag):
    done = subprocess.run([sys.executable, "-m", "pyeuler", command, flag],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pyeuler: error: {flag}: needs CUDA")


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("adv,optimizer", [("none", "adam"), ("pgd", "sgd")])
@pytest.mark.parametrize("backend", ["eager", pytest.param("triton", marks=requires_triton)])
def test_cuda_graph_step_trains_as_eager(backend, adv, optimizer):
    """The captured step (warm-up undone, then replays) follows eager training; a
    learning-rate change re-captures without warm-up."""
    def make():
        model = _model(backend, "batch").cuda()
        if optimizer == "sgd":
            return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)

    x, y = (t.cuda() for t in _batch(n=8))
    model, opt = make()
    captured_model, captured_opt = make()

    def forward_backward(xb, yb):
        loss, _ = step_loss(captured_model, xb, yb, adv, eps=0.1, steps=1)
        loss.backward()
        return loss.detach()

    step = CapturedStep(forward_backward, captured_model, captured_opt, mode="cuda-graph")
    for i in range(4):
        want = _train_step(model, opt, x, y, adv)
        got = step(x, y).clone()
        if adv == "none":  # the attack's random start draws differently inside a graph
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        if i == 1:
            for o in (opt, captured_opt):
                for group in o.param_groups:
                    group["lr"] *= 0.1
    assert step.captures == 2
    if adv == "none":
        torch.testing.assert_close(captured_model.state_dict(), model.state_dict(),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("flag", ["--cuda-graph", "--compile"])
def test_train_with_capture_runs(tmp_path, flag):
    done = subprocess.run(
        [sys.executable, "-m", "pyeuler", "train", flag, "--epochs", "1", "--ie-steps", "1",
         "--adv", "pgd", "--attack-steps", "2", "--no-progress", "--json",
         str(tmp_path / "r.json")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
