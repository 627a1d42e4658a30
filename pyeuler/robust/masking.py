"""Gradient-masking checks (Athalye, Carlini & Wagner, ICML 2018, §3 "warning signs";
Carlini et al., "On Evaluating Adversarial Robustness", 2019, §5).

A defence can look robust only because its gradients are useless to white-box attacks:
zero, detached, or shattered. IE-Skips with ``grad="detached"`` (the IE authors' released
code) are exactly such a suspect. Each check below compares numbers that must be ordered
one way for an honest model; an inversion beyond its threshold flags masking. Counts are
of samples, so a threshold is a number of samples, not a difference of rounded
percentages. All attacks are L∞ on inputs in [0, 1]. The sweeps use PGD with 5 seeded
random restarts (a sample counts as broken if any run breaks it): a single run from x gets
stuck at a corner of the box even on honest two-moons models (30 % "robust" at ε = 0.5),
and its run-to-run noise would trip a one-sample tolerance.

==================== ====================================================================
check                fires when
==================== ====================================================================
exact_vs_detached    PGD through the model's own IE gradients leaves more than 1 % of the
                     samples (and at least 1) more robust than PGD through exact
                     (``"unrolled"``) gradients, at some ε. Only models whose IE-Skips use
                     ``"unrolled"``/``"detached"`` (same forward, switchable); exact models
                     pass by construction, and both numbers are reported.
black_box_vs_white   the black-box Square attack (which needs no gradients) leaves more
                     than 1 % of the samples (and at least 1) fewer robust than the
                     per-sample worst case of the white-box attacks, at some ε.
monotone_in_steps    robust samples under PGD (α = 2.5·ε/steps, 5 restarts) at the
                     largest ε increase by more than one sample from fewer to more steps
                     (1, 10, 50).
monotone_in_eps      robust samples under PGD-20 (5 restarts) increase by more than one
                     sample from a smaller to a larger ε (the evaluated radii and 0.5·2⁻ᵏ,
                     k = 0..4).
unbounded_eps        PGD-20 (5 restarts) leaves more than 1 % of the samples robust at
                     ε = 0.5, where every input in [0, 1] can reach the all-0.5 input.
==================== ====================================================================
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from pyeuler.robust.attacks import default_alpha, eval_mode, pgd
from pyeuler.robust.autoattack import square
from pyeuler.robust.training import batches

__all__ = ["MaskingCheck", "MaskingReport", "check_gradient_masking", "ie_gradients",
           "MASKING_TOLERANCE", "MONOTONE_TOLERANCE", "UNBOUNDED_EPS", "STEP_COUNTS"]

MASKING_TOLERANCE = 0.01    # fraction of samples, for exact_vs_detached, black_box_vs_white
MONOTONE_TOLERANCE = 1      # samples, for monotone_in_steps and monotone_in_eps
UNBOUNDED_EPS = 0.5         # and at most 1 % robust there
STEP_COUNTS = (1, 10, 50)
SWEEP_RESTARTS = 5
_SWITCHABLE = ("unrolled", "detached")


@dataclass
class MaskingCheck:
    """One check's outcome: ``status`` is ``"pass"``, ``"flag"`` or ``"n/a"``; ``values``
    holds the robust-sample counts it compared."""

    name: str
    status: str
    summary: str
    threshold: str
    values: dict = field(default_factory=dict)


@dataclass
class MaskingReport:
    """All checks of :func:`check_gradient_masking` and their verdict."""

    samples: int
    checks: list[MaskingCheck]

    @property
    def flagged(self) -> list[MaskingCheck]:
        """The checks that fired."""
        return [c for c in self.checks if c.status == "flag"]

    def verdict(self) -> str:
        """One line: ``"gradient masking: no sign (...)"`` or ``"gradient masking:
        SUSPECTED (...)"`` naming the checks that fired."""
        ran = [c for c in self.checks if c.status != "n/a"]
        if self.flagged:
            return ("gradient masking: SUSPECTED — "
                    + "; ".join(f"{c.name}: {c.summary}" for c in self.flagged))
        skipped = len(self.checks) - len(ran)
        return (f"gradient masking: no sign ({len(ran)} checks quiet"
                + (f", {skipped} not applicable" if skipped else "") + ")")

    def to_dict(self) -> dict:
        """JSON-ready dict: samples, verdict, and every check."""
        return {"samples": self.samples, "verdict": self.verdict(),
                "checks": [asdict(c) for c in self.checks]}


