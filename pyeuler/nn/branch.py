"""The pre-activation residual branch, f(x) = h·conv2(ReLU(N2(conv1(ReLU(N1(x))))))."""

from __future__ import annotations

from torch import Tensor, nn

from pyeuler.nn.deprecation import keyword_only_since
from pyeuler.nn.layers import make_conv, make_norm, make_step
from pyeuler.ops.norm_act import norm_act_module
from pyeuler.ops.preact_branch import check_input_rank, dropout_for_reference, scale_by_step

__all__ = ["PreActBranch"]


class PreActBranch(nn.Module):
    """Pre-activation branch ``f(x) = h·conv2(drop(ReLU(bn2(conv1(ReLU(bn1(x)))))))``
    (He et al. 2016b; docs/semantics.md §3), the residual function of
    :class:`PreActBlock` and of IE-Skips.

    :class:`IESkip` recognises this class and uses the explicit VJP and fused kernels.
    Calling it maps x of shape ``(N, channels, *spatial)`` with ``dim`` spatial dims
    (``(N, channels)`` for ``dim=0``), float32/float64/float16/bfloat16 matching the
    parameters (or under autocast), to ``(N, out_channels, *spatial')`` in x's dtype
    (spatial' = ⌈spatial / stride⌉).

    Args:
        channels: C, the input's channels (features for ``dim=0``).
        norm: ``"batch"`` (``nn.BatchNorm{1,2,3}d``) or ``"group"``
            (``nn.GroupNorm(norm_groups, C)``, the IE authors' choice).
        dropout: probability in [0, 1) of zeroing an element between the convolutions
            (training mode only; WideResNet's dropout).
        out_channels: channels of f(x); None: ``channels``.  With ``stride`` it makes the
            down-sampling branch of a block; IE-Skips need the shape-preserving default.
        stride: stride of the first 3×3 convolution (1 for ``dim=0``).
        dim: number of spatial dims, 0–3 (0: bias-free Linear layers on ``(N, C)``).
        norm_groups: groups of the GroupNorm (must divide both channel counts); 1 as in
            the IE authors' code.
        h: the Euler step factor h (finite float).
        h_mode: ``"fixed"`` (h a constant), ``"scalar"`` (a learnable scalar parameter
            ``h``) or ``"channel"`` (a learnable ``(out_channels,)`` parameter).
        backend: the pyeuler backend of the normalisation ops (None: the process default,
            :func:`pyeuler.set_backend`).

    Returns:
        The module.  ``branch(x)`` returns f(x), ``(N, out_channels, *spatial')`` in x's
        dtype and memory format.

    Raises:
        ValueError: bad ``dropout``, ``dim``, channel counts, ``stride``, ``norm``,
            ``norm_groups`` or ``h_mode``; at a call, x of the wrong rank or channel count.
        TypeError: ``h`` not a number; at a call, x not a tensor.
        RuntimeError: at a call, an unavailable ``backend``.
    """

    # the protocol pyeuler.ops reads (ops.preact_branch.has_explicit_vjp): J_fᵀ·v by formula
    explicit_vjp = True

    @keyword_only_since("norm", "dropout")
    def __init__(self, channels: int, *, norm: str = "batch", dropout: float = 0.0,
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

    @keyword_only_since("backend")
    def head(self, x: Tensor, *, backend: str | None = None) -> Tensor:
        """ReLU(bn1(x)): the pre-activation a projection shortcut also reads.

        Args:
            x: ``(N, channels, *spatial)``, floating point.
            backend: overrides the module's ``backend`` for this call.

        Returns:
            ReLU(bn1(x)), x's shape and dtype.

        Raises:
            ValueError: x of the wrong rank or channel count.
            TypeError: x not a tensor.
        """
        check_input_rank(x, self.conv1, type(self).__name__)
        return norm_act_module(self.bn1, x, backend=backend or self.backend)

    @keyword_only_since("backend")
    def tail(self, a: Tensor, *, backend: str | None = None) -> Tensor:
        """conv2(drop(ReLU(bn2(conv1(a))))), without h.

        Args:
            a: the pre-activation :meth:`head` returns, ``(N, channels, *spatial)``.
            backend: overrides the module's ``backend`` for this call.

        Returns:
            ``(N, out_channels, *spatial')`` in a's dtype.

        Raises:
            RuntimeError: a's channels do not match conv1 (torch's convolution error).
        """
        u = norm_act_module(self.bn2, self.conv1(a), backend=backend or self.backend)
        return self.conv2(dropout_for_reference(u, self.dropout, self.training))

    @keyword_only_since("backend")
    def forward(self, x: Tensor, *, backend: str | None = None) -> Tensor:
        return scale_by_step(self.tail(self.head(x, backend=backend), backend=backend), self.h)

    def extra_repr(self) -> str:
        h = self.h if isinstance(self.h, float) else f"learnable{tuple(self.h.shape)}"
        return f"h={h}, dropout={self.dropout}"
