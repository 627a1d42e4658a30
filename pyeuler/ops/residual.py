"""The scaled residual add ``x + h·f`` of an explicit Euler step (docs/semantics.md §1)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["scaled_residual_add"]


def scaled_residual_add(x: Tensor, f: Tensor, h: float | Tensor = 1.0) -> Tensor:
    """``x + h·f`` in one pass (docs/semantics.md §1): x, f ``(N, C, *spatial)`` of one shape on one
    device, floating point; ``h`` a float, a scalar tensor or a per-channel ``(C,)`` tensor.
    The result has torch's promoted dtype.  Raises ``TypeError``/``ValueError`` naming the
    bad argument."""
    for name, t in (("x", x), ("f", f)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point Tensor, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if x.shape != f.shape:
        raise ValueError(f"x and f must have the same shape, got {tuple(x.shape)} and {tuple(f.shape)}")
    if x.device != f.device:
        raise ValueError(f"f is on {f.device} but x is on {x.device}")
    if isinstance(h, Tensor):
        if h.dim() > 1 or (h.dim() == 1 and (x.dim() < 2 or h.shape[0] != x.shape[1])):
            raise ValueError(f"h must be a float, a scalar tensor or a (C,) tensor, got shape "
                             f"{tuple(h.shape)} for x of shape {tuple(x.shape)}")
        if h.device != x.device:
            raise ValueError(f"h is on {h.device} but x is on {x.device}")
    elif not isinstance(h, (int, float)) or isinstance(h, bool):
        raise TypeError(f"h must be a float or a tensor, got {type(h).__name__}")
    if isinstance(h, Tensor):
        if h.dim() == 1:
            h = h.view(1, -1, *([1] * (f.dim() - 2)))
        return torch.addcmul(x, h, f)
    return torch.add(x, f, alpha=h)