def _switchable_ie_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if getattr(m, "grad", None) in _SWITCHABLE and (getattr(m, "steps", 0) or 0) > 0]


@contextlib.contextmanager
def ie_gradients(model: nn.Module, grad: str) -> Iterator[int]:
    """Temporarily differentiate every IE-Skip of ``model`` that uses ``"unrolled"`` or
    ``"detached"`` gradients with ``grad`` instead (the two share the forward pass, so the
    model computes the same function). ``"implicit"`` IE-Skips are left alone.

    Args:
        model: any module; IE-Skips are recognised by their ``grad`` and ``steps``
            attributes (:class:`pyeuler.nn.IESkip` and the IE blocks).
        grad: ``"unrolled"`` (exact) or ``"detached"``.

    Returns:
        A context manager yielding the number of IE-Skips switched.

    Raises:
        ValueError: ``grad`` not ``"unrolled"`` or ``"detached"``.
    """
    if grad not in _SWITCHABLE:
        raise ValueError(f"grad: expected one of {_SWITCHABLE}, got {grad!r}")
    modules = _switchable_ie_modules(model)
    before = [m.grad for m in modules]
    for m in modules:
        m.grad = grad
    try:
        yield len(modules)
    finally:
        for m, g in zip(modules, before):
            m.grad = g


def _robust(model, x, y, attack: Callable | None, batch_size, device) -> torch.Tensor:
    flags = []
    for xb, yb in batches(x, y, batch_size, device=device):
        if attack is not None:
            xb = attack(model, xb, yb)
        with torch.no_grad():
            flags.append((model(xb).argmax(1) == yb).cpu())
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)


def _pgd_attack(eps, steps, seed, restarts=1):
    alpha = default_alpha(eps, steps)

    def attack(model, xb, yb):
        generator = torch.Generator(device=xb.device).manual_seed(seed)
        return pgd(model, xb, yb, eps, alpha, steps, True, generator, restarts=restarts)

    return attack


def _allowed(n: int) -> int:
    # "more than 1 % of the samples, and at least 1": below 100 samples one is noise
    return max(int(MASKING_TOLERANCE * n), 1)


