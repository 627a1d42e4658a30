"""IE-Skips: the explicit path ("eager") against the literal autograd algorithm ("reference")."""

import pytest
import torch
from torch import nn

from pyeuler.functional import branch_jvp, branch_vjp, ie_skip
from pyeuler.nn import IESkip, PreActBranch
from helpers import F32, assert_tensors_close, grads, swapped_parameters, twin

DT = torch.float64


def _branch(norm="batch", dim=2, channels=4, dtype=DT, **kw):
    branch = PreActBranch(channels, norm=norm, dim=dim, norm_groups=2 if norm == "group" else 1,
                          **kw).to(dtype)
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        for m in branch.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return branch


def _x(dim=2, dtype=DT, n=3, channels=4):
    shape = (n, channels) + (5, 4, 3)[:dim]
    return torch.randn(shape, dtype=dtype)


def _compare(branch, x, steps, theta, grad, bn_update="all", train=True, step_size=0.1,
             input_grad=True, param_grad=True, tols=dict(rtol=1e-8, atol=1e-10)):
    """Run eager and reference on twin branches; compare output, grads and buffers."""
    branch.train(train)
    ref_branch = twin(branch)
    outs, gs = [], []
    for b, backend in ((branch, "eager"), (ref_branch, "reference")):
        for p in b.parameters():
            p.requires_grad_(param_grad)
        xi = x.clone().requires_grad_(input_grad)
        y = ie_skip(b, xi, steps, step_size, theta, grad, bn_update, backend=backend)
        outs.append(y)
        wrt = ([xi] if input_grad else []) + (list(b.parameters()) if param_grad else [])
        if wrt:
            dy = torch.randn_like(y, generator=torch.Generator().manual_seed(1))
            gs.append(grads((y * dy).sum(), wrt))
    torch.testing.assert_close(outs[0], outs[1], **tols)
    if gs:
        assert_tensors_close(gs[0], gs[1], **tols)
    assert_tensors_close(list(branch.buffers()), list(ref_branch.buffers()), **tols)
    return outs[0]


@pytest.mark.parametrize("steps", [0, 1, 2, 3])
@pytest.mark.parametrize("theta", [0.5, 1.0])
@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("train", [True, False])
def test_unrolled_equals_reference(steps, theta, norm, train):
    _compare(_branch(norm), _x(), steps, theta, "unrolled", train=train)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_detached_equals_reference(steps, norm):
    _compare(_branch(norm), _x(), steps, 1.0, "detached")


@pytest.mark.parametrize("dim", [0, 1, 3])
def test_other_spatial_ranks(dim):
    _compare(_branch(dim=dim), _x(dim, n=4), 2, 0.5, "unrolled")


def test_bn_update_first_and_learnable_h():
    _compare(_branch(h=0.5, h_mode="channel"), _x(), 2, 1.0, "unrolled", bn_update="first")
    _compare(_branch(h=0.5, h_mode="scalar"), _x(), 2, 0.5, "unrolled", bn_update="all")


def test_only_input_requires_grad_as_attacks_do():
    _compare(_branch(), _x(), 2, 1.0, "unrolled", train=False, param_grad=False)


def test_no_grad_matches_reference():
    branch = _branch()
    ref = twin(branch)
    x = _x()
    with torch.no_grad():
        y = ie_skip(branch, x, 2, backend="eager")
        y_ref = ie_skip(ref, x, 2, backend="reference")
    torch.testing.assert_close(y, y_ref)
    assert_tensors_close(list(branch.buffers()), list(ref.buffers()))


def test_dropout_matches_reference_with_same_seed():
    branch = _branch(dropout=0.3)
    ref = twin(branch)
    x = _x()
    torch.manual_seed(5)
    y = ie_skip(branch, x, 2, backend="eager")
    torch.manual_seed(5)
    y_ref = ie_skip(ref, x, 2, backend="reference")
    torch.testing.assert_close(y, y_ref)


def test_steps_change_the_output_and_reduce_the_implicit_residual():
    branch = _branch().eval()
    x = _x()
    with torch.no_grad():
        residuals = []
        for steps in range(4):
            y = ie_skip(branch, x, steps, step_size=0.05, backend="eager")
            residuals.append((y - x - branch(y)).norm().item())
    assert residuals[1] < residuals[0] and residuals[3] < residuals[1]


