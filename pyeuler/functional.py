"""Functional ops (docs/semantics.md §1–§4).  Every op takes ``backend=`` (None: the process
default).

BatchNorm arguments follow ``torch.nn.functional.batch_norm``: with ``training=True`` batch
statistics normalise and, when ``running_mean``/``running_var`` are given, are folded into
them in place (unbiased variance, ``momentum``); with ``training=False`` the running
statistics normalise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyeuler.ops.ie_skip import ie_residual as _ie_residual
from pyeuler.ops.ie_skip import ie_skip
from pyeuler.ops.ie_skip import ie_update as _ie_update
from pyeuler.ops.norm_act import norm_act
from pyeuler.ops import preact_branch as _branch
from pyeuler.ops.residual import scaled_residual_add
from pyeuler.backend import resolve_backend

__all__ = ["norm_act", "bn_relu", "group_norm_relu", "bn_add_relu", "scaled_residual_add",
           "ie_residual", "ie_update", "ie_skip", "branch_vjp", "branch_jvp"]


def bn_relu(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
            running_mean: Tensor | None = None, running_var: Tensor | None = None, *,
            training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
            backend: str | None = None) -> Tensor:
    """``ReLU(BN(x))``: the pre-activation head."""
    return norm_act(x, weight, bias, running_mean, running_var, training=training,
                    momentum=momentum, eps=eps, backend=backend)


def group_norm_relu(x: Tensor, num_groups: int = 1, weight: Tensor | None = None,
                    bias: Tensor | None = None, *, eps: float = 1e-5,
                    backend: str | None = None) -> Tensor:
    """``ReLU(GroupNorm(num_groups)(x))`` (per-sample statistics; 1 group as in the IE code)."""
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    return norm_act(x, weight, bias, eps=eps, groups=num_groups, backend=backend)


def bn_add_relu(z: Tensor, shortcut: Tensor | None, h: float | Tensor = 1.0,
                weight: Tensor | None = None, bias: Tensor | None = None,
                running_mean: Tensor | None = None, running_var: Tensor | None = None, *,
                training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                relu: bool = True, backend: str | None = None) -> Tensor:
    """``ReLU(shortcut + h·BN(z))``: the post-activation tail.  ``h`` a float, a scalar or a
    per-channel tensor (learnable if it requires grad); shortcut and ReLU optional."""
    return norm_act(z, weight, bias, running_mean, running_var, training=training,
                    momentum=momentum, eps=eps, shortcut=shortcut, h=h, relu=relu,
                    backend=backend)


def ie_residual(x: Tensor, c: Tensor, fx: Tensor, theta: float = 1.0,
                backend: str | None = None) -> Tensor:
    """IE-Skip residual ``e = x − c − θ·f(x)`` (docs/semantics.md §2).  x, c, fx: one shape (no
    broadcasting), one device, floating dtypes (the result has their promoted dtype);
    θ in [0, 1].  Raises ``TypeError``/``ValueError`` naming the bad argument."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    return _ie_residual(x, c, fx, theta, resolve_backend(backend, x.device))


def ie_update(x: Tensor, e: Tensor, v: Tensor, step_size: float = 0.1, theta: float = 1.0,
              backend: str | None = None) -> Tensor:
    """IE-Skip update ``x − 2γ·(e − θ·v)`` with ``v = J_fᵀ e`` (docs/semantics.md §2).  x, e, v: one
    shape, one device, floating dtypes (the result has their promoted dtype); γ
    (``step_size``) finite and > 0, θ in [0, 1]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    return _ie_update(x, e, v, step_size, theta, resolve_backend(backend, x.device))


def _check_direction(name: str, v, like: Tensor) -> None:
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(v).__name__}")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
    if v.device != like.device:
        raise ValueError(f"{name} is on {v.device} but x is on {like.device}")
    if v.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(v.shape)}")


def _branch_input(branch, x) -> None:
    _branch.check_preact_branch(branch)
    _branch.check_input_rank(x, branch.conv1, "branch")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    weight = branch.conv1.weight
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"x is {x.dtype} but the branch's parameters are {weight.dtype} "
                        "(convert one, or run under autocast)")


def branch_vjp(branch, x: Tensor, v: Tensor, backend: str | None = None) -> Tensor:
    """``J_f(x)ᵀ v`` for a :class:`pyeuler.nn.PreActBranch` ``f`` by the explicit formula of
    docs/semantics.md §3 (running statistics untouched).  x: ``(N, C, *spatial)``; v: f(x)'s
    shape, on x's device, floating point; the result has x's shape.  Raises ``TypeError`` for a
    branch that is not a PreActBranch, ``ValueError``/``TypeError`` for a bad x or v."""
    _branch_input(branch, x)
    name = resolve_backend(backend, x.device)
    name = "eager" if name == "reference" else name
    fx, cache = _branch.branch_forward(branch, x, name, update_running=False)
    _check_direction("v", v, fx)
    return _branch.branch_vjp(branch, cache, v, name)


def branch_jvp(branch, x: Tensor, v: Tensor, backend: str | None = None) -> Tensor:
    """``J_f(x) v`` for a :class:`pyeuler.nn.PreActBranch` ``f`` by forward-mode AD (no
    graph kept, running statistics untouched, dropout off): the stability diagnostics'
    primitive.  x: ``(N, C, *spatial)``; v: x's shape, device, a floating dtype; the result
    has f(x)'s shape.  Every backend serves it (fused ones through their eager formulas,
    since custom kernels carry no tangents)."""
    _branch_input(branch, x)
    _check_direction("v", v, x)
    return _branch.branch_jvp(branch, x, v, resolve_backend(backend, x.device))
