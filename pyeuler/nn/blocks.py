"""Residual blocks as explicit Euler steps ``x + h·F(x)``, optionally with IE-Skips."""

from __future__ import annotations

from torch import Tensor, nn

from pyeuler.nn.branch import PreActBranch
from pyeuler.nn.deprecation import keyword_only_since
from pyeuler.nn.layers import make_conv, make_norm, make_step
from pyeuler.nn.ie_skip import warn_batch_norm_in_eval
from pyeuler.ops.ie_skip import check_recompute, ie_skip, validate_ie_args
from pyeuler.ops.norm_act import norm_act_module
from pyeuler.ops.preact_branch import check_input_rank, scale_by_step
from pyeuler.ops.residual import relayed_residual_add, scaled_residual_add

__all__ = ["EulerBasicBlock", "PreActBlock", "PreActBottleneck", "PreActBottleneckBranch",
           "DOWNSAMPLES"]

DOWNSAMPLES = ("conv1x1", "conv3x3")


class EulerBasicBlock(nn.Module):
    """Post-activation block of the Robust-ResNet CIFAR code (Zhang et al., IJCAI 2019;
    docs/semantics.md §1): ``ReLU(S(x) + h·bn2(conv2(ReLU(bn1(conv1(x))))))``, S the
    identity or a projection (1×1 conv with the stride, BatchNorm).

    The state_dict equals that of the plain-PyTorch block with the same attribute names
    (``conv1, bn1, conv2, bn2, shortcut``), plus ``h`` when it is learnable.  Calling it
    maps x of shape ``(N, in_planes, *spatial)`` (``dim`` spatial dims), floating point, to
    ``(N, planes, *spatial')`` in x's dtype (spatial' = ⌈spatial / stride⌉).

    Args:
        in_planes: the input's channels.
        planes: the output's channels.
        stride: stride of conv1 and of the projection shortcut.
        h: the Euler step factor h (finite float).
        h_mode: ``"fixed"``, ``"scalar"`` (learnable scalar) or ``"channel"`` (learnable
            ``(planes,)``).
        dim: number of spatial dims, 1–3 (0: Linear layers on ``(N, C)``).
        backend: the pyeuler backend of the fused norm ops (None: the process default).

    Returns:
        The module; ``block(x)`` returns ``(N, planes, *spatial')`` in x's dtype.

    Raises:
        ValueError: bad channel counts, ``stride``, ``dim`` or ``h_mode``; at a call, x of
            the wrong rank or channel count.
        TypeError: ``h`` not a number; at a call, x not a tensor.
        RuntimeError: at a call, an unavailable ``backend``.
    """

    expansion = 1

    @keyword_only_since("h")
    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, h: float = 1.0,
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
    """Pre-activation block (PreAct-ResNet, WideResNet; docs/semantics.md §1–§2):
    ``S(x) + h·F(x)``, F a :class:`PreActBranch`.

    When shapes match (``stride=1``, ``in_planes == planes``) and ``ie_steps > 0`` the block
    is an IE-Skip around F (as :class:`IESkip`; it warns once when it first runs in eval
    mode with BatchNorm in F).  Down-sampling shortcut: ``"conv1x1"`` on ReLU(bn1(x)) (WRN
    convention) or the IE authors' ``"conv3x3"`` (norm → ReLU → 3×3 conv with the stride)
    on x.  Calling it maps x of shape ``(N, in_planes, *spatial)`` (``dim`` spatial dims;
    ``(N, in_planes)`` for ``dim=0``), floating point, to ``(N, planes·expansion,
    *spatial')`` in x's dtype (spatial' = ⌈spatial / stride⌉).

    Args:
        in_planes: the input's channels.
        planes: the branch's width; the output has ``planes·expansion`` channels.
        stride: stride of the first strided convolution and of the shortcut.
        h: the Euler step factor h (finite float).
        h_mode: ``"fixed"``, ``"scalar"`` (learnable scalar) or ``"channel"`` (learnable
            per output channel).
        norm: ``"batch"`` or ``"group"`` (``GroupNorm(norm_groups, C)``).
        norm_groups: groups of the GroupNorm.
        dropout: dropout probability in [0, 1) inside the branch (not in bottlenecks).
        downsample: ``"conv1x1"`` or ``"conv3x3"`` (above).
        ie_steps: K >= 0 IE-Skip steps for a shape-preserving block (0: plain residual
            step); ignored by down-sampling blocks.
        ie_step_size: γ > 0 of the IE steps (:class:`IESkip`'s ``step_size``).
        theta: θ in [0, 1] of the θ-method.
        grad: ``"unrolled"``, ``"detached"`` or ``"implicit"`` (:class:`IESkip`).
        bn_update: ``"all"`` or ``"first"`` (:class:`IESkip`).
        tol: relative-residual early stop of ``grad="implicit"`` (:class:`IESkip`); None:
            the whole budget.
        recompute: what ``grad="unrolled"`` IE-Skips on the fused backends recompute in the
            backward: ``"selective"`` (default), ``"full"`` (least memory) or ``"none"``
            (fewest bytes moved; :class:`IESkip`).
        dim: number of spatial dims, 0–3.
        backend: the pyeuler backend (None: the process default).

    Returns:
        The module; ``block(x)`` returns ``(N, planes·expansion, *spatial')`` in x's dtype.

    Raises:
        ValueError: bad ``downsample``, IE settings (as :class:`IESkip`), ``norm``,
            ``norm_groups``, ``h_mode``, ``dropout``, ``dim`` or channel counts; at a call,
            x of the wrong rank or channel count.
        TypeError: ``h`` not a number; at a call, x not a floating-point tensor.
        RuntimeError: at a call, an unavailable ``backend``.
        NotImplementedError: at a call, forward mode or ``torch.func`` through
            ``grad="implicit"`` (:class:`IESkip`).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, h: float = 1.0,
                 h_mode: str = "fixed", norm: str = "batch", norm_groups: int = 1,
                 dropout: float = 0.0, downsample: str = "conv1x1", ie_steps: int = 0,
                 ie_step_size: float = 0.1, theta: float = 1.0, grad: str = "unrolled",
                 bn_update: str = "all", tol: float | None = None, recompute: str = "selective",
                 dim: int = 2, backend: str | None = None):
        super().__init__()
        validate_ie_args(ie_steps, ie_step_size, theta, grad, bn_update, tol)
        check_recompute(recompute)
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
        self.grad, self.bn_update, self.tol, self.recompute = grad, bn_update, tol, recompute

    @staticmethod
    def _make_branch(in_planes, planes, stride, *, dropout, **kwargs) -> nn.Module:
        return PreActBranch(in_planes, dropout=dropout, out_channels=planes, stride=stride,
                            **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        branch = self.branch
        if self.shortcut is None:
            if self.steps > 0:
                if not self.training:
                    warn_batch_norm_in_eval(branch)
                return ie_skip(branch, x, self.steps, self.step_size, self.theta, self.grad,
                               self.bn_update, branch.backend, tol=self.tol,
                               recompute=self.recompute)
            a = branch.head(x)
            # relayed: the first norm adds the add's share of x's gradient in its kernel
            return relayed_residual_add(x, branch.tail(a), branch.h, a)[0]
        if isinstance(self.shortcut, nn.Sequential):  # norm → ReLU → conv3x3 on x
            return scaled_residual_add(self.shortcut(x), branch.tail(branch.head(x)), branch.h)
        a = branch.head(x)  # WRN convention: project ReLU(bn1(x))
        return scaled_residual_add(self.shortcut(a), branch.tail(a), branch.h)

    def extra_repr(self) -> str:
        if not self.steps:
            return ""
        tol = f", tol={self.tol}" if self.tol is not None else ""
        recompute = "" if self.recompute == "selective" else f", recompute={self.recompute!r}"
        return (f"ie_steps={self.steps}, ie_step_size={self.step_size}, theta={self.theta}, "
                f"grad={self.grad!r}, bn_update={self.bn_update!r}{tol}{recompute}")


class PreActBottleneckBranch(nn.Module):
    """``h·conv3(ρ(n3(conv2(ρ(n2(conv1(ρ(n1(x)))))))))``: 1×1 → 3×3 (stride) → 1×1 (×4), the
    branch of :class:`PreActBottleneck` (He et al. 2016b), ρ = ReLU, n = the norm.

    IE-Skips around it differentiate through generic autograd (no explicit VJP).  Calling
    it maps x of shape ``(N, in_planes, *spatial)``, floating point, to
    ``(N, 4·planes, *spatial')`` in x's dtype (spatial' = ⌈spatial / stride⌉).

    Args:
        in_planes: the input's channels.
        planes: the bottleneck width; the output has ``4·planes`` channels.
        stride: stride of the 3×3 convolution.
        norm: ``"batch"`` or ``"group"`` (``GroupNorm(norm_groups, C)``).
        norm_groups: groups of the GroupNorm.
        h: the Euler step factor h (finite float).
        h_mode: ``"fixed"``, ``"scalar"`` or ``"channel"`` (learnable per output channel).
        dim: number of spatial dims, 0–3.
        backend: the pyeuler backend of the norm ops (None: the process default).

    Returns:
        The module; ``branch(x)`` returns ``(N, 4·planes, *spatial')`` in x's dtype.

    Raises:
        ValueError: bad ``norm``, ``norm_groups``, ``h_mode``, ``dim`` or channel counts; at
            a call, x of the wrong rank or channel count.
        TypeError: ``h`` not a number; at a call, x not a tensor.
        RuntimeError: at a call, an unavailable ``backend``.
    """

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

    def head(self, x: Tensor, *, backend: str | None = None) -> Tensor:
        """ρ(n1(x)): the pre-activation a projection shortcut also reads.

        Args:
            x: ``(N, in_planes, *spatial)``, floating point.
            backend: overrides the module's ``backend`` for this call.

        Returns:
            ρ(n1(x)), x's shape and dtype.

        Raises:
            ValueError: x of the wrong rank or channel count.
            TypeError: x not a tensor.
        """
        check_input_rank(x, self.conv1, type(self).__name__)
        return norm_act_module(self.bn1, x, backend=backend or self.backend)

    def tail(self, a: Tensor, *, backend: str | None = None) -> Tensor:
        """conv3(ρ(n3(conv2(ρ(n2(conv1(a))))))), without h.

        Args:
            a: the pre-activation :meth:`head` returns, ``(N, in_planes, *spatial)``.
            backend: overrides the module's ``backend`` for this call.

        Returns:
            ``(N, 4·planes, *spatial')`` in a's dtype.

        Raises:
            RuntimeError: a's channels do not match conv1 (torch's convolution error).
        """
        backend = backend or self.backend
        u = norm_act_module(self.bn2, self.conv1(a), backend=backend)
        u = norm_act_module(self.bn3, self.conv2(u), backend=backend)
        return self.conv3(u)

    def forward(self, x: Tensor, *, backend: str | None = None) -> Tensor:
        return scale_by_step(self.tail(self.head(x, backend=backend), backend=backend), self.h)


class PreActBottleneck(PreActBlock):
    """Pre-activation bottleneck block (PreAct-ResNet-50): :class:`PreActBlock` with a
    :class:`PreActBottleneckBranch` (``expansion = 4``; no dropout); IE-Skips via generic
    autograd.  Arguments, returns and errors as :class:`PreActBlock`; ``dropout`` must be 0
    (ValueError otherwise)."""

    expansion = 4

    @staticmethod
    def _make_branch(in_planes, planes, stride, *, dropout, **kwargs) -> nn.Module:
        if dropout:
            raise ValueError("dropout is not supported in PreActBottleneck")
        return PreActBottleneckBranch(in_planes, planes, stride, **kwargs)
