"""IE-Skip: the explicit Euler step followed by K gradient steps toward implicit Euler
(docs/semantics.md §2).

    c    = x0 + (1-θ)·f(x0)
    x⁽⁰⁾ = x0 + f(x0)
    x⁽ᵏ⁾ = x⁽ᵏ⁻¹⁾ − 2γ·(e − θ·J_f(x⁽ᵏ⁻¹⁾)ᵀ e),   e = x⁽ᵏ⁻¹⁾ − c − θ·f(x⁽ᵏ⁻¹⁾)

Two algorithms compute it:

- :func:`_ie_autograd`, the literal one: ``torch.autograd.grad`` of ‖e‖² (with
  ``create_graph`` for exact "unrolled" gradients).  It is the ``"reference"`` backend and
  the path for branches pyeuler does not know.
- :func:`_ie_explicit`, for :class:`pyeuler.nn.PreActBranch`: J_fᵀe written out
  (:func:`pyeuler.ops.preact_branch.branch_vjp`), no ‖e‖² reduction, no autograd inside
  the forward.  "unrolled" differentiates through those explicit ops (each differentiable
  once more); "detached" runs the correction under ``no_grad``.

``grad="implicit"`` is a third algorithm, :func:`_ie_implicit`: it solves
``x = c + θ·f(x)`` by Anderson-accelerated fixed-point iteration (``steps`` evaluations of
f) and differentiates by the implicit function theorem, ``u = (I − θ·J_fᵀ)⁻¹ ḡ`` solved the
same way, J_fᵀu explicit for a PreActBranch and by autograd otherwise.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
from torch import Tensor, nn

from pyeuler.backend import kernel_module as _kernels
from pyeuler.backend import resolve_backend
from pyeuler.ops import primitives
from pyeuler.ops.dispatch import (dual_level_open, forward_mode_active, func_transform_active,
                                  kernel_backend)
from pyeuler.ops.fixed_point import anderson
from pyeuler.ops.gradient_relay import GradientRelay, hand_on, incoming, mark_relaying
from pyeuler.ops.norm_act_fusions import cached_weight_casts
from pyeuler.ops.sync import refuse_synchronised
from pyeuler.ops.preact_branch import (branch_forward, branch_vjp, branch_vjp_ie_update,
                                       has_explicit_vjp)
from pyeuler.ops.residual import relayed_residual_add

__all__ = ["GRAD_MODES", "BN_UPDATES", "RECOMPUTE_POLICIES", "ie_skip", "ie_residual",
           "ie_residual_with_term", "ie_update", "validate_ie_args", "check_recompute"]

GRAD_MODES = ("unrolled", "detached", "implicit")
BN_UPDATES = ("all", "first")
# What the fused path of an unrolled IE-Skip recomputes in the backward instead of keeping
# (ie_skip's docstring; docs/benchmarks.md measures each).
RECOMPUTE_POLICIES = ("selective", "full", "none")


# ----------------------------------------------------------------------------------------
# Elementwise pieces.  Linear maps, so their backward is written with torch ops and stays
# differentiable (the "unrolled" gradient needs that).


@torch.library.custom_op("pyeuler::ie_residual", mutates_args=())
def _ie_residual_op(x: Tensor, c: Tensor, fx: Tensor, theta: float, backend: str) -> Tensor:
    return _kernels(backend).ie_residual(x, c, fx, theta)


@_ie_residual_op.register_fake
def _(x, c, fx, theta, backend):
    return torch.empty_like(x)


def _ie_residual_setup(ctx, inputs, output):
    x, c, fx, theta, _ = inputs
    ctx.theta, ctx.dtypes = theta, (x.dtype, c.dtype, fx.dtype)


def _ie_residual_backward(ctx, de):
    dx_dtype, dc_dtype, dfx_dtype = ctx.dtypes
    minus_de = -de
    # θ = 1 (the default): c's and f(x)'s gradients are one tensor, computed once
    dfx = minus_de if ctx.theta == 1.0 else -ctx.theta * de
    return de.to(dx_dtype), minus_de.to(dc_dtype), dfx.to(dfx_dtype), None, None


torch.library.register_autograd("pyeuler::ie_residual", _ie_residual_backward,
                                setup_context=_ie_residual_setup)


# ``(e, −2γ·e)`` and its adjoint: each is the other's VJP (both maps are linear), so the
# pair is differentiable to every order.  The adjoint's third output, dfx = −θ·u, is empty at
# θ = 1, where it equals dc (custom-op outputs may not alias each other).  The residual
# relays x's gradient (pyeuler.ops.gradient_relay): the adjoint adds the share handed to it
# to dx.  It relays c's too, where c is the block input x0: it hands dc on beside the shares
# of later residuals, for the branch evaluation at x0 to add.


@torch.library.custom_op("pyeuler::ie_residual_with_term", mutates_args=())
def _ie_residual_with_term_op(x: Tensor, c: Tensor, fx: Tensor, theta: float, step_size: float,
                              backend: str) -> tuple[Tensor, Tensor]:
    return _kernels(backend).ie_residual_with_term(x, c, fx, theta, step_size)


@_ie_residual_with_term_op.register_fake
def _(x, c, fx, theta, step_size, backend):
    return torch.empty_like(x), torch.empty_like(x)


def _with_term_setup(ctx, inputs, output):
    x, c, fx, theta, step_size, backend = inputs
    ctx.config, ctx.dtypes = (theta, step_size, backend), (x.dtype, c.dtype, fx.dtype)
    ctx.set_materialize_grads(False)
    mark_relaying(ctx, "x", "c")


def _with_term_backward(ctx, de, dterm):
    theta, step_size, backend = ctx.config
    # the gradient shares of x and c from their later readers, if relayed
    x_addends, c_shares = incoming(ctx, "x", at_most=1), incoming(ctx, "c")
    if de is None and dterm is None:
        return (hand_on(ctx, *x_addends), hand_on(ctx, *c_shares, input="c")) + (None,) * 4
    de = torch.zeros_like(dterm) if de is None else de
    dterm = torch.zeros_like(de) if dterm is None else dterm
    dx, dc, dfx = _ie_residual_with_term_adjoint_op(de, dterm.to(de.dtype), theta, step_size,
                                                    next(iter(x_addends), None), backend)
    dfx = dc if theta == 1.0 else dfx
    dx, dc, dfx = (g.to(dtype) for g, dtype in zip((dx, dc, dfx), ctx.dtypes))
    return hand_on(ctx, dx), hand_on(ctx, dc, *c_shares, input="c"), dfx, None, None, None


torch.library.register_autograd("pyeuler::ie_residual_with_term", _with_term_backward,
                                setup_context=_with_term_setup)


@torch.library.custom_op("pyeuler::ie_residual_with_term_adjoint", mutates_args=())
def _ie_residual_with_term_adjoint_op(de: Tensor, dterm: Tensor, theta: float, step_size: float,
                                      dx_addend: Tensor | None, backend: str
                                      ) -> tuple[Tensor, Tensor, Tensor]:
    dx, dc, dfx = _kernels(backend).ie_residual_with_term_adjoint(de, dterm, theta, step_size,
                                                                  dx_addend)
    return dx, dc, (de.new_empty(0) if theta == 1.0 else dfx)


@_ie_residual_with_term_adjoint_op.register_fake
def _(de, dterm, theta, step_size, dx_addend, backend):
    return (torch.empty_like(de), torch.empty_like(de),
            de.new_empty(0) if theta == 1.0 else torch.empty_like(de))


def _adjoint_setup(ctx, inputs, output):
    de, dterm, theta, step_size, dx_addend, backend = inputs
    ctx.config, ctx.dtypes = (theta, step_size, backend), (de.dtype, dterm.dtype)
    ctx.addend_dtype = None if dx_addend is None else dx_addend.dtype
    ctx.set_materialize_grads(False)


def _adjoint_backward(ctx, ddx, ddc, ddfx):
    theta, step_size, backend = ctx.config
    given = next((g for g in (ddx, ddc, ddfx) if g is not None and g.numel()), None)
    if given is None:
        return (None,) * 6
    ddx, ddc, ddfx = (g if g is not None and g.numel() else torch.zeros_like(given)
                      for g in (ddx, ddc, ddfx))
    dde, ddterm = _ie_residual_with_term_op(ddx, ddc, ddfx, theta, step_size, backend)
    # dx = u + dx_addend: the addend's gradient is dx's own
    daddend = ddx.to(ctx.addend_dtype) if ctx.needs_input_grad[4] else None
    return dde.to(ctx.dtypes[0]), ddterm.to(ctx.dtypes[1]), None, None, daddend, None


torch.library.register_autograd("pyeuler::ie_residual_with_term_adjoint", _adjoint_backward,
                                setup_context=_adjoint_setup)


@torch.library.custom_op("pyeuler::ie_update", mutates_args=())
def _ie_update_op(x: Tensor, e: Tensor, v: Tensor, step_size: float, theta: float,
                  backend: str) -> Tensor:
    return _kernels(backend).ie_update(x, e, v, step_size, theta)


@_ie_update_op.register_fake
def _(x, e, v, step_size, theta, backend):
    return torch.empty_like(x)


def _ie_update_setup(ctx, inputs, output):
    x, e, v, step_size, theta, _ = inputs
    ctx.coeffs, ctx.dtypes = (step_size, theta), (x.dtype, e.dtype, v.dtype)


def _ie_update_backward(ctx, dout):
    step_size, theta = ctx.coeffs
    dx_dtype, de_dtype, dv_dtype = ctx.dtypes
    return (dout.to(dx_dtype), (-2.0 * step_size * dout).to(de_dtype),
            (2.0 * step_size * theta * dout).to(dv_dtype), None, None, None)


torch.library.register_autograd("pyeuler::ie_update", _ie_update_backward,
                                setup_context=_ie_update_setup)


# ``x + (refined − x).detach()`` of a "detached" IE-Skip as one copy instead of a subtraction
# and an add (each reading two tensors and writing one): refined's value, x's gradient.


@torch.library.custom_op("pyeuler::value_with_gradient_of", mutates_args=())
def _value_with_gradient_of(value: Tensor, x: Tensor) -> Tensor:
    return value.clone()  # outputs never alias inputs


@_value_with_gradient_of.register_fake
def _(value, x):
    return torch.empty_like(value)


def _value_with_gradient_setup(ctx, inputs, output):
    ctx.x_dtype = inputs[1].dtype


def _value_with_gradient_backward(ctx, grad):
    return None, grad.to(ctx.x_dtype)


torch.library.register_autograd("pyeuler::value_with_gradient_of", _value_with_gradient_backward,
                                setup_context=_value_with_gradient_setup)


def _elementwise_operands(names: tuple[str, ...], tensors: tuple) -> tuple[Tensor, ...]:
    """Check the operands of an elementwise IE op (same shape, no broadcasting; one device;
    floating point) and return them in their promoted dtype, as torch's arithmetic would
    give it; metadata only.  The kernels read and write one dtype, x's."""
    first = tensors[0]
    for name, t in zip(names, tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.shape != first.shape:
            raise ValueError(f"{name} must have {names[0]}'s shape {tuple(first.shape)} (no "
                             f"broadcasting), got {tuple(t.shape)}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {names[0]} is on {first.device}")
    dtype = first.dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return (first.to(dtype),) + tuple(tensors[1:])


def _run_elementwise(names: tuple[str, ...], tensors: tuple, scalars: tuple, backend: str,
                     primitive, op):
    """Check the operands (:func:`_elementwise_operands`), then run the eager ``primitive``
    or, on a kernel backend, its custom ``op``."""
    operands = _elementwise_operands(names, tensors)
    backend = kernel_backend(backend, *operands)
    if backend in ("eager", "reference"):
        return primitive(*operands, *scalars)
    return op(*operands, *scalars, backend)


def _check_step_size(step_size) -> None:
    if (not isinstance(step_size, (int, float)) or isinstance(step_size, bool)
            or not 0.0 < step_size < math.inf):
        raise ValueError(f"step_size must be a finite float > 0, got {step_size!r}")


def _check_theta(theta) -> None:
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not 0.0 <= theta <= 1.0:
        raise ValueError(f"theta must be a float in [0, 1], got {theta!r}")


def ie_residual(x: Tensor, c: Tensor, fx: Tensor, theta: float, backend: str = "eager") -> Tensor:
    """``e = x − c − θ·f(x)`` (docs/semantics.md §2): x, c, fx of one shape (no broadcasting) on one
    device, any floating dtypes; returns their promoted dtype.  ``θ`` in [0, 1].  Raises
    ``TypeError``/``ValueError`` naming the bad argument."""
    _check_theta(theta)
    return _run_elementwise(("x", "c", "fx"), (x, c, fx), (theta,), backend,
                            primitives.ie_residual, _ie_residual_op)


def ie_residual_with_term(x: Tensor, c: Tensor, fx: Tensor, theta: float, step_size: float,
                          backend: str = "eager") -> tuple[Tensor, Tensor]:
    """``(e, −2γ·e)``: the residual ``e = x − c − θ·f(x)`` and its term in the IE step
    ``x − 2γ·(e − θ·v)`` (docs/semantics.md §2), from one pass; shapes, dtypes and errors
    as :func:`ie_residual`, ``γ`` (``step_size``) finite and > 0.  The branch VJP reads e
    and the fused step the term (:func:`pyeuler.ops.preact_branch.branch_vjp_ie_update`):
    each has one reader, so their gradients meet in this op's own backward, one fused
    pass (:func:`pyeuler.ops.primitives.ie_residual_with_term_adjoint`)."""
    _check_step_size(step_size)
    _check_theta(theta)
    return _run_elementwise(("x", "c", "fx"), (x, c, fx), (theta, step_size), backend,
                            primitives.ie_residual_with_term, _ie_residual_with_term_op)


def ie_update(x: Tensor, e: Tensor, v: Tensor, step_size: float, theta: float,
              backend: str = "eager") -> Tensor:
    """``x − 2γ·(e − θ·v)``, one gradient step on ‖x − c − θ·f(x)‖² with ``v = J_fᵀe``
    (docs/semantics.md §2): x, e, v of one shape on one device, any floating dtypes; returns their
    promoted dtype.  ``γ`` (``step_size``) finite and > 0, ``θ`` in [0, 1]."""
    _check_step_size(step_size)
    _check_theta(theta)
    return _run_elementwise(("x", "e", "v"), (x, e, v), (step_size, theta), backend,
                            primitives.ie_update, _ie_update_op)


# ----------------------------------------------------------------------------------------
# The two algorithms.


_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def _running_stats_frozen(module: nn.Module):
    """Let BatchNorms in ``module`` update throw-away copies of their running statistics
    (``bn_update="first"``).  The originals are swapped back untouched: restoring them in
    place would bump their version counters, which BatchNorm's autograd node checks."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
             and m.track_running_stats]
    originals = [[getattr(m, name) for name in _RUNNING] for m in norms]
    for m, buffers in zip(norms, originals):
        for name, buffer in zip(_RUNNING, buffers):
            setattr(m, name, buffer.clone())
    try:
        yield
    finally:
        for m, buffers in zip(norms, originals):
            for name, buffer in zip(_RUNNING, buffers):
                setattr(m, name, buffer)


def _ie_autograd(f, module, x0, steps, step_size, theta, grad, bn_update):
    fx0 = f(x0)
    _check_shape_preserving(fx0, x0)
    x = x0 + fx0
    if steps == 0:
        return x
    c = x0 if theta == 1.0 else x0 + (1.0 - theta) * fx0
    frozen = _running_stats_frozen(module) if bn_update == "first" else contextlib.nullcontext()
    if not torch.compiler.is_compiling() and (
            func_transform_active() or forward_mode_active(x0, *module.parameters())):
        with frozen:
            return _ie_functorch_steps(f, x, c, steps, step_size, theta, grad)
    outer_grad = torch.is_grad_enabled()
    # the inner gradient needs autograd, which torch.inference_mode turns off: step outside
    # it, on normal copies of its tensors (no graph reaches the caller's: it had none)
    inference = not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()
    escape = torch.inference_mode(False) if inference else contextlib.nullcontext()
    with frozen, escape, torch.enable_grad():
        if inference:
            x, c = x.clone(), c.clone()
        for _ in range(steps):
            create_graph = grad == "unrolled" and outer_grad and x.requires_grad
            xk = x if create_graph else x.detach().requires_grad_()
            e = xk - c - theta * f(xk)
            (grad_xk,) = torch.autograd.grad(e.pow(2).sum(), xk, create_graph=create_graph)
            if not create_graph:  # a constant step, also to forward mode ("detached")
                grad_xk = grad_xk.detach()
            with torch.set_grad_enabled(outer_grad):
                x = x - step_size * grad_xk
    return x


def _ie_functorch_steps(f, x, c, steps, step_size, theta, grad):
    """The K steps inside a ``torch.func`` transform, where ``torch.autograd.grad`` cannot
    run, or under forward-mode AD, which ``torch.autograd.grad`` only carries through a
    graph it was asked to build: ∇ₓ‖e‖² = 2·(∂e/∂x)ᵀe by ``torch.func.vjp``, which the
    outer transform differentiates ("unrolled") unless the step is detached."""
    for _ in range(steps):
        e, residual_vjp = torch.func.vjp(lambda z: z - c - theta * f(z), x)
        (half_grad,) = residual_vjp(e)
        step = (2.0 * step_size) * half_grad
        x = x - (step if grad == "unrolled" else step.detach())
    return x


def _refine(branch, x0, fx0, x, steps, step_size, theta, update_running, recompute, backend,
            x0_relay=None):
    c = x0 if theta == 1.0 else x0 + (1.0 - theta) * fx0
    x0_relay = x0_relay if c is x0 else None  # the residuals read x0 itself only at θ = 1
    recompute = recompute if torch.is_grad_enabled() else "none"
    for _ in range(steps):
        fx, cache = branch_forward(branch, x, backend, update_running=update_running,
                                   recompute=recompute)
        if torch.is_grad_enabled():  # the term spares the backward three passes
            e, residual_term = ie_residual_with_term(x, c, fx, theta, step_size, backend)
        else:  # no backward: one tensor fewer to write
            e, residual_term = ie_residual(x, c, fx, theta, backend), None
        relays = _step_relays(cache, x, e, x0_relay)
        x = branch_vjp_ie_update(branch, cache, e, step_size, theta, backend, residual_term,
                                 relays)
    return x


def _step_relays(cache, x, e, x0_relay):
    """The gradient relays (:mod:`pyeuler.ops.gradient_relay`) of one differentiable IE
    step on a fused backend: of x, read by the branch evaluation, the residual and the
    update, and of conv1's output, read by the evaluation and the VJP; None elsewhere.
    The residual joins ``x0_relay`` too, the relay of its c, the block input x0."""
    if x0_relay is not None:
        x0_relay.join(e.grad_fn, "c")
    if (not torch.is_grad_enabled() or not x.requires_grad or cache.readers is None
            or torch.compiler.is_compiling()):
        return None
    x_readers = GradientRelay(cache.readers[0])
    x_readers.join(e.grad_fn)
    return x_readers, GradientRelay(cache.readers[1])


def _ie_explicit(branch, x0, steps, step_size, theta, grad, bn_update, recompute, backend):
    # "unrolled" keeps K + 1 branch evaluations and K VJPs alive: recompute activations,
    # unless the caller has the memory and would rather save the passes (recompute="none").
    unrolled = grad == "unrolled" and steps > 0 and torch.is_grad_enabled()
    recompute = recompute if unrolled else "none"
    fx0, cache = branch_forward(branch, x0, backend, recompute=recompute)
    _check_shape_preserving(fx0, x0)
    # x0 + f(x0), and the relay of x0's gradient that the residuals join
    x, x0_relay = relayed_residual_add(x0, fx0, 1.0, cache.readers and cache.readers[0])
    if steps == 0:
        return x
    update_running = bn_update == "all"
    if grad == "unrolled" and torch.is_grad_enabled():
        return _refine(branch, x0, fx0, x, steps, step_size, theta, update_running, recompute,
                       backend, x0_relay)
    with torch.no_grad():
        refined = _refine(branch, x0, fx0, x, steps, step_size, theta, update_running, "none",
                          backend)
    if not torch.is_grad_enabled():
        return refined
    # "detached": the value of x⁽ᴷ⁾, the gradient of x0 + f(x0).
    if backend in ("eager", "reference") or torch.compiler.is_compiling():
        return x + (refined - x).detach()  # forward mode and torch.func take this path
    return _value_with_gradient_of(refined, x)


def _explicit_evaluator(branch, backend):
    """``evaluate(x, update_running, differentiable) → (f(x), vjp)`` for a PreActBranch:
    J_fᵀu by the explicit formula at the evaluated point, never autograd."""
    def evaluate(x, update_running, differentiable):
        with torch.set_grad_enabled(differentiable):
            fx, cache = branch_forward(branch, x, backend, update_running=update_running)
        return fx, lambda u: branch_vjp(branch, cache, u, backend)

    return evaluate


def _autograd_evaluator(f, module):
    """The same for any branch ``f``: J_fᵀu by ``torch.autograd.grad`` on a kept graph."""
    def evaluate(x, update_running, differentiable):
        frozen = contextlib.nullcontext() if update_running else _running_stats_frozen(module)
        if not differentiable:
            with frozen, torch.no_grad():
                return f(x), None
        point = x if x.requires_grad else x.detach().requires_grad_()  # x0 keeps its graph
        with frozen, torch.enable_grad():
            fx = f(point)
        return fx, lambda u: torch.autograd.grad(fx, point, u, retain_graph=True)[0]

    return evaluate


def _ie_implicit(evaluate, x0, steps, theta, tol, bn_update):
    """x* with ``x* = c + θ·f(x*)`` and its implicit-function-theorem gradient.

    Running statistics are updated by f(x0), and by the final f(x*) when
    ``bn_update="all"``; the solver's own evaluations (their number depends on ``tol``)
    never touch them.  The value returned is ``c + θ·f(x*)``, one Picard step past the
    solver's output, whose graph carries the gradient: a hook on it replaces the incoming
    ḡ by ``u = (I − θ·J_f(x*)ᵀ)⁻¹ ḡ``, which then flows to x0 and the parameters through
    c and f(x*) exactly as the theorem says.
    """
    fx0, _ = evaluate(x0, True, torch.is_grad_enabled())
    _check_shape_preserving(fx0, x0)
    c = x0 if theta == 1.0 else x0 + (1.0 - theta) * fx0
    with torch.no_grad():
        c_value = c.detach()
        x_star = anderson(lambda x: c_value + theta * evaluate(x, False, False)[0],
                          (x0 + fx0).detach(), steps, tol)
    differentiable = torch.is_grad_enabled()
    fx, vjp = evaluate(x_star, bn_update == "all", differentiable)
    out = c + theta * fx
    if differentiable and out.requires_grad and theta > 0.0:
        # the backward runs outside the caller's autocast region: J_fᵀu must see the same one
        device = x0.device.type
        autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))

        def implicit_gradient(grad_out):
            if grad_out is None:  # an undefined gradient stays undefined
                return None
            # The engine runs hooks in grad mode iff create_graph.  (Compiled graphs refuse
            # double backward themselves; dynamo traces this hook in grad mode.)
            if torch.is_grad_enabled() and not torch.compiler.is_compiling():
                raise RuntimeError(
                    "higher-order gradients (create_graph=True, e.g. a gradient penalty) of "
                    "grad='implicit' IE-Skips are not supported: the adjoint solve is not "
                    "differentiated.  Use grad='unrolled' for exact higher-order gradients")
            with torch.no_grad(), torch.autocast(autocast[0], dtype=autocast[1],
                                                 enabled=autocast[2]):
                return anderson(lambda u: grad_out + theta * vjp(u), grad_out, steps, tol)

        out.register_hook(implicit_gradient)
    return out


def _check_implicit_differentiation(x: Tensor, parameters) -> None:
    """``grad="implicit"`` differentiates through a backward hook that solves the adjoint
    equation: reverse mode, first order.  Refuse, rather than return a wrong derivative,
    what that cannot serve (forward mode would see the solver's output as a constant)."""
    if forward_mode_active(x, *parameters):
        raise NotImplementedError(
            "forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad) through "
            "grad='implicit' IE-Skips is not supported: use grad='unrolled', or "
            "pyeuler.functional.branch_jvp for J_f·v of the branch")
    if not torch.compiler.is_compiling() and func_transform_active():
        raise NotImplementedError(
            "torch.func transforms (vmap, grad, jacrev) over grad='implicit' IE-Skips are not "
            "supported (their gradient is a backward hook): use torch.autograd.grad or "
            ".backward(), or grad='unrolled'")


def _check_shape_preserving(fx0: Tensor, x0: Tensor) -> None:
    if not isinstance(fx0, Tensor):
        raise TypeError(f"an IE-Skip's branch must return one Tensor, got {type(fx0).__name__}")
    if fx0.shape != x0.shape:
        raise ValueError(f"an IE-Skip needs a shape-preserving branch: f(x) has shape "
                         f"{tuple(fx0.shape)} for x of shape {tuple(x0.shape)}")


def check_recompute(recompute) -> None:
    if isinstance(recompute, bool):
        raise TypeError(f"recompute must be one of {RECOMPUTE_POLICIES} (a policy, not a bool: "
                        f"True was 'full', False 'none'), got {recompute!r}")
    if not isinstance(recompute, str):
        raise TypeError(f"recompute must be one of {RECOMPUTE_POLICIES}, got "
                        f"{type(recompute).__name__} {recompute!r}")
    if recompute not in RECOMPUTE_POLICIES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_POLICIES}, got {recompute!r}")


def validate_ie_args(steps, step_size, theta, grad, bn_update, tol=None) -> None:
    """Clear errors for bad IE-Skip settings (also used by modules at construction)."""
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps (ie_steps) must be an int >= 0, got {steps!r}")
    for name, value in (("step_size (ie_step_size)", step_size), ("theta", theta)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{name} must be a Python float, got {type(value).__name__} "
                             f"{value!r}" + (" (pass float(...))" if isinstance(value, Tensor)
                                             else ""))
    if not 0.0 < step_size < math.inf:
        raise ValueError(f"step_size (ie_step_size) must be a finite float > 0, got {step_size!r}")
    if not 0.0 <= theta <= 1.0:
        raise ValueError(f"theta must be in [0, 1], got {theta!r}")
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")
    if bn_update not in BN_UPDATES:
        raise ValueError(f"bn_update must be one of {BN_UPDATES}, got {bn_update!r}")
    if tol is not None and (grad != "implicit" or not isinstance(tol, (int, float))
                            or isinstance(tol, bool) or not 0.0 < tol < math.inf):
        raise ValueError(f"tol must be None or > 0, and only with grad='implicit'; got tol={tol!r} "
                         f"with grad={grad!r}")


def ie_skip(branch, x: Tensor, steps: int = 1, step_size: float = 0.1, theta: float = 1.0,
            grad: str = "unrolled", bn_update: str = "all", backend: str | None = None, *,
            tol: float | None = None, recompute: str = "selective") -> Tensor:
    """IE-Skip around a shape-preserving ``branch``: x0 + f(x0) refined by ``steps`` gradient
    steps toward the implicit (θ-method) Euler solution.  See docs/semantics.md §2 for the modes.

    With ``grad="implicit"``, ``steps`` is the solver's budget of branch evaluations (forward
    and backward each) and ``tol`` an optional early stop on the relative residual
    ‖x − c − θ·f(x)‖ / ‖c + θ·f(x)‖ (it reads the residual on the host every iteration);
    ``step_size`` is unused.

    ``recompute`` (``grad="unrolled"`` on the fused path, convolutional branches), what the
    backward recomputes instead of keeping:

    - ``"selective"`` (default): the convolutions' inputs ``ReLU(norm(·))``, written again by
      the backward's reduce pass (one write each, no pass of its own); the VJP's norm input
      gradient is kept.
    - ``"full"``: that gradient too, by an elementwise pass (three per element): the least
      memory.
    - ``"none"``: keep everything: the fewest bytes moved, the most memory.

    The default is the measured trade (IE-WRN-34-10, K = 1, bf16: 43.8 GB moved per step
    and 0.61× the reference's saved activations, against 44.7 GB / 0.54× for "full" and
    43.5 GB / 0.88× for "none"; ``pyeuler cost --recompute`` and
    ``benchmarks/saved_activations.py`` measure each, docs/benchmarks.md §6).  The policy
    has no effect elsewhere (other gradient modes, the eager and reference backends,
    branches without convolutions).  Values agree across policies up to rounding: under
    autocast, ``"none"`` casts each conv weight per use, as ``nn.Conv2d`` does, and sums
    its gradients in float32, the others once per call, summing them in the autocast dtype.

    x is ``(N, C, *spatial)``, any floating dtype; the output has x's shape.  Raises
    ``ValueError`` for bad settings or a branch that does not preserve x's shape, and
    ``NotImplementedError``/``RuntimeError`` for what ``grad="implicit"`` cannot
    differentiate (forward mode, ``torch.func`` transforms, ``create_graph=True``).
    """
    if not callable(branch):
        raise TypeError(f"branch must be a callable module, got {type(branch).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point Tensor")
    validate_ie_args(steps, step_size, theta, grad, bn_update, tol)
    check_recompute(recompute)
    # parameters carry tangents only under forward-mode AD: don't walk the module otherwise
    parameters = (tuple(branch.parameters()) if isinstance(branch, nn.Module) and dual_level_open()
                  else ())
    name = kernel_backend(resolve_backend(backend, x.device), x, *parameters)
    if grad == "implicit" and steps > 0:
        _check_implicit_differentiation(x, parameters)
        if isinstance(branch, nn.Module):
            # each process's Anderson solver mixes iterates with coefficients of its own
            # shard, so the processes would not solve the global batch's fixed point
            refuse_synchronised(branch, "grad='implicit' IE-Skips",
                                "use grad='unrolled' (or 'detached'), or norm='group'")
    preact = has_explicit_vjp(branch)
    explicit = preact and name != "reference"
    if preact:
        if grad == "implicit" and branch.training and branch.dropout > 0:
            raise ValueError("grad='implicit' needs a deterministic branch: dropout must be 0 in "
                             "training mode (each evaluation would draw a new mask)")
        f = lambda inp: branch(inp, backend="reference")  # noqa: E731
    else:
        f = branch
    module = branch if isinstance(branch, nn.Module) else nn.Module()
    if grad == "implicit" and steps > 0:
        evaluate = _explicit_evaluator(branch, name) if explicit else _autograd_evaluator(f, module)
        return _ie_implicit(evaluate, x, steps, theta, tol, bn_update)
    if explicit:
        with cached_weight_casts():
            return _ie_explicit(branch, x, steps, step_size, theta, grad, bn_update,
                                recompute, name)
    return _ie_autograd(f, module, x, steps, step_size, theta, grad, bn_update)
