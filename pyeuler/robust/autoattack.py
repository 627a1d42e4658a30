"""AutoAttack (Croce & Hein, ICML 2020) through the maintained package ``pyautoattack``.

Robust accuracy is only believed when measured with AutoAttack, the RobustBench standard:
APGD-CE, targeted APGD-DLR, targeted FAB and the black-box Square attack, all with fixed
hyper-parameters. This module does not reimplement any of it; it calls the package (an
optional extra: ``pip install "pyeuler[eval]"``) with the model in eval mode, on x's
device, and leaves the caller's random number generators as they were (the package
re-seeds torch's global generator before every attack).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn

from pyeuler.robust.attacks import NORMS, _check, eval_mode

__all__ = ["autoattack", "square", "AUTOATTACK_ATTACKS", "AUTOATTACK_VERSIONS",
           "FEW_CLASS_ATTACKS", "autoattack_plan"]

AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
AUTOATTACK_VERSIONS = ("standard", "plus", "rand")
# The DLR loss needs 3 classes, its targeted form 4 (Croce & Hein §3.2): below that,
# AutoAttack's standard version cannot run and these two untargeted attacks stand in.
FEW_CLASS_ATTACKS = ("apgd-ce", "square")
_NEEDS_FOUR_CLASSES = ("apgd-dlr", "apgd-t", "fab-t")
_MAX_TARGETS = 9  # the standard version's target classes for APGD-T and FAB-T


def _package():
    try:
        import pyautoattack
    except ImportError as e:
        raise ImportError("AutoAttack needs the pyautoattack package: "
                          'pip install "pyeuler[eval]" (or pip install pyautoattack)') from e
    return pyautoattack


@contextlib.contextmanager
def _own_rng(device: torch.device):
    # the package calls torch.manual_seed(seed) before each attack; keep the caller's streams
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def _as_images(model: nn.Module, x: torch.Tensor):
    """The package's Square attack reads inputs as (N, C, H, W): other shapes (two-moons'
    (N, 2) points) go in as one-row images (N, 1, 1, D) and are reshaped back for the model,
    which makes Square a random search over single coordinates. 4-D inputs pass as they are."""
    if x.dim() == 4:
        return model, x
    shape = x.shape[1:]

    def flat_model(images: torch.Tensor) -> torch.Tensor:
        return model(images.reshape(images.shape[0], *shape))

    return flat_model, x.reshape(x.shape[0], 1, 1, -1)


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[-1])


def autoattack_plan(num_classes: int, version: str = "standard",
                    attacks: list[str] | tuple[str, ...] | None = None
                    ) -> tuple[str, list[str] | None, str | None]:
    """Which AutoAttack version and attacks run for a classifier with ``num_classes`` classes.

    Args:
        num_classes: number of classes C of the model's logits, int >= 2.
        version: ``"standard"``, ``"plus"`` or ``"rand"`` (the package's versions).
        attacks: a custom subset of :data:`AUTOATTACK_ATTACKS`, run as the package's
            ``"custom"`` version, or None for the version's own list.

    Returns:
        ``(version, attacks, note)``: the package version to run (``"custom"`` when
        ``attacks`` is given, or when fewer than 4 classes force
        :data:`FEW_CLASS_ATTACKS`), its attack list (None: the version's own), and a note
        saying what was substituted and why (None if nothing was).

    Raises:
        ValueError: an unknown version or attack, an empty or repeated subset, a subset
            passed with ``version`` other than ``"standard"``, or a subset that needs more
            classes than the model has.
    """
    if version not in AUTOATTACK_VERSIONS:
        raise ValueError(f"version: expected one of {AUTOATTACK_VERSIONS}, got {version!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: expected an int >= 2, got {num_classes!r}")
    if attacks is not None:
        if version != "standard":
            raise ValueError(f"attacks: a custom subset runs as the package's custom version; "
                             f"leave version='standard' (got {version!r})")
        attacks = list(attacks)
        unknown = [a for a in attacks if a not in AUTOATTACK_ATTACKS]
        if unknown or not attacks or len(set(attacks)) != len(attacks):
            raise ValueError(f"attacks: expected distinct names from {AUTOATTACK_ATTACKS}, "
                             f"got {attacks!r}")
        too_few = [a for a in attacks if a in _NEEDS_FOUR_CLASSES] if num_classes < 4 else []
        if too_few:
            raise ValueError(f"attacks: {', '.join(too_few)} need at least 4 classes (the "
                             f"targeted DLR loss); the model has {num_classes}")
        return "custom", attacks, None
    if num_classes < 4 and version in ("standard", "plus"):
        return "custom", list(FEW_CLASS_ATTACKS), (
            f"AutoAttack: {num_classes} classes are too few for the DLR loss and the targeted "
            f"attacks (4 needed); ran {' + '.join(FEW_CLASS_ATTACKS)} instead of the "
            f"{version} version")
    if num_classes < 3 and version == "rand":
        raise ValueError(f"version: 'rand' runs APGD-DLR, which needs at least 3 classes; the "
                         f"model has {num_classes}")
    return version, None, None


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
               norm: str = "Linf", version: str = "standard", seed: int = 0,
               attacks: list[str] | tuple[str, ...] | None = None) -> torch.Tensor:
    """AutoAttack adversarial examples (Croce & Hein, ICML 2020), computed by ``pyautoattack``.

    Equivalent to ``pyautoattack.AutoAttack(model, eps=eps, norm=norm, version=version,
    seed=seed, attacks=attacks, device=x.device).run_standard_evaluation(x, y,
    batch_size=len(x))[0]`` with the model in eval mode, except that:

    - ``attacks`` (a subset of :data:`AUTOATTACK_ATTACKS`) runs as the package's
      ``version="custom"`` (its defaults: APGD with 5 restarts, Square with 5000 queries);
    - with fewer than 4 classes (two-moons), where the DLR loss and the targeted attacks
      cannot run, the standard and plus versions become the custom version with
      :data:`FEW_CLASS_ATTACKS` (APGD-CE + Square), with a ``UserWarning`` saying so;
    - with 4 to 9 classes, the standard version's 9 target classes are cut to C − 1
      (the package would index classes that do not exist);
    - inputs that are not images (N, C, H, W), e.g. two-moons' (N, 2) points, go to the
      package as (N, 1, 1, D) (its Square attack reads image shapes) and come back as given;
    - torch's global random state is restored afterwards.

    Each sample the ensemble fools gets the first attack's adversarial example that fooled
    it; the others are returned unchanged (as are samples misclassified to begin with).

    Args:
        model: maps x to logits (N, C); run in eval mode, its mode restored afterwards.
        x: float tensor (N, ...) in [0, 1], on the model's device.
        y: int64 tensor (N,) of true labels.
        eps: radius of the threat model (per pixel for ``"Linf"``, per sample for ``"L2"``).
        norm: ``"Linf"`` or ``"L2"``.
        version: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square), ``"plus"`` or ``"rand"``.
        seed: the package's seed for every attack's random starts and queries.
        attacks: a custom subset, e.g. ``["apgd-ce", "apgd-t"]``, or None.

    Returns:
        Tensor like ``x`` (shape, dtype, device): the adversarial examples, detached.

    Raises:
        ImportError: ``pyautoattack`` is not installed (names the extra to install).
        TypeError: ``x`` not floating point, ``y`` not int64, ``eps`` not a finite number,
            ``seed`` not an int.
        ValueError: shapes or devices that do not match, ``x`` outside [0, 1], a negative
            ``eps``, an unknown ``norm``, or what :func:`autoattack_plan` refuses.
    """
    _check(model, x, y, eps=eps)
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {seed!r}")
    package = _package()
    x, y = x.detach(), y.detach()
    if x.shape[0] == 0:
        return x.clone()
    with eval_mode(model), _own_rng(x.device):
        num_classes = _num_classes(model, x)
        version, subset, note = autoattack_plan(num_classes, version, attacks)
        if note is not None:
            warnings.warn(note, UserWarning, stacklevel=2)
        images_model, images = _as_images(model, x)
        adversary = package.AutoAttack(images_model, attacks=subset, device=x.device,
                                       eps=float(eps), norm=norm, seed=seed, version=version)
        if num_classes <= _MAX_TARGETS:
            adversary.apgd_targeted.n_target_classes = min(
                adversary.apgd_targeted.n_target_classes, num_classes - 1)
            adversary.fab.n_target_classes = min(adversary.fab.n_target_classes,
                                                 num_classes - 1)
        x_adv, _ = adversary.run_standard_evaluation(images, y, batch_size=x.shape[0])
    return x_adv.detach().reshape(x.shape)


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
           norm: str = "Linf", queries: int = 5000, seed: int = 0) -> torch.Tensor:
    """The Square attack (Andriushchenko et al., ECCV 2020): black box, scores only.

    ``pyautoattack``'s ``SquareAttack`` with AutoAttack's settings (p_init 0.8, one restart,
    margin loss, no schedule rescaling); with ``queries=5000`` it is what
    ``autoattack(..., attacks=["square"])`` runs. It uses no gradients, so gradient masking
    does not weaken it: being stronger than the white-box attacks is a sign of masking
    (Athalye et al., ICML 2018).

    Args:
        model: maps x to logits (N, C); run in eval mode, its mode restored afterwards.
        x: float tensor (N, ...) in [0, 1].
        y: int64 tensor (N,) of true labels.
        eps: radius (per pixel for ``"Linf"``, per sample for ``"L2"``), >= 0.
        norm: ``"Linf"`` or ``"L2"``.
        queries: model evaluations per sample, int >= 1.
        seed: the package's seed for the random squares.

    Returns:
        Tensor like ``x``: the adversarial examples (unchanged where the attack failed).

    Raises:
        ImportError: ``pyautoattack`` is not installed.
        TypeError / ValueError: as :func:`autoattack`; ``queries`` not a positive int.
    """
    _check(model, x, y, eps=eps)
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
    if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
        raise ValueError(f"queries: expected an int >= 1, got {queries!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {seed!r}")
    _package()
    from pyautoattack.square import SquareAttack

    x, y = x.detach(), y.detach()
    if x.shape[0] == 0:
        return x.clone()
    with eval_mode(model), _own_rng(x.device), torch.no_grad():
        images_model, images = _as_images(model, x)
        attack = SquareAttack(images_model, p_init=0.8, n_queries=queries, eps=float(eps), norm=norm,
                              n_restarts=1, seed=seed, verbose=False, device=x.device,
                              resc_schedule=False)
        x_adv = attack.perturb(images, y)
    return x_adv.detach().reshape(x.shape).to(x.dtype)
