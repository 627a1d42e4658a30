"""CIFAR ResNet-(6n+2) with step factor h (Zhang et al., IJCAI 2019)."""

from __future__ import annotations

from torch import Tensor, nn

from pyeuler.models._common import check_positive_int
from pyeuler.nn.blocks import EulerBasicBlock
from pyeuler.nn.deprecation import keyword_only_since
from pyeuler.ops.norm_act import norm_act_module
from pyeuler.ops.preact_branch import check_input_rank

__all__ = ["ResNetCifar", "resnet_cifar"]


class ResNetCifar(nn.Module):
    """conv3×3(16) → BN → ReLU → three stages of n post-activation Euler blocks
    (16, 32, 64 channels; :class:`~pyeuler.nn.EulerBasicBlock`) → global average pool →
    linear: the CIFAR ResNet-(6n+2) of He et al. (2016) with the step factor h of Zhang et
    al. (IJCAI 2019).

    Calling it maps x ``(N, in_channels, H, W)``, floating point, to ``(N, num_classes)``
    logits in x's dtype.

    Args:
        depth: 6n+2 (20, 32, 44, 56, 110, 218, ...).
        num_classes: the number of logits.
        in_channels: the input images' channels.
        h: the Euler step factor h of every block (finite float; 0.1 in the paper's robust
            ResNet-110).
        h_mode: ``"fixed"``, ``"scalar"`` (one learnable h per block) or ``"channel"``.
        backend: the pyeuler backend of every fused op (None: the process default).

    Returns:
        The module; ``net(x)`` returns ``(N, num_classes)`` logits.

    Raises:
        ValueError: bad ``depth``, ``num_classes``, ``in_channels`` or ``h_mode``; at a
            call, x of the wrong rank or channel count.
        TypeError: ``h`` not a number; at a call, x not a tensor.
        RuntimeError: at a call, an unavailable ``backend``.
    """

    @keyword_only_since("h", "num_classes", "in_channels")
    def __init__(self, depth: int = 20, *, num_classes: int = 10, in_channels: int = 3,
                 h: float = 1.0, h_mode: str = "fixed", backend: str | None = None):
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 (20, 56, 110, 218, ...), got {depth!r}")
        check_positive_int(num_classes, "num_classes")
        check_positive_int(in_channels, "in_channels")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(EulerBasicBlock(in_planes, planes, stride if i == 0 else 1, h=h,
                                              h_mode=h_mode, backend=backend))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        check_input_rank(x, self.conv1, type(self).__name__)
        out = norm_act_module(self.bn1, self.conv1(x), backend=self.backend)
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(out.mean((2, 3)))


@keyword_only_since("h", "num_classes", "in_channels")
def resnet_cifar(depth: int = 20, *, num_classes: int = 10, in_channels: int = 3,
                 h: float = 1.0, h_mode: str = "fixed", backend: str | None = None
                 ) -> ResNetCifar:
    """The IJCAI paper's ResNet-20/56/110/218 (depth = 6n+2) with step factor ``h``
    (post-activation blocks, BatchNorm only, no IE-Skips).

    Args:
        depth: 6n+2 (20, 32, 44, 56, 110, 218, ...).
        num_classes: the number of logits.
        in_channels: the input images' channels.
        h: the Euler step factor h of every block (finite float).
        h_mode: ``"fixed"``, ``"scalar"`` (one learnable h per block) or ``"channel"``.
        backend: the pyeuler backend of every fused op (None: the process default).

    Returns:
        A :class:`ResNetCifar` mapping x ``(N, in_channels, H, W)``, floating point, to
        ``(N, num_classes)`` logits in x's dtype.

    Raises:
        ValueError: bad ``depth``, ``num_classes``, ``in_channels`` or ``h_mode``.
        TypeError: ``h`` not a number.
    """
    return ResNetCifar(depth, num_classes=num_classes, in_channels=in_channels, h=h,
                       h_mode=h_mode, backend=backend)
