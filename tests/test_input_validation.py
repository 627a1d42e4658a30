"""Nothing is silently wrong (docs/semantics.md §5): bad input raises an error that names the
argument, wrong ranks and broadcasting branches are refused, mixed dtypes give torch's
promoted dtype, and empty batches behave as torch's own layers do — on every backend.

Validation is metadata only; the errors are checked by type and by the argument they name.
"""

import copy

import pytest
import torch
from torch import nn

from pyeuler import functional as PF
from pyeuler.models import mlp_resnet, resnet_cifar, wide_resnet
from pyeuler.nn import EulerBasicBlock, IESkip, PreActBlock, PreActBottleneck, PreActBranch
from pyeuler.ops.ie_skip import ie_residual as ie_residual_op
from conftest import ALL_BACKENDS, backend_device
from helpers import twin


# ---------------------------------------------------------------------------------------
# Bad arguments of the functional ops.


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("call, error, names", [
    (lambda x, be: PF.bn_relu(x[:, :0], backend=be), ValueError, "at least one channel"),
    (lambda x, be: PF.bn_relu(x, eps=0.0, backend=be), ValueError, "eps"),
    (lambda x, be: PF.bn_relu(x, eps=-1e-5, backend=be), ValueError, "eps"),
    (lambda x, be: PF.bn_relu(x, eps=float("nan"), backend=be), ValueError, "eps"),
    (lambda x, be: PF.bn_relu(x, momentum=1.5, backend=be), ValueError, "momentum"),
    (lambda x, be: PF.bn_relu(x, training=1, backend=be), TypeError, "training"),
    (lambda x, be: PF.bn_relu(x, x.new_ones(3).long(), backend=be), TypeError, "weight"),
    (lambda x, be: PF.bn_add_relu(x, x, h="0.1", backend=be), TypeError, "h must"),
    (lambda x, be: PF.bn_add_relu(x, x, h=True, backend=be), TypeError, "h must"),
    (lambda x, be: PF.bn_add_relu(x, x, h=float("inf"), backend=be), ValueError,
     "h must not be infinite"),
    (lambda x, be: PF.bn_add_relu(x, x, h=-float("inf"), backend=be), ValueError,
     "h must not be infinite"),
    (lambda x, be: PF.norm_act(x, None, None, x.new_zeros(3), x.new_ones(3), momentum=None,
                               backend=be), ValueError, "momentum=None .* needs num_batches_tracked"),
    (lambda x, be: PF.bn_add_relu(x, x, h=x.new_ones(3).long(), backend=be), TypeError, "h must"),
    (lambda x, be: PF.group_norm_relu(x, 2, backend=be), ValueError, "groups"),
    (lambda x, be: PF.ie_residual(x, x[:1], x, backend=be), ValueError, "c must have x's shape"),
    (lambda x, be: PF.ie_residual(x, x, x[..., :2], backend=be), ValueError, "fx must have"),
    (lambda x, be: PF.ie_residual(x, x.long(), x, backend=be), TypeError, "c must be a floating"),
    (lambda x, be: PF.ie_residual(x, x, x, theta=1.5, backend=be), ValueError, "theta"),
    (lambda x, be: PF.ie_update(x, x, x, step_size=-0.1, backend=be), ValueError, "step_size"),
    (lambda x, be: PF.ie_update(x, x, x, step_size=float("inf"), backend=be), ValueError,
     "step_size"),
    (lambda x, be: PF.ie_update(x, x, x, theta=2.0, backend=be), ValueError, "theta"),
    (lambda x, be: PF.ie_update(x, x, x.long(), backend=be), TypeError, "v must be a floating"),
    (lambda x, be: PF.ie_update(x, x.expand(2, 2, 3, 4)[0], x[:1], backend=be), ValueError,
     "v must have x's shape"),
    (lambda x, be: PF.scaled_residual_add(x, x, h="0.1"), TypeError, "h must"),
    (lambda x, be: PF.scaled_residual_add(x, x.long()), TypeError, "f must"),
])
def test_bad_arguments_raise_errors_naming_them(backend, call, error, names):
    x = torch.randn(2, 3, 4, device=backend_device(backend))
    with pytest.raises(error, match=names):
        call(x, backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("which", ["c", "fx"])
def test_ie_residual_refuses_an_operand_on_another_device(backend, which):
    """A meta operand used to reach the custom op's shape-only fake and return
    uninitialised memory."""
    x = torch.randn(2, 3, 4, device=backend_device(backend))
    operands = {"c": x, "fx": x, which: x.to("meta")}
    with pytest.raises(ValueError, match=f"{which} is on meta"):
        PF.ie_residual(x, operands["c"], operands["fx"], backend=backend)
    with pytest.raises(ValueError, match="v is on meta"):
        PF.ie_update(x, x, x.to("meta"), backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ie_update_internal_op_validates_too(backend):
    x = torch.randn(2, 3, 4, device=backend_device(backend))
    with pytest.raises(ValueError, match="fx is on meta"):
        ie_residual_op(x, x, x.to("meta"), 1.0, backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad_v, error, message", [
    (lambda x: x[..., :2], ValueError, "v must have shape"),
    (lambda x: x.to("meta"), ValueError, "v is on meta"),
    (lambda x: x.long(), TypeError, "v must be a floating"),
    (lambda x: x.numpy(), TypeError, "v must be a Tensor"),
])
def test_branch_vjp_and_jvp_check_the_direction(backend, bad_v, error, message):
    dev = backend_device(backend)
    branch = PreActBranch(8).to(dev)
    x = torch.randn(2, 8, 4, 4, device=dev)
    v = bad_v(x.cpu()) if message == "v must be a Tensor" else bad_v(x)
    with pytest.raises(error, match=message):
        PF.branch_vjp(branch, x, v, backend=backend)
    with pytest.raises(error, match=message):
        PF.branch_jvp(branch, x, v, backend=backend)


def test_branch_vjp_needs_a_preact_branch():
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(TypeError, match="branch must be a pyeuler.nn.PreActBranch"):
        PF.branch_vjp(nn.Conv2d(8, 8, 3, padding=1), x, x)
    with pytest.raises(TypeError, match="branch must be a pyeuler.nn.PreActBranch"):
        PF.branch_jvp(nn.Sequential(), x, x)


def test_ie_skip_settings_are_checked_at_construction():
    with pytest.raises(ValueError, match="step_size"):
        IESkip(PreActBranch(4), step_size=float("inf"))
    with pytest.raises(ValueError, match="step_size"):
        IESkip(PreActBranch(4), step_size=float("nan"))
    with pytest.raises(ValueError, match="theta"):
        IESkip(PreActBranch(4), theta=True)
    # a tensor in range is refused for its type, and the message says so
    with pytest.raises(ValueError, match=r"theta must be a Python float, got Tensor .*float\(\.\.\.\)"):
        IESkip(PreActBranch(4), theta=torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"step_size \(ie_step_size\) must be a Python float"):
        IESkip(PreActBranch(4), step_size=torch.tensor(0.1))
    with pytest.raises(ValueError, match="tol"):
        IESkip(PreActBranch(4), grad="implicit", tol=float("inf"))


# ---------------------------------------------------------------------------------------
# Ranks and shapes the modules cannot read.


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("make, shape", [
    (lambda: PreActBranch(8), (8, 8, 16)),  # N == C: a convolution reads it as one image
    (lambda: PreActBranch(8, dim=1), (8, 8)),
    (lambda: PreActBranch(8, dim=0), (2, 8, 3)),
    (lambda: IESkip(PreActBranch(8), steps=1), (8, 8, 16)),
    (lambda: PreActBlock(8, 8, ie_steps=1), (8, 8, 16)),
    (lambda: PreActBlock(4, 8, stride=2), (4, 8, 8)),
    (lambda: PreActBottleneck(8, 2), (8, 8, 16)),
    (lambda: EulerBasicBlock(8, 8), (8, 8, 16)),
    (lambda: wide_resnet(10, 1, num_classes=3), (3, 8, 8)),
    (lambda: resnet_cifar(8), (3, 8, 8)),
    (lambda: mlp_resnet(in_features=2, width=4, depth=1), (5, 2, 1)),
])
def test_modules_refuse_a_wrong_rank(backend, make, shape):
    dev = backend_device(backend)
    module = twin(make(), backend=backend).to(dev)
    with pytest.raises(ValueError, match=r"expects a \d-D input"):
        module(torch.randn(shape, device=dev))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("grad", ["unrolled", "detached", "implicit"])
def test_ie_skip_refuses_a_branch_that_only_broadcasts(backend, grad):
    dev = backend_device(backend)
    block = IESkip(nn.Linear(8, 1), steps=1, grad=grad, backend=backend).to(dev)
    with pytest.raises(ValueError, match="shape-preserving branch"):
        block(torch.randn(4, 8, device=dev))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ie_skip_refuses_a_down_sampling_preact_branch(backend):
    dev = backend_device(backend)
    block = IESkip(PreActBranch(4, out_channels=8, stride=2), steps=1, backend=backend).to(dev)
    with pytest.raises(ValueError, match="shape-preserving branch"):
        block(torch.randn(2, 4, 6, 6, device=dev))


# ---------------------------------------------------------------------------------------
# Mixed dtypes: torch's promoted dtype on every backend.


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("z_dtype, s_dtype", [(torch.float16, torch.float32),
                                               (torch.bfloat16, torch.float32),
                                               (torch.float32, torch.bfloat16)])
def test_bn_add_relu_returns_the_promoted_dtype(backend, z_dtype, s_dtype):
    dev = backend_device(backend)
    z = torch.randn(4, 3, 5, 5, device=dev).to(z_dtype).requires_grad_()
    s = torch.randn(4, 3, 5, 5, device=dev).to(s_dtype).requires_grad_()
    out = PF.bn_add_relu(z, s, h=0.5, backend=backend)
    assert out.dtype == torch.promote_types(z_dtype, s_dtype)
    expected = PF.bn_add_relu(z.double(), s.double(), h=0.5, backend="eager")
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)
    dz, ds = torch.autograd.grad(out.sum(), (z, s))
    assert (dz.dtype, ds.dtype) == (z_dtype, s_dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_per_channel_h_promotes_like_torch(backend):
    dev = backend_device(backend)
    z = torch.randn(4, 3, 5, device=dev).to(torch.bfloat16)
    h = torch.full((3,), 0.5, device=dev)  # a learnable per-channel h is float32
    assert PF.bn_add_relu(z, None, h=h, backend=backend).dtype == torch.float32
    assert PF.bn_add_relu(z, None, h=h[0], backend=backend).dtype == torch.bfloat16  # 0-dim


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ie_ops_return_the_promoted_dtype(backend):
    dev = backend_device(backend)
    x = torch.randn(2, 3, 4, device=dev).to(torch.bfloat16)
    other = torch.randn(2, 3, 4, device=dev)
    assert PF.ie_residual(x, other, other, backend=backend).dtype == torch.float32
    assert PF.ie_update(x, other, x, backend=backend).dtype == torch.float32


# ---------------------------------------------------------------------------------------
# Empty batches: as torch's layers.


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_norm_follows_torch(backend, training):
    dev = backend_device(backend)
    torch.manual_seed(0)
    ours, theirs = nn.BatchNorm2d(3).to(dev), nn.BatchNorm2d(3).to(dev)
    for m in (ours, theirs):
        m.running_mean.uniform_()
        m.running_var.uniform_(0.5, 1.5)
        m.train(training)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(0, 3, 4, 4, device=dev, requires_grad=True)
    from pyeuler.ops.norm_act import norm_act_module
    out = norm_act_module(ours, x, backend=backend)
    expected = torch.relu(theirs(x))
    assert out.shape == expected.shape == (0, 3, 4, 4)
    (dx, dw) = torch.autograd.grad(out.sum(), (x, ours.weight))
    (dx_t, dw_t) = torch.autograd.grad(expected.sum(), (x, theirs.weight))
    assert dx.shape == dx_t.shape
    torch.testing.assert_close(dw, dw_t)  # zeros, not NaN
    for name, buffer in ours.named_buffers():
        torch.testing.assert_close(buffer, theirs.get_buffer(name), msg=name)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("ie_steps", [0, 1])
def test_empty_batch_through_a_model(backend, norm, training, ie_steps):
    dev = backend_device(backend)
    model = wide_resnet(10, 1, num_classes=3, norm=norm, ie_steps=ie_steps,
                        backend=backend).to(dev).train(training)
    state = copy.deepcopy(model.state_dict())
    counted = copy.deepcopy(model)  # how often a non-empty batch counts each norm's calls
    counted(torch.randn(2, 3, 8, 8, device=dev))
    calls = {k: v for k, v in counted.state_dict().items() if k.endswith("num_batches_tracked")}
    x = torch.randn(0, 3, 8, 8, device=dev, requires_grad=True)
    out = model(x)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert x.grad.shape == x.shape
    for name, p in model.named_parameters():
        assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p)), name
    for name, buffer in model.state_dict().items():
        if name.endswith("num_batches_tracked"):  # torch counts an empty call too
            assert int(buffer) == int(calls[name]), name
        else:
            torch.testing.assert_close(buffer, state[name], msg=name)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_group_norm_relu(backend):
    dev = backend_device(backend)
    x = torch.randn(0, 4, 3, device=dev, requires_grad=True)
    out = PF.group_norm_relu(x, 2, backend=backend)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_batch_norm_with_one_value_per_channel_is_still_refused():
    with pytest.raises(ValueError, match="one value per channel"):
        PF.bn_relu(torch.randn(1, 3, 1, 1))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_more_arguments_named_in_their_errors(backend):
    dev = backend_device(backend)
    x = torch.randn(2, 3, 4, device=dev)
    with pytest.raises(TypeError, match="shortcut must be a Tensor"):
        PF.bn_add_relu(x, x.tolist(), backend=backend)
    with pytest.raises(TypeError, match="relu must be a bool"):
        PF.bn_add_relu(x, x, relu="no", backend=backend)
    with pytest.raises(ValueError, match="x has 3 channels .* but weight has 4"):
        PF.bn_relu(x, torch.ones(4, device=dev), backend=backend)
    with pytest.raises(ValueError, match="momentum is on meta"):
        PF.bn_relu(x, None, None, torch.zeros(3, device=dev), torch.ones(3, device=dev),
                   momentum=torch.tensor(0.1, device="meta"), backend=backend)
    with pytest.raises(TypeError, match="must return one Tensor"):
        IESkip(_TupleBranch(), steps=1, backend=backend)(torch.randn(2, 3, device=dev))
    branch = PreActBranch(3).to(dev)
    x4 = torch.randn(2, 3, 4, 4, device=dev, dtype=torch.float64)
    with pytest.raises(TypeError, match="x is torch.float64 but the branch's parameters"):
        PF.branch_vjp(branch, x4, x4, backend=backend)


