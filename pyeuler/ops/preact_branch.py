"""The pre-activation branch ``f(x) = h·W2 ⋆ ρ(N2(W1 ⋆ ρ(N1(x))))`` as explicit functions.

:func:`branch_forward` evaluates f and keeps what its Jacobian needs; :func:`branch_vjp`
gives ``J_fᵀ e`` with docs/semantics.md §3's explicit formula (convolution data-gradients through
``aten.convolution_backward``, the norm backward of :mod:`pyeuler.ops.norm_act`), never
generic autograd; :func:`branch_jvp` gives ``J_f v`` by forward-mode AD, no graph kept.
Everything is built from differentiable ops, so the "unrolled" IE-Skip gradient is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pyeuler.ops.norm_act import (NormStats, conv_weight_for, norm_act_backward, norm_act_module,
                                  norm_relu_backward_conv, norm_relu_backward_ie_update)

__all__ = ["BranchCache", "branch_forward", "branch_vjp", "branch_vjp_ie_update", "branch_jvp",
           "check_input_rank", "check_preact_branch", "has_explicit_vjp", "scale_by_step"]

_CONV_INPUT_GRAD = {
    nn.Conv1d: torch.nn.grad.conv1d_input,
    nn.Conv2d: torch.nn.grad.conv2d_input,
    nn.Conv3d: torch.nn.grad.conv3d_input,
}


@dataclass
class BranchCache:
    """Intermediates of one evaluation of the branch, enough for its VJP."""

    stats1: NormStats
    stats2: NormStats
    dropout_noise: Tensor | None
    # the recompute policy of the VJP at this point (see branch_forward): "none" runs it
    # unfused, "selective" fused, keeping the norm's input gradient, "full" fused,
    # recomputing it in the backward
    recompute: str = "none"
    # the autograd nodes of the first readers of x and of conv1's output, for gradient
    # relays (pyeuler.ops.gradient_relay); None under torch.compile.  A reader that is not a
    # relaying pyeuler op (the eager backends', an unfused conv1 output's: None) only keeps
    # its relay from activating
    readers: tuple | None = None


def check_input_rank(x: Tensor, layer: nn.Module, owner: str) -> None:
    """x must be ``(N, C, *spatial)`` with the spatial rank and the input channels of
    ``layer`` (the first conv or linear layer ``owner`` applies): convolutions would read a
    tensor one dim short as a single unbatched sample, and return a wrong answer rather than
    an error; a wrong C would surface as an error about some internal weight.  Metadata only.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner} input x must be a Tensor, got {type(x).__name__}")
    expected = layer.weight.dim()  # conv: 2 + spatial; linear: 2, as (N, C)
    if x.dim() != expected:
        shape = "(N, C)" if expected == 2 else f"(N, C, {', '.join('*' * (expected - 2))})"
        raise ValueError(f"{owner} expects a {expected}-D input {shape} (a batch), got x of "
                         f"shape {tuple(x.shape)}")
    channels = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    if x.shape[1] != channels:
        raise ValueError(f"{owner} expects {channels} input channels (dim 1), got x of shape "
                         f"{tuple(x.shape)}")


def has_explicit_vjp(branch) -> bool:
    """Whether ``branch`` declares itself a pre-activation branch whose J_fᵀ·v the explicit
    formula computes: a class attribute ``explicit_vjp = True`` (:class:`pyeuler.nn.PreActBranch`
    sets it) over ``bn1, conv1, bn2, conv2``, ``h``, ``dropout`` and ``forward(x, backend=)``.
    A protocol rather than an isinstance check, so the ops never import the modules above
    them."""
    return getattr(type(branch), "explicit_vjp", False) is True


def check_preact_branch(branch, argument: str = "branch") -> None:
    """The explicit formula needs a pre-activation branch (:func:`has_explicit_vjp`)."""
    if not has_explicit_vjp(branch):
        raise TypeError(f"{argument} must be a pyeuler.nn.PreActBranch (the explicit formula "
                        f"reads its bn1, conv1, bn2, conv2 and h), got {type(branch).__name__}")


