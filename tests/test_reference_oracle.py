"""The oracle ("reference" backend) is right at every derivative order.

torch's native batch_norm has a wrong third derivative in training mode, so the reference
norms are plain arithmetic (pyeuler/ops/reference_norm.py).  Here: they equal torch's
native norms in value, first and second derivatives and running statistics; third-order
quantities (gradient penalties through IE-Skips, nested jvps) match finite differences and
a hand-written BatchNorm; every backend agrees with the oracle on them; forward mode,
torch.func, vmap and torch.compile work.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyeuler.ops.ie_skip as ie_ops
import pyeuler.ops.norm_act as na
from pyeuler.ops import norm_act_fusions, norm_act_ops
from pyeuler import functional as PF
from pyeuler.models import wide_resnet
from pyeuler.nn import IESkip, PreActBranch
from pyeuler.ops import primitives
from pyeuler.ops import reference_norm as R
from pyeuler.ops.norm_act import norm_act, norm_act_module
from conftest import requires_triton
from helpers import F64, assert_tensors_close, grads, tol, twin

DT = torch.float64


def _affine(c, dtype=DT):
    w = (torch.rand(c, dtype=dtype) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=dtype).requires_grad_()
    return w, b


def _first_and_second_derivatives(f, inputs):
    """``f(*inputs)``, its VJP with a random cotangent, and the VJP of that (a random
    vector against the first-order gradients): value, first and second order."""
    y = f(*inputs)
    dy = torch.randn_like(y)
    first = torch.autograd.grad((y * dy).sum(), inputs, create_graph=True)
    against = sum((g * torch.randn_like(g)).sum() for g in first)
    if not against.requires_grad:  # eval mode without affine: linear, no second order
        return [y, *first]
    second = torch.autograd.grad(against, inputs, allow_unused=True,
                                 materialize_grads=True)  # the bias has none
    return [y, *first, *second]


SHAPES = [(5, 3), (3, 2, 7), (2, 3, 5, 3), (2, 3, 3, 1, 2), (7, 1, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_equals_native_to_second_order(shape, training, affine):
    x = (torch.randn(shape, dtype=DT) * 2 + 0.5).requires_grad_()
    if x.dim() == 4:  # a non-default memory format too
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    w, b = _affine(shape[1]) if affine else (None, None)
    stats = torch.randn(shape[1], dtype=DT), torch.rand(shape[1], dtype=DT) + 0.5
    inputs = [x] + ([w, b] if affine else [])

    def call(norm, running):
        return lambda xx, *wb: norm(xx, *running, *(wb or (None, None)), training, 0.1, 1e-5)

    running, native_running = [s.clone() for s in stats], [s.clone() for s in stats]
    torch.manual_seed(1)
    ours = _first_and_second_derivatives(call(R.batch_norm, running), inputs)
    torch.manual_seed(1)
    native = _first_and_second_derivatives(call(F.batch_norm, native_running), inputs)
    assert_tensors_close(ours, native, **F64)
    assert_tensors_close(running, native_running, **F64)
    assert ours[0].is_contiguous(memory_format=torch.channels_last) == (x.dim() == 4)


@pytest.mark.parametrize("shape, groups", [((3, 6), 2), ((2, 4, 5), 1), ((2, 6, 3, 2), 3),
                                           ((2, 4, 2, 1, 3), 4), ((1, 3, 1), 1)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_equals_native_to_second_order(shape, groups, affine):
    x = (torch.randn(shape, dtype=DT) * 2 - 0.5).requires_grad_()
    if x.dim() == 4:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    w, b = _affine(shape[1]) if affine else (None, None)
    inputs = [x] + ([w, b] if affine else [])

    def call(norm):
        return lambda xx, *wb: norm(xx, groups, *(wb or (None, None)), 1e-5)

    torch.manual_seed(1)
    ours = _first_and_second_derivatives(call(R.group_norm), inputs)
    torch.manual_seed(1)
    assert_tensors_close(ours, _first_and_second_derivatives(call(F.group_norm), inputs), **F64)
    assert ours[0].is_contiguous(memory_format=torch.channels_last) == (x.dim() == 4)


# momentum=None (cumulative average) reaches the norm as a tensor 1/num_batches_tracked in the
# statistics' dtype (norm_act_module; no host sync), nn.BatchNorm uses a Python float.
@pytest.mark.parametrize("momentum, dtype", [(0.1, DT), (None, DT), (None, torch.float32)])
@pytest.mark.parametrize("dim, module", [(0, nn.BatchNorm1d), (1, nn.BatchNorm1d),
                                         (3, nn.BatchNorm3d)])
def test_running_stats_and_counter_through_modules(dim, module, momentum, dtype):
    bn = module(3, momentum=momentum, dtype=dtype)
    native = module(3, momentum=momentum, dtype=dtype)
    tols = tol(dtype)
    for _ in range(3):
        x = torch.randn((4, 3) + (3, 2, 2)[:dim], dtype=dtype) * 3 + 1
        y = norm_act_module(bn, x, relu=False, backend="reference")
        torch.testing.assert_close(y, native(x), **tols)
    for key, value in native.state_dict().items():
        torch.testing.assert_close(bn.state_dict()[key], value, **tols)
    bn.eval(), native.eval()
    x = torch.randn((2, 3) + (3, 2, 2)[:dim], dtype=dtype)
    torch.testing.assert_close(norm_act_module(bn, x, relu=False, backend="reference"), native(x),
                               **tols)


def test_momentum_tensor_and_low_precision_running_stats():
    x = torch.randn(4, 3, 5, dtype=torch.float16)
    running = [torch.randn(3), torch.rand(3) + 0.5]
    native_running = [s.clone() for s in running]
    R.batch_norm(x, *running, training=True, momentum=torch.tensor(0.25))
    F.batch_norm(x, *native_running, training=True, momentum=0.25)
    assert_tensors_close(running, native_running, rtol=1e-6, atol=1e-7)
    assert running[0].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16])
def test_low_precision_dtype_and_layout_follow_native(dtype, autocast):
    x = (torch.randn(4, 6, 5, 3) * 2 + 1).to(dtype).to(memory_format=torch.channels_last)
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    running = torch.randn(6), torch.rand(6) + 0.5
    cases = [(R.batch_norm, F.batch_norm, (None, None, w, b, True)),
             (R.batch_norm, F.batch_norm, (*running, w, b, False)),
             (R.group_norm, F.group_norm, (3, w, b))]
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        for ours, native, args in cases:
            y, y_native = ours(x, *args), native(x, *args)
            assert y.dtype == y_native.dtype == dtype
            assert y.is_contiguous(memory_format=torch.channels_last)
            # both compute in float32 and round once: at most a rounding step apart
            torch.testing.assert_close(y, y_native)
        # float32 inputs stay float32 under autocast, as with the native norms
        y = R.batch_norm(x.float(), None, None, w, b, True)
        assert y.dtype == F.batch_norm(x.float(), None, None, w, b, True).dtype == torch.float32


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (0, 3, 4, 4)])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_matches_modules(shape, training):
    """nn.BatchNorm*d / nn.GroupNorm (torch 2.13) return an empty output, leave the running
    statistics alone and give zero parameter gradients."""
    batch_norm = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)]
    for native in (batch_norm(3, dtype=DT), nn.GroupNorm(3, 3, dtype=DT)):
        native.train(training)
        if isinstance(native, nn.GroupNorm):
            ours = lambda xx, m: R.group_norm(  # noqa: E731
                xx, m.num_groups, m.weight, m.bias, m.eps)
        else:
            native.running_mean.uniform_(-1, 1)
            ours = lambda xx, m: R.batch_norm(xx, m.running_mean, m.running_var,  # noqa: E731
                                              m.weight, m.bias, training, m.momentum, m.eps)
        module, via_module = twin(native), twin(native)
        x = torch.randn(shape, dtype=DT, requires_grad=True)
        y, y_native = ours(x, module), native(x)
        y_module = norm_act_module(via_module, x, relu=False, backend="reference")
        assert y.shape == y_module.shape == y_native.shape == x.shape
        native_grads = grads(y_native.sum(), [x, *native.parameters()])
        assert_tensors_close(grads(y.sum(), [x, *module.parameters()]), native_grads, rtol=0,
                             atol=0)
        assert_tensors_close(grads(y_module.sum(), [x, *via_module.parameters()]), native_grads,
                             rtol=0, atol=0)
        # running statistics untouched; num_batches_tracked counts the call (the module path)
        assert_tensors_close(list(via_module.buffers()), list(native.buffers()), rtol=0, atol=0)
        assert_tensors_close([getattr(module, n) for n in ("running_mean", "running_var")
                              if hasattr(module, n)],
                             [getattr(native, n) for n in ("running_mean", "running_var")
                              if hasattr(native, n)], rtol=0, atol=0)


def test_overflowing_batch_variance_is_nan_not_a_confident_answer():
    """The deliberate deviation from torch (whose output there is the bias, finitely)."""
    x = torch.randn(3, 4, 5)
    x[:, 1, ::2], x[:, 1, 1::2] = 2e19, -2e19  # finite sums and mean; (x − mean)² overflows
    b = torch.randn(4)
    y = R.batch_norm(x, None, None, None, b, True)
    assert y[:, 1].isnan().all() and y[:, [0, 2, 3]].isfinite().all()
    assert F.batch_norm(x, None, None, None, b, True)[:, 1].isfinite().all()
    y = R.group_norm(x, 4, None, b)
    assert y[:, 1].isnan().all() and y[:, [0, 2, 3]].isfinite().all()
    assert F.group_norm(x, 4, None, b)[:, 1].isfinite().all()


def _penalty_of(f, r):
    """x, *params ↦ ‖∇ₓ L‖², L = Σ r·f + Σ f³/10: a gradient penalty (second order in f)."""
    def penalty(x, *params):
        y = f(x, *params)
        g, = torch.autograd.grad((r * y).sum() + (y ** 3).sum() / 10, x, create_graph=True)
        return (g * g).sum()
    return penalty


@pytest.mark.parametrize("groups", [0, 2])
def test_gradient_penalty_through_the_reference_norms_gradcheck_gradgradcheck(groups):
    """gradcheck of the penalty checks third derivatives of the norm, gradgradcheck fourth."""
    x = (torch.randn(3, 4, 3, dtype=DT) + 0.3).requires_grad_()
    w, b = _affine(4)
    f = lambda xx, ww, bb: norm_act(xx, ww, bb, groups=groups, relu=False,  # noqa: E731
                                    backend="reference")
    penalty = _penalty_of(f, torch.randn(3, 4, 3, dtype=DT))
    assert torch.autograd.gradcheck(penalty, (x, w, b))
    assert torch.autograd.gradgradcheck(penalty, (x, w, b))


def _ie_skip(norm):
    branch = PreActBranch(3, norm=norm, norm_groups=1)
    with torch.no_grad():
        for m in branch.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return IESkip(branch, steps=1, grad="unrolled").to(DT).train()


def _penalty_and_gradients(model, x, r):
    """The penalty ‖∇ₓ L(model(x))‖² and its gradients in x and every parameter (third
    order through an IE-Skip, whose forward already differentiates the branch)."""
    x = x.clone().requires_grad_()
    penalty = _penalty_of(lambda xx: model(xx), r)(x)
    return [penalty, *grads(penalty, [x, *model.parameters()])]


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_ie_skip_gradient_penalty_matches_finite_differences(norm):
    """The old bug: with F.batch_norm in the reference, ⟨∇ penalty, v⟩ through the BatchNorm
    IE-Skip here was −31.87705; the right value, −31.95035, is the finite difference of the
    penalty (second order, which F.batch_norm gets right)."""
    model = _ie_skip(norm)
    x, r, v = (torch.randn(2, 3, 4, 4, dtype=DT) for _ in range(3))
    _, dx, *_ = _penalty_and_gradients(twin(model, backend="reference"), x, r)
    eps = 1e-4
    plus, minus = (_penalty_and_gradients(twin(model, backend="reference"), x + s * eps * v, r)[0]
                   for s in (1, -1))
    torch.testing.assert_close((dx * v).sum(), (plus - minus) / (2 * eps), rtol=1e-6, atol=0)


@pytest.fixture
def custom_ops_on_primitives(monkeypatch):
    """backend="triton" runs its torch.library custom ops (the fused backends' autograd) on
    the eager primitives, which take float64."""
    for module in (norm_act_ops, norm_act_fusions, ie_ops):  # every module that launches
        monkeypatch.setattr(module, "_kernels", lambda backend: primitives)
    for module in (na, ie_ops):
        monkeypatch.setattr(module, "resolve_backend", lambda backend, device: backend)


@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("backend", ["eager", "custom-ops"])
def test_ie_skip_gradient_penalty_equals_reference_in_float64(request, norm, backend):
    if backend == "custom-ops":
        request.getfixturevalue("custom_ops_on_primitives")
    model = _ie_skip(norm)
    x, r = torch.randn(2, 3, 4, 4, dtype=DT), torch.randn(2, 3, 4, 4, dtype=DT)
    ref = twin(model, backend="reference")
    fast = twin(model, backend="eager" if backend == "eager" else "triton")
    assert_tensors_close(_penalty_and_gradients(fast, x, r), _penalty_and_gradients(ref, x, r),
                         **F64)
    assert_tensors_close(list(fast.buffers()), list(ref.buffers()), **F64)


@requires_triton
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_ie_skip_gradient_penalty_triton_equals_reference(norm):
    """The Triton kernels (float32, CPU interpreter) against the float64 oracle."""
    model = _ie_skip(norm)
    x, r = torch.randn(2, 3, 4, 4, dtype=DT), torch.randn(2, 3, 4, 4, dtype=DT)
    expected = _penalty_and_gradients(twin(model, backend="reference"), x, r)
    got = _penalty_and_gradients(twin(model, backend="triton").float(), x.float(), r.float())
    for g, e in zip(got, expected):  # relative to each tensor's scale: float32 rounding
        torch.testing.assert_close(g.double(), e, rtol=1e-3, atol=1e-4 * e.abs().max().item())


def test_wide_resnet_gradient_penalty_eager_equals_reference():
    model = wide_resnet(10, 1, num_classes=3, ie_steps=1).to(DT).train()
    x = torch.randn(2, 3, 4, 4, dtype=DT)
    r = torch.randn(2, 3, dtype=DT)
    ref, eager = twin(model, backend="reference"), twin(model, backend="eager")
    expected = _penalty_and_gradients(ref, x, r)
    for got, e in zip(_penalty_and_gradients(eager, x, r), expected):
        # float64 rounding through 4 blocks, relative to each tensor's scale
        torch.testing.assert_close(got, e, rtol=1e-8, atol=1e-12 * e.abs().max().item())


def _handwritten_bn(x, w, b, eps=1e-5):
    """Training-mode BatchNorm of a (N, C, L) tensor, float64, straight from the definition."""
    n = x.shape[0] * x.shape[2]
    mean = x.sum((0, 2), keepdim=True) / n
    var = ((x - mean) ** 2).sum((0, 2), keepdim=True) / n
    return (x - mean) / torch.sqrt(var + eps) * w[:, None] + b[:, None]


def test_nested_jvp_third_order_matches_a_handwritten_batch_norm():
    """The old bug's other face: a third directional derivative by nested forward mode.
    With F.batch_norm in the reference it was −8.95474 here instead of −13.71031."""
    x, v = torch.randn(4, 3, 2, dtype=DT), torch.randn(4, 3, 2, dtype=DT)
    w, b = (t.detach() for t in _affine(3))
    r = torch.randn(4, 3, 2, dtype=DT)

    def scalar_of(bn):
        return lambda xx: (torch.tanh(bn(xx)) * r).sum()

    def along_v(f):  # f ↦ x ↦ ⟨f'(x), v⟩
        return lambda xx: torch.func.jvp(f, (xx,), (v,))[1]

    reference = scalar_of(lambda xx: norm_act(xx, w, b, relu=False, backend="reference"))
    handwritten = scalar_of(lambda xx: _handwritten_bn(xx, w, b))
    third = along_v(along_v(along_v(reference)))(x)
    torch.testing.assert_close(third, along_v(along_v(along_v(handwritten)))(x), **F64)
    second, eps = along_v(along_v(handwritten)), 1e-4
    torch.testing.assert_close(third, (second(x + eps * v) - second(x - eps * v)) / (2 * eps),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("op", ["bn_relu", "group_norm_relu"])
def test_forward_mode_on_the_reference_equals_finite_differences(op):
    x = torch.randn(3, 4, 5, dtype=DT)
    v = torch.randn(3, 4, 5, dtype=DT)
    w, b = (t.detach() for t in _affine(4))
    if op == "bn_relu":
        f = lambda xx: PF.bn_relu(xx, w, b, backend="reference")  # noqa: E731
    else:
        f = lambda xx: PF.group_norm_relu(xx, 2, w, b, backend="reference")  # noqa: E731
    eps = 1e-6
    _, tangent = torch.func.jvp(f, (x,), (v,))
    torch.testing.assert_close(tangent, (f(x + eps * v) - f(x - eps * v)) / (2 * eps),
                               rtol=1e-6, atol=1e-8)
    jacobian = torch.func.jacfwd(f)(x)
    torch.testing.assert_close(jacobian, torch.autograd.functional.jacobian(f, x), **F64)


def test_torch_func_reverse_transforms_and_vmap():
    x = torch.randn(2, 3, 4, 2, dtype=DT)  # vmapped over dim 0: four (3, 2)-shaped batches
    w, b = (t.detach() for t in _affine(4))
    running = [torch.zeros(4, dtype=DT), torch.ones(4, dtype=DT)]
    native_running = [s.clone() for s in running]

    def bn(xx):
        return R.batch_norm(xx, *running, w, b, True, 0.1)

    # running statistics update under torch.func.grad, as native batch_norm's do
    g = torch.func.grad(lambda xx: bn(xx).pow(3).sum())(x[0])
    native_g = torch.func.grad(
        lambda xx: F.batch_norm(xx, *native_running, w, b, True, 0.1).pow(3).sum())(x[0])
    torch.testing.assert_close(g, native_g, **F64)
    assert_tensors_close(running, native_running, **F64)
    jac = torch.func.jacrev(lambda xx: R.group_norm(xx, 2, w, b))(x[0])
    torch.testing.assert_close(jac, torch.autograd.functional.jacobian(
        lambda xx: F.group_norm(xx, 2, w, b), x[0]), **F64)
    for norm in (lambda xx: R.batch_norm(xx, None, None, w, b, True),
                 lambda xx: R.group_norm(xx, 2, w, b)):
        torch.testing.assert_close(torch.func.vmap(norm)(x), torch.stack([norm(xi) for xi in x]),
                                   **F64)


def test_compiles_without_graph_breaks_or_host_syncs():
    """fullgraph=True fails on a graph break, which a host read (float(momentum), .item())
    or a branch on tensor values would cause."""
    torch._dynamo.reset()
    x = torch.randn(4, 3, 5)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    running = [torch.zeros(3), torch.ones(3)]
    compiled_running = [s.clone() for s in running]

    def f(xx, running_mean, running_var, momentum):
        y = norm_act(xx, w, b, running_mean, running_var, momentum=momentum, relu=False,
                     backend="reference")
        return y + norm_act(xx, w, b, groups=3, backend="reference")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    momentum = torch.tensor(0.3)
    torch.testing.assert_close(compiled(x, *compiled_running, momentum), f(x, *running, momentum))
    assert_tensors_close(compiled_running, running)


def test_native_norms_switch_is_scoped_and_used_by_the_benchmark_baseline(monkeypatch):
    from pyeuler.benchmark import StepCase, time_train_step

    calls = []
    native = F.batch_norm
    monkeypatch.setattr(F, "batch_norm", lambda *a, **k: calls.append(1) or native(*a, **k))
    x = torch.randn(3, 2, 4)
    PF.bn_relu(x, backend="reference")
    assert not calls  # the oracle never calls torch's native batch_norm
    with R.native_norms():
        PF.bn_relu(x, backend="reference")
    assert len(calls) == 1
    PF.bn_relu(x, backend="reference")
    assert len(calls) == 1  # switched back off
    time_train_step(StepCase(1, "unrolled", "fp32", "reference"), depth=10, widen_factor=1,
                    batch_size=2, image_size=4, warmup=1, iters=1)
    assert len(calls) > 1
