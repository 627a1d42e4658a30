"""Layer factories shared by the blocks: dimension-generic convs and norms, the step h."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["NORMS", "H_MODES", "make_conv", "make_norm", "make_step"]

NORMS = ("batch", "group")
H_MODES = ("fixed", "scalar", "channel")
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCH_NORMS = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _check_dim(dim: int) -> None:
    if isinstance(dim, bool) or dim not in (0, 1, 2, 3):
        raise ValueError(f"dim (number of spatial dims) must be 0, 1, 2 or 3, got {dim!r}")


def _check_count(value, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def make_conv(dim: int, in_channels: int, out_channels: int, kernel_size: int = 3,
              stride: int = 1) -> nn.Module:
    """A bias-free ``kernel_size`` conv with 'same' padding, or a Linear layer for ``dim=0``."""
    _check_dim(dim)
    for value, name in ((in_channels, "in_channels"), (out_channels, "out_channels"),
                        (kernel_size, "kernel_size"), (stride, "stride")):
        _check_count(value, name)
    if dim == 0:
        if stride != 1:
            raise ValueError(f"stride must be 1 for dim=0 (Linear) blocks, got {stride}")
        return nn.Linear(in_channels, out_channels, bias=False)
    return _CONVS[dim](in_channels, out_channels, kernel_size, stride=stride,
                       padding=kernel_size // 2, bias=False)


def make_norm(norm: str, channels: int, dim: int, groups: int = 1) -> nn.Module:
    """``nn.BatchNorm{1,2,3}d`` (``norm="batch"``) or ``nn.GroupNorm(groups, C)``."""
    _check_dim(dim)
    _check_count(channels, "channels")
    if norm == "batch":
        return _BATCH_NORMS[dim](channels)
    if norm == "group":
        _check_count(groups, "norm_groups")
        if channels % groups:
            raise ValueError(f"norm_groups must divide channels={channels}, got {groups}")
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def make_step(h: float, h_mode: str, channels: int) -> float | nn.Parameter:
    """The Euler step factor: a float (``"fixed"``) or a learnable scalar / per-channel h."""
    if not isinstance(h, (int, float)) or isinstance(h, bool):
        raise TypeError(f"h must be a float, got {type(h).__name__}")
    if not math.isfinite(h):  # a module's step factor: NaN or inf is a mistake, not a value
        raise ValueError(f"h must be a finite float, got {h!r}")
    if h_mode == "fixed":
        return float(h)
    if h_mode == "scalar":
        return nn.Parameter(torch.tensor(float(h)))
    if h_mode == "channel":
        return nn.Parameter(torch.full((channels,), float(h)))
    raise ValueError(f"h_mode must be one of {H_MODES}, got {h_mode!r}")
