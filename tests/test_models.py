"""Modules and model builders: structure, parameter counts, state_dict compatibility, errors."""

import pytest
import torch
from torch import nn

from pyeuler.models import mlp_resnet, preact_resnet, resnet_cifar, wide_resnet
from pyeuler.nn import EulerBasicBlock, PreActBlock, PreActBranch
from helpers import F32, twin


class PlainBasicBlock(nn.Module):
    """The Robust-ResNet CIFAR block written in plain PyTorch."""

    def __init__(self, in_planes, planes, stride=1, h=1.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))
        self.h = h

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.shortcut(x) + self.h * self.bn2(self.conv2(out)))


@pytest.mark.parametrize("in_planes, planes, stride", [(4, 4, 1), (4, 8, 2)])
@pytest.mark.parametrize("backend", ["eager", "reference"])
def test_euler_basic_block_loads_plain_state_dict_and_matches(in_planes, planes, stride, backend):
    plain = PlainBasicBlock(in_planes, planes, stride, h=0.1)
    block = EulerBasicBlock(in_planes, planes, stride, h=0.1, backend=backend)
    block.load_state_dict(plain.state_dict(), strict=True)
    assert block.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(3, in_planes, 6, 6)
    torch.testing.assert_close(block(x), plain(x), **F32)
    for key, value in plain.state_dict().items():  # running stats and counters too
        torch.testing.assert_close(block.state_dict()[key], value, **F32)


def test_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(wide_resnet(34, 10)) == 46_160_474
    assert count(wide_resnet(34, 10, ie_steps=1)) == 46_160_474  # IE-Skips add no parameters
    assert count(resnet_cifar(20)) == 272_474
    assert count(preact_resnet(18)) == 11_171_146 + 2 * 512  # the common PreActResNet18 + final BN


def test_ie_wrn_structure():
    model = wide_resnet(34, 10, ie_steps=1)
    blocks = [m for m in model.modules() if isinstance(m, PreActBlock)]
    assert len(blocks) == 15
    assert [b.steps for b in blocks] == [0, 1, 1, 1, 1] * 3
    assert all(isinstance(b.branch, PreActBranch) for b in blocks)


@pytest.mark.parametrize("builder, x", [
    (lambda **kw: resnet_cifar(8, h=0.1, num_classes=5, **kw), torch.rand(2, 3, 8, 8)),
    (lambda **kw: preact_resnet(18, base_width=4, num_classes=5, **kw), torch.rand(2, 3, 8, 8)),
    (lambda **kw: preact_resnet(50, base_width=2, num_classes=5, ie_steps=1, **kw), torch.rand(4, 3, 16, 16)),
    (lambda **kw: wide_resnet(10, 1, num_classes=5, in_channels=1, ie_steps=2, downsample="conv3x3",
                              norm="group", **kw), torch.rand(2, 1, 8, 8)),
    (lambda **kw: mlp_resnet(2, 8, 3, num_classes=5, ie_steps=1, h_mode="channel", h=0.5, **kw),
     torch.rand(6, 2)),
])
def test_models_eager_equal_reference(builder, x):
    # float64: with 8×8 inputs the last stages normalise over a handful of values, where
    # float32 rounding differences are amplified beyond any fixed tolerance.
    model = builder(backend="eager").double()
    x = x.double()
    ref = twin(model, backend="reference")
    y, y_ref = model(x), ref(x)
    assert y.shape == (x.shape[0], 5)
    torch.testing.assert_close(y, y_ref, rtol=1e-8, atol=1e-9)
    g = torch.autograd.grad(y.square().sum(), list(model.parameters()))
    g_ref = torch.autograd.grad(y_ref.square().sum(), list(ref.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_channels_last_model():
    model = wide_resnet(10, 1, num_classes=3, ie_steps=1).to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 8, 8).to(memory_format=torch.channels_last)
    ref = twin(model, backend="reference")
    torch.testing.assert_close(model(x), ref(x), **F32)


@pytest.mark.parametrize("call, match", [
    (lambda: resnet_cifar(21), "depth must be 6n\\+2"),
    (lambda: wide_resnet(33), "depth must be 6n\\+4"),
    (lambda: preact_resnet(19), "depth must be one of"),
    (lambda: wide_resnet(10, 1, norm="layer"), "norm must be one of"),
    (lambda: wide_resnet(10, 1, downsample="pool"), "downsample must be one of"),
    (lambda: wide_resnet(10, 1, h_mode="vector"), "h_mode must be one of"),
    (lambda: wide_resnet(10, 1, ie_steps=-1), "ie_steps"),
    (lambda: wide_resnet(10, 1, num_classes=0), "num_classes"),
    (lambda: PreActBranch(6, norm="group", norm_groups=4), "norm_groups must divide"),
    (lambda: PreActBranch(6, dropout=1.0), "dropout"),
])
def test_bad_arguments_name_themselves(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- one signature for all (0.2.0)

IE_ARGUMENTS = ("h", "h_mode", "ie_steps", "ie_step_size", "theta", "grad", "bn_update", "tol",
                "norm", "norm_groups", "backend")


@pytest.mark.parametrize("builder", [preact_resnet, wide_resnet, mlp_resnet])
def test_builders_take_every_ie_argument_by_keyword(builder):
    import inspect

    parameters = inspect.signature(builder).parameters
    for name in IE_ARGUMENTS + ("num_classes",):
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name


def test_module_arguments_after_the_sizes_are_keyword_only():
    import inspect

    from pyeuler.nn import IESkip, PreActBottleneckBranch

    for cls, positional in ((IESkip, ["branch"]), (PreActBranch, ["channels"]),
                            (PreActBlock, ["in_planes", "planes", "stride"]),
                            (EulerBasicBlock, ["in_planes", "planes", "stride"]),
                            (PreActBottleneckBranch, ["in_planes", "planes", "stride"])):
        parameters = list(inspect.signature(cls).parameters.values())
        assert [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD] == positional
    for cls in (PreActBranch, PreActBottleneckBranch):
        for method in ("head", "tail", "forward"):
            backend = inspect.signature(getattr(cls, method)).parameters["backend"]
            assert backend.kind is inspect.Parameter.KEYWORD_ONLY, (cls, method)


def test_tol_reaches_the_implicit_ie_skips_of_a_model():
    from pyeuler.nn import IESkip

    model = mlp_resnet(2, 4, 2, num_classes=2, ie_steps=30, grad="implicit", tol=1e-2,
                       norm="group", h=0.5).double()
    blocks = [m for m in model.modules() if isinstance(m, PreActBlock)]
    assert [b.tol for b in blocks] == [1e-2, 1e-2]
    assert "tol=0.01" in repr(blocks[0])
    x = torch.rand(5, 4, dtype=torch.float64)
    block = blocks[0]
    for tol in (1e-2, None):  # the block runs exactly the IESkip with the same tol
        block.tol = tol
        expected = IESkip(block.branch, steps=30, grad="implicit", tol=tol)(x)
        torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
    block.tol = 1e-2
    early = block(x)
    block.tol = None
    assert not torch.equal(early, block(x))  # the early stop changed the answer


def test_tol_without_implicit_gradients_is_refused():
    with pytest.raises(ValueError, match="tol"):
        wide_resnet(10, 1, ie_steps=1, tol=1e-3)
    with pytest.raises(ValueError, match="tol"):
        PreActBlock(4, 4, ie_steps=1, grad="unrolled", tol=1e-3)
