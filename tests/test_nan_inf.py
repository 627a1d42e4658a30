"""NaN and ±inf propagate as in torch on every backend; an overflowed variance gives NaN.

Each backend's value is compared with torch's own ``relu``/``batch_norm``/``group_norm``
composition (``equal_nan``: NaN exactly where torch has NaN, and the same finite values
elsewhere), forward and backward.  The one deliberate deviation from torch is the variance
that overflows to +inf (bfloat16 values near 1e30): torch then computes ``invstd = 0`` and a
confident, finite ``relu(bias)``; pyeuler returns the variance as NaN
(:func:`pyeuler.ops.primitives.norm_stats`), so the output is NaN.
"""

import pytest
import torch
import torch.nn.functional as F

from torch import nn

from pyeuler.functional import bn_add_relu, bn_relu, group_norm_relu
from pyeuler.models import wide_resnet
from pyeuler.ops.norm_act import norm_act_module
from conftest import requires_cuda, triton_usable
from helpers import twin

# The interpreter computes with numpy, which warns on the inf/NaN arithmetic tested here.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(invalid value|overflow) encountered:RuntimeWarning")

BACKENDS = [
    "eager",
    pytest.param("triton", marks=pytest.mark.skipif(not triton_usable()[0],
                                                    reason=f"triton: {triton_usable()[1]}")),
    pytest.param("cuda", marks=requires_cuda),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAN, INF = float("nan"), float("inf")
TOL = dict(rtol=1e-4, atol=1e-5, equal_nan=True)
SHAPE = (4, 3, 4, 4)
POISONED = (1, 1, 2, 2)  # one element of sample 1, channel 1


def _kernels(backend):
    if backend == "eager":
        from pyeuler.ops import primitives as kernels
    elif backend == "triton":
        import pyeuler.triton as kernels
    else:
        import pyeuler.cuda as kernels
    return kernels


def _overflowing(dtype):
    """Values near 1e30: their squared deviations overflow the float32 accumulation."""
    return (torch.randn(SHAPE, device=DEVICE) * 1e30).to(dtype)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _grads(out, inputs, dy, **kwargs):
    """Gradients of ``(out·dy).sum()``, zeros where an input gets none."""
    got = torch.autograd.grad((out * dy).sum(), inputs, allow_unused=True, **kwargs)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(got, inputs)]


def _assert_all_close(actual, expected):
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, msg=lambda m: f"entry {i}: {m}", **TOL)