class _TupleBranch(nn.Module):
    def forward(self, x):
        return x, x


@pytest.mark.parametrize("kwargs, name", [(dict(channels=0), "channels"),
                                          (dict(channels=4, stride=0), "stride"),
                                          (dict(channels=4, dim=True), "dim"),
                                          (dict(channels=4, norm="group", norm_groups=True),
                                           "norm_groups")])
def test_constructors_refuse_bad_sizes(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PreActBranch(**kwargs)


def test_ie_steps_accept_any_integer_type():
    import numpy as np

    block = IESkip(PreActBranch(4, norm="group"), steps=np.int64(2))
    assert block(torch.randn(2, 4, 3, 3)).shape == (2, 4, 3, 3)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_momentum_none_and_numpy_numbers_where_they_make_sense(backend):
    """momentum=None needs num_batches_tracked only when running statistics are updated;
    NumPy scalars are numbers like Python's (nn.BatchNorm takes both)."""
    import numpy as np

    dev = backend_device(backend)
    x = torch.randn(4, 3, 5, device=dev)
    running = (torch.zeros(3, device=dev), torch.ones(3, device=dev))
    for kwargs in (dict(training=False), dict(update_running=False)):
        PF.norm_act(x, None, None, *running, momentum=None, backend=backend, **kwargs)
    PF.norm_act(x, momentum=None, backend=backend)  # no running statistics at all
    results = []
    for momentum, h in ((0.25, 0.5), (np.float32(0.25), np.float32(0.5)),
                        (np.float64(0.25), np.float64(0.5))):
        buffers = [t.clone() for t in running]
        y = PF.norm_act(x, None, None, *buffers, momentum=momentum, h=h, backend=backend)
        results.append([y, *buffers])
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("h", [float("nan"), float("inf")])
def test_module_step_factor_must_be_finite(h):
    from pyeuler.nn import EulerBasicBlock, PreActBranch

    with pytest.raises(ValueError, match="h must be a finite float"):
        PreActBranch(8, h=h)
    with pytest.raises(ValueError, match="h must be a finite float"):
        EulerBasicBlock(8, 8, h=h)


def test_wrong_channel_count_names_the_module():
    with pytest.raises(ValueError, match=r"PreActBranch expects 8 input channels \(dim 1\)"):
        PreActBranch(8)(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"PreActNet expects 3 input channels \(dim 1\)"):
        mlp_resnet(in_features=3)(torch.randn(2, 2))
    with pytest.raises(ValueError, match=r"ResNetCifar expects 3 input channels"):
        resnet_cifar(8)(torch.randn(2, 1, 8, 8))


def test_ie_skip_backend_name_is_checked_at_construction():
    with pytest.raises(ValueError, match="backend must be one of"):
        IESkip(PreActBranch(4), backend="gpu")
