"""Functional ops (docs/semantics.md §1–§4).  Every op takes ``backend=`` (None: the process
default, :func:`pyeuler.set_backend`).

Conventions of every docstring here: tensors are ``(N, C, *spatial)`` with 0–3 spatial dims
(``(N, C)`` for features), any memory format (contiguous or channels-last; results keep
x's); floating dtypes float16, bfloat16, float32 or float64, one device for all operands;
per-channel vectors are ``(C,)``.  Results have torch's promoted dtype of the operands.

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


def _public_doc(op, doc: str) -> None:
    """Give an op implemented in :mod:`pyeuler.ops` its public docstring, as torch documents
    its C++ functions from Python (``torch/_torch_docs.py``): the op itself is the public
    function (``pyeuler.functional.norm_act is pyeuler.ops.norm_act.norm_act``), the public
    documentation lives with the public API."""
    op.__doc__ = doc


_public_doc(norm_act, """``act(shortcut + h·Norm(x))`` with BatchNorm (``groups=0``) or GroupNorm(groups): the
    central op every pyeuler block is made of (docs/semantics.md §4).

    BatchNorm follows ``F.batch_norm``: batch statistics when ``training`` (running
    statistics updated in place when given and ``update_running``, together with
    ``num_batches_tracked`` if given; ``momentum=None`` is the cumulative average
    ``1/num_batches_tracked``, as in ``nn.BatchNorm``), running statistics otherwise.
    GroupNorm always uses per-sample statistics.  Statistics accumulate in float32 (float64
    for float64 inputs).

    Args:
        x: ``(N, C, *spatial)``, 0–3 spatial dims, floating point.
        weight: the affine scale γ, ``(C,)`` floating point, or None (1).
        bias: the affine shift β, ``(C,)`` floating point, or None (0).
        running_mean: ``(C,)`` floating point, or None; updated in place in training mode.
            Needed (with ``running_var``) for BatchNorm with ``training=False``.
        running_var: ``(C,)`` floating point, or None; stores the unbiased variance.
        training: BatchNorm with batch statistics (True) or running statistics (False);
            a bool.
        momentum: the running statistics' update weight: a float in [0, 1], a 0-dim
            floating-point tensor on the running statistics' device (not read on the host),
            or None for the cumulative average (needs ``num_batches_tracked``).
        eps: added to the variance, a finite float > 0.
        groups: 0 for BatchNorm, else the number of GroupNorm groups (divides C).
        shortcut: a tensor of x's shape added after the step, or None.
        h: the step factor: a finite float, a 0-dim tensor or a ``(C,)``/``(1,)`` tensor
            (learnable when it requires grad).
        relu: apply the ReLU (a bool).
        update_running: update the running statistics in training mode (False: leave them).
        num_batches_tracked: ``nn.BatchNorm``'s one-element int64 counter, incremented with
            each update; needs the running statistics.
        backend: ``"reference"``, ``"eager"``, ``"triton"``, ``"cuda"``, ``"auto"`` or None
            (the process default).
        return_stats: also return the statistics a backward pass needs (not with
            ``backend="reference"``).
        conv: a bias-free ``nn.Conv{1,2,3}d`` with numeric zero padding, or None.  Given
            (with ``relu=True``, no shortcut, ``h=1.0``), the result is
            ``conv(ReLU(Norm(x)))``; on the fused backends its backward recomputes the
            activation from x instead of keeping it.

    Returns:
        ``y``: x's shape (``conv``: the convolution's output shape, ``(N, C_out,
        *spatial')``), in the promoted dtype of x, the shortcut and a per-channel h, in
        x's memory format; with ``return_stats=True``, ``(y, stats)``, stats a
        ``pyeuler.ops.norm_act.NormStats`` (mean and variance: ``(C,)`` for BatchNorm,
        ``(N, groups)`` for GroupNorm, float32/float64).

    Raises:
        TypeError: x, a per-channel operand, the shortcut, h or ``num_batches_tracked`` of
            the wrong type (integer dtypes included); ``training``/``relu`` not bools;
            ``conv`` not a convolution.
        ValueError: a per-channel operand not ``(C,)``; a shortcut not of x's shape; an
            operand on another device; ``eps`` <= 0 or non-finite; ``momentum`` outside
            [0, 1] or None without ``num_batches_tracked``; an infinite h; ``groups`` not
            dividing C; one value per channel for batch statistics; only one of the
            running statistics; ``training=False`` BatchNorm without them; a ``conv`` that
            is biased, mismatched or combined with a shortcut, ``relu=False`` or h != 1;
            ``return_stats`` with ``backend="reference"``.
        RuntimeError: ``backend`` names a backend that is not available here (the message
            lists those that are).
    """)

_public_doc(scaled_residual_add, """``x + h·f`` in one pass: the explicit Euler step (docs/semantics.md §1).

    Args:
        x: the state, ``(N, C, *spatial)``, floating point.
        f: the branch's output, x's shape, on x's device, floating point.
        h: the step factor: a float, a 0-dim tensor or a ``(C,)`` tensor on x's device.

    Returns:
        x's shape, in torch's promoted dtype of x, f (and a tensor h).

    Raises:
        TypeError: x or f not a floating-point tensor; h neither a number nor a tensor.
        ValueError: x and f of different shapes or devices; h of another shape than
            ``()``/``(C,)`` or on another device.
    """)

_public_doc(ie_skip, """IE-Skip around a shape-preserving ``branch`` (Li, He & Lin, ICML 2020): ``x0 + f(x0)``
    refined by ``steps`` gradient steps toward the implicit (θ-method) Euler solution of
    ``x = x0 + θ·f(x) + (1−θ)·f(x0)``; docs/semantics.md §2 for the modes.  The functional
    form of :class:`pyeuler.nn.IESkip`.

    Args:
        branch: f, a module or callable mapping x to a tensor of x's shape; a
            :class:`pyeuler.nn.PreActBranch` takes the explicit-VJP fast path.
        x: x0, ``(N, C, *spatial)`` (or ``(N, D)``), any floating dtype.
        steps: K >= 0 (``grad="implicit"``: the solver's budget of branch evaluations,
            forward and backward each).
        step_size: γ > 0, finite (unused with ``grad="implicit"``).
        theta: θ in [0, 1].
        grad: ``"unrolled"`` (exact derivative of the K-step map), ``"detached"`` (the IE
            authors' gradient, that of x0 + f(x0)) or ``"implicit"`` (implicit function
            theorem; first-order reverse mode only).
        bn_update: ``"all"`` or ``"first"``: which branch evaluations update BatchNorm's
            running statistics in training mode.
        backend: the pyeuler backend, or None (the process default).
        tol: with ``grad="implicit"`` only: stop early at this relative residual
            ``‖x − c − θ·f(x)‖ / ‖c + θ·f(x)‖`` (> 0; read on the host every iteration);
            None runs the whole budget.
        recompute: ``grad="unrolled"`` on the fused backends, convolutional branches: True
            (default) keeps only the convolutions' inputs for the backward and recomputes
            ``ReLU(norm(·))`` and the VJP's norm input gradient there, an elementwise pass
            each (less memory); False keeps those activations (fewer bytes moved).

    Returns:
        x's shape, dtype and device.

    Raises:
        TypeError: ``branch`` not callable; x not a floating-point tensor; a branch that
            does not return one tensor; ``recompute`` not a bool.
        ValueError: bad ``steps``, ``step_size``, ``theta``, ``grad``, ``bn_update`` or
            ``tol``; a branch that does not preserve x's shape; dropout in training mode
            with ``grad="implicit"``.
        RuntimeError: an unavailable ``backend``; ``create_graph=True`` through
            ``grad="implicit"`` (at the backward pass).
        NotImplementedError: forward-mode AD or ``torch.func`` transforms through
            ``grad="implicit"``.
    """)


def bn_relu(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
            running_mean: Tensor | None = None, running_var: Tensor | None = None, *,
            training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
            backend: str | None = None) -> Tensor:
    """``ReLU(BN(x))``: the pre-activation head (:func:`norm_act` with ``groups=0``).

    Args:
        x: ``(N, C, *spatial)``, floating point.
        weight: γ, ``(C,)``, or None.
        bias: β, ``(C,)``, or None.
        running_mean: ``(C,)`` or None; updated in place in training mode.
        running_var: ``(C,)`` or None (unbiased variance); updated in place in training mode.
        training: batch statistics (True) or the running statistics (False).
        momentum: running-statistics update weight in [0, 1].
        eps: finite float > 0 added to the variance.
        backend: the pyeuler backend, or None (the process default).

    Returns:
        x's shape and dtype.

    Raises:
        TypeError, ValueError, RuntimeError: as :func:`norm_act`.
    """
    return norm_act(x, weight, bias, running_mean, running_var, training=training,
                    momentum=momentum, eps=eps, backend=backend)


def group_norm_relu(x: Tensor, num_groups: int = 1, weight: Tensor | None = None,
                    bias: Tensor | None = None, *, eps: float = 1e-5,
                    backend: str | None = None) -> Tensor:
    """``ReLU(GroupNorm(num_groups)(x))``: per-sample statistics over each group of channels
    and all spatial positions (1 group as in the IE authors' code).

    Args:
        x: ``(N, C, *spatial)``, floating point.
        num_groups: a positive int dividing C.
        weight: γ, ``(C,)``, or None.
        bias: β, ``(C,)``, or None.
        eps: finite float > 0 added to the variance.
        backend: the pyeuler backend, or None (the process default).

    Returns:
        x's shape and dtype.

    Raises:
        ValueError: ``num_groups`` not a positive int dividing C; else as :func:`norm_act`.
        TypeError, RuntimeError: as :func:`norm_act`.
    """
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    return norm_act(x, weight, bias, eps=eps, groups=num_groups, backend=backend)


def bn_add_relu(z: Tensor, shortcut: Tensor | None, h: float | Tensor = 1.0,
                weight: Tensor | None = None, bias: Tensor | None = None,
                running_mean: Tensor | None = None, running_var: Tensor | None = None, *,
                training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                relu: bool = True, backend: str | None = None) -> Tensor:
    """``ReLU(shortcut + h·BN(z))``: the post-activation tail of the Robust-ResNet block
    (docs/semantics.md §1).

    Args:
        z: the last convolution's output, ``(N, C, *spatial)``, floating point.
        shortcut: z's shape, or None (no residual).
        h: the step factor: a finite float, a 0-dim or a ``(C,)`` tensor (learnable if it
            requires grad).
        weight: γ, ``(C,)``, or None.
        bias: β, ``(C,)``, or None.
        running_mean: ``(C,)`` or None; updated in place in training mode.
        running_var: ``(C,)`` or None; updated in place in training mode.
        training: batch statistics (True) or the running statistics (False).
        momentum: running-statistics update weight in [0, 1].
        eps: finite float > 0 added to the variance.
        relu: apply the ReLU.
        backend: the pyeuler backend, or None (the process default).

    Returns:
        z's shape, in the promoted dtype of z, the shortcut and a per-channel h.

    Raises:
        TypeError, ValueError, RuntimeError: as :func:`norm_act`.
    """
    return norm_act(z, weight, bias, running_mean, running_var, training=training,
                    momentum=momentum, eps=eps, shortcut=shortcut, h=h, relu=relu,
                    backend=backend)


def ie_residual(x: Tensor, c: Tensor, fx: Tensor, theta: float = 1.0,
                backend: str | None = None) -> Tensor:
    """IE-Skip residual ``e = x − c − θ·f(x)`` (docs/semantics.md §2).

    Args:
        x: the iterate, ``(N, C, *spatial)``, floating point.
        c: ``x0 + (1−θ)·f(x0)``, x's shape and device, floating point (no broadcasting).
        fx: f(x), x's shape and device, floating point.
        theta: θ in [0, 1].
        backend: the pyeuler backend, or None (the process default).

    Returns:
        e: x's shape, in the promoted dtype of x, c and fx.

    Raises:
        TypeError: an operand not a floating-point tensor.
        ValueError: operands of different shapes or devices; θ outside [0, 1].
        RuntimeError: an unavailable ``backend``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    return _ie_residual(x, c, fx, theta, resolve_backend(backend, x.device))


def ie_update(x: Tensor, e: Tensor, v: Tensor, step_size: float = 0.1, theta: float = 1.0,
              backend: str | None = None) -> Tensor:
    """IE-Skip update ``x − 2γ·(e − θ·v)`` with ``v = J_fᵀ e`` (docs/semantics.md §2): one
    gradient step on ``‖x − c − θ·f(x)‖²``.

    Args:
        x: the iterate, ``(N, C, *spatial)``, floating point.
        e: the residual (:func:`ie_residual`), x's shape and device.
        v: ``J_f(x)ᵀ e`` (:func:`branch_vjp`), x's shape and device.
        step_size: γ, finite and > 0.
        theta: θ in [0, 1].
        backend: the pyeuler backend, or None (the process default).

    Returns:
        The next iterate: x's shape, in the promoted dtype of x, e and v.

    Raises:
        TypeError: an operand not a floating-point tensor.
        ValueError: operands of different shapes or devices; γ or θ out of range.
        RuntimeError: an unavailable ``backend``.
    """
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
    docs/semantics.md §3 (running statistics untouched; BatchNorm in training mode
    differentiates through the batch statistics).

    Args:
        branch: a :class:`pyeuler.nn.PreActBranch`.
        x: ``(N, C, *spatial)`` with the branch's spatial rank, floating point, the
            branch's parameter dtype (or under autocast).
        v: the cotangent, f(x)'s shape, on x's device, floating point.
        backend: the pyeuler backend, or None (the process default); ``"reference"`` runs
            the eager formulas.

    Returns:
        x's shape, in the computation's dtype.

    Raises:
        TypeError: a branch that is not a PreActBranch; x or v not floating-point tensors;
            x's dtype not the parameters' outside autocast.
        ValueError: x of the wrong rank; v of the wrong shape or device.
        RuntimeError: an unavailable ``backend``.
    """
    _branch_input(branch, x)
    name = resolve_backend(backend, x.device)
    name = "eager" if name == "reference" else name
    fx, cache = _branch.branch_forward(branch, x, name, update_running=False)
    _check_direction("v", v, fx)
    return _branch.branch_vjp(branch, cache, v, name)


def branch_jvp(branch, x: Tensor, v: Tensor, backend: str | None = None) -> Tensor:
    """``J_f(x) v`` for a :class:`pyeuler.nn.PreActBranch` ``f`` by forward-mode AD (no
    graph kept, running statistics untouched, dropout off): the stability diagnostics'
    primitive (docs/semantics.md §11).  Every backend serves it (fused ones through their
    eager formulas, since custom kernels carry no tangents).

    Args:
        branch: a :class:`pyeuler.nn.PreActBranch`.
        x: ``(N, C, *spatial)`` with the branch's spatial rank, floating point, the
            branch's parameter dtype (or under autocast).
        v: the tangent, x's shape, on x's device, floating point.
        backend: the pyeuler backend, or None (the process default).

    Returns:
        f(x)'s shape ``(N, out_channels, *spatial')``, in the computation's dtype.

    Raises:
        TypeError: a branch that is not a PreActBranch; x or v not floating-point tensors;
            x's dtype not the parameters' outside autocast.
        ValueError: x of the wrong rank; v of the wrong shape or device.
        RuntimeError: an unavailable ``backend``.
    """
    _branch_input(branch, x)
    _check_direction("v", v, x)
    return _branch.branch_jvp(branch, x, v, resolve_backend(backend, x.device))