def check_gradient_masking(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                           eps: Sequence[float], white_box: Mapping[float, torch.Tensor]
                           | None = None, black_box: Mapping[float, torch.Tensor] | None = None,
                           square_queries: int = 5000, seed: int = 0, batch_size: int = 256,
                           device: torch.device | str | None = None) -> MaskingReport:
    """Run the gradient-masking checks of the module docstring on (x, y), L∞.

    Args:
        model: maps x to logits (N, C); evaluated in eval mode, its mode restored.
        x: float tensor (N, ...) in [0, 1] (uint8 images are scaled by 1/255).
        y: int64 tensor (N,) of labels.
        eps: the evaluated L∞ radii (non-empty); ``exact_vs_detached`` and
            ``black_box_vs_white`` run at each, ``monotone_in_steps`` at the largest.
        white_box: per radius, bool (N,) robust after every white-box attack already run
            (e.g. the evaluation's per-sample worst case); missing radii run PGD-20 with a
            seeded random start.
        black_box: per radius, bool (N,) robust after Square already run; missing radii
            run :func:`pyeuler.robust.autoattack.square` with ``square_queries``.
        square_queries: Square's query budget per sample (AutoAttack uses 5000).
        seed: seed of the random starts and of Square.
        batch_size: samples per batch.
        device: where to run (the model must be there); default x's device.

    Returns:
        :class:`MaskingReport` (``.verdict()`` is the one-line summary).

    Raises:
        ValueError: empty ``eps`` or a negative radius; what the attacks refuse.
        ImportError: Square is needed and ``pyautoattack`` is not installed.
    """
    eps = [float(e) for e in eps]
    if not eps or min(eps) < 0:
        raise ValueError(f"eps: expected non-empty radii >= 0, got {eps!r}")
    n = len(x)
    allowed = _allowed(n)
    white_box = dict(white_box or {})
    black_box = dict(black_box or {})
    checks = []

    def robust(attack):
        return _robust(model, x, y, attack, batch_size, device)

    with eval_mode(model):
        clean = robust(None)

        # 1. exact vs detached IE gradients
        if not _switchable_ie_modules(model):
            checks.append(MaskingCheck(
                "exact_vs_detached", "n/a", "no IE-Skips with unrolled/detached gradients "
                "(none, or implicit ones, whose gradients are exact)",
                f"own-gradient PGD-20 robust > exact-gradient robust + {allowed} samples"))
        else:
            values, worst = {}, 0
            for e in eps:
                own = int((clean & robust(_pgd_attack(e, 20, seed))).sum())
                with ie_gradients(model, "unrolled"):
                    exact = int((clean & robust(_pgd_attack(e, 20, seed))).sum())
                with ie_gradients(model, "detached"):
                    detached = int((clean & robust(_pgd_attack(e, 20, seed))).sum())
                values[str(e)] = {"own": own, "exact": exact, "detached": detached}
                worst = max(worst, own - exact)
            fired = worst > allowed
            checks.append(MaskingCheck(
                "exact_vs_detached", "flag" if fired else "pass",
                f"the model's own IE gradients leave up to {worst} more of {n} samples robust "
                "than exact gradients" if fired else
                f"own gradients within {allowed} samples of exact ones",
                f"own-gradient PGD-20 robust > exact-gradient robust + {allowed} samples",
                values))

        # 2. black box (Square) vs white box
        values, worst = {}, 0
        for e in eps:
            white = white_box.get(e)
            if white is None:
                white = robust(_pgd_attack(e, 20, seed))
            black = black_box.get(e)
            if black is None:
                black = robust(lambda m, xb, yb, e=e: square(
                    m, xb, yb, eps=e, queries=square_queries, seed=seed))
            w, b = int((clean & white.bool()).sum()), int((clean & black.bool()).sum())
            values[str(e)] = {"white_box": w, "square": b}
            worst = max(worst, w - b)
        fired = worst > allowed
        checks.append(MaskingCheck(
            "black_box_vs_white", "flag" if fired else "pass",
            f"Square breaks up to {worst} of {n} samples more than the white-box attacks"
            if fired else f"Square within {allowed} samples of the white-box attacks",
            f"white-box robust − Square robust > {allowed} samples", values))

        # 3. more PGD steps never help the model
        e_max = max(eps)
        counts = {k: int((clean & robust(_pgd_attack(e_max, k, seed, SWEEP_RESTARTS))).sum())
                  for k in STEP_COUNTS}
        rises = [(a, b) for a, b in zip(STEP_COUNTS, STEP_COUNTS[1:])
                 if counts[b] > counts[a] + MONOTONE_TOLERANCE]
        checks.append(MaskingCheck(
            "monotone_in_steps", "flag" if rises else "pass",
            ", ".join(f"PGD-{b} leaves {counts[b]} robust vs {counts[a]} for PGD-{a}"
                      for a, b in rises) if rises else
            f"robust samples non-increasing in steps at eps={e_max:g}",
            f"a rise of more than {MONOTONE_TOLERANCE} sample", {str(k): v for k, v in counts.items()}))

        # 4. and 5. a larger ball never helps, and the unbounded one breaks everything
        grid = sorted(set(eps) | {UNBOUNDED_EPS * 2.0 ** -k for k in range(5)})
        curve = {e: int((clean & robust(_pgd_attack(e, 20, seed, SWEEP_RESTARTS))).sum())
                 for e in grid}
        rises = [(a, b) for a, b in zip(grid, grid[1:]) if curve[b] > curve[a] + MONOTONE_TOLERANCE]
        checks.append(MaskingCheck(
            "monotone_in_eps", "flag" if rises else "pass",
            ", ".join(f"{curve[b]} robust at eps={b:g} vs {curve[a]} at {a:g}"
                      for a, b in rises) if rises else "robust samples non-increasing in eps",
            f"a rise of more than {MONOTONE_TOLERANCE} sample",
            {str(e): v for e, v in curve.items()}))
        left = curve[UNBOUNDED_EPS]
        fired = left > MASKING_TOLERANCE * n
        checks.append(MaskingCheck(
            "unbounded_eps", "flag" if fired else "pass",
            f"{left} of {n} samples ({100 * left / max(n, 1):.1f} %) survive PGD-20 ×"
            f"{SWEEP_RESTARTS} at "
            f"eps={UNBOUNDED_EPS:g}",
            f"more than {100 * MASKING_TOLERANCE:g} % robust at eps={UNBOUNDED_EPS:g}",
            {"robust": left}))
    return MaskingReport(n, checks)
