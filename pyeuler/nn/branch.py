"""The pre-activation residual branch, f(x) = h·conv2(ReLU(N2(conv1(ReLU(N1(x))))))."""

from __future__ import annotations

from torch import Tensor, nn

from pyeuler.nn.layers import make_conv, make_norm, make_step
from pyeuler.ops.norm_act import norm_act_module
from pyeuler.ops.preact_branch import check_input_rank, dropout_for_reference, scale_by_step

__all__ = ["PreActBranch"]


class PreActBranch(nn.Module):
    """Pre-activation branch ``f(x) = h·conv2(drop(ReLU(bn2(conv1(ReLU(bn1(x)))))))``.

    ``norm="group"`` uses ``GroupNorm(norm_groups, C)`` (1 group by default, as in the IE
    authors' code).  ``dim`` is the number of spatial dims (0: Linear layers on (N, C)).
    ``out_channels``/``stride`` make the down-sampling branch of a block; IE-Skips need the
    shape-preserving default.  ``IESkip`` recognises this class and uses the explicit VJP.
    """

    # the protocol pyeuler.ops reads (ops.preact_branch.has_explicit_vjp): J_fᵀ·v by formula
    explicit_vjp = True

    def __init__(self, channels: int, norm: str = "batch", dropout: float = 0.0, *,
                 out_channels: int | None = None, stride: int = 1, dim: int = 2,
                 norm_groups: int = 1, h: float = 1.0, h_mode: str = "fixed",
                 backend: str | None = None):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.bn1 = make_norm(norm, channels, dim, norm_groups)
        self.conv1 = make_conv(dim, channels, out_channels, 3, stride)
        self.bn2 = make_norm(norm, out_channels, dim, norm_groups)
        self.conv2 = make_conv(dim, out_channels, out_channels, 3, 1)
        self.dropout = float(dropout)
        self.h = make_step(h, h_mode, out_channels)
        self.backend = backend

    def head(self, x: Tensor, backend: str | None = None) -> Tensor:
        """ReLU(bn1(x)): the pre-activation a projection shortcut also reads."""
        check_input_rank(x, self.conv1, type(self).__name__)
        return norm_act_module(self.bn1, x, backend=backend or self.backend)

    def tail(self, a: Tensor, backend: str | None = None) -> Tensor:
        """conv2(drop(ReLU(bn2(conv1(a))))), without h."""
        u = norm_act_module(self.bn2, self.conv1(a), backend=backend or self.backend)
        return self.conv2(dropout_for_reference(u, self.dropout, self.training))

    def forward(self, x: Tensor, backend: str | None = None) -> Tensor:
        return scale_by_step(self.tail(self.head(x, backend), backend), self.h)

    def extra_repr(self) -> str:
        h = self.h if isinstance(self.h, float) else f"learnable{tuple(self.h.shape)}"
        return f"h={h}, dropout={self.dropout}"
