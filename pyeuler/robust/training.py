"""Training and evaluation loops: natural training, PGD adversarial training (Madry et al.
2018), TRADES (Zhang et al. 2019), clean / robust accuracy, and the gradient-masking check
for IE-Skips with detached gradients."""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyeuler.robust.attacks import _check, default_alpha, eval_mode, make_attack, pgd
from pyeuler.robust.distributed import all_sum, derive_seed, loss_scale, shard_bounds

__all__ = [
    "GradientMaskingWarning", "uses_detached_ie_gradients", "warn_if_gradient_masking",
    "pgd_at_loss", "trades_adversarial", "trades_loss", "train_epoch", "accuracy",
    "evaluate", "batches", "ADV_METHODS", "OPTIMIZERS", "make_optimizer",
    "load_optimizer_state",
]

ADV_METHODS = ("none", "pgd", "trades")
OPTIMIZERS = ("sgd", "adam")


class GradientMaskingWarning(UserWarning):
    """White-box attacks on this model use approximate gradients; robust accuracy may be
    overstated."""


def uses_detached_ie_gradients(model: nn.Module) -> bool:
    """Whether some IE-Skip in ``model`` takes K > 0 steps with ``grad="detached"``.

    Args:
        model: any ``nn.Module``.

    Returns:
        True if such an IE-Skip (an :class:`~pyeuler.nn.IESkip` or a
        :class:`~pyeuler.nn.PreActBlock` with ``ie_steps > 0``) is in ``model``.

    Raises:
        AttributeError: ``model`` is not an ``nn.Module`` (has no ``modules``).
    """
    for m in model.modules():
        if getattr(m, "grad", None) == "detached" and (getattr(m, "steps", 0) or 0) > 0:
            return True
    return False


def warn_if_gradient_masking(model: nn.Module, stacklevel: int = 2) -> bool:
    """Warn if white-box attacks on ``model`` would use detached IE-Skip gradients.

    Args:
        model: any ``nn.Module``.
        stacklevel: the warning's stack level, counted from the caller (2: the caller's
            caller).

    Returns:
        Whether it warned.

    Raises:
        AttributeError: ``model`` is not an ``nn.Module``.

    Warns:
        GradientMaskingWarning: :func:`uses_detached_ie_gradients` is true.
    """
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

def make_optimizer(name: str, parameters, *, lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0, fused: bool | None = None) -> torch.optim.Optimizer:
    """The optimizer ``pyeuler train`` steps: ``torch.optim.SGD`` or ``torch.optim.Adam``,
    with torch's fused update kernels on CUDA.

    Fused: one multi-tensor pass that reads each parameter, gradient and state tensor once
    and writes each parameter and state tensor once, where the default ``foreach`` update
    spends a pass per arithmetic op (SGD with momentum: 5 parameter-sized passes against
    8; for WRN-34-10, 0.55 GB less per step).  Same update rule, same state, and capturable
    (:mod:`pyeuler.robust.capture`).  Resume with :func:`load_optimizer_state`, which keeps
    this choice rather than the checkpoint's.

    Args:
        name: ``"sgd"`` or ``"adam"`` (:data:`OPTIMIZERS`).
        parameters: the tensors to optimise, or parameter groups (dicts with ``"params"``),
            as torch's optimizers take them.
        lr: the learning rate, a finite number ≥ 0.
        momentum: SGD's momentum, finite and ≥ 0 (Adam ignores it).
        weight_decay: L2 penalty coefficient added to the gradient, finite and ≥ 0.
        fused: torch's fused kernels; None: where every parameter is a floating-point CUDA
            tensor (torch's default elsewhere).

    Returns:
        The ``torch.optim.Optimizer``.

    Raises:
        ValueError: ``name`` not in :data:`OPTIMIZERS`; ``lr``, ``momentum`` or
            ``weight_decay`` negative or not finite; no parameters.
        TypeError: ``lr``, ``momentum`` or ``weight_decay`` not a number, ``fused`` not a
            bool or None, a parameter not a tensor.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {name!r}")
    for argument, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{argument} must be a number, got {type(value).__name__}")
        if not 0.0 <= value < math.inf:
            raise ValueError(f"{argument} must be finite and >= 0, got {value}")
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be True, False or None, got {fused!r}")
    parameters = list(parameters)
    tensors = [p for group in parameters
               for p in (group["params"] if isinstance(group, dict) else [group])]
    tensors = [p[1] if isinstance(p, tuple) else p for p in tensors]  # named parameters
    if not tensors:
        raise ValueError("parameters: the optimizer got none to optimise")
    if not all(isinstance(p, torch.Tensor) for p in tensors):
        raise TypeError("parameters must be tensors or parameter groups of tensors")
    if fused is None:
        fused = all(p.is_cuda and p.is_floating_point() for p in tensors)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               fused=fused or None)
    return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, fused=fused or None)


# how an optimizer runs its update, not what it has learnt: a resumed run keeps its own
_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping the optimizer's own implementation
    choices (``fused``, ``foreach``, ``capturable``, ``differentiable``) where torch would
    take the checkpoint's: a run saved on a CPU and resumed on a GPU steps with the fused
    kernels :func:`make_optimizer` chose there, and state such as Adam's step counts is
    placed as that implementation needs it.

    Args:
        optimizer: the optimizer to restore, built for this run.
        state: a ``state_dict()`` of an optimizer of the same class and parameters.

    Returns:
        None; ``optimizer`` is changed in place.

    Raises:
        ValueError: from torch, when ``state`` has other parameter groups or sizes.
    """
    groups = [dict(saved, **{key: own[key] for key in _IMPLEMENTATION if key in own})
              for saved, own in zip(state["param_groups"], optimizer.param_groups)]
    if len(groups) != len(state["param_groups"]):
        groups = state["param_groups"]  # torch names the mismatch
    optimizer.load_state_dict(dict(state, param_groups=groups))

