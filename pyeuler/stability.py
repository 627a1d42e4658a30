"""Stability diagnostics: the seed papers' stability conditions, measured on any model.

A residual block ``y = x + f(x)`` is one explicit Euler step of ``x' = f(x)``; an IE-Skip
approximates the implicit step ``y = x0 + f(y)``.  For a perturbation δ of the block's
input, to first order,

- the explicit step maps δ to ``(I + J_f(x))·δ``: it does not amplify any perturbation when
  ``‖I + J_f(x)‖₂ ≤ 1`` (Li, He & Lin, *Implicit Euler Skip Connections*, ICML 2020,
  Prop. 2);
- the exact implicit step maps δ to ``(I − J_f(y))⁻¹·δ``: it does not amplify when
  ``σ_min(I − J_f(y)) ≥ 1``, i.e. ``‖(I − J_f(y))⁻¹‖₂ ≤ 1`` (ibid., Prop. 3), and this
  second condition holds for a larger set of Jacobians than the first (ibid., Theorem 1;
  at one point, ‖I + J‖₂ ≤ 1 implies σ_min(I − J) ≥ 2 − ‖I + J‖₂ ≥ 1).
  The θ-method ``y = x0 + (1−θ)·f(x0) + θ·f(y)`` of pyeuler's IE-Skips has
  ``(I − θ·J_f(y))`` in place of ``(I − J_f(y))``.

:func:`explicit_step_lipschitz` and :func:`implicit_step_lipschitz` measure these two
numbers per sample, so that both conditions read "≤ 1".  :func:`model_stability` measures
them for every block of a pyeuler model, together with the quantities of the step-factor
paper (Zhang, Han, Wynter, Low & Kankanhalli, *Towards Robust ResNet: A Small Step but a
Giant Leap*, IJCAI 2019, §3.3: a small step factor h damps the growth of input noise
through depth) and the feature norms through depth whose growth Zhang & Schaeffer
(*Forward Stability of ResNet and Its Variants*, JMIV 2020) bound.

Conventions.  A "sample" is one row ``x[n]`` of a batch ``x`` of shape ``(N, D)`` or
``(N, C, *spatial)``; its Jacobian is the matrix of ``∂f(x)[n] / ∂x[n]`` over all its
``D = C·∏spatial`` entries, and ``‖·‖₂`` is the spectral norm of that matrix (the largest
ratio of Euclidean norms of output and input perturbations, a dimensionless number).  This
is only defined when the branch treats samples independently: BatchNorm with batch
statistics (training mode, or ``track_running_stats=False``) and active dropout raise
``ValueError`` naming the module (:func:`check_per_sample`).  Nothing here changes a
module's mode, parameters or buffers: BatchNorm runs with its running statistics (eval
mode), pyeuler's norms with ``update_running=False``.

Products with the Jacobian: for a :class:`pyeuler.nn.PreActBranch`, pyeuler's explicit
``J_fᵀu`` (docs/semantics.md §3, the fused kernels of the chosen backend) and its
forward-mode ``J_f v`` (:func:`pyeuler.functional.branch_jvp`); with
``backend="reference"``, or for any other module (and whole block maps), reverse-mode
autograd on a graph kept for ``J_fᵀu`` and ``torch.func.jvp`` for ``J_f v``.  Two methods,
each returning one value per sample:

- ``method="dense"``: each sample's Jacobian is formed from D products and its singular
  values are computed by ``torch.linalg.svdvals``: exact (to rounding in x's dtype), no
  iteration, no :class:`ConvergenceWarning`.  Refused (``ValueError`` naming the size) for
  samples of more than :data:`DENSE_LIMIT` entries, whose D×D matrices and O(D³) SVDs are
  out of reach; ``"auto"`` picks it for up to :data:`DENSE_MAX` entries.
- ``method="iterative"``: matrix-free power iteration and inverse iteration (conjugate
  gradients for the inner solves), deterministic given ``generator``; samples that do not
  converge within ``iters`` raise a :class:`ConvergenceWarning` naming them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from pyeuler.backend import resolve_backend
from pyeuler.nn.blocks import EulerBasicBlock, PreActBlock
from pyeuler.nn.branch import PreActBranch
from pyeuler.nn.ie_skip import IESkip
from pyeuler.ops import preact_branch as _pb
from pyeuler.ops.ie_skip import ie_skip

__all__ = ["ConvergenceWarning", "LipschitzInfo", "explicit_step_lipschitz",
           "implicit_step_lipschitz", "block_map_lipschitz", "check_per_sample",
           "singular_threshold", "find_blocks", "BlockStability", "ModelStability",
           "model_stability", "KINDS", "METHODS", "DENSE_MAX", "DENSE_LIMIT",
           "PASS_TOLERANCE"]

#: Block kinds :func:`model_stability` recognises, and what it measures for each.
KINDS = {
    "residual": "x + f(x): ‖I + J_f‖₂ and 1/σ_min(I − θJ_f) at x0",
    "ie-skip": ("IE-Skip around f: both at x0 and at the IE output, and ‖J_block‖₂ of the "
                "K-step map"),
    "post-activation": "ReLU(S(x) + h·F(x)): ‖J_block‖₂ of the whole block map only",
    "down-sampling": ("S(x) + h·F(x) with a projection shortcut: ‖J_block‖₂ of the whole "
                      "block map only"),
}


class ConvergenceWarning(RuntimeWarning):
    """An iterative estimate did not reach its tolerance within ``iters`` for some samples."""


class LipschitzInfo(NamedTuple):
    """Per-sample diagnostics of an estimate (``return_info=True``); all tensors ``[N]``.

    ``converged`` (bool): the estimate's relative change fell below ``tol`` (always True
    for ``method="dense"``, which computes the singular values exactly);
    ``iterations`` (int64): outer iterations run for that sample (power or inverse
    iterations, each one product with the operator and one with its transpose, plus the
    inner conjugate-gradient products for the inverse iteration; 0 for the dense method);
    ``singular`` (bool): σ_min was found below the singularity threshold (value +inf;
    always False for the explicit / block-map estimates).
    """

    converged: Tensor
    iterations: Tensor
    singular: Tensor


# ------------------------------------------------------------------------------- checks


def check_per_sample(module, argument: str = "branch") -> None:
    """Raise ``ValueError`` naming the first submodule of ``module`` that couples samples,
    is random, or would change its buffers when evaluated: BatchNorm (any ``_BatchNorm``,
    ``SyncBatchNorm`` included) in training mode or without running statistics, an
    instance norm tracking running statistics in training mode, dropout modules with
    ``p > 0`` in training mode, and :class:`pyeuler.nn.PreActBranch` with ``dropout > 0`` in
    training mode.  Calling ``.eval()`` on the model first fixes all of them.  Plain
    callables (not ``nn.Module``) are not checked.

    Args:
        module: the module (or callable) about to be differentiated per sample.
        argument: the name the error message gives ``module`` (e.g. ``"branch"``,
            ``"model"``); submodules are named ``argument.qualified_name``.

    Returns:
        None.

    Raises:
        ValueError: naming the first offending submodule and what to do.
    """
    if not isinstance(module, nn.Module):
        return
    for name, m in module.named_modules():
        label = f"{argument}.{name}" if name else argument
        kind = type(m).__name__
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.training:
                raise ValueError(
                    f"{label} ({kind}) is in training mode: it normalises with the batch's "
                    "statistics, which couples the samples, so per-sample Jacobians are not "
                    "defined (and evaluating it would update its running statistics); call "
                    ".eval() on the model first")
            if m.running_mean is None or not m.track_running_stats:
                raise ValueError(
                    f"{label} ({kind}) has no running statistics (track_running_stats=False): "
                    "it normalises with the batch's statistics even in eval mode, which "
                    "couples the samples, so per-sample Jacobians are not defined")
        elif (isinstance(m, nn.modules.batchnorm._NormBase) and m.training
              and m.track_running_stats):
            raise ValueError(f"{label} ({kind}) tracks running statistics in training mode: "
                             "evaluating it would change its buffers; call .eval() first")
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(f"{label} ({kind}, p={m.p}) is in training mode: a random map has "
                             "no Jacobian to measure; call .eval() first")
        if isinstance(m, PreActBranch) and m.training and m.dropout > 0:
            raise ValueError(f"{label} (PreActBranch, dropout={m.dropout}) is in training mode: "
                             "a random map has no Jacobian to measure; call .eval() first")


def _check_settings(iters, tol, theta=None) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (
            math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float))
                              or not 0.0 <= theta <= 1.0):
        raise ValueError(f"theta must be a number in [0, 1], got {theta!r}")


def _check_input(x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must be a batch (N, D) or (N, C, *spatial), got shape "
                         f"{tuple(x.shape)}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or infinite values")


# ------------------------------------------------------------------- batched linear algebra


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product, [N], accumulated in at least float32."""
    acc = torch.promote_types(a.dtype, torch.float32)
    return (a.to(acc) * b.to(acc)).flatten(1).sum(1)