def test_detached_gradients_are_those_of_the_explicit_step():
    branch = _branch()
    x = _x().requires_grad_()
    y = ie_skip(branch, x, 2, grad="detached", backend="eager")
    twin_branch = twin(branch)
    x2 = x.detach().clone().requires_grad_()
    y0 = x2 + twin_branch(x2)
    dy = torch.randn_like(y)
    assert_tensors_close(grads((y * dy).sum(), [x, *branch.parameters()]),
                         grads((y0 * dy).sum(), [x2, *twin_branch.parameters()]))
    assert not torch.allclose(y, y0)


@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("backend", ["eager", "reference"])
def test_gradcheck_and_gradgradcheck(norm, train, backend):
    # Outputs never depend on the running statistics the calls update (train mode uses
    # batch statistics; eval mode updates nothing), so repeated calls are one function.
    branch = _branch(norm, channels=2).train(train)
    x = torch.randn(2, 2, 3, 2, dtype=DT, requires_grad=True)
    f = lambda inp: ie_skip(branch, inp, 2, 0.1, 0.5, "unrolled", "all", backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    # the reference too: its norms are decomposed (torch's native batch_norm third derivative
    # is not exact, which this check caught)
    assert torch.autograd.gradgradcheck(f, (x,))


def test_parameter_gradients_gradcheck():
    ie = _IE(_branch(channels=2))
    x = torch.randn(3, 2, 3, 3, dtype=DT)
    names = [n for n, _ in ie.named_parameters()]
    values = [p.detach().clone().requires_grad_() for p in ie.parameters()]
    f = lambda *ps: torch.func.functional_call(ie, dict(zip(names, ps)), (x,))  # noqa: E731
    assert torch.autograd.gradcheck(f, values)


class _IE(nn.Module):
    def __init__(self, branch):
        super().__init__()
        self.branch = branch

    def forward(self, x):
        return ie_skip(self.branch, x, 2, 0.1, 1.0, "unrolled", "first", backend="eager")


class _MLPBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))

    def forward(self, x):
        return 0.5 * self.net(x)


def test_generic_branch_uses_autograd_and_solves_the_implicit_equation():
    branch = _MLPBranch().double()
    x = torch.randn(5, 4, dtype=DT)
    with torch.no_grad():
        y = IESkip(branch, steps=60, step_size=0.25)(x)
    torch.testing.assert_close(y, x + branch(y), rtol=1e-6, atol=1e-8)
    xg = x.clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: IESkip(branch, steps=2)(t), (xg,))


def test_iesKip_module_uses_branch_backend():
    branch = _branch()
    module = IESkip(twin(branch), steps=2)
    x = _x()
    torch.testing.assert_close(module(x), ie_skip(branch, x, 2, backend="reference"), **F32)


@pytest.mark.parametrize("theta", [0.5, 1.0])
@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("bn_update", ["all", "first"])
def test_implicit_equals_reference(theta, norm, train, bn_update):
    if norm == "group" and bn_update == "first":
        pytest.skip("group norm has no running statistics")
    _compare(_branch(norm, h=0.5), _x(), 12, theta, "implicit", bn_update, train=train)


def test_implicit_input_gradient_only():
    _compare(_branch(h=0.5), _x(), 8, 1.0, "implicit", param_grad=False)


@pytest.mark.parametrize("theta", [0.5, 1.0])
def test_implicit_solves_the_equation_and_has_the_ift_gradient(theta):
    """x* = x0 + (1−θ)·f(x0) + θ·f(x*) to float64 precision, and gradcheck of the map
    x0, W ↦ x* (finite differences of the converged solve) against the implicit-function-
    theorem gradient, for the input and a weight."""
    branch = _branch("group", h=0.4)
    x0 = _x()
    f = lambda t: branch(t, backend="reference")  # noqa: E731
    y = ie_skip(branch, x0, 200, theta=theta, grad="implicit", tol=1e-14)
    torch.testing.assert_close(y, x0 + (1 - theta) * f(x0) + theta * f(y), rtol=1e-12, atol=1e-12)

    def solve(x, weight):
        with swapped_parameters(branch.conv1, weight=weight):
            return ie_skip(branch, x, 200, theta=theta, grad="implicit", tol=1e-14)

    assert torch.autograd.gradcheck(solve, (x0.clone().requires_grad_(),
                                            branch.conv1.weight.detach().clone().requires_grad_()),
                                    fast_mode=True)


