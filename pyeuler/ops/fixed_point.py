"""Anderson-accelerated fixed-point iteration ``x = g(x)`` on whole tensors.

Used by ``grad="implicit"`` IE-Skips twice: for the forward solve ``x = c + θ·f(x)`` and
for the backward linear system ``u = ḡ + θ·J_fᵀu`` of the implicit function theorem.  The
batch is one vector (BatchNorm couples its samples), so one small least-squares problem
per iteration mixes the last ``memory`` iterates (Walker & Ni, 2011).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from pyeuler.ops.dispatch import capture_active

__all__ = ["anderson", "relative_residual"]


def relative_residual(x: Tensor, gx: Tensor) -> Tensor:
    """``‖g(x) − x‖ / ‖g(x)‖`` as a float32 (float64) scalar tensor."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    diff = torch.linalg.vector_norm((gx - x).to(acc))
    return diff / torch.linalg.vector_norm(gx.to(acc)).clamp_min(torch.finfo(acc).tiny)


def anderson(g: Callable[[Tensor], Tensor], x: Tensor, iterations: int, tol: float | None = None,
             memory: int = 5, regularization: float = 1e-10) -> Tensor:
    """Approximate fixed point of ``g`` from ``x`` after at most ``iterations`` evaluations.

    With ``tol=None`` it runs exactly ``iterations`` evaluations and never synchronises
    with the host (CUDA-graph and torch.compile friendly); with a float it stops once
    :func:`relative_residual` ``≤ tol``, which reads the residual on the host each step and
    so raises ``RuntimeError`` under a CUDA graph capture or ``torch.compile``.
    Returns the last ``g(x)`` (one Picard step past the mixed iterate).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if memory < 1:
        raise ValueError(f"memory must be >= 1, got {memory}")
    if tol is not None and capture_active():
        raise RuntimeError(
            f"grad='implicit' with tol={tol} reads the residual on the host every iteration, "
            "which a CUDA graph capture or torch.compile cannot do: use tol=None (a fixed "
            "budget of `steps` evaluations, no host reads)")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    iterates: list[Tensor] = []
    images: list[Tensor] = []
    gx = x
    for _ in range(iterations):
        gx = g(x)
        if tol is not None and relative_residual(x, gx).item() <= tol:
            break
        iterates.append(x)
        images.append(gx)
        if len(iterates) > memory:
            iterates.pop(0)
            images.pop(0)
        if len(iterates) == 1:
            x = gx
            continue
        # min ‖Σ αᵢ (g(xᵢ) − xᵢ)‖ subject to Σ αᵢ = 1, through the normal equations.
        residuals = torch.stack([(gi - xi).reshape(-1).to(acc) for gi, xi in zip(images, iterates)])
        gram = residuals @ residuals.T
        # relative Tikhonov term; eps keeps an exactly converged (all-zero) history solvable
        damping = regularization * gram.diagonal().mean() + torch.finfo(acc).eps
        gram = gram + damping * torch.eye(len(images), dtype=acc, device=x.device)
        ones = torch.ones(len(images), 1, dtype=acc, device=x.device)
        weights, _ = torch.linalg.solve_ex(gram, ones)  # no host-side singularity check
        alpha = (weights / weights.sum()).to(x.dtype)
        x = sum(a * gi for a, gi in zip(alpha.unbind(0), images))
    return gx
