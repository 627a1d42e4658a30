"""Residual blocks as explicit Euler steps ``x + h·F(x)``, optionally with IE-Skips."""

from __future__ import annotations

from torch import Tensor, nn

from pyeuler.nn.branch import PreActBranch
from pyeuler.nn.layers import make_conv, make_norm, make_step
from pyeuler.nn.ie_skip import warn_batch_norm_in_eval
from pyeuler.ops.ie_skip import ie_skip, validate_ie_args
from pyeuler.ops.norm_act import norm_act_module
from pyeuler.ops.preact_branch import check_input_rank, scale_by_step
from pyeuler.ops.residual import scaled_residual_add

__all__ = ["EulerBasicBlock", "PreActBlock", "PreActBottleneck", "PreActBottleneckBranch",
           "DOWNSAMPLES"]

DOWNSAMPLES = ("conv1x1", "conv3x3")


class EulerBasicBlock(nn.Module):
    """Post-activation block of the Robust-ResNet CIFAR code (docs/semantics.md §1):
    ``ReLU(S(x) + h·bn2(conv2(ReLU(bn1(conv1(x))))))``.

    The state_dict equals that of the plain-PyTorch block with the same attribute names
    (``conv1, bn1, conv2, bn2, shortcut``), plus ``h`` when it is learnable.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, h: float = 1.0, *,
                 h_mode: str = "fixed", dim: int = 2, backend: str | None = None):
        super().__init__()
        self.conv1 = make_conv(dim, in_planes, planes, 3, stride)
        self.bn1 = make_norm("batch", planes, dim)
        self.conv2 = make_conv(dim, planes, planes, 3, 1)
        self.bn2 = make_norm("batch", planes, dim)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(make_conv(dim, in_planes, planes, 1, stride),
                                          make_norm("batch", planes, dim))
        self.h = make_step(h, h_mode, planes)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        check_input_rank(x, self.conv1, type(self).__name__)
        out = norm_act_module(self.bn1, self.conv1(x), backend=self.backend)
        shortcut = x
        if len(self.shortcut):
            conv, norm = self.shortcut
            shortcut = norm_act_module(norm, conv(x), relu=False, backend=self.backend)
        return norm_act_module(self.bn2, self.conv2(out), shortcut=shortcut, h=self.h,
                               backend=self.backend)


def _make_shortcut(in_planes, planes, stride, downsample, norm, norm_groups, dim):
    if stride == 1 and in_planes == planes:
        return None
    if downsample == "conv3x3":
        return nn.Sequential(make_norm(norm, in_planes, dim, norm_groups), nn.ReLU(),
                             make_conv(dim, in_planes, planes, 3, stride))
    return make_conv(dim, in_planes, planes, 1, stride)


class PreActBlock(nn.Module):
    """Pre-activation block (PreAct-ResNet, WideResNet): ``S(x) + h·F(x)``, F a
    :class:`PreActBranch`.  When shapes match and ``ie_steps > 0`` the block is an IE-Skip
    around F.  Down-sampling shortcut: ``"conv1x1"`` on ReLU(bn1(x)) (WRN convention) or
    the IE authors' ``"conv3x3"`` (norm → ReLU → 3×3 conv with the stride) on x.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, h: float = 1.0,
                 h_mode: str = "fixed", norm: str = "batch", norm_groups: int = 1,
                 dropout: float = 0.0, downsample: str = "conv1x1", ie_steps: int = 0,
                 ie_step_size: float = 0.1, theta: float = 1.0, grad: str = "unrolled",
                 bn_update: str = "all", dim: int = 2, backend: str | None = None):
        super().__init__()
        validate_ie_args(ie_steps, ie_step_size, theta, grad, bn_update)
        if downsample not in DOWNSAMPLES:
            raise ValueError(f"downsample must be one of {DOWNSAMPLES}, got {downsample!r}")
        self.branch = self._make_branch(in_planes, planes, stride, norm=norm,
                                        norm_groups=norm_groups, dropout=dropout, h=h,
                                        h_mode=h_mode, dim=dim, backend=backend)
        self.shortcut = _make_shortcut(in_planes, planes * self.expansion, stride, downsample,
                                       norm, norm_groups, dim)
        # Only shape-preserving blocks get an IE-Skip (docs/semantics.md §2).
        self.steps = ie_steps if self.shortcut is None else 0
        self.step_size, self.theta = float(ie_step_size), float(theta)
        self.grad, self.bn_update = grad, bn_update

    @staticmethod
    def _make_branch(in_planes, planes, stride, *, dropout, **kwargs) -> nn.Module:
        return PreActBranch(in_planes, kwargs.pop("norm"), dropout, out_channels=planes,
                            stride=stride, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        branch = self.branch
        if self.shortcut is None:
            if self.steps > 0:
                if not self.training:
                    warn_batch_norm_in_eval(branch)
                return ie_skip(branch, x, self.steps, self.step_size, self.theta, self.grad,
                               self.bn_update, branch.backend)
            return scaled_residual_add(x, branch.tail(branch.head(x)), branch.h)
        if isinstance(self.shortcut, nn.Sequential):  # norm → ReLU → conv3x3 on x
            return scaled_residual_add(self.shortcut(x), branch.tail(branch.head(x)), branch.h)
        a = branch.head(x)  # WRN convention: project ReLU(bn1(x))
        return scaled_residual_add(self.shortcut(a), branch.tail(a), branch.h)

    def extra_repr(self) -> str:
        if not self.steps:
            return ""
        return (f"ie_steps={self.steps}, ie_step_size={self.step_size}, theta={self.theta}, "
                f"grad={self.grad!r}, bn_update={self.bn_update!r}")


class PreActBottleneckBranch(nn.Module):
    """``h·conv3(ρ(n3(conv2(ρ(n2(conv1(ρ(n1(x)))))))))``: 1×1 → 3×3 (stride) → 1×1 (×4)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, norm: str = "batch",
                 norm_groups: int = 1, h: float = 1.0, h_mode: str = "fixed", dim: int = 2,
                 backend: str | None = None):
        super().__init__()
        out = planes * PreActBottleneck.expansion
        self.bn1 = make_norm(norm, in_planes, dim, norm_groups)
        self.conv1 = make_conv(dim, in_planes, planes, 1)
        self.bn2 = make_norm(norm, planes, dim, norm_groups)
        self.conv2 = make_conv(dim, planes, planes, 3, stride)
        self.bn3 = make_norm(norm, planes, dim, norm_groups)
        self.conv3 = make_conv(dim, planes, out, 1)
        self.h = make_step(h, h_mode, out)
        self.backend = backend

    def head(self, x: Tensor) -> Tensor:
        check_input_rank(x, self.conv1, type(self).__name__)
        return norm_act_module(self.bn1, x, backend=self.backend)

    def tail(self, a: Tensor) -> Tensor:
        u = norm_act_module(self.bn2, self.conv1(a), backend=self.backend)
        u = norm_act_module(self.bn3, self.conv2(u), backend=self.backend)
        return self.conv3(u)

    def forward(self, x: Tensor) -> Tensor:
        return scale_by_step(self.tail(self.head(x)), self.h)


class PreActBottleneck(PreActBlock):
    """Pre-activation bottleneck block (PreAct-ResNet-50); IE-Skips via generic autograd."""

    expansion = 4

    @staticmethod
    def _make_branch(in_planes, planes, stride, *, dropout, **kwargs) -> nn.Module:
        if dropout:
            raise ValueError("dropout is not supported in PreActBottleneck")
        return PreActBottleneckBranch(in_planes, planes, stride, **kwargs)