def test_implicit_input_jacobian_is_the_ift_formula():
    """∂x*/∂x0 = (I − θ·J_f(x*))⁻¹ (I + (1−θ)·J_f(x0)), from dense Jacobians (tiny shape)."""
    theta = 0.5
    branch = _branch("group", channels=2, h=0.5)
    x0 = torch.randn(2, 2, 2, 2, dtype=DT)
    f = lambda t: branch(t, backend="reference")  # noqa: E731
    solve = lambda t: ie_skip(branch, t, 80, theta=theta, grad="implicit", tol=1e-14)  # noqa: E731
    n = x0.numel()
    y = solve(x0).detach()
    jac_f = lambda t: torch.autograd.functional.jacobian(f, t).reshape(n, n)  # noqa: E731
    eye = torch.eye(n, dtype=DT)
    expected = torch.linalg.solve(eye - theta * jac_f(y), eye + (1 - theta) * jac_f(x0))
    actual = torch.autograd.functional.jacobian(solve, x0).reshape(n, n)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11)


def test_implicit_no_grad_gives_the_same_value():
    branch, x = _branch("group", h=0.5), _x()
    y = ie_skip(branch, x.clone().requires_grad_(), 10, grad="implicit")
    with torch.no_grad():
        torch.testing.assert_close(ie_skip(branch, x, 10, grad="implicit"), y.detach())


def test_implicit_settings_are_checked():
    with pytest.raises(ValueError, match="tol"):
        ie_skip(_branch(), _x(), 3, grad="unrolled", tol=1e-6)
    with pytest.raises(ValueError, match="tol"):
        ie_skip(_branch(), _x(), 3, grad="implicit", tol=0.0)
    with pytest.raises(ValueError, match="dropout"):
        ie_skip(_branch(dropout=0.3), _x(), 3, grad="implicit")


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=-1), "steps"), (dict(step_size=0.0), "step_size"), (dict(theta=1.5), "theta"),
    (dict(grad="exact"), "grad must"), (dict(bn_update="none"), "bn_update"),
])
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IESkip(_branch(), **kwargs)


@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("train", [True, False])
def test_branch_vjp_and_jvp_match_autograd(norm, train):
    branch = _branch(norm).train(train)
    x, v = _x(), _x()
    buffers = [b.clone() for b in branch.buffers()]
    xg = x.clone().requires_grad_()
    with torch.no_grad():
        ref_branch = twin(branch)
    fx = ref_branch(xg, backend="reference")
    (vjp_ref,) = torch.autograd.grad(fx, xg, v)
    torch.testing.assert_close(branch_vjp(branch, x, v, backend="eager"), vjp_ref)
    _, jvp_ref = torch.autograd.functional.jvp(lambda t: twin(branch)(t, backend="reference"), x, v)
    torch.testing.assert_close(branch_jvp(branch, x, v), jvp_ref)
    assert_tensors_close(list(branch.buffers()), buffers)  # diagnostics leave running stats alone


def test_batch_norm_in_eval_mode_warns_once(monkeypatch):
    """BatchNorm inside IE-Skips evaluated with running statistics: one warning per process,
    none for GroupNorm or in training."""
    import warnings

    import pyeuler.nn.ie_skip as ie_module
    from pyeuler.models import wide_resnet

    monkeypatch.setattr(ie_module, "_warned_batch_norm_eval", False)
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wide_resnet(10, 1, ie_steps=1, backend="eager")(x)  # training
        wide_resnet(10, 1, ie_steps=1, norm="group", backend="eager").eval()(x)
        model = wide_resnet(10, 1, ie_steps=1, backend="eager").eval()
        model(x)
        model(x)
    messages = [str(w.message) for w in caught if "IE-Skip with BatchNorm" in str(w.message)]
    assert len(messages) == 1 and "norm='group'" in messages[0]


@pytest.mark.parametrize("branch", ["generic", "reference"])
def test_inference_mode_gives_the_no_grad_values(branch):
    """The inner gradient of the autograd path needs autograd, which torch.inference_mode
    turns off: the steps run outside it, with the values of torch.no_grad."""
    torch.manual_seed(0)
    if branch == "generic":
        module = IESkip(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh()), steps=2)
    else:
        module = IESkip(PreActBranch(4, norm="group", norm_groups=2), steps=2,
                        backend="reference")
    module.eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        want = module(x)
    with torch.inference_mode():
        got = module(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