def _norm(a: Tensor) -> Tensor:
    return _dot(a, a).clamp_min(0).sqrt()


def _col(s: Tensor, like: Tensor) -> Tensor:
    """[N] → broadcastable against ``like`` (N, ...), in like's dtype."""
    return s.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _unit_start(shape, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Random unit vector per sample, drawn in float32 on the generator's device (so the
    draw depends on the generator only), then moved to like's device and dtype."""
    device = generator.device if generator is not None else like.device
    v = torch.randn(shape, generator=generator, dtype=torch.float32, device=device)
    v = v.to(like.device, like.dtype)
    return v / _col(_norm(v).clamp_min(torch.finfo(torch.float32).tiny), v)


class _Operator:
    """A per-sample (block-diagonal) linear map given by batched products ``mv`` (x-shaped
    in, out_shape out) and ``rmv`` (its transpose)."""

    def __init__(self, mv: Callable[[Tensor], Tensor], rmv: Callable[[Tensor], Tensor],
                 in_shape: tuple, out_shape: tuple):
        self.mv, self.rmv, self.in_shape, self.out_shape = mv, rmv, in_shape, out_shape


def _jacobian(f: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, _Operator]:
    """``(f(x), J_f(x))``: J_fᵀu by reverse-mode autograd on a graph built once and kept
    (for pyeuler modules that graph runs their explicit formulas and fused kernels), J_f v
    by ``torch.func.jvp``.  Parameters are not differentiated."""
    point = x.detach().requires_grad_()
    with torch.enable_grad():
        fx = f(point)
    if not fx.requires_grad:  # f does not depend on x
        return fx.detach(), _Operator(lambda v: torch.zeros_like(fx), torch.zeros_like,
                                      tuple(x.shape), tuple(fx.shape))

    def mv(v):
        return torch.func.jvp(f, (x.detach(),), (v,))[1].detach()

    def rmv(u):
        (g,) = torch.autograd.grad(fx, point, u.to(fx.dtype), retain_graph=True)
        return g.detach()

    return fx.detach(), _Operator(mv, rmv, tuple(x.shape), tuple(fx.shape))


def _branch_jacobian(branch, x: Tensor, backend: str | None) -> tuple[Tensor, _Operator]:
    """J_f(x) of a branch: pyeuler's explicit products for a PreActBranch (forward-mode
    ``branch_jvp`` for J_f v, the backend's explicit ``branch_vjp`` kernels for J_fᵀu),
    torch.func for any other module or for ``backend="reference"`` (autograd through the
    reference algorithm: the oracle)."""
    if isinstance(branch, PreActBranch):
        _pb.check_input_rank(x, branch.conv1, "branch")
        name = resolve_backend(backend if backend is not None else branch.backend, x.device)
        if name == "reference":
            return _jacobian(lambda z: branch(z, backend="reference"), x)
        with torch.no_grad():
            fx, cache = _pb.branch_forward(branch, x, name, update_running=False)

        def mv(v):
            with torch.no_grad():
                return _pb.branch_jvp(branch, x, v, name)

        def rmv(u):
            with torch.no_grad():
                return _pb.branch_vjp(branch, cache, u, name)

        return fx, _Operator(mv, rmv, tuple(x.shape), tuple(fx.shape))
    return _jacobian(branch, x)


_REPLICA_ELEMENTS = 1 << 22  # entries of one replicated input in dense mode


