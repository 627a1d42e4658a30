"""Pieces shared by the model builders."""

from __future__ import annotations

from torch import Tensor, nn

from pyeuler.ops.norm_act import norm_act_module


class PreActHead(nn.Module):
    """Final norm → ReLU → global average pool → linear classifier of pre-activation nets."""

    def __init__(self, norm: nn.Module, in_features: int, num_classes: int,
                 backend: str | None = None):
        super().__init__()
        self.bn = norm
        self.fc = nn.Linear(in_features, num_classes)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        x = norm_act_module(self.bn, x, backend=self.backend)
        if x.dim() > 2:
            x = x.flatten(2).mean(2)
        return self.fc(x)


def check_positive_int(value, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