def scale_by_step(t: Tensor, h: float | Tensor) -> Tensor:
    """``h·t`` for a float, scalar or per-channel ``h``."""
    if isinstance(h, Tensor):
        return t * (h.view(1, -1, *([1] * (t.dim() - 2))) if h.dim() == 1 else h)
    return t if h == 1.0 else t * h


def _dropout_noise(u: Tensor, p: float, training: bool) -> Tensor | None:
    # Drawn explicitly (as ATen's CPU dropout does) so the VJP can reuse the same mask.
    if not training or p == 0.0:
        return None
    return torch.empty_like(u).bernoulli_(1.0 - p).div_(1.0 - p)


def branch_forward(branch, x: Tensor, backend: str, update_running: bool = True,
                   recompute: str = "none"):
    """``(f(x), cache)``; running statistics updated unless ``update_running=False``.

    ``recompute`` (a policy of :data:`pyeuler.ops.ie_skip.RECOMPUTE_POLICIES`; convolution
    layers): ``"selective"`` keeps only the convolutions' pre-activation inputs for the
    backward (x and conv1's output), which recomputes ``ReLU(norm(·))`` in its reduce pass;
    ``"full"`` also has :func:`branch_vjp` at this point recompute the norm's input gradient
    before conv1ᵀ (no dropout noise), by an elementwise pass; ``"none"`` keeps everything.
    """
    check_input_rank(x, branch.conv1, type(branch).__name__)
    convolutional = not isinstance(branch.conv1, nn.Linear)
    fuse = recompute != "none" and convolutional
    policy = recompute if fuse else "none"
    if fuse:
        z1, stats1 = norm_act_module(branch.bn1, x, update_running=update_running, backend=backend,
                                     return_stats=True, conv=branch.conv1)
    else:
        u1, stats1 = norm_act_module(branch.bn1, x, update_running=update_running, backend=backend,
                                     return_stats=True)
        z1 = branch.conv1(u1)
    if fuse and not (branch.training and branch.dropout > 0):
        fx, stats2 = norm_act_module(branch.bn2, z1, update_running=update_running, backend=backend,
                                     return_stats=True, conv=branch.conv2)
        # autograd nodes exist in eager mode only (a compiled graph sums shares itself)
        readers = None if torch.compiler.is_compiling() else (z1.grad_fn, fx.grad_fn)
        return scale_by_step(fx, branch.h), BranchCache(stats1, stats2, None, policy, readers)
    u2, stats2 = norm_act_module(branch.bn2, z1, update_running=update_running, backend=backend,
                                 return_stats=True)
    noise = _dropout_noise(u2, branch.dropout, branch.training)
    fx = branch.conv2(u2 if noise is None else u2 * noise)
    # x's first reader relays on a fused backend; conv1's output has no relaying reader here
    readers = None if torch.compiler.is_compiling() else ((z1 if fuse else u1).grad_fn, None)
    return scale_by_step(fx, branch.h), BranchCache(stats1, stats2, noise, policy, readers)


def _layer_input_grad(layer: nn.Module, grad_out: Tensor, layer_input: Tensor) -> Tensor:
    """``Wᵀ ⋆ g``: the data gradient of a bias-free conv or linear layer, computed in the
    layer's compute dtype (the autocast dtype under autocast) and returned in its input's
    dtype, as autograd through the layer would give it."""
    weight = conv_weight_for(grad_out, layer.weight)
    grad_out = grad_out.to(weight.dtype)
    if isinstance(layer, nn.Linear):
        return (grad_out @ weight).to(layer_input.dtype)
    input_grad = _CONV_INPUT_GRAD[type(layer)]
    return input_grad(layer_input.shape, weight, grad_out, layer.stride, layer.padding,
                      layer.dilation, layer.groups).to(layer_input.dtype)


def _norm_relu_input_grad(norm: nn.Module, stats: NormStats, grad_out: Tensor, backend: str):
    groups = norm.num_groups if isinstance(norm, nn.GroupNorm) else 0
    dx, *_ = norm_act_backward(grad_out, stats.x, norm.weight, norm.bias, None, 1.0, stats.mean,
                               stats.var, stats.mask, norm.eps, groups, True, stats.batch_stats,
                               (True, False, False, False, False), backend, affine=stats.affine,
                               sync=stats.sync)
    return dx