def _to_float(x: torch.Tensor) -> torch.Tensor:
    # uint8 images (CIFAR) are kept compact in memory and scaled per batch.
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
            generator: torch.Generator | None = None, device: torch.device | str | None = None,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
            shard: tuple[int, int] = (0, 1)
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of in-memory tensors, or this process's part of each.

    Args:
        x: inputs ``(N, ...)``; uint8 images are scaled to [0, 1] float32 per batch.
        y: labels ``(N,)``.
        batch_size: a positive int; the last batch may be smaller.
        shuffle: draw a random order (else the stored order).
        generator: the shuffle's generator (None: the global RNG).
        device: where to move each batch (None: leave it).
        transform: applied to each input batch (after scaling, before moving), e.g.
            :func:`pyeuler.data.random_crop_flip`.
        shard: ``(rank, world_size)``: each batch of ``batch_size`` (the global batch, the
            same for every ``world_size``) is cut into ``world_size`` contiguous parts of
            near-equal size and part ``rank`` is yielded
            (:func:`pyeuler.robust.distributed.shard_bounds`); a last batch smaller than
            ``world_size`` is skipped (it cannot give every rank a sample).

    Yields:
        ``(xb, yb)``: ``(B, ...)`` floating point and ``(B,)``, B <= ``batch_size``
        (about ``batch_size / world_size`` with ``shard``).

    Raises:
        ValueError: ``batch_size`` not a positive int; x and y of different lengths;
            ``shard`` not ``(rank, world_size)`` with 0 <= rank < world_size.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if len(x) != len(y):
        raise ValueError(f"y: {len(y)} labels for {len(x)} inputs")
    rank, world_size = _check_shard(shard)
    n = len(x)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        if world_size > 1:
            if len(idx) < world_size:
                return
            start, stop = shard_bounds(len(idx), rank, world_size)
            idx = idx[start:stop]
        xb, yb = _to_float(x[idx]), y[idx]
        if transform is not None:
            xb = transform(xb)
        if device is not None:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        yield xb, yb


