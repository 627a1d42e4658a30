"""White-box adversarial attacks: FGSM, PGD (L∞ and L2, restarts, targeted) and
Carlini-Wagner (L2). AutoAttack is in :mod:`pyeuler.robust.autoattack`.

Conventions (the same as torchattacks 3.5, so that with the same arguments and no random
start the adversarial examples are identical):

- inputs ``x`` are float tensors in [0, 1] of shape (N, ...), labels ``y`` are int64 of
  shape (N,); the model maps x to logits (N, num_classes);
- the loss is the batch-mean cross entropy (only its sign/direction matters for FGSM/PGD);
- the model is put in eval mode while the attack runs and its previous mode is restored
  afterwards; parameter gradients are never touched (``torch.autograd.grad`` w.r.t. the
  input only);
- everything runs on the device and dtype of ``x`` (the model must live there too).

Gradients flow through the model exactly as its modules define them: IE-Skips built with
``grad="unrolled"`` or ``"implicit"`` give exact input gradients, ``grad="detached"`` does
not (see :func:`pyeuler.robust.training.uses_detached_ie_gradients`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyeuler.ops.dispatch import capture_active

__all__ = ["fgsm", "pgd", "cw", "eval_mode", "make_attack", "ATTACKS", "NORMS", "default_alpha"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` (and all submodules) in eval mode; restore each module's mode on exit.

    Args:
        model: any module; every submodule's own ``training`` flag is restored.

    Returns:
        A context manager yielding ``model``.

    Raises:
        Nothing of its own; exceptions in the block propagate after the modes are restored.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _check(model, x, y, **params) -> None:
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(f"model: expected an nn.Module or callable, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 2:
        raise ValueError(f"x: expected shape (N, ...) with a batch dimension, got {tuple(x.shape)}")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.long:
        raise TypeError(f"y: expected an int64 (long) tensor of labels, got "
                        f"{getattr(y, 'dtype', type(y).__name__)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y: expected shape ({x.shape[0]},) to match x's batch, got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"y: on {y.device} but x is on {x.device}")
    for name, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"{name}: expected a finite number, got {value!r}")
        if value < 0:
            raise ValueError(f"{name}: must be >= 0, got {value!r}")
    # Values cannot be read while a CUDA graph is captured or torch.compile traces: there
    # pyeuler.robust.capture checks the data set's range on the host before training.
    if x.numel() and not capture_active() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"x: attacks expect inputs in [0, 1]; got values in "
                         f"[{x.min().item():.4g}, {x.max().item():.4g}]")


def _steps(steps, name="steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {steps!r}")
    return steps


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): ``clip(x + eps·sign(∇ₓ CE), 0, 1)``.

    Args:
        model: maps x to logits (N, C); run in eval mode, its mode restored afterwards.
        x: float tensor (N, ...) in [0, 1].
        y: int64 tensor (N,) of true labels.
        eps: L∞ radius per pixel, in input units, >= 0.

    Returns:
        Tensor like ``x`` (shape, dtype, device): the adversarial examples, detached.

    Raises:
        TypeError: ``x`` not floating point, ``y`` not int64, ``eps`` not a finite number.
        ValueError: shapes or devices that do not match, ``x`` outside [0, 1], ``eps`` < 0.
    """
    _check(model, x, y, eps=eps)
    x = x.detach().clone()
    with eval_mode(model), torch.enable_grad():
        x.requires_grad_(True)
        loss = F.cross_entropy(model(x), y)
        (grad,) = torch.autograd.grad(loss, x)
    return torch.clamp(x.detach() + eps * grad.sign(), 0, 1).detach()


NORMS = ("Linf", "L2")


def _check_norm(norm) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
    return norm


def _l2_per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(p=2, dim=1)


def _random_start(x: torch.Tensor, eps: float, norm: str,
                  generator: torch.Generator | None) -> torch.Tensor:
    # L∞: uniform in the cube; L2: a uniform direction scaled by a uniform radius
    # (torchattacks' PGDL2 start). Both then clipped to [0, 1].
    if norm == "Linf":
        noise = torch.empty_like(x).uniform_(-eps, eps, generator=generator)
    else:
        noise = torch.empty_like(x).normal_(generator=generator)
        view = (-1,) + (1,) * (x.dim() - 1)
        radius = torch.empty(x.shape[0], device=x.device, dtype=x.dtype).uniform_(
            0, 1, generator=generator)
        noise = noise * (radius * eps / _l2_per_sample(noise)).view(view)
    return torch.clamp(x + noise, 0, 1)