def _vjp_to_first_activation(branch, cache: BranchCache, e: Tensor, backend: str,
                             hidden_relay=None) -> Tensor:
    """The VJP back to the output of ``ReLU(bn1(x))``; the op reading conv1's output joins
    ``hidden_relay`` (:mod:`pyeuler.ops.gradient_relay`) if given."""
    g = scale_by_step(e, branch.h)
    # conv2's input, ReLU(bn2(z1)), has z1's dtype; conv1's has x's.
    g = _layer_input_grad(branch.conv2, g, cache.stats2.x)
    if cache.dropout_noise is not None:
        g = g * cache.dropout_noise
    if cache.recompute != "none":
        g = norm_relu_backward_conv(g, cache.stats2, branch.bn2, branch.conv1,
                                    cache.stats1.x.shape, backend,
                                    keep_input_grad=cache.recompute == "selective")
        if hidden_relay is not None:
            hidden_relay.join(g.grad_fn)
        return g.to(cache.stats1.x.dtype)
    g = _norm_relu_input_grad(branch.bn2, cache.stats2, g, backend)
    return _layer_input_grad(branch.conv1, g, cache.stats1.x)


def branch_vjp(branch, cache: BranchCache, e: Tensor, backend: str) -> Tensor:
    """``J_fᵀ e`` at the point ``cache`` was taken (docs/semantics.md §3)."""
    g = _vjp_to_first_activation(branch, cache, e, backend)
    return _norm_relu_input_grad(branch.bn1, cache.stats1, g, backend)


def branch_vjp_ie_update(branch, cache: BranchCache, e: Tensor, step_size: float, theta: float,
                         backend: str, residual_term: Tensor | None = None,
                         relays=None) -> Tensor:
    """``x − 2γ·(e − θ·J_fᵀe)`` at the branch input x, the update fused into the VJP's last
    pass (J_fᵀe is never written).  Given e's term ``residual_term = −2γ·e``
    (:func:`pyeuler.ops.ie_skip.ie_residual_with_term`), the update reads it and the VJP e:
    each has one reader, so their gradients never meet in the autograd engine.
    ``relays``: the :class:`~pyeuler.ops.gradient_relay.GradientRelay` of x and of conv1's
    output, which the update and the VJP join as those tensors' last readers.
    Differentiable like :func:`branch_vjp`."""
    x_relay, hidden_relay = relays or (None, None)
    g = _vjp_to_first_activation(branch, cache, e, backend, hidden_relay)
    if residual_term is None:
        out = norm_relu_backward_ie_update(g, cache.stats1, branch.bn1, e, step_size, theta,
                                           backend)
    else:
        out = norm_relu_backward_ie_update(g, cache.stats1, branch.bn1, residual_term, step_size,
                                           theta, backend, residual_is_term=True)
    if x_relay is not None:
        x_relay.join(out.grad_fn)
    return out


def branch_jvp(branch, x: Tensor, v: Tensor, backend: str = "eager") -> Tensor:
    """``J_f v`` at ``x`` by forward-mode AD (no graph, running statistics untouched).

    Dropout is off: a Jacobian of a random map is rarely what a diagnostic wants.  A fused
    ``backend`` runs its eager formulas here (:mod:`pyeuler.ops.dispatch`).
    """
    def f(inp):
        u1 = norm_act_module(branch.bn1, inp, update_running=False, backend=backend)
        u2 = norm_act_module(branch.bn2, branch.conv1(u1), update_running=False, backend=backend)
        return scale_by_step(branch.conv2(u2), branch.h)

    _, tangent = torch.func.jvp(f, (x,), (v,))
    return tangent


def dropout_for_reference(u: Tensor, p: float, training: bool) -> Tensor:
    """The branch's dropout, drawing the same random numbers as :func:`branch_forward`."""
    noise = _dropout_noise(u, p, training)
    return u if noise is None else u * noise

