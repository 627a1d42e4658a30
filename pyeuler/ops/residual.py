"""The scaled residual add ``x + h·f`` of an explicit Euler step (docs/semantics.md §1)."""

from __future__ import annotations

import torch
from torch import Tensor

from pyeuler.ops.gradient_relay import GradientRelay, hand_on, incoming, mark_relaying

__all__ = ["scaled_residual_add"]


def scaled_residual_add(x: Tensor, f: Tensor, h: float | Tensor = 1.0) -> Tensor:
    """``x + h·f`` in one pass (docs/semantics.md §1): x, f ``(N, C, *spatial)`` of one shape on one
    device, floating point; ``h`` a float, a scalar tensor or a per-channel ``(C,)`` tensor.
    The result has torch's promoted dtype.  Raises ``TypeError``/``ValueError`` naming the
    bad argument."""
    _check_operands(x, f, h)
    if isinstance(h, Tensor):
        if h.dim() == 1:
            h = h.view(1, -1, *([1] * (f.dim() - 2)))
        return torch.addcmul(x, h, f)
    return torch.add(x, f, alpha=h)


# The explicit Euler step ``x + h·f`` as an op that relays x's gradient
# (pyeuler.ops.gradient_relay): its share, the output's gradient, goes on beside any it was
# handed (an IE-Skip's residuals read x too), for x's first reader to add in its kernel.  The
# add itself is torch's.


@torch.library.custom_op("pyeuler::explicit_euler_step", mutates_args=())
def _explicit_euler_step_op(x: Tensor, f: Tensor, h: float) -> Tensor:
    return torch.add(x, f, alpha=h)


@_explicit_euler_step_op.register_fake
def _(x, f, h):
    return torch.add(x, f, alpha=h)


def _explicit_step_setup(ctx, inputs, output):
    x, f, h = inputs
    ctx.dtypes, ctx.h = (x.dtype, f.dtype), h
    mark_relaying(ctx)


def _explicit_step_backward(ctx, grad):
    x_dtype, f_dtype = ctx.dtypes
    grad_f = grad if ctx.h == 1.0 else ctx.h * grad
    return hand_on(ctx, grad.to(x_dtype), *incoming(ctx)), grad_f.to(f_dtype), None


torch.library.register_autograd("pyeuler::explicit_euler_step", _explicit_step_backward,
                                setup_context=_explicit_step_setup)


def relayed_residual_add(x: Tensor, f: Tensor, h: float | Tensor, first_reader
                         ) -> tuple[Tensor, GradientRelay | None]:
    """:func:`scaled_residual_add`, and the relay of x's gradient from the step to x's first
    reader, ``first_reader`` (its autograd node, or a tensor it output: a pyeuler op that
    relays x, the branch's first norm on a fused backend), which later readers may join.
    Where no relay applies (a tensor h, no gradient to x, a first reader that does not
    relay, under torch.compile), torch's add and None."""
    if torch.compiler.is_compiling():  # compiled graphs sum the shares themselves
        return scaled_residual_add(x, f, h), None
    if isinstance(first_reader, Tensor):
        first_reader = first_reader.grad_fn
    if (isinstance(h, Tensor) or not torch.is_grad_enabled() or not isinstance(x, Tensor)
            or not x.requires_grad or "x" not in getattr(first_reader, "relayed_inputs", ())):
        return scaled_residual_add(x, f, h), None
    _check_operands(x, f, h)
    y = _explicit_euler_step_op(x, f, float(h))
    relay = GradientRelay(first_reader)
    relay.join(y.grad_fn)
    return y, relay


def _check_operands(x, f, h) -> None:
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