def _pgd_run(model, x, y, eps, alpha, steps, norm, targeted, start):
    view = (-1,) + (1,) * (x.dim() - 1)
    adv = start
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), y)
        (grad,) = torch.autograd.grad(loss, adv)
        if targeted:  # descend the cross entropy of the target class
            grad = -grad
        if norm == "Linf":
            adv = adv.detach() + alpha * grad.sign()
            delta = torch.clamp(adv - x, -eps, eps)
        else:  # torchattacks' PGDL2: normalised step, radial projection onto the ball
            grad = grad / (_l2_per_sample(grad) + 1e-10).view(view)
            delta = adv.detach() + alpha * grad - x
            norms = _l2_per_sample(delta)  # min(eps/‖δ‖, 1), also at ‖δ‖ = 0 (eps = 0)
            shrink = torch.where(norms > eps, eps / norms, torch.ones_like(norms))
            delta = delta * shrink.view(view)
        adv = torch.clamp(x + delta, 0, 1).detach()
    return adv


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
        steps: int, random_start: bool = True, generator: torch.Generator | None = None,
        *, norm: str = "Linf", restarts: int = 1, targeted: bool = False) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018) in the L∞ or L2 ball, with restarts.

    Each step moves ``alpha·sign(∇)`` (L∞) or ``alpha·∇/‖∇‖₂`` per sample (L2) on the
    batch-mean cross entropy, then projects onto the eps-ball around ``x`` and onto [0, 1]
    (torchattacks 3.5's PGD / PGDL2: without a random start the results are identical).
    Untargeted attacks ascend ``CE(model(x'), y)``; targeted ones (``targeted=True``, ``y``
    the target classes) descend it. With ``restarts`` > 1 every run starts at a random point
    and each sample keeps the first run that succeeded (misclassified as not ``y``, or
    classified as the target), else the run with the highest loss (untargeted) or lowest
    (targeted).

    Args:
        model: maps x to logits (N, C); run in eval mode, its mode restored afterwards.
        x: float tensor (N, ...) in [0, 1].
        y: int64 tensor (N,): true labels, or target labels when ``targeted``.
        eps: radius of the ball, in input units (L∞: per pixel; L2: per sample), >= 0.
        alpha: step size, >= 0 (:func:`default_alpha` gives 2.5·eps/steps).
        steps: number of gradient steps, int >= 0.
        random_start: start at a random point of the ball (uniform in the L∞ cube; for L2
            a uniform direction at a uniform radius), clipped to [0, 1]; else at ``x``.
        generator: torch.Generator on x's device for reproducible random starts.
        norm: ``"Linf"`` or ``"L2"``.
        restarts: number of runs, int >= 1; more than 1 needs ``random_start``.
        targeted: attack toward the labels ``y`` instead of away from them.

    Returns:
        Tensor like ``x`` (shape, dtype, device): the adversarial examples, detached.

    Raises:
        TypeError: ``x`` not floating point, ``y`` not int64, a parameter not a finite number.
        ValueError: shapes or devices that do not match, ``x`` outside [0, 1], a negative
            ``eps``/``alpha``/``steps``, an unknown ``norm``, ``restarts`` < 1, or restarts
            without ``random_start``.
    """
    _check(model, x, y, eps=eps, alpha=alpha)
    steps = _steps(steps)
    norm = _check_norm(norm)
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts: expected an int >= 1, got {restarts!r}")
    if restarts > 1 and not random_start:
        raise ValueError("restarts: several runs from the same start give the same result; "
                         "use random_start=True")
    x = x.detach().clone()
    view = (-1,) + (1,) * (x.dim() - 1)
    best = best_done = best_loss = None
    with eval_mode(model), torch.enable_grad():
        for _ in range(restarts):
            start = _random_start(x, eps, norm, generator) if random_start else x.clone()
            adv = _pgd_run(model, x, y, eps, alpha, steps, norm, targeted, start)
            if restarts == 1:
                return adv
            with torch.no_grad():
                logits = model(adv)
                loss = F.cross_entropy(logits, y, reduction="none")
                done = (logits.argmax(1) == y) if targeted else (logits.argmax(1) != y)
                if targeted:
                    loss = -loss
            if best is None:
                best, best_done, best_loss = adv, done, loss
                continue
            take = ~best_done & (done | (loss > best_loss))
            best = torch.where(take.view(view), adv, best)
            best_loss = torch.where(take, loss, best_loss)
            best_done = best_done | done
    return best


def _cw_margin(logits: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    # max(Z_y - max_{j != y} Z_j, -kappa). torchattacks masks the true class by multiplying
    # with (1 - one_hot), which makes that entry 0 (wrong when all other logits are < 0);
    # we mask it with -inf instead. The two agree whenever some other logit is >= 0.
    real = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return torch.clamp(real - other, min=-kappa)


def cw(model: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float = 10.0, steps: int = 50,
       lr: float = 6e-4, kappa: float = 0.0) -> torch.Tensor:
    """Carlini-Wagner L2 attack (untargeted, fixed c, no binary search), as torchattacks.CW.

    Optimises ``w`` with ``x' = (tanh(w)+1)/2`` by Adam(lr) on
    ``‖x' - x‖² + c·max(Z_y - max_{j≠y} Z_j, -kappa)`` (sums over the batch); returns, per
    sample, the misclassified iterate with the smallest L2 distance, else ``x`` itself.
    Like torchattacks it stops early when the cost rises between checks (every steps/10).
    Pixels exactly at 0 or 1 map to w = ∓inf and stay fixed (torchattacks' convention).
    A minimum-distortion attack: report its success rate and L2 distances, not an accuracy
    beside L∞ attacks (:mod:`pyeuler.robust.evaluation` does).

    Args:
        model: maps x to logits (N, C); run in eval mode, its mode restored afterwards.
        x: float tensor (N, ...) in [0, 1].
        y: int64 tensor (N,) of true labels.
        c: weight of the margin term, >= 0 (the IE paper: 10).
        steps: Adam steps, int >= 0 (the IE paper: 50).
        lr: Adam learning rate on w, >= 0 (the IE paper: 6e-4).
        kappa: confidence margin κ, >= 0.

    Returns:
        Tensor like ``x``: per sample the closest misclassified iterate, else ``x``.

    Raises:
        TypeError: ``x`` not floating point, ``y`` not int64, a parameter not a finite number.
        ValueError: shapes or devices that do not match, ``x`` outside [0, 1], a negative
            parameter.
    """
    _check(model, x, y, c=c, lr=lr, kappa=kappa)
    steps = _steps(steps)
    x = x.detach().clone()
    n = x.shape[0]
    w = torch.atanh(torch.clamp(x * 2 - 1, -1, 1)).detach().requires_grad_(True)
    best_adv = x.clone()
    best_l2 = torch.full((n,), 1e10, device=x.device, dtype=x.dtype)
    prev_cost = math.inf
    opt = torch.optim.Adam([w], lr=lr)
    view = (-1,) + (1,) * (x.dim() - 1)
    with eval_mode(model), torch.enable_grad():
        for step in range(steps):
            adv = (torch.tanh(w) + 1) / 2
            l2 = (adv - x).pow(2).flatten(1).sum(1)
            logits = model(adv)
            cost = l2.sum() + c * _cw_margin(logits, y, kappa).sum()
            # gradient w.r.t. w only: the model's parameter .grad stay untouched
            (w.grad,) = torch.autograd.grad(cost, w)
            opt.step()
            improved = (logits.detach().argmax(1) != y) & (best_l2 > l2.detach())
            best_l2 = torch.where(improved, l2.detach(), best_l2)
            best_adv = torch.where(improved.view(view), adv.detach(), best_adv)
            if step % max(steps // 10, 1) == 0:
                cost_value = cost.item()
                if cost_value > prev_cost:
                    break
                prev_cost = cost_value
    return best_adv.detach()


def default_alpha(eps: float, steps: int) -> float:
    """PGD step size rule of thumb ``2.5·eps/steps`` (Madry et al.): PGD-10 at 8/255 gives
    2/255 (the IE paper's training step), PGD-20 gives 1/255 (its evaluation step).

    Args:
        eps: the radius (any norm), in input units.
        steps: the number of PGD steps (0 is read as 1).

    Returns:
        float: the step size.

    Raises:
        Nothing; arguments are checked by the attack that uses the step.
    """
    return 2.5 * eps / max(steps, 1)


ATTACKS = ("none", "fgsm", "pgd-N (e.g. pgd-20)", "cw")


def make_attack(name: str, eps: float | None = None, alpha: float | None = None,
                random_start: bool = True, c: float = 10.0, cw_steps: int = 50,
                lr: float = 6e-4, kappa: float = 0.0
                ) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """Attack by name: ``"none"`` (returns None), ``"fgsm"``, ``"pgd"`` / ``"pgd-20"`` (L∞ PGD
    with that many steps, default 20), ``"cw"``. The evaluation's fuller set of names (L2,
    targeted, AutoAttack) is :func:`pyeuler.robust.evaluation.parse_attack`.

    Args:
        name: the attack's name (case and surrounding spaces ignored).
        eps: L∞ radius; required by FGSM and PGD, ignored by C&W.
        alpha: PGD step size (default :func:`default_alpha`).
        random_start: PGD starts at a random point of the ball.
        c, cw_steps, lr, kappa: C&W's parameters (see :func:`cw`).

    Returns:
        ``attack(model, x, y) -> x_adv`` (tensors as :func:`pgd`), or None for ``"none"``.

    Raises:
        ValueError: an unknown name, ``pgd-N`` with N < 1, or no ``eps`` for FGSM/PGD.
    """
    key = name.strip().lower()
    if key in ("none", "clean"):
        return None
    if key == "cw":
        return lambda model, x, y: cw(model, x, y, c=c, steps=cw_steps, lr=lr, kappa=kappa)
    if eps is None:
        raise ValueError(f"eps: required for attack {name!r}")
    if key == "fgsm":
        return lambda model, x, y: fgsm(model, x, y, eps)
    if key == "pgd" or key.startswith("pgd-"):
        try:
            steps = 20 if key == "pgd" else int(key[4:])
        except ValueError:
            steps = -1
        if steps < 1:
            raise ValueError(f"attack: expected 'pgd-N' with N >= 1 steps, got {name!r}")
        a = default_alpha(eps, steps) if alpha is None else alpha
        return lambda model, x, y: pgd(model, x, y, eps, a, steps, random_start=random_start)
    raise ValueError(f"attack: unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