def autocast(device_type: str, dtype: torch.dtype | None):
    """``torch.autocast(device_type, dtype)``, or no context at all for ``dtype=None`` (an
    autocast the caller opened stays in force)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype)


def _check_shard(shard) -> tuple[int, int]:
    valid = (isinstance(shard, tuple) and len(shard) == 2
             and all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
             and 0 <= shard[0] < shard[1])
    if not valid:
        raise ValueError(f"shard: expected (rank, world_size) with 0 <= rank < world_size, "
                         f"got {shard!r}")
    return shard


class _NoBar:
    """The part of a tqdm bar the loops use, showing nothing: tqdm comes with
    ``pyeuler[train]``, and the loops run without it."""

    def __init__(self, iterable):
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable)

    def set_postfix(self, **values) -> None:
        pass


def _progress(iterable, total, desc, progress: bool | None):
    disable = (not sys.stderr.isatty()) if progress is None else (not progress)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar(iterable)
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=disable, dynamic_ncols=True)


# --------------------------------------------------------------------------- losses

def pgd_at_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255,
                alpha: float = 2 / 255, steps: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Madry PGD-AT (Madry et al. 2018): ``CE(model(x_adv), y)`` with ``x_adv = pgd(model,
    x, y, eps, alpha, steps, random_start=True)`` found in eval mode; the loss is computed in
    the model's current mode.

    Args:
        model: a classifier mapping x to logits ``(N, classes)``.
        x: inputs ``(N, ...)`` in [0, 1], floating point.
        y: int64 labels ``(N,)`` on x's device.
        eps: L∞ radius, a finite number >= 0 (in x's units: 8/255 for CIFAR).
        alpha: PGD step, a finite number >= 0.
        steps: PGD steps, an int >= 0.

    Returns:
        ``(loss, logits)``: the mean cross-entropy (0-dim, differentiable) and the logits
        on x_adv ``(N, classes)``.

    Raises:
        TypeError, ValueError: bad model, x, y, eps, alpha or steps, naming the argument
            (as :func:`pyeuler.robust.pgd`).
    """
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
    ``KL(p(x) || p(x'))`` projected to the eps-ball and [0, 1]; model in eval mode.

    Args:
        model: a classifier mapping x to logits ``(N, classes)``.
        x: inputs ``(N, ...)`` in [0, 1], floating point.
        eps: L∞ radius, a finite number >= 0.
        alpha: step size, a finite number >= 0.
        steps: ascent steps, an int >= 0.
        generator: the start noise's generator (None: the global RNG).

    Returns:
        x_adv: x's shape, dtype and device, detached, in [0, 1] and within eps of x.

    Raises:
        TypeError, ValueError: bad model, x, eps or alpha, naming the argument.
    """
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
    """TRADES loss ``CE(f(x), y) + beta · (1/N) Σᵢ KL(softmax f(xᵢ) || softmax f(x'ᵢ))``
    (Zhang et al. 2019), computed in the model's current mode.

    Args:
        model: a classifier mapping x to logits ``(N, classes)``.
        x: inputs ``(N, ...)`` in [0, 1], floating point.
        y: int64 labels ``(N,)``.
        beta: the robustness weight, a number >= 0 (6 in the paper).
        eps: L∞ radius of the inner maximisation.
        alpha: its step size.
        steps: its steps.
        x_adv: precomputed adversarial inputs of x's shape; None: :func:`trades_adversarial`
            (model in eval mode).

    Returns:
        ``(loss, logits)``: the loss (0-dim, differentiable) and the natural logits
        ``(N, classes)``.

    Raises:
        ValueError: ``beta`` not a number >= 0; ``x_adv`` not of x's shape; else as
            :func:`trades_adversarial`.
        TypeError: as :func:`trades_adversarial`.
    """
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
                progress: bool | None = None, desc: str = "train",
                shard: tuple[int, int] = (0, 1), seed: int | None = None,
                amp: torch.dtype | None = None,
                grad_scaler: torch.amp.GradScaler | None = None) -> EpochStats:
    """One training epoch over (x, y), naturally or adversarially; the model is left in
    training mode.  Also one rank's part of a data-parallel epoch (``shard``), where the
    model is a ``DistributedDataParallel`` wrapper (:mod:`pyeuler.robust.distributed`).

    Args:
        model: a classifier mapping batches to logits ``(B, classes)``.
        x: inputs ``(N, ...)``: floating point in [0, 1], or uint8 images (scaled per
            batch).
        y: int64 labels ``(N,)``.
        optimizer: steps once per batch.
        batch_size: a positive int.
        adv: ``"none"``, ``"pgd"`` (:func:`pgd_at_loss`) or ``"trades"``
            (:func:`trades_loss`).
        eps: L∞ radius of the attacks, >= 0.
        alpha: attack step; None: ``2.5·eps/steps`` (2/255 for PGD-10 at 8/255).
        steps: attack steps.
        beta: TRADES' robustness weight.
        generator: the shuffle's generator (None: the global RNG).
        device: where batches go (None: where x is).
        transform: augmentation applied to each input batch.
        scheduler_step: called after each optimizer step (per-iteration schedules).
        progress: a tqdm bar (None: when stderr is a terminal; none without tqdm, which
            comes with ``pyeuler[train]``).
        desc: the bar's label.
        shard: ``(rank, world_size)``: train on part ``rank`` of every global batch of
            ``batch_size`` (:func:`batches`).  With ``world_size > 1`` the loss is scaled
            so that DDP's gradient average is the gradient of the mean over the global
            batch, and the returned statistics are summed over the default process group.
        seed: reseed torch's global generators before every step with
            ``derive_seed(seed, step)``, so that the step's draws (augmentation, attack
            starts, TRADES noise, dropout) depend on nothing else; None: leave them running.
        amp: ``torch.bfloat16`` or ``torch.float16``: the step's forward passes (the
            attack's included) under ``torch.autocast``; None: full precision.
        grad_scaler: scales the loss, and steps the optimizer, through this
            ``torch.amp.GradScaler`` (float16 gradients underflow without it).

    Returns:
        ``EpochStats(loss, accuracy, seconds, samples)``: mean loss and accuracy over the
        samples the loss saw (adversarial ones for PGD-AT; all ranks' with ``shard``), wall
        time, sample count.

    Raises:
        ValueError: bad ``batch_size``, ``adv``, ``eps``, ``alpha``, ``shard`` or ``amp``;
            else as the attack.
        FloatingPointError: the loss became NaN or infinite (lower the learning rate).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if adv not in ADV_METHODS:
        raise ValueError(f"adv: expected one of {ADV_METHODS}, got {adv!r}")
    if adv != "none":
        if alpha is None:
            alpha = default_alpha(eps, steps)
        if eps < 0 or alpha < 0:
            raise ValueError(f"eps/alpha: must be >= 0, got eps={eps!r}, alpha={alpha!r}")
    rank, world_size = _check_shard(shard)
    if amp not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"amp: expected torch.bfloat16, torch.float16 or None, got {amp!r}")
    model.train()
    t0 = time.perf_counter()
    total_loss, correct, seen = 0.0, 0, 0
    n = len(x)
    nb = math.ceil(n / batch_size)
    bar = _progress(batches(x, y, batch_size, shuffle=True, generator=generator, shard=shard),
                    nb, desc, progress)
    for step, (xb, yb) in enumerate(bar):
        if seed is not None:
            torch.manual_seed(derive_seed(seed, step))  # before the step's first draw
        if transform is not None:
            xb = transform(xb)
        if device is not None:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        with autocast(xb.device.type, amp):
            if adv == "none":
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
            elif adv == "pgd":
                loss, logits = pgd_at_loss(model, xb, yb, eps, alpha, steps)
            else:
                loss, logits = trades_loss(model, xb, yb, beta=beta, eps=eps, alpha=alpha,
                                           steps=steps)
        objective = loss
        if world_size > 1:
            objective = loss * loss_scale(len(yb), min(batch_size, n - step * batch_size),
                                          world_size)
        optimizer.zero_grad(set_to_none=True)
        if grad_scaler is not None:
            grad_scaler.scale(objective).backward()
            grad_scaler.step(optimizer)
            grad_scaler.update()
        else:
            objective.backward()
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
    if world_size > 1:
        total_loss, correct, seen = all_sum([total_loss, correct, seen], device or x.device)
        seen = int(seen)
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1),
                      time.perf_counter() - t0, seen)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             attack: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             batch_size: int = 256, device: torch.device | str | None = None,
             progress: bool | None = None, desc: str = "eval") -> float:
    """Accuracy of ``model`` (in eval mode, restored after) on (x, y), or on
    ``attack(model, xb, yb)`` per batch.

    Args:
        model: a classifier mapping batches to logits ``(B, classes)``.
        x: inputs ``(N, ...)`` (uint8 images are scaled per batch).
        y: int64 labels ``(N,)``.
        attack: ``(model, xb, yb) -> xb_adv`` of xb's shape, or None (clean accuracy).
        batch_size: a positive int.
        device: where batches go (None: where x is).
        progress: a tqdm bar (None: when stderr is a terminal).
        desc: the bar's label.

    Returns:
        The fraction of correct predictions, a float in [0, 1] (0 for N = 0).

    Raises:
        ValueError: bad ``batch_size``; x and y of different lengths; else as ``attack``.
    """
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
    """Clean and robust accuracy.

    Args:
        model: a classifier mapping batches to logits ``(B, classes)``.
        x: inputs ``(N, ...)`` in [0, 1] (uint8 images are scaled per batch).
        y: int64 labels ``(N,)``.
        attacks: names for :func:`pyeuler.robust.make_attack` (``"fgsm"``, ``"pgd-20"``,
            ``"cw"``), one or a sequence.
        eps: an L∞ radius or a sequence of them (one result per eps; CW ignores eps).
        alpha: the PGD step (None: the attack's default).
        batch_size: a positive int.
        device: where batches go (None: where x is).
        progress: tqdm bars (None: when stderr is a terminal).
        **attack_kwargs: passed to :func:`pyeuler.robust.make_attack`.

    Returns:
        ``{"clean": acc, "fgsm": {eps: acc, ...}, "cw": acc, ...}``, accuracies as floats in
        [0, 1], eps keys as floats.

    Raises:
        ValueError: an unknown attack name or bad attack settings
            (:func:`pyeuler.robust.make_attack`); else as :func:`accuracy`.

    Warns:
        GradientMaskingWarning: the model uses detached IE-Skip gradients.
    """
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