def _bn_inputs():
    x = torch.randn(SHAPE, device=DEVICE)
    w = torch.rand(SHAPE[1], device=DEVICE) + 0.5
    b = torch.randn(SHAPE[1], device=DEVICE)
    return x, w, b, torch.randn(SHAPE, device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("saved_mask", [False, True], ids=["recomputed_gate", "saved_mask"])
def test_primitive_relu_and_gate_follow_torch(backend, saved_mask):
    """The ReLU keeps NaN; the gate is torch's threshold_backward: open at NaN, and a closed
    gate gives exactly 0 even for a NaN or inf gradient (first and second order)."""
    kernels = _kernels(backend)
    x = torch.randn(2, 4, 8, device=DEVICE)
    x[0, :, :6] = torch.tensor([NAN, INF, -INF, 0.0, -0.0, -1.0], device=DEVICE)
    dy, ddx = torch.randn_like(x), torch.randn_like(x)
    dy[0, :, :6] = ddx[0, :, :6] = torch.tensor([NAN, -INF, NAN, INF, NAN, NAN], device=DEVICE)
    ones, zeros = torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE)
    y, mask = kernels.affine_act_forward(x, ones, zeros, None, True, True)
    y_torch = torch.relu(x)
    torch.testing.assert_close(y, y_torch, **TOL)
    assert torch.equal(mask, torch.ops.aten.threshold_backward(torch.ones_like(x), y_torch, 0) != 0)
    mask = mask if saved_mask else None
    _, g = kernels.affine_act_backward_apply(dy, x, ones, zeros, mask, True, ones, zeros, zeros,
                                             zeros, True)
    torch.testing.assert_close(g, torch.ops.aten.threshold_backward(dy, y_torch, 0), **TOL)
    ddy, _ = kernels.affine_act_double_backward_apply(ddx, dy, x, ones, zeros, mask, True, ones,
                                                      zeros, zeros, zeros, zeros, None)
    # ddy = m·(a·ddx + p + q·(x − center)) has 0·inf = NaN at x = +inf (an open gate)
    keep = x != INF
    torch.testing.assert_close(ddy[keep], torch.ops.aten.threshold_backward(ddx, y_torch, 0)[keep],
                               **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_primitive_norm_stats_overflow_is_nan_but_a_huge_mean_is_not(backend):
    kernels = _kernels(backend)
    x = _overflowing(torch.bfloat16)
    x[:, 1] = 1e20  # |mean|² overflows float32, the variance (0) does not
    mean, var = kernels.norm_stats(x, 0)
    assert var[0].isnan() and var[2].isnan()
    assert mean[1] == x[0, 1, 0, 0].float() and var[1] == 0
    assert kernels.norm_stats(x, 1)[1].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_bn_relu_one_bad_element_poisons_its_channel(backend, bad):
    x, w, b, dy = _bn_inputs()
    x[POISONED] = bad
    x, w, b = _leaves(x, w, b)
    y = bn_relu(x, w, b, backend=backend)
    xt, wt, bt = _leaves(x, w, b)
    yt = torch.relu(F.batch_norm(xt, None, None, wt, bt, training=True))
    assert yt[:, 1].isnan().all() and not yt[:, 0].isnan().any()
    torch.testing.assert_close(y, yt, **TOL)
    _assert_all_close(_grads(y, (x, w, b), dy), _grads(yt, (xt, wt, bt), dy))


def _add_relu_case(case):
    """x, shortcut, h for ``relu(shortcut + h·BN(x))`` with one bad value."""
    x, shortcut = torch.randn(SHAPE, device=DEVICE), torch.randn(SHAPE, device=DEVICE)
    h = 0.7
    if case == "x_nan":
        x[POISONED] = NAN
    elif case == "x_inf":
        x[POISONED] = INF
    elif case == "shortcut_nan":
        shortcut[POISONED] = NAN
    elif case == "shortcut_inf":
        shortcut[POISONED] = INF
    else:
        assert case == "h_nan"
        h = NAN
    return x, shortcut, h


ADD_RELU_CASES = ["x_nan", "x_inf", "shortcut_nan", "shortcut_inf", "h_nan"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ADD_RELU_CASES)
def test_bn_add_relu_matches_torch(backend, case):
    x, shortcut, h = _add_relu_case(case)
    _, w, b, dy = _bn_inputs()
    x, shortcut, w, b = _leaves(x, shortcut, w, b)
    y = bn_add_relu(x, shortcut, h, w, b, backend=backend)
    xt, st, wt, bt = _leaves(x, shortcut, w, b)
    yt = torch.relu(st + h * F.batch_norm(xt, None, None, wt, bt, training=True))
    assert not yt.isfinite().all()
    torch.testing.assert_close(y, yt, **TOL)
    # A NaN output passes its gradient (torch's threshold_backward): with a NaN shortcut
    # element, every gradient stays finite and equal to torch's.
    _assert_all_close(_grads(y, (x, shortcut, w, b), dy), _grads(yt, (xt, st, wt, bt), dy))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["shortcut_nan", "x_nan"])
def test_bn_add_relu_second_order_matches_torch(backend, case):
    x, shortcut, h = _add_relu_case(case)
    _, w, b, dy = _bn_inputs()
    v = torch.randn(SHAPE, device=DEVICE)

    def second_order(fn, x, shortcut, w, b):
        dx, = _grads(fn(x, shortcut, w, b), (x,), dy, create_graph=True)
        return _grads(dx, (x, shortcut, w, b), v)

    ours = second_order(lambda *a: bn_add_relu(*a[:2], h, *a[2:], backend=backend),
                        *_leaves(x, shortcut, w, b))
    theirs = second_order(
        lambda x, s, w, b: torch.relu(s + h * F.batch_norm(x, None, None, w, b, training=True)),
        *_leaves(x, shortcut, w, b))
    _assert_all_close(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "inf"])
