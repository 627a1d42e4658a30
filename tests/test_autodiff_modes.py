"""Every differentiation mode is right on every backend, or refused with a clear error
(docs/semantics.md §9): forward mode (``torch.func.jvp``, ``jacfwd``,
``torch.autograd.forward_ad``) and ``torch.func`` reverse transforms through the fused ops,
and what ``grad="implicit"`` IE-Skips can and cannot differentiate.

Expected values are computed independently: central finite differences in float64, or
plain torch compositions whose derivatives PyTorch gets right at that order.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from pyeuler import functional as PF
from pyeuler.models import wide_resnet
from pyeuler.nn import IESkip, PreActBranch
from conftest import ALL_BACKENDS, backend_device, requires_cuda, requires_triton
from helpers import twin
# Forward mode runs the fused backends' eager formulas, so float64 works on all of them.
FUSED_BACKENDS = [pytest.param("triton", marks=requires_triton),
                  pytest.param("cuda", marks=requires_cuda)]
F64 = dict(rtol=1e-7, atol=1e-8)


def _central_difference(f, x, v, eps=1e-6):
    return (f(x + eps * v) - f(x - eps * v)) / (2 * eps)


def _bn_relu_torch(z):
    return torch.relu(F.batch_norm(z, None, None, training=True))


# ---------------------------------------------------------------------------------------
# Forward mode through the fused ops: never zero tangents.


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_jvp_of_bn_relu_matches_torch(backend):
    dev = backend_device(backend)
    x = torch.randn(2, 3, 4, dtype=torch.float64, device=dev)
    v = torch.randn_like(x)
    _, expected = torch.func.jvp(_bn_relu_torch, (x,), (v,))
    _, tangent = torch.func.jvp(lambda z: PF.bn_relu(z, backend=backend), (x,), (v,))
    assert expected.norm() > 1.0  # a zero tangent could not pass
    torch.testing.assert_close(tangent, expected, **F64)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_forward_ad_dual_tensors_through_bn_add_relu(backend):
    dev = backend_device(backend)
    z = torch.randn(3, 4, 5, dtype=torch.float64, device=dev)
    s, vz, vs = torch.randn_like(z), torch.randn_like(z), torch.randn_like(z)

    def f(zz, ss, be):
        return PF.bn_add_relu(zz, ss, h=0.3, backend=be)

    with fwAD.dual_level():
        out = f(fwAD.make_dual(z, vz), fwAD.make_dual(s, vs), backend)
        tangent = fwAD.unpack_dual(out).tangent
    assert tangent is not None
    expected = (f(z + 1e-6 * vz, s + 1e-6 * vs, "reference")
                - f(z - 1e-6 * vz, s - 1e-6 * vs, "reference")) / 2e-6
    torch.testing.assert_close(tangent, expected, **F64)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_jacfwd_of_group_norm_relu_equals_jacrev_of_torch(backend):
    dev = backend_device(backend)
    x = torch.randn(2, 4, 3, dtype=torch.float64, device=dev)
    w = torch.rand(4, dtype=torch.float64, device=dev) + 0.5
    jac = torch.func.jacfwd(lambda z: PF.group_norm_relu(z, 2, w, backend=backend))(x)
    expected = torch.func.jacrev(lambda z: torch.relu(F.group_norm(z, 2, w)))(x)
    torch.testing.assert_close(jac, expected, **F64)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_branch_jvp_takes_backend_and_matches_finite_differences(backend, norm):
    dev = backend_device(backend)
    branch = PreActBranch(4, norm=norm, h=0.5).double().to(dev)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, device=dev)
    v = torch.randn_like(x)
    tangent = PF.branch_jvp(branch, x, v, backend=backend)
    with torch.no_grad():
        expected = _central_difference(lambda z: branch(z, backend="eager"), x, v)
    assert tangent.norm() > 1e-3
    torch.testing.assert_close(tangent, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("grad", ["unrolled", "detached"])
def test_jvp_through_unrolled_ie_skip(backend, grad):
    """GroupNorm: a torch.func transform may not mutate BatchNorm's running statistics
    (PyTorch refuses that for its own BatchNorm too); eval-mode BatchNorm is covered below."""
    dev = backend_device(backend)
    block = IESkip(PreActBranch(4, norm="group", h=0.5), steps=2, grad=grad).double().to(dev)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, device=dev)
    v = torch.randn_like(x)
    _, tangent = torch.func.jvp(twin(block, backend=backend), (x,), (v,))
    if grad == "unrolled":
        with torch.no_grad():
            expected = _central_difference(twin(block, backend="eager"), x, v)
    else:  # the derivative of x0 + f(x0)
        branch = twin(block.branch, backend="eager")
        _, expected = torch.func.jvp(lambda z: z + branch(z), (x,), (v,))
    torch.testing.assert_close(tangent, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_jacfwd_of_eval_mode_ie_wrn(backend):
    dev = backend_device(backend)
    torch.manual_seed(1)
    model = wide_resnet(10, 1, num_classes=3, ie_steps=1, h=0.5).double().to(dev)
    with torch.no_grad():  # non-trivial running statistics
        model(torch.randn(8, 3, 6, 6, dtype=torch.float64, device=dev))
    model.eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64, device=dev)
    v = torch.randn_like(x)
    _, tangent = torch.func.jvp(twin(model, backend=backend), (x,), (v,))
    with torch.no_grad():
        expected = _central_difference(twin(model, backend="eager"), x, v)
    torch.testing.assert_close(tangent, expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------
# torch.func reverse transforms through the fused ops.


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_jacrev_and_vmap_grad_of_eval_bn_relu(backend):
    dev = backend_device(backend)
    rm = torch.randn(3, device=dev)
    rv = torch.rand(3, device=dev) + 0.5
    w = torch.rand(3, device=dev) + 0.5

    def f(z, be):
        return PF.bn_relu(z, w, None, rm, rv, training=False, backend=be)

    x = torch.randn(2, 3, 4, device=dev)
    torch.testing.assert_close(torch.func.jacrev(lambda z: f(z, backend))(x),
                               torch.func.jacrev(lambda z: f(z, "reference"))(x))
    batch = torch.randn(5, 2, 3, 4, device=dev)  # vmap over a leading dim of batches
    per_batch = torch.func.vmap(torch.func.grad(lambda z: f(z, backend).square().sum()))(batch)
    expected = torch.func.vmap(torch.func.grad(lambda z: f(z, "reference").square().sum()))(batch)
    torch.testing.assert_close(per_batch, expected)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_func_grad_of_ie_residual_and_update(backend):
    dev = backend_device(backend)
    x, c, fx = (torch.randn(2, 3, 4, device=dev) for _ in range(3))
    g = torch.func.grad(lambda a: PF.ie_update(a, PF.ie_residual(a, c, fx, 0.5, backend=backend),
                                               fx, 0.1, 0.5, backend=backend).sum())(x)
    # d/dx of x − 0.2·(x − c − 0.5·fx − 0.5·fx) summed: 1 − 0.2 everywhere
    torch.testing.assert_close(g, torch.full_like(x, 0.8))


# ---------------------------------------------------------------------------------------
# grad="implicit": first-order reverse mode only, everything else refused by name.


def _implicit_block(dev, theta=1.0, dtype=torch.float64):
    return IESkip(PreActBranch(4, norm="group", h=0.4), steps=30, theta=theta,
                  grad="implicit").to(dev, dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_implicit_ie_skip_refuses_forward_mode(backend):
    dev = backend_device(backend)
    block = twin(_implicit_block(dev), backend=backend)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, device=dev)
    with pytest.raises(NotImplementedError, match="forward-mode AD .* grad='implicit'"):
        torch.func.jacfwd(block)(x)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(block, (x,), (torch.randn_like(x),))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        block(fwAD.make_dual(x, torch.randn_like(x)))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_implicit_ie_skip_refuses_func_reverse_transforms(backend):
    dev = backend_device(backend)
    block = twin(_implicit_block(dev), backend=backend)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, device=dev)
    with pytest.raises(NotImplementedError, match="torch.func transforms"):
        torch.func.grad(lambda z: block(z).sum())(x)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("theta", [0.5, 1.0])
def test_implicit_ie_skip_refuses_higher_order_gradients(backend, theta):
    """A gradient penalty through an implicit IE-Skip was off by 0.118 (θ = 0.5) or failed
    deep inside (θ = 1): now a clear error, and first order stays right."""
    dev = backend_device(backend)
    dtype = torch.float32 if backend in ("triton", "cuda") else torch.float64  # kernels: no fp64
    block = twin(_implicit_block(dev, theta, dtype), backend=backend)
    x = torch.randn(2, 4, 3, 3, dtype=dtype, device=dev, requires_grad=True)
    (g,) = torch.autograd.grad(block(x).square().sum(), x, create_graph=False)
    assert torch.isfinite(g).all()
    loss = block(x).square().sum()
    with pytest.raises(RuntimeError, match="higher-order gradients .* grad='implicit'"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("theta", [0.5, 1.0])
def test_implicit_first_order_gradient_matches_a_converged_plain_iteration(theta):
    """The independent value: x* by 300 plain (Picard) iterations in float64, then the
    input gradient of ‖x*‖² from the implicit function theorem with a dense Jacobian."""
    block = _implicit_block("cpu", theta)
    block.eval()
    branch = twin(block.branch, backend="eager")
    x0 = torch.randn(1, 4, 3, 3, dtype=torch.float64)

    def fixed_point(z0):
        c = z0 + (1 - theta) * branch(z0)
        z = z0 + branch(z0)
        for _ in range(300):
            z = c + theta * branch(z)
        return z

    with torch.no_grad():
        x_star = fixed_point(x0)
    n = x0.numel()
    jac_f = torch.autograd.functional.jacobian(lambda z: branch(z.view_as(x0)).reshape(-1),
                                               x_star.reshape(-1))
    jac_f0 = torch.autograd.functional.jacobian(lambda z: branch(z.view_as(x0)).reshape(-1),
                                                x0.reshape(-1))
    eye = torch.eye(n, dtype=torch.float64)
    dxstar_dx0 = torch.linalg.solve(eye - theta * jac_f, eye + (1 - theta) * jac_f0)
    expected = (dxstar_dx0.T @ (2 * x_star.reshape(-1))).view_as(x0)

    x = x0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(twin(block, backend="eager")(x).square().sum(), x)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------
# Tangents that only ride on some of the inputs.


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_tangent_carried_by_the_running_statistics(backend):
    """Eval-mode BatchNorm whose running mean is the dual tensor (nothing else is)."""
    dev = backend_device(backend)
    x = torch.randn(3, 4, 5, dtype=torch.float64, device=dev)
    running_var = torch.rand(4, dtype=torch.float64, device=dev) + 0.5
    running_mean, tangent_in = torch.randn(4, dtype=torch.float64, device=dev), torch.randn(4, dtype=torch.float64, device=dev)

    def f(mean, be):
        return PF.bn_relu(x, None, None, mean, running_var, training=False, backend=be)

    with fwAD.dual_level():
        out = f(fwAD.make_dual(running_mean, tangent_in), backend)
        tangent = fwAD.unpack_dual(out).tangent
    assert tangent is not None
    _, expected = torch.func.jvp(lambda m: f(m, "reference"), (running_mean,), (tangent_in,))
    torch.testing.assert_close(tangent, expected, **F64)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("grad", ["unrolled", "detached"])
def test_dual_input_through_an_autograd_ie_skip(backend, frozen, grad):
    """A branch pyeuler has no explicit VJP for runs the literal algorithm; with frozen
    parameters (or under no_grad) autograd.grad used to drop the dual input's tangent."""
    dev = backend_device(backend)
    torch.manual_seed(2)
    branch = torch.nn.Sequential(torch.nn.Conv1d(3, 3, 3, padding=1), torch.nn.Tanh())
    block = IESkip(branch.double().to(dev), steps=2, step_size=0.2, grad=grad, backend=backend)
    block.requires_grad_(not frozen)
    x = torch.randn(2, 3, 6, dtype=torch.float64, device=dev)
    v = torch.randn_like(x)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(block(fwAD.make_dual(x, v))).tangent
    if grad == "unrolled":
        expected = _central_difference(block, x, v)
    else:
        _, expected = torch.func.jvp(lambda z: z + branch(z), (x,), (v,))
    torch.testing.assert_close(tangent, expected, rtol=1e-6, atol=1e-8)
