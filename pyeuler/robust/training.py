"""Training and evaluation loops: natural training, PGD adversarial training (Madry et al.
2018), TRADES (Zhang et al. 2019), clean / robust accuracy, and the gradient-masking check
for IE-Skips with detached gradients."""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from pyeuler.robust.attacks import _check, default_alpha, eval_mode, make_attack, pgd

__all__ = [
    "GradientMaskingWarning", "uses_detached_ie_gradients", "warn_if_gradient_masking",
    "pgd_at_loss", "trades_adversarial", "trades_loss", "train_epoch", "accuracy",
    "evaluate", "batches", "ADV_METHODS",
]

ADV_METHODS = ("none", "pgd", "trades")


class GradientMaskingWarning(UserWarning):
    """White-box attacks on this model use approximate gradients; robust accuracy may be
    overstated."""


def uses_detached_ie_gradients(model: nn.Module) -> bool:
    """True if some IE-Skip in ``model`` takes K > 0 steps with ``grad="detached"``."""
    for m in model.modules():
        if getattr(m, "grad", None) == "detached" and (getattr(m, "steps", 0) or 0) > 0:
            return True
    return False


def warn_if_gradient_masking(model: nn.Module, stacklevel: int = 2) -> bool:
    """Warn (:class:`GradientMaskingWarning`) if white-box attacks on ``model`` would use
    detached IE-Skip gradients. Returns whether it warned."""
    if uses_detached_ie_gradients(model):
        warnings.warn(
            "the model's IE-Skips use grad='detached': input gradients ignore the implicit "
            "correction, so white-box robust accuracy (FGSM/PGD/CW) may be overstated "
            "(gradient masking). Evaluate with grad='unrolled' or 'implicit' for an honest "
            "number (the weights are the same).",
            GradientMaskingWarning, stacklevel=stacklevel + 1)
        return True
    return False


# --------------------------------------------------------------------------- data batches

def _to_float(x: torch.Tensor) -> torch.Tensor:
    # uint8 images (CIFAR) are kept compact in memory and scaled per batch.
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
            generator: torch.Generator | None = None, device: torch.device | str | None = None,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of in-memory tensors (uint8 images are scaled to [0, 1] float)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if len(x) != len(y):
        raise ValueError(f"y: {len(y)} labels for {len(x)} inputs")
    n = len(x)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        xb, yb = _to_float(x[idx]), y[idx]
        if transform is not None:
            xb = transform(xb)
        if device is not None:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        yield xb, yb


def _progress(iterable, total, desc, progress: bool | None):
    disable = (not sys.stderr.isatty()) if progress is None else (not progress)
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=disable, dynamic_ncols=True)


# --------------------------------------------------------------------------- losses

