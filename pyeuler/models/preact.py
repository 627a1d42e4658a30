"""Pre-activation ResNets and WideResNets, with step factor h and IE-Skips."""

from __future__ import annotations

from torch import Tensor, nn

from pyeuler.models._common import PreActHead, check_positive_int
from pyeuler.nn.blocks import PreActBlock, PreActBottleneck
from pyeuler.nn.deprecation import keyword_only_since
from pyeuler.nn.layers import make_conv, make_norm
from pyeuler.ops.preact_branch import check_input_rank

__all__ = ["PreActNet", "preact_resnet", "wide_resnet", "mlp_resnet"]

_PREACT_DEPTHS = {18: (PreActBlock, (2, 2, 2, 2)), 34: (PreActBlock, (3, 4, 6, 3)),
                  50: (PreActBottleneck, (3, 4, 6, 3))}


# What every builder's step-factor and IE-Skip arguments mean (one wording for all four).
_IE_ARGS = """
        h: the Euler step factor h of every block (finite float; Zhang et al., IJCAI 2019).
        h_mode: ``"fixed"``, ``"scalar"`` (one learnable h per block) or ``"channel"``
            (learnable per output channel).
        ie_steps: K >= 0 IE-Skip steps in every shape-preserving block (0: ResNet;
            :class:`pyeuler.nn.IESkip`'s ``steps``).
        ie_step_size: γ > 0 of the IE steps.
        theta: θ in [0, 1] of the θ-method (1: implicit Euler).
        grad: ``"unrolled"`` (exact), ``"detached"`` (the IE authors' cheaper gradient;
            white-box attacks through it overstate robustness) or ``"implicit"``.
        bn_update: ``"all"`` or ``"first"``: which branch evaluations update BatchNorm's
            running statistics in training mode.
        tol: relative-residual early stop of ``grad="implicit"``; None: the whole budget.
        recompute: ``grad="unrolled"`` on the fused backends, what the backward recomputes:
            ``"selective"`` (default), ``"full"`` (least memory) or ``"none"`` (fewest bytes
            moved); :class:`pyeuler.nn.IESkip`.
        norm: ``"batch"`` (default: the benchmarked model; BatchNorm inside IE-Skips can
            lose much eval-mode accuracy, see below) or ``"group"``
            (``GroupNorm(norm_groups, C)``, the IE authors' choice and the CLI's default).
        norm_groups: groups of the GroupNorm."""

_BUILDER_RAISES = """
    Raises:
        ValueError: bad ``depth``, widths, ``num_classes``, ``in_channels``, IE settings,
            ``norm``, ``norm_groups``, ``h_mode``, ``dropout`` or ``downsample``, each
            naming the argument; at a call, x of the wrong rank or channel count.
        TypeError: ``h`` not a number; at a call, x not a floating-point tensor.
        RuntimeError: at a call, an unavailable ``backend``.

    With ``norm="batch"`` and ``ie_steps > 0`` the running statistics average the
    branches' inputs at x0 and at the IE iterates, which are distributed differently, so
    eval-mode accuracy can fall far below training accuracy (IE-ResNet-1 on digits: 74.6 ±
    13.2 % vs 98.6 ± 0.9 %, docs/robustness_report.md); such a model warns once when it first
    runs in eval mode.  ``norm="group"`` has no running statistics.
    """


