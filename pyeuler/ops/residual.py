"""The scaled residual add ``x + h·f`` of an explicit Euler step (SPEC §1)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["scaled_residual_add"]


def scaled_residual_add(x: Tensor, f: Tensor, h: float | Tensor = 1.0) -> Tensor:
    """``x + h·f`` in one pass; ``h`` a float, a scalar tensor or a per-channel tensor."""
    if x.shape != f.shape:
        raise ValueError(f"x and f must have the same shape, got {tuple(x.shape)} and {tuple(f.shape)}")
    if isinstance(h, Tensor):
        if h.dim() == 1:
            h = h.view(1, -1, *([1] * (f.dim() - 2)))
        return torch.addcmul(x, h, f)
    return torch.add(x, f, alpha=h)