def pgd_at_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255,
                alpha: float = 2 / 255, steps: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Madry PGD-AT: ``CE(model(x_adv), y)`` with ``x_adv = pgd(model, x, y, eps, alpha,
    steps, random_start=True)`` found in eval mode; the loss is computed in the model's
    current mode. Returns (loss, logits on x_adv)."""
    x_adv = pgd(model, x, y, eps, alpha, steps, random_start=True)
    logits = model(x_adv)
    return F.cross_entropy(logits, y), logits


def _kl_sum(logits_adv: torch.Tensor, logits_nat: torch.Tensor) -> torch.Tensor:
    # sum over the batch of KL(p_nat || p_adv), as nn.KLDivLoss(reduction="sum")(log p_adv, p_nat)
    return F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits_nat, 1), reduction="sum")


def trades_adversarial(model: nn.Module, x: torch.Tensor, eps: float = 8 / 255,
                       alpha: float = 2 / 255, steps: int = 10,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """TRADES inner maximisation (Zhang et al. 2019, reference code): start at
    ``x + 0.001·N(0, I)``, then ``steps`` signed-gradient steps of size ``alpha`` on
    ``KL(p(x) || p(x'))`` projected to the eps-ball and [0, 1]; model in eval mode."""
    y_dummy = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    _check(model, x, y_dummy, eps=eps, alpha=alpha)
    x = x.detach()
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) \
        if generator is not None else torch.randn_like(x)
    adv = x + 0.001 * noise
    with eval_mode(model), torch.enable_grad():
        with torch.no_grad():
            logits_nat = model(x)
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = _kl_sum(model(adv), logits_nat)
            (grad,) = torch.autograd.grad(loss, adv)
            adv = torch.min(torch.max(adv.detach() + alpha * grad.sign(), x - eps), x + eps)
            adv = torch.clamp(adv, 0, 1)
    return torch.clamp(adv.detach(), 0, 1)


def trades_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, beta: float = 6.0,
                eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                x_adv: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """TRADES loss ``CE(f(x), y) + beta · (1/N) Σᵢ KL(softmax f(xᵢ) || softmax f(x'ᵢ))``.

    ``x_adv`` defaults to :func:`trades_adversarial` (model in eval mode); the loss itself
    is computed in the model's current mode. Returns (loss, natural logits)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 0:
        raise ValueError(f"beta: expected a number >= 0, got {beta!r}")
    if x_adv is None:
        x_adv = trades_adversarial(model, x, eps, alpha, steps)
    elif x_adv.shape != x.shape:
        raise ValueError(f"x_adv: shape {tuple(x_adv.shape)} does not match x {tuple(x.shape)}")
    logits_nat = model(x)
    logits_adv = model(x_adv)
    natural = F.cross_entropy(logits_nat, y)
    robust = _kl_sum(logits_adv, logits_nat) / x.shape[0]
    return natural + beta * robust, logits_nat


# --------------------------------------------------------------------------- loops

@dataclass
class EpochStats:
    loss: float
    accuracy: float  # on the inputs the loss was computed on (adversarial for pgd-AT)
    seconds: float
    samples: int


def train_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                optimizer: torch.optim.Optimizer, *, batch_size: int = 128, adv: str = "none",
                eps: float = 8 / 255, alpha: float | None = None, steps: int = 10,
                beta: float = 6.0, generator: torch.Generator | None = None,
                device: torch.device | str | None = None,
                transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                scheduler_step: Callable[[], None] | None = None,
                progress: bool | None = None, desc: str = "train") -> EpochStats:
    """One epoch over (x, y) with ``adv`` ∈ {"none", "pgd", "trades"} (``alpha`` defaults to
    2.5·eps/steps, i.e. 2/255 for PGD-10 at 8/255). ``scheduler_step`` runs after each
    optimizer step (per-iteration schedules)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if adv not in ADV_METHODS:
        raise ValueError(f"adv: expected one of {ADV_METHODS}, got {adv!r}")
    if adv != "none":
        if alpha is None:
            alpha = default_alpha(eps, steps)
        if eps < 0 or alpha < 0:
            raise ValueError(f"eps/alpha: must be >= 0, got eps={eps!r}, alpha={alpha!r}")
    model.train()
    t0 = time.perf_counter()
    total_loss, correct, seen = 0.0, 0, 0
    nb = math.ceil(len(x) / batch_size)
    bar = _progress(batches(x, y, batch_size, shuffle=True, generator=generator, device=device,
                            transform=transform), nb, desc, progress)
    for xb, yb in bar:
        if adv == "none":
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
        elif adv == "pgd":
            loss, logits = pgd_at_loss(model, xb, yb, eps, alpha, steps)
        else:
            loss, logits = trades_loss(model, xb, yb, beta=beta, eps=eps, alpha=alpha, steps=steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler_step is not None:
            scheduler_step()
        loss_v = loss.detach()
        if not torch.isfinite(loss_v):
            raise FloatingPointError(f"training loss became {loss_v.item()} (lower --lr?)")
        total_loss += loss_v.item() * len(yb)
        correct += (logits.detach().argmax(1) == yb).sum().item()
        seen += len(yb)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1),
                      time.perf_counter() - t0, seen)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             attack: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             batch_size: int = 256, device: torch.device | str | None = None,
             progress: bool | None = None, desc: str = "eval") -> float:
    """Accuracy of ``model`` (eval mode) on (x, y), or on ``attack(model, xb, yb)`` per batch."""
    correct, seen = 0, 0
    nb = math.ceil(len(x) / batch_size)
    with eval_mode(model):
        for xb, yb in _progress(batches(x, y, batch_size, device=device), nb, desc, progress):
            if attack is not None:
                xb = attack(model, xb, yb)
            with torch.no_grad():
                pred = model(xb).argmax(1)
            correct += (pred == yb).sum().item()
            seen += len(yb)
    return correct / max(seen, 1)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             attacks: Sequence[str] | str = ("fgsm",), eps: float | Sequence[float] = 8 / 255,
             alpha: float | None = None, batch_size: int = 256,
             device: torch.device | str | None = None, progress: bool | None = None,
             **attack_kwargs) -> dict:
    """Clean and robust accuracy. ``attacks`` are names for :func:`make_attack` ("fgsm",
    "pgd-20", "cw"); ``eps`` may be a list (one result per eps; CW ignores eps).

    Returns ``{"clean": acc, "fgsm": {eps: acc, ...}, ...}`` (eps keys as floats). Warns
    (:class:`GradientMaskingWarning`) if the model uses detached IE gradients."""
    if isinstance(attacks, str):
        attacks = (attacks,)
    eps_list = [eps] if isinstance(eps, (int, float)) else list(eps)
    warn_if_gradient_masking(model)
    out: dict = {"clean": accuracy(model, x, y, batch_size=batch_size, device=device,
                                   progress=progress, desc="clean")}
    for name in attacks:
        if name.lower() == "cw":
            atk = make_attack(name, **attack_kwargs)
            out[name] = accuracy(model, x, y, atk, batch_size, device, progress, name)
            continue
        res = {}
        for e in eps_list:
            atk = make_attack(name, eps=e, alpha=alpha, **attack_kwargs)
            res[float(e)] = accuracy(model, x, y, atk, batch_size, device, progress,
                                     f"{name} eps={e:.3g}")
        out[name] = res
    return out