def _dense_jacobian(make: Callable[[Tensor], tuple[Tensor, _Operator]], x: Tensor,
                    argument: str) -> tuple[Tensor, Tensor]:
    """``(f(x), J)`` with J the per-sample matrices [N, D_out, D_in] in x's dtype, formed
    from transposed products (row i of every sample's J is Jᵀe_i).  ``make(z)`` gives f(z)
    and its Jacobian operator; it is called once, on k copies of the batch, so that one
    product yields k rows of every sample's J (valid because samples are independent).
    Raises ValueError (:func:`_check_dense_size`) for outputs too large to form, and for
    Jacobians with non-finite entries, naming the samples."""
    n, d_in = x.shape[0], x[0].numel()
    k = max(1, min(d_in, _REPLICA_ELEMENTS // max(n * d_in, 1)))
    xr = x.repeat(k, *([1] * (x.dim() - 1)))
    fr, op = make(xr)
    d_out = fr[0].numel()
    _check_dense_size(tuple(x.shape[1:]), tuple(fr.shape[1:]), argument)
    m = x.new_empty(n, d_out, d_in)
    copies = torch.arange(k, device=x.device)
    for start in range(0, d_out, k):
        kk = min(k, d_out - start)
        u = x.new_zeros(k, n, d_out)
        u[copies[:kk], :, start + copies[:kk]] = 1
        g = op.rmv(u.view(fr.shape)).reshape(k, n, d_in)
        m[:, start:start + kk] = g[:kk].transpose(0, 1).to(x.dtype)
    bad = (~torch.isfinite(m).flatten(1).all(1)).nonzero().flatten().tolist()
    if bad:  # torch.linalg.svdvals would raise for NaN and return NaN for ±inf
        raise ValueError(f"{argument}: the Jacobian has non-finite entries at samples {bad[:10]}"
                         f"{' ...' if len(bad) > 10 else ''} (the map overflows there, or has "
                         "non-finite parameters)")
    return fr[:n], m


def _affine(jac: _Operator, scale: float) -> _Operator:
    """``I + scale·J`` for a square J."""
    return _Operator(lambda v: v + scale * jac.mv(v), lambda u: u + scale * jac.rmv(u),
                     jac.in_shape, jac.out_shape)


def _power_iteration(op: _Operator, like: Tensor, iters: int, tol: float,
                     generator) -> tuple[Tensor, Tensor, Tensor]:
    """σ_max of ``op`` per sample by power iteration on opᵀop.  Returns the estimate
    ``‖op·v‖`` (float64; a lower bound that increases monotonically), converged flags and
    the iteration counts."""
    n = like.shape[0]
    v = _unit_start(op.in_shape, like, generator)
    est = torch.zeros(n, dtype=torch.float64, device=like.device)
    done = torch.zeros(n, dtype=torch.bool, device=like.device)
    count = torch.zeros(n, dtype=torch.int64, device=like.device)
    tiny = torch.finfo(like.dtype).tiny
    for k in range(1, iters + 1):
        av = op.mv(v)
        sigma = _norm(av).double()
        w = op.rmv(av)
        wn = _norm(w)
        zero = sigma == 0  # the start vector lies in the null space: σ_max estimate 0
        new_v = w / _col(wn.clamp_min(tiny), w)
        ok = (sigma - est).abs() <= tol * sigma
        active = ~done
        est = torch.where(active, sigma, est)
        count = torch.where(active, torch.full_like(count, k), count)
        done = done | (active & ((ok & (k > 1)) | zero))
        v = torch.where(_col(done | (wn <= tiny), v) > 0, v, new_v.to(v.dtype))
        if bool(done.all()):
            break
    return est, done, count


def _conjugate_gradient(op: _Operator, b: Tensor, x0: Tensor, iters: int, tol: float):
    """Solve ``opᵀop·w = b`` per sample by conjugate gradients from ``x0``.  Returns
    ``(w, breakdown)``: breakdown marks samples where ``pᵀ(opᵀop)p`` vanished (opᵀop
    singular to working precision along the search direction)."""
    def m(p):
        return op.rmv(op.mv(p))

    w = x0
    r = b - m(w)
    p = r
    rs = _dot(r, r)
    bnorm = _norm(b)
    breakdown = torch.zeros_like(bnorm, dtype=torch.bool)
    eps = torch.finfo(b.dtype).eps
    for _ in range(iters):
        active = (rs.sqrt() > tol * bnorm) & ~breakdown
        if not bool(active.any()):
            break
        mp = m(p)
        pmp = _dot(p, mp)
        pp = _dot(p, p)
        broke = active & (pmp <= eps * eps * pp)
        breakdown = breakdown | broke
        active = active & ~broke
        alpha = torch.where(active, rs / torch.where(active, pmp, torch.ones_like(pmp)),
                            torch.zeros_like(rs))
        w = w + _col(alpha, p) * p
        r = r - _col(alpha, mp) * mp
        rs_new = _dot(r, r)
        beta = torch.where(active, rs_new / torch.where(active, rs, torch.ones_like(rs)),
                           torch.zeros_like(rs))
        p = torch.where(_col(active, p) > 0, r + _col(beta, p) * p, p)
        rs = torch.where(active, rs_new, rs)
    return w, breakdown


def _cg_solver(op: _Operator, cg_iters: int, cg_tol: float):
    return lambda b, guess: _conjugate_gradient(op, b, guess, cg_iters, cg_tol)


def singular_threshold(dtype: torch.dtype) -> float:
    """σ_min below which :func:`implicit_step_lipschitz` returns +inf by default:
    ``√eps`` of ``dtype`` (3.5e-4 in float32, 1.5e-8 in float64), the smallest σ_min that
    (I − θJ)ᵀ(I − θJ), whose eigenvalues are σ², resolves in that precision.

    Args:
        dtype: a floating ``torch.dtype``.

    Returns:
        ``√eps`` of ``dtype``, a Python float.

    Raises:
        TypeError: ``dtype`` is not a floating-point dtype (``torch.finfo``'s error).
    """
    return math.sqrt(torch.finfo(dtype).eps)


def _inverse_iteration(op: _Operator, like: Tensor, iters: int, tol: float, generator,
                       solve, threshold: float):
    """σ_min of a square ``op`` per sample by inverse iteration on opᵀop, each step a solve
    ``solve(v, guess)`` (conjugate gradients warm-started at ``guess = v/σ²``, exact for the
    converged singular vector).  The estimate ``‖op·v‖`` is an upper bound of σ_min.
    Returns (estimate float64, converged, iterations, singular)."""
    n = like.shape[0]
    v = _unit_start(op.in_shape, like, generator)
    est = _norm(op.mv(v)).double()
    done = torch.zeros(n, dtype=torch.bool, device=like.device)
    singular = torch.zeros_like(done)
    count = torch.zeros(n, dtype=torch.int64, device=like.device)
    tiny = torch.finfo(like.dtype).tiny
    for k in range(1, iters + 1):
        guess = v / _col(est.clamp_min(threshold) ** 2, v)
        w, breakdown = solve(v, guess)
        wn = _norm(w)
        finite = torch.isfinite(wn)
        new_v = w / _col(torch.where(finite, wn, torch.ones_like(wn)).clamp_min(tiny), w)
        sigma = _norm(op.mv(new_v)).double()
        sigma = torch.where(torch.isfinite(sigma), sigma, torch.zeros_like(sigma))
        active = ~done
        ok = (sigma - est).abs() <= tol * sigma
        low = active & ((sigma < threshold) | breakdown | ~finite)
        singular = singular | low
        est = torch.where(active, sigma, est)
        count = torch.where(active, torch.full_like(count, k), count)
        done = done | (active & (ok | low))
        v = torch.where(_col(done, v) > 0, v, new_v)
        if bool(done.all()):
            break
    singular = singular | (est < threshold)
    return est, done, count, singular


def _warn(fn: str, converged: Tensor, iters: int, tol: float) -> None:
    bad = (~converged).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(str(i) for i in bad[:10]) + (", ..." if len(bad) > 10 else "")
        warnings.warn(f"{fn}: {len(bad)} of {converged.numel()} samples did not converge "
                      f"within iters={iters} (tol={tol:g}): samples [{shown}]; their values "
                      "are the last iterate's (a lower bound of the norm)",
                      ConvergenceWarning, stacklevel=3)


def _prepare(branch, x, argument="branch"):
    check_per_sample(branch, argument)
    _check_input(x)
    return x.detach()


def _check_square(fx: Tensor, x: Tensor) -> None:
    if fx.shape != x.shape:
        raise ValueError(f"branch must preserve its input's shape (a residual branch f of "
                         f"x + f(x)): f(x) has shape {tuple(fx.shape)}, x has {tuple(x.shape)}")


METHODS = ("auto", "iterative", "dense")
#: A value counts as meeting its condition when ≤ 1 + PASS_TOLERANCE: the conditions can
#: hold with equality (a branch with GroupNorm has J_f·x = 0, so ‖I + J_f‖₂ ≥ 1), and the
#: estimates carry rounding and iteration error.
PASS_TOLERANCE = 1e-3
#: ``method="auto"`` forms dense Jacobians when a sample has at most this many entries.
DENSE_MAX = 1024
#: ``method="dense"`` refuses maps whose input or output has more entries per sample than
#: this: one sample's 4096×4096 Jacobian is 64 MiB in float32 and its SVD takes about 10 s
#: on two CPU cores (O(D³); 3×32×32 images fit, 16×32×32 feature maps do not).
DENSE_LIMIT = 4096
_DENSE_ELEMENTS = 1 << 23  # Jacobian entries per chunk of samples in dense mode


def _check_method(method) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _check_dense_size(in_shape: tuple, out_shape: tuple | None, argument: str) -> None:
    """ValueError when a per-sample Jacobian of a map from ``in_shape`` to ``out_shape``
    (one sample's shapes; None: not known yet, taken as ``in_shape``) is too large for
    ``method="dense"``."""
    d_in = math.prod(in_shape)
    d_out = d_in if out_shape is None else math.prod(out_shape)
    if max(d_in, d_out) > DENSE_LIMIT:
        which, d, shape = ("input", d_in, in_shape) if d_in >= d_out else ("output", d_out,
                                                                         out_shape)
        mib = d_in * d_out * 4 / 2 ** 20
        size = f"{mib:,.0f} MiB" if mib >= 1 else f"{mib * 1024:.0f} KiB"
        raise ValueError(
            f"{argument}: method='dense' is limited to DENSE_LIMIT = {DENSE_LIMIT} entries per "
            f"sample, and the {which} has {d} (shape {shape}): each sample's Jacobian would be "
            f"a {d_out}×{d_in} matrix ({size} in float32) and its SVD O(D³); use "
            "method='iterative' (matrix-free) instead")


def _chunks(x: Tensor, method: str, argument: str) -> tuple[bool, tuple]:
    d = x[0].numel() if x.shape[0] else 0
    dense = method == "dense" or (method == "auto" and d <= DENSE_MAX)
    if dense:
        _check_dense_size(tuple(x.shape[1:]), None, argument)
    size = max(1, _DENSE_ELEMENTS // max(d * d, 1)) if dense else max(x.shape[0], 1)
    return dense, x.split(size)


def _exact(values: Tensor, singular: Tensor | None = None) -> tuple[Tensor, LipschitzInfo]:
    """Values from singular value decompositions, with their info: converged, 0 iterations."""
    n, device = values.shape[0], values.device
    return values, LipschitzInfo(torch.ones(n, dtype=torch.bool, device=device),
                                 torch.zeros(n, dtype=torch.int64, device=device),
                                 torch.zeros(n, dtype=torch.bool, device=device)
                                 if singular is None else singular)


def _cat(parts) -> tuple[Tensor, LipschitzInfo]:
    return (torch.cat([p[0] for p in parts]),
            LipschitzInfo(*(torch.cat([p[1][i] for p in parts]) for i in range(3))))


def _step_numbers(branch, x, which, *, theta=1.0, iters=100, tol=1e-5, generator=None,
                  backend=None, method="auto", cg_iters=50, cg_tol=1e-4, singular_tol=None):
    """``{"explicit"|"implicit": (values [N], LipschitzInfo)}`` at x, for ``which``; the
    branch's Jacobian is formed once per chunk for both.  Dense: the extreme singular values
    of ``I + J`` and ``I − θJ`` by ``torch.linalg.svdvals`` (descending); iterative: power
    and inverse iteration."""
    dense, chunks = _chunks(x, method, "branch")
    threshold = singular_threshold(x.dtype) if singular_tol is None else float(singular_tol)
    parts = {w: [] for w in which}
    for xc in chunks:
        if dense:
            fx, m = _dense_jacobian(lambda z: _branch_jacobian(branch, z, backend), xc, "branch")
            _check_square(fx, xc)
            eye = torch.eye(m.shape[1], dtype=m.dtype, device=m.device)
            for w in which:
                if w == "explicit":
                    parts[w].append(_exact(torch.linalg.svdvals(eye + m)[:, 0]))
                else:
                    sigma = torch.linalg.svdvals(eye - float(theta) * m)[:, -1]
                    singular = sigma < threshold
                    inv = torch.where(singular, torch.full_like(sigma, math.inf), 1.0 / sigma)
                    parts[w].append(_exact(inv, singular))
            continue
        fx, jac = _branch_jacobian(branch, xc, backend)
        _check_square(fx, xc)
        for w in which:
            if w == "explicit":
                est, done, count = _power_iteration(_affine(jac, 1.0), xc, iters, tol, generator)
                parts[w].append((est.to(xc.dtype),
                                 LipschitzInfo(done, count, torch.zeros_like(done))))
            else:
                op = _affine(jac, -float(theta))
                sigma, done, count, singular = _inverse_iteration(
                    op, xc, iters, tol, generator, _cg_solver(op, cg_iters, cg_tol), threshold)
                inv = torch.where(singular, torch.full_like(sigma, math.inf),
                                  1.0 / sigma.clamp_min(threshold))
                parts[w].append((inv.to(xc.dtype), LipschitzInfo(done, count, singular)))
    return {w: _cat(p) for w, p in parts.items()}


def _map_numbers(f, x, *, iters=100, tol=1e-5, generator=None, method="auto",
                 argument="block"):
    dense, chunks = _chunks(x, method, argument)
    parts = []
    for xc in chunks:
        if dense:
            _, m = _dense_jacobian(lambda z: _jacobian(f, z), xc, argument)
            parts.append(_exact(torch.linalg.svdvals(m)[:, 0]))
            continue
        _, jac = _jacobian(f, xc)
        est, done, count = _power_iteration(jac, xc, iters, tol, generator)
        parts.append((est.to(xc.dtype), LipschitzInfo(done, count, torch.zeros_like(done))))
    return _cat(parts)


def _empty(x: Tensor):
    b = torch.zeros(0, dtype=torch.bool, device=x.device)
    return (torch.zeros(0, dtype=x.dtype, device=x.device),
            LipschitzInfo(b, torch.zeros(0, dtype=torch.int64, device=x.device), b))


# ------------------------------------------------------------------------ the two numbers


def explicit_step_lipschitz(branch, x: Tensor, *, iters: int = 100, tol: float = 1e-5,
                            generator: torch.Generator | None = None,
                            backend: str | None = None, method: str = "auto",
                            return_info: bool = False):
    """Per sample n, ``‖I + J_f(x_n)‖₂``: the Lipschitz constant, at x_n, of the explicit
    Euler step ``x ↦ x + f(x)`` with ``f = branch``.  The step does not amplify input
    perturbations (to first order) where the value is ≤ 1: Li, He & Lin (ICML 2020),
    Prop. 2.  With ``f = h·F`` a small step factor h pulls it towards 1 (Zhang et al.,
    IJCAI 2019).

    ``method="dense"`` forms each sample's D×D Jacobian from D products ``Jᵀe_i`` (in x's
    dtype) and returns the largest singular value of ``I + J`` from
    ``torch.linalg.svdvals``: exact to rounding, no iteration (``iters``, ``tol`` and
    ``generator`` are not used) and never a :class:`ConvergenceWarning`; refused for
    ``D > DENSE_LIMIT`` (4096).  ``method="iterative"``: power iteration on
    ``(I + J)ᵀ(I + J)``, batched over samples, each iteration one ``J v`` and one ``Jᵀu``.
    ``"auto"`` (default): dense when ``D ≤ DENSE_MAX`` (1024), else iterative.

    Args:
        branch: a shape-preserving module (or callable) ``f``, e.g. a
            :class:`pyeuler.nn.PreActBranch` (pyeuler's explicit products:
            :func:`pyeuler.functional.branch_jvp` for J v, the ``backend``'s explicit
            ``branch_vjp`` for Jᵀu; ``backend="reference"`` differentiates the reference
            algorithm with torch.func instead) or any other module (torch.func).  It must
            treat samples independently (:func:`check_per_sample`).
        x: ``(N, D)`` or ``(N, C, *spatial)``, floating point, finite: the points x_n.
        iters: maximum power iterations.
        tol: stop a sample when the estimate's relative change is ≤ tol.
        generator: the random start vectors' generator (deterministic given it; None: the
            global RNG).
        backend: pyeuler backend for a PreActBranch (None: the branch's, else the process
            default).
        method: ``"auto"``, ``"iterative"`` or ``"dense"`` (above).
        return_info: also return a :class:`LipschitzInfo`.

    Returns:
        ``Tensor[N]`` in x's dtype (dimensionless: the largest ratio of Euclidean norms of
        one sample's output and input perturbations): exact with the dense method; with
        the iterative one a lower bound that is exact on convergence.  With
        ``return_info=True``, ``(values, info)``.

    Raises:
        ValueError: naming a module that couples samples or is random (BatchNorm or
            dropout in training mode); a branch that does not preserve x's shape; bad
            ``iters``/``tol``/``method``; non-finite x; ``method="dense"`` for samples of
            more than :data:`DENSE_LIMIT` entries (naming the size; use
            ``method="iterative"``) or a Jacobian with non-finite entries.  TypeError: x
            not a floating-point tensor.

    Warns:
        ConvergenceWarning: naming the samples that did not converge within ``iters``
        (iterative method only).

    Never changes the branch's mode, parameters or buffers.
    """
    _check_settings(iters, tol)
    _check_method(method)
    x = _prepare(branch, x)
    if x.shape[0] == 0:
        values, info = _empty(x)
    else:
        values, info = _step_numbers(branch, x, ("explicit",), iters=iters, tol=tol,
                                     generator=generator, backend=backend,
                                     method=method)["explicit"]
        _warn("explicit_step_lipschitz", info.converged, iters, tol)
    return (values, info) if return_info else values


def implicit_step_lipschitz(branch, x: Tensor, *, theta: float = 1.0, iters: int = 100,
                            tol: float = 1e-5, generator: torch.Generator | None = None,
                            backend: str | None = None, method: str = "auto",
                            cg_iters: int = 50, cg_tol: float = 1e-4,
                            singular_tol: float | None = None, return_info: bool = False):
    """Per sample n, ``1/σ_min(I − θ·J_f(x_n)) = ‖(I − θ·J_f(x_n))⁻¹‖₂``: the Lipschitz
    constant of the exact implicit (θ-method) Euler step ``y = x0 + (1−θ)·f(x0) + θ·f(y)``
    with respect to x0, taken at its solution ``x_n = y`` (for θ < 1 the factor
    ``(I + (1−θ)·J_f(x0))`` is left out).  The step does not amplify perturbations where
    the value is ≤ 1, i.e. ``σ_min(I − J_f) ≥ 1``: Li, He & Lin (ICML 2020), Prop. 3; their
    Theorem 1 shows this holds for more Jacobians than the explicit step's
    ``‖I + J_f‖₂ ≤ 1`` (:func:`explicit_step_lipschitz`), so both conditions read "≤ 1".

    ``method="dense"`` (``"auto"``: when D ≤ 1024) forms the Jacobians and returns
    ``1/σ_min`` from ``torch.linalg.svdvals`` of ``I − θJ``: exact to rounding, no
    iteration, never a :class:`ConvergenceWarning`; refused for ``D > DENSE_LIMIT`` (4096).
    ``method="iterative"``: inverse iteration on ``(I − θJ)ᵀ(I − θJ)``, each iteration
    solving ``(I − θJ)ᵀ(I − θJ)·w = v`` by at most ``cg_iters`` conjugate-gradient steps
    (relative residual ``cg_tol``; each step one J v and one Jᵀu), warm-started at
    ``v/σ²``.  The inner solves need not be accurate (the estimate is the Rayleigh quotient
    ``‖(I − θJ)v‖`` of the iterate, exact for whatever v), but CG needs about κ(I − θJ)
    steps, so near-singular steps converge slowly; the estimate stays a lower bound, so a
    value > 1 is a certain failure of the condition.

    Args:
        branch, x, iters, tol, generator, backend, method, return_info: as in
            :func:`explicit_step_lipschitz` (``iters``: outer inverse iterations).
        theta: θ in [0, 1] (1: the implicit Euler step of Prop. 3).
        cg_iters, cg_tol: the inner solver's budget and relative residual (iterative
            method).
        singular_tol: σ_min below which the value is +inf (the step is singular, or too
            close to singular to resolve); default ``√eps`` of x's dtype
            (:func:`singular_threshold`: 3.5e-4 in float32, 1.5e-8 in float64).  Also
            +inf where the conjugate-gradient solve breaks down (``pᵀAp`` ≈ 0).  Never NaN.

    Returns:
        ``Tensor[N]`` in x's dtype, dimensionless, in ``(0, +inf]``: exact with the dense
        method; with the iterative one a lower bound of ``‖(I − θJ)⁻¹‖₂`` that is exact on
        convergence (its σ_min estimate ``‖(I − θJ)v‖`` is an upper bound).  With
        ``return_info=True``, ``(values, info)``, ``info.singular`` marking the +inf
        samples.

    Raises:
        As :func:`explicit_step_lipschitz`, and ValueError for θ outside [0, 1].

    Warns:
        ConvergenceWarning: naming the samples that did not converge within ``iters``
        (iterative method only).
    """
    _check_settings(iters, tol, theta)
    _check_settings(cg_iters, cg_tol)
    _check_method(method)
    if singular_tol is not None and (isinstance(singular_tol, bool) or not isinstance(
            singular_tol, (int, float)) or not (math.isfinite(singular_tol) and singular_tol > 0)):
        raise ValueError(f"singular_tol must be a finite number > 0, got {singular_tol!r}")
    x = _prepare(branch, x)
    if x.shape[0] == 0:
        values, info = _empty(x)
    else:
        values, info = _step_numbers(branch, x, ("implicit",), theta=theta, iters=iters,
                                     tol=tol, generator=generator, backend=backend,
                                     method=method, cg_iters=cg_iters, cg_tol=cg_tol,
                                     singular_tol=singular_tol)["implicit"]
        _warn("implicit_step_lipschitz", info.converged, iters, tol)
    return (values, info) if return_info else values


def block_map_lipschitz(block, x: Tensor, *, iters: int = 100, tol: float = 1e-5,
                        generator: torch.Generator | None = None, method: str = "auto",
                        return_info: bool = False):
    """Per sample n, ``‖J_g(x_n)‖₂`` of a whole block map ``g = block`` (any module or
    callable; input and output shapes may differ), from ``torch.linalg.svdvals`` of the
    formed Jacobian (``method="dense"``, exact) or by power iteration on ``J_gᵀJ_g`` with
    torch.func products (``"iterative"``): the local Lipschitz constant where the two step
    conditions do not apply, e.g. post-activation blocks ``ReLU(S(x) + h·F(x))`` (Zhang et
    al., IJCAI 2019) and down-sampling blocks.

    Args:
        block: the block map g, any module or callable on x; it must treat samples
            independently (:func:`check_per_sample`).
        x: ``(N, D)`` or ``(N, C, *spatial)``, floating point, finite.
        iters: maximum power iterations.
        tol: stop a sample when the estimate's relative change is ≤ tol.
        generator: the random start vectors' generator (None: the global RNG).
        method: ``"auto"``, ``"iterative"`` or ``"dense"`` (as
            :func:`explicit_step_lipschitz`; dense is refused when the input or the output
            has more than :data:`DENSE_LIMIT` entries per sample).
        return_info: also return a :class:`LipschitzInfo`.

    Returns:
        ``Tensor[N]`` in x's dtype, dimensionless: exact with the dense method, a lower
        bound of ``‖J_g(x_n)‖₂`` that is exact on convergence with the iterative one; with
        ``return_info=True``, ``(values, info)``.

    Raises:
        ValueError: a module that couples samples or is random (naming it); bad
            ``iters``/``tol``/``method``; non-finite x; ``method="dense"`` beyond
            :data:`DENSE_LIMIT` (naming the size) or a non-finite Jacobian.
        TypeError: x not a floating-point tensor.

    Warns:
        ConvergenceWarning: naming the samples that did not converge within ``iters``
        (iterative method only).
    """
    _check_settings(iters, tol)
    _check_method(method)
    x = _prepare(block, x, "block")
    if x.shape[0] == 0:
        values, info = _empty(x)
    else:
        values, info = _map_numbers(block, x, iters=iters, tol=tol, generator=generator,
                                    method=method)
        _warn("block_map_lipschitz", info.converged, iters, tol)
    return (values, info) if return_info else values


# -------------------------------------------------------------------------- whole models


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The residual blocks of a pyeuler model, in registration (= execution, for pyeuler's
    sequential builders) order: :class:`~pyeuler.nn.PreActBlock` (and bottlenecks),
    :class:`~pyeuler.nn.EulerBasicBlock` and :class:`~pyeuler.nn.IESkip`, outermost only.

    Args:
        model: any ``nn.Module``.

    Returns:
        ``[(qualified name, module)]``; the model's class name when the model is itself a
        block; empty when it holds none.

    Raises:
        AttributeError: ``model`` is not an ``nn.Module`` (has no ``named_modules``).
    """
    found, inside = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, (PreActBlock, EulerBasicBlock, IESkip)):
            found.append((name or type(m).__name__, m))
            if not name:  # the model is itself one block
                break
            inside.append(name)
    return found


def _block_spec(block: nn.Module) -> dict:
    """What a block is: kind, branch f, IE settings, description."""
    if isinstance(block, IESkip):
        return dict(kind="ie-skip", branch=block.branch, steps=block.steps,
                    step_size=block.step_size, theta=block.theta, grad=block.grad,
                    bn_update=block.bn_update, tol=block.tol,
                    backend=block.backend or getattr(block.branch, "backend", None),
                    h=_h_of(block.branch))
    if isinstance(block, EulerBasicBlock):
        return dict(kind="post-activation", branch=None, steps=0, theta=None, h=_h_of(block),
                    downsample=len(block.shortcut) > 0)
    if isinstance(block, PreActBlock):
        base = dict(branch=block.branch, h=_h_of(block.branch),
                    backend=getattr(block.branch, "backend", None))
        if block.shortcut is not None:
            return dict(base, kind="down-sampling", branch=None, steps=0, theta=None)
        if block.steps > 0:
            return dict(base, kind="ie-skip", steps=block.steps, step_size=block.step_size,
                        theta=block.theta, grad=block.grad, bn_update=block.bn_update, tol=None)
        return dict(base, kind="residual", steps=0, theta=None)
    raise TypeError(f"not a pyeuler block: {type(block).__name__}")


def _h_of(module) -> float | list | None:
    h = getattr(module, "h", None)
    if isinstance(h, Tensor):
        return h.detach().flatten().tolist() if h.numel() > 1 else float(h)
    return h


def _summary(values: Tensor | None) -> dict | None:
    """mean, median, std, min, max over samples and the fraction ≤ 1 + PASS_TOLERANCE
    (inf counts as failing)."""
    if values is None:
        return None
    v = values.detach().double().cpu()
    finite = v[torch.isfinite(v)]
    return dict(mean=float(v.mean()) if len(finite) == len(v) and len(v) else
                (math.inf if len(v) else math.nan),
                median=float(v.median()) if len(v) else math.nan,
                std=float(finite.std()) if len(finite) > 1 else 0.0,
                min=float(v.min()) if len(v) else math.nan,
                max=float(v.max()) if len(v) else math.nan,
                pass_rate=float((v <= 1.0 + PASS_TOLERANCE).double().mean())
                if len(v) else math.nan)


@dataclass
class BlockStability:
    """One block's diagnostics; the per-sample tensors are ``[N]`` (None: not applicable).

    ``explicit_x0`` ‖I + J_f(x0)‖₂ and ``implicit_x0`` 1/σ_min(I − θJ_f(x0)) for blocks of
    the form x + f(x) (kinds "residual" and "ie-skip"; θ the block's, 1 for "residual");
    ``explicit_out`` / ``implicit_out`` the same at the IE output (kind "ie-skip");
    ``map_lipschitz`` ‖J_block(x0)‖₂ of the whole block map as the network runs it: the
    K-step IE map for "ie-skip" (None for ``grad="implicit"``, whose map is a solver),
    the only quantity for "post-activation" and "down-sampling", and by definition equal
    to ``explicit_x0`` for "residual" (not recomputed).  ``converged``: fraction of
    samples whose estimate converged, per quantity."""

    index: int
    name: str
    kind: str
    in_shape: tuple
    out_shape: tuple
    h: float | list | None = None
    ie_steps: int = 0
    theta: float | None = None
    explicit_x0: Tensor | None = None
    implicit_x0: Tensor | None = None
    explicit_out: Tensor | None = None
    implicit_out: Tensor | None = None
    map_lipschitz: Tensor | None = None
    converged: dict = field(default_factory=dict)
    note: str = ""

    QUANTITIES = ("explicit_x0", "implicit_x0", "explicit_out", "implicit_out", "map_lipschitz")

    def pass_rate(self, quantity: str) -> float | None:
        """Fraction of samples whose ``quantity`` is ≤ 1 (+ :data:`PASS_TOLERANCE`; None:
        not measured)."""
        v = getattr(self, quantity)
        return None if v is None else float((v <= 1.0 + PASS_TOLERANCE).double().mean())

    def to_dict(self, per_sample: bool = False) -> dict:
        """Summaries of each quantity (and, with ``per_sample``, its values as lists)."""
        d = dict(index=self.index, name=self.name, kind=self.kind, measures=KINDS[self.kind],
                 in_shape=list(self.in_shape), out_shape=list(self.out_shape), h=self.h,
                 ie_steps=self.ie_steps, theta=self.theta, converged=self.converged,
                 note=self.note)
        for q in self.QUANTITIES:
            d[q] = _summary(getattr(self, q))
            if per_sample and getattr(self, q) is not None:
                d[q]["values"] = getattr(self, q).detach().double().cpu().tolist()
        return d


@dataclass
class ModelStability:
    """:func:`model_stability`'s result.  ``noise_amplification`` and ``feature_norms`` are
    ``[B + 1, N]``: row 0 is the first block's input x0, row k the output of block k."""

    blocks: list
    noise_amplification: Tensor
    feature_norms: Tensor
    settings: dict

    def depth_curve(self, which: str) -> dict:
        """Mean, std, median and quartiles over samples per depth of
        ``"noise_amplification"`` or ``"feature_norms"``."""
        t = getattr(self, which).double().cpu()
        q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=t.dtype), dim=1)
        return dict(mean=t.mean(1).tolist(),
                    std=(t.std(1) if t.shape[1] > 1 else torch.zeros(t.shape[0])).tolist(),
                    q25=q[0].tolist(), median=q[1].tolist(), q75=q[2].tolist())

    def to_dict(self, per_sample: bool = False) -> dict:
        """JSON-ready: per-block summaries (mean, median, std, min, max, pass_rate of each
        quantity over samples) and the depth curves, with ``per_sample`` also every value
        (blocks' ``values``, depth curves' ``values`` [depth][sample]); +inf is written as
        the string "inf"."""
        curves = {k: self.depth_curve(k) for k in ("noise_amplification", "feature_norms")}
        if per_sample:
            for k, c in curves.items():
                c["values"] = getattr(self, k).double().cpu().tolist()
        return _json_safe(dict(settings=self.settings,
                               blocks=[b.to_dict(per_sample) for b in self.blocks],
                               depth=list(range(len(self.blocks) + 1)), **curves))

    def table(self) -> str:
        """A per-block text table: medians over samples and, in brackets, the percentage of
        samples meeting each condition (≤ 1); noise amplification and ‖x‖: means."""
        def cell(b, q):
            v = getattr(b, q)
            if v is None:
                return "—"
            s = _summary(v)
            return f"{_fmt(s['median'])} [{100 * s['pass_rate']:.0f}%]"

        head = ["#", "block", "kind", "‖I+J_f‖ @x0", "1/σmin(I−θJ_f) @x0", "‖I+J_f‖ @IE out",
                "1/σmin @IE out", "‖J_block‖₂", "noise amp", "‖x‖"]
        rows = [head]
        amp = self.noise_amplification.double().mean(1).tolist()
        norms = self.feature_norms.double().mean(1).tolist()
        rows.append(["0", "(input x0)", "", "", "", "", "", "", _fmt(amp[0]), _fmt(norms[0])])
        for b in self.blocks:
            rows.append([str(b.index + 1), b.name, b.kind] + [cell(b, q) for q in b.QUANTITIES]
                        + [_fmt(amp[b.index + 1]), _fmt(norms[b.index + 1])])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _json_safe(obj):
    """Non-finite floats as strings ("inf", "-inf", "nan"): strict JSON has no infinity."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "inf" if v > 0 else "nan"
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def _capture(model, blocks, x, perturb_first=None):
    """Run ``model(x)`` and return the first block's input and every block's output (and
    input), optionally adding ``perturb_first`` to the first block's input."""
    inputs, outputs, handles = {}, {}, []

    def pre(i):
        def hook(module, args):
            if i == 0 and perturb_first is not None:
                return (args[0] + perturb_first,) + tuple(args[1:])
            return None
        return hook

    def post(i):
        def hook(module, args, out):
            inputs[i] = args[0].detach()
            outputs[i] = out.detach()
        return hook

    try:
        for i, (_, b) in enumerate(blocks):
            handles.append(b.register_forward_pre_hook(pre(i)))
            handles.append(b.register_forward_hook(post(i)))
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    missing = [blocks[i][0] for i in range(len(blocks)) if i not in outputs]
    if missing:
        raise ValueError(f"model_stability: blocks {missing} did not run in model(x)")
    return [inputs[i] for i in range(len(blocks))], [outputs[i] for i in range(len(blocks))]


def _ie_map(spec: dict) -> Callable[[Tensor], Tensor]:
    return lambda z: ie_skip(spec["branch"], z, spec["steps"], spec["step_size"], spec["theta"],
                             "unrolled", spec["bn_update"], spec.get("backend"))


def _chunk_block(spec, block, x0, y, theta, backend, opts):
    """Per-sample quantities of one block on one chunk: {quantity: (values, info)}."""
    out = {}
    kind = spec["kind"]
    if kind in ("residual", "ie-skip"):
        branch = spec["branch"]
        b = backend if backend is not None else spec.get("backend")
        th = theta if theta is not None else (spec["theta"] if kind == "ie-skip" else 1.0)
        at_x0 = _step_numbers(branch, x0, ("explicit", "implicit"), theta=th, backend=b, **opts)
        out["explicit_x0"], out["implicit_x0"] = at_x0["explicit"], at_x0["implicit"]
        if kind == "ie-skip":
            at_y = _step_numbers(branch, y, ("explicit", "implicit"), theta=th, backend=b, **opts)
            out["explicit_out"], out["implicit_out"] = at_y["explicit"], at_y["implicit"]
            if spec["grad"] != "implicit":
                out["map_lipschitz"] = _map_numbers(_ie_map(spec), x0, **_map_opts(opts))
        else:
            out["map_lipschitz"] = out["explicit_x0"]
    else:
        out["map_lipschitz"] = _map_numbers(block, x0, **_map_opts(opts))
    return out


def _map_opts(opts: dict) -> dict:
    return {k: opts[k] for k in ("iters", "tol", "generator", "method")}


def model_stability(model: nn.Module, x: Tensor, *, iters: int = 100, tol: float = 1e-5,
                    theta: float | None = None, noise_scale: float = 1e-2, noise_draws: int = 1,
                    perturb: str = "state", batch_size: int | None = None,
                    generator: torch.Generator | None = None, backend: str | None = None,
                    method: str = "auto", cg_iters: int = 50, cg_tol: float = 1e-4,
                    progress: bool | None = False, warn: bool = True) -> ModelStability:
    """Stability diagnostics of every block of a pyeuler model at the inputs ``x``.

    For block k (:func:`find_blocks`) with input ``x0`` (as the model runs it on ``x``) and
    output ``y``, per sample (:class:`BlockStability`):

    - blocks ``x + f(x)`` ("residual", and "ie-skip" for IE-Skips): the explicit-step
      number ``‖I + J_f‖₂`` (Li et al. Prop. 2) and the implicit-step number
      ``1/σ_min(I − θJ_f)`` (Prop. 3, θ the block's, 1 for plain blocks, or ``theta``) at
      x0, and, for IE-Skips, both again at the IE output y (where the implicit step's
      Jacobian is taken), plus ``‖J_block‖₂`` of the K-step map the network really runs;
    - post-activation blocks ``ReLU(S(x) + h·F(x))`` and down-sampling blocks: only
      ``‖J_block‖₂`` of the whole block map, labelled as such (the two conditions concern
      maps of the form x + f(x));

    and through depth (:class:`ModelStability`, rows 0..B):

    - ``noise_amplification[k, n] = ‖x_k(x + δ) − x_k(x)‖ / ‖δ‖`` for Gaussian δ
      (Zhang et al., IJCAI 2019, §3.3), averaged over ``noise_draws`` draws.  With
      ``perturb="state"`` (default) δ is added to the first block's input x0 (the ODE's
      initial value, so row 0 is 1 and the curve shows what the blocks do); with
      ``perturb="input"`` to the model's input x (row 0 then includes the stem).  δ has
      i.i.d. entries of std ``noise_scale·‖s_n‖/√D`` for the perturbed tensor s (so
      ‖δ_n‖ ≈ noise_scale·‖s_n‖);
    - ``feature_norms[k, n] = ‖x_k‖`` (Zhang & Schaeffer, JMIV 2020).

    Args:
        model: a pyeuler model (``PreActNet``, ``ResNetCifar``, or any module containing
            pyeuler blocks that run in model(x)); must treat samples independently
            (:func:`check_per_sample`: call ``.eval()`` on BatchNorm models).
        x: a batch of model inputs, floating point (N ≥ 1).
        iters, tol, method, cg_iters, cg_tol: as in :func:`implicit_step_lipschitz`
            (``method="dense"`` is refused before any measurement when a block's input or
            output has more than :data:`DENSE_LIMIT` entries per sample).
        theta: θ in [0, 1] of every block's implicit-step number; None: each IE-Skip's
            own θ, 1 for plain blocks.
        noise_scale: relative size of the Gaussian perturbation δ, a finite float > 0
            (above).
        noise_draws: number of δ draws averaged, a positive int.
        perturb: ``"state"`` (δ on the first block's input) or ``"input"`` (δ on x).
        batch_size: samples per chunk (None: all at once).
        generator: random start vectors and noise; deterministic given it.
        backend: pyeuler backend for the branches' explicit products (None: each branch's).
        progress: a tqdm bar over blocks (None: when stderr is a terminal).
        warn: one :class:`ConvergenceWarning` summarising non-converged estimates
            (iterative method only: the dense one computes exact values).

    Returns:
        :class:`ModelStability`.  Never changes the model's mode, parameters or buffers.

    Raises:
        ValueError: a module that couples samples or is random (naming it), a model without
            pyeuler blocks, an empty batch, bad settings, ``method="dense"`` for a block
            too large for it (naming the block and its size); TypeError: x not floating
            point.
    """
    _check_settings(iters, tol, theta)
    _check_settings(cg_iters, cg_tol)
    _check_method(method)
    if perturb not in ("state", "input"):
        raise ValueError(f"perturb must be 'state' or 'input', got {perturb!r}")
    if not (isinstance(noise_scale, (int, float)) and math.isfinite(noise_scale)
            and noise_scale > 0):
        raise ValueError(f"noise_scale must be a finite number > 0, got {noise_scale!r}")
    if isinstance(noise_draws, bool) or not isinstance(noise_draws, int) or noise_draws < 1:
        raise ValueError(f"noise_draws must be a positive int, got {noise_draws!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    check_per_sample(model, "model")
    _check_input(x)
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one sample")
    blocks = find_blocks(model)
    if not blocks:
        raise ValueError(f"model_stability: no pyeuler blocks (PreActBlock, EulerBasicBlock, "
                         f"IESkip) in {type(model).__name__}")
    specs = [_block_spec(b) for _, b in blocks]
    x = x.detach()
    chunks = x.split(batch_size) if batch_size else (x,)
    opts = dict(iters=iters, tol=tol, generator=generator, method=method, cg_iters=cg_iters,
                cg_tol=cg_tol)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with pyeuler[train]; without it, no progress bar
        tqdm = None
    bar = tqdm(total=len(chunks) * len(blocks), desc="stability", unit="block",
               disable=progress is False or (progress is None and not _stderr_tty()),
               leave=False) if tqdm is not None else None
    per_block = [dict() for _ in blocks]
    amps, norms = [], []
    try:
        for xc in chunks:
            x0s, ys = _capture(model, blocks, xc)
            if method == "dense" and xc is chunks[0]:  # before any Jacobian is formed
                for (name, _), x0, y in zip(blocks, x0s, ys):
                    _check_dense_size(tuple(x0.shape[1:]), tuple(y.shape[1:]), f"block {name}")
            clean = [x0s[0]] + ys
            norms.append(torch.stack([_norm(t).double() for t in clean]))
            amp = torch.zeros(len(clean), xc.shape[0], dtype=torch.float64, device=x.device)
            for _ in range(noise_draws):
                target = x0s[0] if perturb == "state" else xc
                g = torch.randn(target.shape, generator=generator, dtype=torch.float32,
                                device=generator.device if generator is not None else x.device)
                g = g.to(target.device, target.dtype)
                d = target[0].numel()
                scale = noise_scale * _norm(target) / math.sqrt(d)
                scale = torch.where(scale > 0, scale, torch.full_like(scale, noise_scale))
                delta = _col(scale, g) * g
                if perturb == "state":
                    _, ys_noisy = _capture(model, blocks, xc, perturb_first=delta)
                    noisy = [x0s[0] + delta] + ys_noisy
                else:
                    x0n, ys_noisy = _capture(model, blocks, xc + delta)
                    noisy = [x0n[0]] + ys_noisy
                dn = _norm(delta).double().clamp_min(torch.finfo(torch.float64).tiny)
                amp += torch.stack([_norm(a - b).double() / dn for a, b in zip(noisy, clean)])
            amps.append(amp / noise_draws)
            for i, ((_, block), spec) in enumerate(zip(blocks, specs)):
                res = _chunk_block(spec, block, x0s[i], ys[i], theta, backend, opts)
                for q, r in res.items():
                    per_block[i].setdefault(q, []).append(r)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    results, unconverged = [], []
    for i, ((name, block), spec) in enumerate(zip(blocks, specs)):
        x0s_shape = tuple(x0s[i].shape[1:])
        out = BlockStability(index=i, name=name, kind=spec["kind"], in_shape=x0s_shape,
                             out_shape=tuple(ys[i].shape[1:]), h=spec.get("h"),
                             ie_steps=spec.get("steps", 0) or 0)
        if spec["kind"] in ("residual", "ie-skip"):
            out.theta = theta if theta is not None else (spec["theta"] if spec["kind"] == "ie-skip"
                                                         else 1.0)
        for q, parts in per_block[i].items():
            values = torch.cat([p[0] for p in parts])
            conv = torch.cat([p[1].converged for p in parts])
            setattr(out, q, values)
            out.converged[q] = float(conv.double().mean())
            if not bool(conv.all()):
                unconverged.append(f"{name}.{q} ({int((~conv).sum())}/{conv.numel()})")
        if spec["kind"] == "residual":
            out.note = "‖J_block‖₂ = ‖I + J_f(x0)‖₂ (the block is x + f(x))"
        elif spec["kind"] == "ie-skip" and spec["grad"] == "implicit":
            out.note = ("‖J_block‖₂ not measured: grad='implicit' runs a fixed-point solver, "
                        "whose Jacobian is (I − θJ_f(y))⁻¹(I + (1−θ)J_f(x0))")
        elif spec["kind"] == "ie-skip":
            out.note = f"‖J_block‖₂ of the K={out.ie_steps} IE map (unrolled derivative)"
        else:
            out.note = "spectral norm of the whole block map's Jacobian"
        results.append(out)
    if warn and unconverged:
        warnings.warn(f"model_stability: estimates did not converge within iters={iters} "
                      f"(tol={tol:g}) for some samples: {', '.join(unconverged[:10])}"
                      + (", ..." if len(unconverged) > 10 else ""), ConvergenceWarning,
                      stacklevel=2)
    settings = dict(samples=int(x.shape[0]), iters=iters, tol=tol, theta=theta,
                    noise_scale=noise_scale, noise_draws=noise_draws, perturb=perturb,
                    method=method, cg_iters=cg_iters, cg_tol=cg_tol,
                    dtype=str(x.dtype).replace("torch.", ""), backend=backend,
                    pass_tolerance=PASS_TOLERANCE)
    return ModelStability(results, torch.cat(amps, 1), torch.cat(norms, 1), settings)


def _stderr_tty() -> bool:
    import sys

    return bool(getattr(sys.stderr, "isatty", lambda: False)())
