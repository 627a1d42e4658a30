"""Pre-activation ResNets and WideResNets, with step factor h and IE-Skips."""

from __future__ import annotations

from torch import Tensor, nn

from pyeuler.models._common import PreActHead, check_positive_int
from pyeuler.nn.blocks import PreActBlock, PreActBottleneck
from pyeuler.nn.layers import make_conv, make_norm
from pyeuler.ops.preact_branch import check_input_rank

__all__ = ["PreActNet", "preact_resnet", "wide_resnet", "mlp_resnet"]

_PREACT_DEPTHS = {18: (PreActBlock, (2, 2, 2, 2)), 34: (PreActBlock, (3, 4, 6, 3)),
                  50: (PreActBottleneck, (3, 4, 6, 3))}


class PreActNet(nn.Module):
    """stem conv → stages of pre-activation blocks → norm → ReLU → pool → linear.

    ``block_kwargs`` (h, h_mode, norm, norm_groups, dropout, downsample, ie_steps,
    ie_step_size, theta, grad, bn_update, backend) go to every block; IE-Skips apply to
    every shape-preserving block.
    """

    def __init__(self, block, widths, counts, strides, *, in_channels: int, stem_width: int,
                 num_classes: int, dim: int = 2, **block_kwargs):
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        check_positive_int(in_channels, "in_channels")
        norm, norm_groups = block_kwargs.get("norm", "batch"), block_kwargs.get("norm_groups", 1)
        self.stem = (nn.Linear(in_channels, stem_width, bias=False) if dim == 0
                     else make_conv(dim, in_channels, stem_width, 3, 1))
        stages, in_planes = [], stem_width
        for width, count, stride in zip(widths, counts, strides):
            blocks = []
            for i in range(count):
                blocks.append(block(in_planes, width, stride if i == 0 else 1, dim=dim,
                                    **block_kwargs))
                in_planes = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = PreActHead(make_norm(norm, in_planes, dim, norm_groups), in_planes,
                               num_classes, block_kwargs.get("backend"))

    def forward(self, x: Tensor) -> Tensor:
        check_input_rank(x, self.stem, type(self).__name__)
        return self.head(self.stages(self.stem(x)))


def _block_kwargs(h, h_mode, norm, norm_groups, dropout, downsample, ie_steps, ie_step_size,
                  theta, grad, bn_update, backend):
    return dict(h=h, h_mode=h_mode, norm=norm, norm_groups=norm_groups, dropout=dropout,
                downsample=downsample, ie_steps=ie_steps, ie_step_size=ie_step_size,
                theta=theta, grad=grad, bn_update=bn_update, backend=backend)


def preact_resnet(depth: int = 18, base_width: int = 64, num_classes: int = 10,
                  in_channels: int = 3, *, h: float = 1.0, h_mode: str = "fixed",
                  ie_steps: int = 0, ie_step_size: float = 0.1, theta: float = 1.0,
                  grad: str = "unrolled", bn_update: str = "all", norm: str = "batch",
                  norm_groups: int = 1, dropout: float = 0.0, downsample: str = "conv1x1",
                  backend: str | None = None) -> PreActNet:
    """PreAct-ResNet-18/34/50 (He et al. 2016b) for 32×32 inputs, widths ``base_width``·(1, 2, 4, 8)."""
    if depth not in _PREACT_DEPTHS:
        raise ValueError(f"depth must be one of {sorted(_PREACT_DEPTHS)}, got {depth!r}")
    check_positive_int(base_width, "base_width")
    block, counts = _PREACT_DEPTHS[depth]
    widths = tuple(base_width * m for m in (1, 2, 4, 8))
    return PreActNet(block, widths, counts, (1, 2, 2, 2), in_channels=in_channels,
                     stem_width=base_width, num_classes=num_classes,
                     **_block_kwargs(h, h_mode, norm, norm_groups, dropout, downsample, ie_steps,
                                     ie_step_size, theta, grad, bn_update, backend))


def wide_resnet(depth: int = 34, widen_factor: int = 10, num_classes: int = 10,
                in_channels: int = 3, *, dropout: float = 0.0, h: float = 1.0,
                h_mode: str = "fixed", ie_steps: int = 0, ie_step_size: float = 0.1,
                theta: float = 1.0, grad: str = "unrolled", bn_update: str = "all",
                norm: str = "batch", norm_groups: int = 1, downsample: str = "conv1x1",
                backend: str | None = None) -> PreActNet:
    """WRN-depth-k (Zagoruyko & Komodakis): 3×3 stem to 16 channels, three groups of
    (depth−4)/6 pre-activation blocks of widths 16k, 32k, 64k.  ``wide_resnet(34, 10)`` is
    the TRADES / IE paper's WRN-34-10; ``ie_steps=1`` makes IE-WRN-1-34.

    ``norm="batch"`` (the default, the benchmarked model) puts BatchNorm inside the
    IE-Skips too: its running statistics then average the branch's inputs at x0 and at the
    IE iterates, and eval-mode accuracy can fall far below training accuracy (README,
    docs/robustness_report.md); ``norm="group"`` (the CLI's default for IE models) avoids
    that.  :class:`~pyeuler.nn.IESkip` warns once when such a model first runs in eval."""
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth must be 6n+4 (10, 16, 28, 34, ...), got {depth!r}")
    check_positive_int(widen_factor, "widen_factor")
    n = (depth - 4) // 6
    widths = tuple(w * widen_factor for w in (16, 32, 64))
    return PreActNet(PreActBlock, widths, (n, n, n), (1, 2, 2), in_channels=in_channels,
                     stem_width=16, num_classes=num_classes,
                     **_block_kwargs(h, h_mode, norm, norm_groups, dropout, downsample, ie_steps,
                                     ie_step_size, theta, grad, bn_update, backend))


def mlp_resnet(in_features: int = 2, width: int = 32, depth: int = 4, num_classes: int = 2, *,
               h: float = 1.0, h_mode: str = "fixed", ie_steps: int = 0,
               ie_step_size: float = 0.1, theta: float = 1.0, grad: str = "unrolled",
               bn_update: str = "all", norm: str = "batch", norm_groups: int = 1,
               backend: str | None = None) -> PreActNet:
    """A residual MLP on points (two-moons): Linear stem, ``depth`` pre-activation Linear
    blocks of ``width``, norm → ReLU → linear classifier."""
    check_positive_int(in_features, "in_features")
    check_positive_int(width, "width")
    check_positive_int(depth, "depth")
    return PreActNet(PreActBlock, (width,), (depth,), (1,), in_channels=in_features,
                     stem_width=width, num_classes=num_classes, dim=0,
                     **_block_kwargs(h, h_mode, norm, norm_groups, 0.0, "conv1x1", ie_steps,
                                     ie_step_size, theta, grad, bn_update, backend))