class PreActNet(nn.Module):
    """stem conv → stages of pre-activation blocks → norm → ReLU → pool → linear: the
    network :func:`preact_resnet`, :func:`wide_resnet` and :func:`mlp_resnet` build.

    Calling it maps x of shape ``(N, in_channels, *spatial)`` (``dim`` spatial dims;
    ``(N, in_channels)`` for ``dim=0``), floating point, to logits ``(N, num_classes)`` in
    x's dtype.

    Args:
        block: the block class, :class:`~pyeuler.nn.PreActBlock` or
            :class:`~pyeuler.nn.PreActBottleneck`.
        widths: each stage's block width (``planes``), a sequence of positive ints.
        counts: each stage's number of blocks.
        strides: each stage's first stride.
        in_channels: the input's channels (features for ``dim=0``).
        stem_width: channels of the stem convolution (Linear layer for ``dim=0``).
        num_classes: the number of logits.
        dim: number of spatial dims, 0–3.
        **block_kwargs: passed to every block (h, h_mode, norm, norm_groups, dropout,
            downsample, ie_steps, ie_step_size, theta, grad, bn_update, tol, recompute,
            backend); IE-Skips apply to every shape-preserving block.

    Returns:
        The module; ``net(x)`` returns ``(N, num_classes)`` logits.

    Raises:
        ValueError: non-positive ``num_classes``/``in_channels``, or a bad block argument
            (as :class:`~pyeuler.nn.PreActBlock`); at a call, x of the wrong rank.
        TypeError: at a call, x not a tensor.
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
                  theta, grad, bn_update, tol, recompute, backend):
    return dict(h=h, h_mode=h_mode, norm=norm, norm_groups=norm_groups, dropout=dropout,
                downsample=downsample, ie_steps=ie_steps, ie_step_size=ie_step_size,
                theta=theta, grad=grad, bn_update=bn_update, tol=tol, recompute=recompute,
                backend=backend)


@keyword_only_since("num_classes", "in_channels")
def preact_resnet(depth: int = 18, base_width: int = 64, *, num_classes: int = 10,
                  in_channels: int = 3, h: float = 1.0, h_mode: str = "fixed",
                  ie_steps: int = 0, ie_step_size: float = 0.1, theta: float = 1.0,
                  grad: str = "unrolled", bn_update: str = "all", tol: float | None = None,
                  recompute: str = "selective", norm: str = "batch", norm_groups: int = 1,
                  dropout: float = 0.0,
                  downsample: str = "conv1x1", backend: str | None = None) -> PreActNet:
    """PreAct-ResNet-18/34/50 (He et al. 2016b) for 32×32 inputs, widths
    ``base_width``·(1, 2, 4, 8); 50 uses bottleneck blocks.

    Args:
        depth: 18, 34 or 50.
        base_width: the first stage's width (64 in the paper).
        num_classes: the number of logits.
        in_channels: the input images' channels.{ie}
        dropout: dropout probability in [0, 1) inside the branches (not for depth 50).
        downsample: ``"conv1x1"`` (WRN convention) or ``"conv3x3"`` (the IE authors').
        backend: the pyeuler backend of every fused op (None: the process default).

    Returns:
        A :class:`PreActNet` mapping x ``(N, in_channels, H, W)``, floating point, to
        ``(N, num_classes)`` logits in x's dtype (any H, W; global average pooling).
{raises}"""
    if depth not in _PREACT_DEPTHS:
        raise ValueError(f"depth must be one of {sorted(_PREACT_DEPTHS)}, got {depth!r}")
    check_positive_int(base_width, "base_width")
    block, counts = _PREACT_DEPTHS[depth]
    widths = tuple(base_width * m for m in (1, 2, 4, 8))
    return PreActNet(block, widths, counts, (1, 2, 2, 2), in_channels=in_channels,
                     stem_width=base_width, num_classes=num_classes,
                     **_block_kwargs(h, h_mode, norm, norm_groups, dropout, downsample, ie_steps,
                                     ie_step_size, theta, grad, bn_update, tol, recompute,
                                     backend))


@keyword_only_since("num_classes", "in_channels")
def wide_resnet(depth: int = 34, widen_factor: int = 10, *, num_classes: int = 10,
                in_channels: int = 3, dropout: float = 0.0, h: float = 1.0,
                h_mode: str = "fixed", ie_steps: int = 0, ie_step_size: float = 0.1,
                theta: float = 1.0, grad: str = "unrolled", bn_update: str = "all",
                tol: float | None = None, recompute: str = "selective", norm: str = "batch",
                norm_groups: int = 1, downsample: str = "conv1x1",
                backend: str | None = None) -> PreActNet:
    """WRN-depth-k (Zagoruyko & Komodakis): 3×3 stem to 16 channels, three groups of
    (depth−4)/6 pre-activation blocks of widths 16k, 32k, 64k.  ``wide_resnet(34, 10)`` is
    the TRADES / IE paper's WRN-34-10; ``ie_steps=1`` makes IE-WRN-1-34.

    ``norm="batch"`` (the default, the benchmarked model) puts BatchNorm inside the
    IE-Skips too (see the note below); ``norm="group"`` (the CLI's default for IE models)
    avoids that.

    Args:
        depth: 6n+4 (10, 16, 28, 34, ...).
        widen_factor: k >= 1.
        num_classes: the number of logits.
        in_channels: the input images' channels.
        dropout: dropout probability in [0, 1) between each branch's convolutions.{ie}
        downsample: ``"conv1x1"`` (WRN convention) or ``"conv3x3"`` (the IE authors').
        backend: the pyeuler backend of every fused op (None: the process default).

    Returns:
        A :class:`PreActNet` mapping x ``(N, in_channels, H, W)``, floating point, to
        ``(N, num_classes)`` logits in x's dtype (any H, W; global average pooling).
{raises}"""
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth must be 6n+4 (10, 16, 28, 34, ...), got {depth!r}")
    check_positive_int(widen_factor, "widen_factor")
    n = (depth - 4) // 6
    widths = tuple(w * widen_factor for w in (16, 32, 64))
    return PreActNet(PreActBlock, widths, (n, n, n), (1, 2, 2), in_channels=in_channels,
                     stem_width=16, num_classes=num_classes,
                     **_block_kwargs(h, h_mode, norm, norm_groups, dropout, downsample, ie_steps,
                                     ie_step_size, theta, grad, bn_update, tol, recompute,
                                     backend))


@keyword_only_since("num_classes")
def mlp_resnet(in_features: int = 2, width: int = 32, depth: int = 4, *, num_classes: int = 2,
               h: float = 1.0, h_mode: str = "fixed", ie_steps: int = 0,
               ie_step_size: float = 0.1, theta: float = 1.0, grad: str = "unrolled",
               bn_update: str = "all", tol: float | None = None, recompute: str = "selective",
               norm: str = "batch", norm_groups: int = 1,
               backend: str | None = None) -> PreActNet:
    """A residual MLP on points (two-moons): Linear stem, ``depth`` pre-activation Linear
    blocks of ``width``, norm → ReLU → linear classifier.

    Args:
        in_features: D, the points' dimension.
        width: the blocks' width.
        depth: the number of residual blocks.
        num_classes: the number of logits.{ie}
        backend: the pyeuler backend of every fused op (None: the process default).

    Returns:
        A :class:`PreActNet` mapping x ``(N, in_features)``, floating point, to
        ``(N, num_classes)`` logits in x's dtype.
{raises}"""
    check_positive_int(in_features, "in_features")
    check_positive_int(width, "width")
    check_positive_int(depth, "depth")
    return PreActNet(PreActBlock, (width,), (depth,), (1,), in_channels=in_features,
                     stem_width=width, num_classes=num_classes, dim=0,
                     **_block_kwargs(h, h_mode, norm, norm_groups, 0.0, "conv1x1", ie_steps,
                                     ie_step_size, theta, grad, bn_update, tol, recompute,
                                     backend))


for _builder in (preact_resnet, wide_resnet, mlp_resnet):
    _builder.__doc__ = _builder.__doc__.format(ie=_IE_ARGS, raises=_BUILDER_RAISES)