def test_group_norm_relu_one_bad_element_poisons_its_group(backend, bad):
    x, w, b, dy = _bn_inputs()
    x = torch.cat([x, x], 1)  # 6 channels, 2 groups of 3
    w, b, dy = torch.cat([w, w]), torch.cat([b, b]), torch.cat([dy, dy], 1)
    x[POISONED] = bad
    x, w, b = _leaves(x, w, b)
    y = group_norm_relu(x, 2, w, b, backend=backend)
    xt, wt, bt = _leaves(x, w, b)
    yt = torch.relu(F.group_norm(xt, 2, wt, bt))
    assert yt[1, :3].isnan().all() and not yt[1, 3:].isnan().any() and not yt[0].isnan().any()
    torch.testing.assert_close(y, yt, **TOL)
    _assert_all_close(_grads(y, (x, w, b), dy), _grads(yt, (xt, wt, bt), dy))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ie_steps", [0, 1])
def test_wide_resnet_with_one_nan_weight_has_nan_loss(backend, ie_steps):
    model = wide_resnet(10, 1, num_classes=3, ie_steps=ie_steps).to(DEVICE)
    with torch.no_grad():
        next(p for p in model.parameters() if p.dim() == 4)[0, 0, 0, 0] = NAN  # the stem conv
    model = twin(model, backend=backend)
    x = torch.rand(4, 3, 8, 8, device=DEVICE)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0], device=DEVICE))
    assert loss.isnan()
    loss.backward()
    assert any(p.grad.isnan().any() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_overflowed_variance_gives_nan_not_relu_bias(backend, dtype):
    x = _overflowing(dtype)
    w, b = torch.ones(SHAPE[1], device=DEVICE), torch.ones(SHAPE[1], device=DEVICE)
    # torch (on the CPU): var = inf, invstd = 0, a confident relu(bias) = 1 everywhere
    assert (torch.relu(F.batch_norm(x.float().cpu(), None, None, w.cpu(), b.cpu(),
                                    training=True)) == 1).all()
    assert bn_relu(x, w, b, backend=backend).isnan().all()
    assert bn_add_relu(x, x, 0.5, w, b, backend=backend).isnan().all()
    assert group_norm_relu(x, 1, w, b, backend=backend).isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_eval_mode_input_gradient_has_no_x_term(backend, bad):
    """With running statistics the input gradient is a·g: a non-finite x must not turn the
    absent b·(x − center) term into NaN (0·inf), as torch's eval BatchNorm shows."""
    dev = DEVICE
    bn = nn.BatchNorm2d(3).to(dev).eval()
    bn.running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 4, 4, device=dev)
    x[0, 1, 2, 2] = bad
    x.requires_grad_()
    ours = norm_act_module(bn, x, relu=False, backend=backend)
    (dx,) = torch.autograd.grad(ours, x, torch.ones_like(ours))
    (expected,) = torch.autograd.grad(bn(x), x, torch.ones_like(ours))
    torch.testing.assert_close(dx, expected, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "inf"])
def test_eval_mode_ie_skip_gradient_of_a_bad_input_matches_reference(backend, bad):
    """An unrolled BatchNorm IE-Skip in eval mode: the second order's absent terms (b = q = 0
    with running statistics) contribute exactly 0, so one bad element poisons exactly the
    gradients it poisons in the reference, not its whole sample and the biases."""
    from pyeuler.nn import IESkip, PreActBranch

    torch.manual_seed(0)
    block = IESkip(PreActBranch(4, norm="batch", backend="reference"), steps=1).to(DEVICE)
    block(torch.randn(8, 4, 4, 4, device=DEVICE))  # running statistics from a training step
    block.eval()
    ours = twin(block, backend=backend)
    ours.branch.backend = backend
    x = torch.randn(2, 4, 4, 4, device=DEVICE)
    x[0, 0, 1, 1] = bad
    grads = []
    for model in (block, ours):
        xx = x.clone().requires_grad_()
        model(xx).sum().backward()
        grads.append([xx.grad] + [p.grad for p in model.parameters()])
    for want, got in zip(*grads):
        assert torch.equal(want.isnan(), got.isnan())
        torch.testing.assert_close(got, want, **TOL)
