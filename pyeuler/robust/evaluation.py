"""Robust evaluation with per-sample results: every attack on every sample, the per-sample
worst case over all attacks as the headline, C&W as an L2 distortion, and resumption.

A sample counts as robust at (norm, ε) only if it is classified correctly without attack
and after every attack run at that norm and ε (the RobustBench convention: AutoAttack's
robust accuracy is this worst case over its four attacks). Per-sample results make the
worst case exact (a minimum per sample, not a minimum of accuracies, which would overstate
robustness) and let a long evaluation resume at the batch where it stopped.

Attack names (:func:`parse_attack`): ``fgsm``; ``pgd-N`` (L∞, N steps; ``pgd`` is
``pgd-20``), ``pgd-N-l2`` (L2), ``pgd-N-t`` / ``pgd-N-l2-t`` (targeted, toward each of
the top wrong classes in turn); ``autoattack`` / ``autoattack-l2`` (the ``pyautoattack``
package); ``square`` / ``square-l2`` (black-box Square alone); ``cw`` (Carlini-Wagner L2,
reported as success rate and median L2 distortion, and counted in the L2 worst case at
each L2 ε: a C&W example within ε breaks the sample there).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from pyeuler.robust.attacks import cw, default_alpha, eval_mode, fgsm, pgd
from pyeuler.robust.autoattack import autoattack, autoattack_plan, square
from pyeuler.robust.training import batches

__all__ = ["AttackSpec", "EvalSettings", "parse_attack", "worst_case", "attack_batch",
           "robust_evaluation", "summarize", "eps_key", "per_sample"]

_PGD = re.compile(r"^pgd(?:-(\d+))?(-l2)?(-t)?$")


@dataclass(frozen=True)
class AttackSpec:
    """One attack of an evaluation, parsed from its name by :func:`parse_attack`.

    ``kind`` is ``"fgsm"``, ``"pgd"``, ``"autoattack"``, ``"square"`` or ``"cw"``; ``norm``
    ``"Linf"``/``"L2"`` (``None`` for C&W, a minimum-distortion attack without ε)."""

    name: str
    kind: str
    norm: str | None
    steps: int = 0
    targeted: bool = False

    @property
    def white_box(self) -> bool:
        """Whether the attack uses the model's gradients (all but Square)."""
        return self.kind != "square"


def parse_attack(name: str) -> AttackSpec:
    """Parse an attack name (see the module docstring for the list).

    Args:
        name: e.g. ``"fgsm"``, ``"pgd-20"``, ``"pgd-50-l2-t"``, ``"autoattack"``, ``"cw"``
            (case and surrounding spaces ignored).

    Returns:
        The :class:`AttackSpec`, with the canonical lower-case name.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: an unknown name, or PGD with 0 steps.
    """
    if not isinstance(name, str):
        raise TypeError(f"attack: expected a name, got {type(name).__name__}")
    key = name.strip().lower()
    if key == "fgsm":
        return AttackSpec("fgsm", "fgsm", "Linf")
    if key == "cw":
        return AttackSpec("cw", "cw", None)
    if key in ("autoattack", "autoattack-l2", "square", "square-l2"):
        return AttackSpec(key, key.split("-")[0], "L2" if key.endswith("-l2") else "Linf")
    match = _PGD.match(key)
    if match:
        steps = int(match.group(1)) if match.group(1) else 20
        if steps < 1:
            raise ValueError(f"attack: {name!r}: PGD needs N >= 1 steps")
        name = f"pgd-{steps}" + ("-l2" if match.group(2) else "") + ("-t" if match.group(3) else "")
        return AttackSpec(name, "pgd", "L2" if match.group(2) else "Linf", steps,
                          bool(match.group(3)))
    raise ValueError(f"attack: unknown attack {name!r}; choose from fgsm, pgd-N[-l2][-t], "
                     "autoattack[-l2], square[-l2], cw")


@dataclass
class EvalSettings:
    """Everything besides the model and data that decides an evaluation's results (a
    saved evaluation resumes only under equal settings).

    ``alpha`` None means :func:`default_alpha` (2.5·ε/steps); ``targets`` None means
    min(9, C − 1) target classes for targeted PGD (AutoAttack's APGD-T count); seeds derive
    from ``seed`` and each batch's first sample index, so results do not depend on where
    an evaluation was interrupted."""

    alpha: float | None = None
    restarts: int = 1
    random_start: bool = True
    targets: int | None = None
    seed: int = 0
    aa_version: str = "standard"
    aa_attacks: list[str] | None = None
    square_queries: int = 5000
    cw_c: float = 10.0
    cw_steps: int = 50
    cw_lr: float = 6e-4
    cw_kappa: float = 0.0
    batch_size: int = 256

    def to_dict(self) -> dict:
        """JSON-ready dict of the settings."""
        return asdict(self)


def eps_key(eps: float) -> str:
    """The JSON key of a radius: ``str(float(eps))`` (``"0.1"``, ``"0.03137254901960784"``)."""
    return str(float(eps))


def worst_case(clean: torch.Tensor, attacks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample worst case: robust only if correct clean and after every attack.

    Args:
        clean: bool tensor (N,), correct without attack.
        attacks: bool tensors (N,), correct after each attack.

    Returns:
        bool tensor (N,): the logical AND, i.e. the per-sample minimum over all inputs.

    Raises:
        ValueError: tensors of another shape than ``clean``'s (N,).
    """
    if clean.dim() != 1:
        raise ValueError(f"clean: expected shape (N,), got {tuple(clean.shape)}")
    out = clean.bool().clone()
    for i, flags in enumerate(attacks):
        if flags.shape != clean.shape:
            raise ValueError(f"attacks[{i}]: shape {tuple(flags.shape)} does not match "
                             f"clean {tuple(clean.shape)}")
        out &= flags.bool().to(out.device)
    return out


def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def _batch_generator(settings: EvalSettings, start: int, device: torch.device):
    return torch.Generator(device=device).manual_seed(settings.seed * 1_000_003 + start)


def attack_batch(model: nn.Module, spec: AttackSpec, x: torch.Tensor, y: torch.Tensor,
                 eps: float | None, settings: EvalSettings, start: int = 0) -> torch.Tensor:
    """Run one attack on one batch and say, per sample, whether it survived.

    Args:
        model: maps x to logits (N, C); attacked in eval mode.
        spec: the attack (:func:`parse_attack`).
        x: float tensor (N, ...) in [0, 1], on the model's device.
        y: int64 tensor (N,) of true labels.
        eps: the radius for ``spec.norm`` (ignored by C&W, which may pass None).
        settings: attack parameters and the seed.
        start: index of the batch's first sample in the whole evaluation (the random
            starts are seeded with ``settings.seed`` and ``start``).

    Returns:
        For C&W, a float tensor (N,): the L2 distance of the adversarial example, +inf where
        the attack did not misclassify the sample. Otherwise a bool tensor (N,): correct
        after the attack.

    Raises:
        ValueError / TypeError: what the attack itself refuses (see each attack).
    """
    if spec.kind == "cw":
        adv = cw(model, x, y, c=settings.cw_c, steps=settings.cw_steps, lr=settings.cw_lr,
                 kappa=settings.cw_kappa)
        fooled = _predict(model, adv) != y
        l2 = (adv - x).flatten(1).norm(dim=1)
        return torch.where(fooled, l2, torch.full_like(l2, math.inf))
    if spec.kind == "fgsm":
        return _predict(model, fgsm(model, x, y, eps)) == y
    if spec.kind == "pgd":
        alpha = default_alpha(eps, spec.steps) if settings.alpha is None else settings.alpha
        generator = _batch_generator(settings, start, x.device)

        def run(labels, targeted):
            return pgd(model, x, labels, eps, alpha, spec.steps, settings.random_start,
                       generator, norm=spec.norm, restarts=settings.restarts, targeted=targeted)

        if not spec.targeted:
            return _predict(model, run(y, False)) == y
        with torch.no_grad():
            logits = model(x)
        ranked = logits.masked_fill(
            torch.nn.functional.one_hot(y, logits.shape[1]).bool(), -math.inf
        ).argsort(1, descending=True)
        targets = min(9, logits.shape[1] - 1) if settings.targets is None else settings.targets
        correct = torch.ones_like(y, dtype=torch.bool)
        for rank in range(min(targets, logits.shape[1] - 1)):
            correct &= _predict(model, run(ranked[:, rank], True)) == y
        return correct
    if spec.kind == "square":
        adv = square(model, x, y, eps=eps, norm=spec.norm, queries=settings.square_queries,
                     seed=settings.seed)
        return _predict(model, adv) == y
    if spec.kind == "autoattack":
        with torch.no_grad():
            num_classes = int(model(x[:1]).shape[-1])
        # the plan's substitution for few classes is reported once, by the caller
        _, subset, _ = autoattack_plan(num_classes, settings.aa_version,
                                             settings.aa_attacks)
        adv = autoattack(model, x, y, eps=eps, norm=spec.norm, seed=settings.seed,
                         version=settings.aa_version if subset is None else "standard",
                         attacks=subset)
        return _predict(model, adv) == y
    raise ValueError(f"attack: unknown kind {spec.kind!r}")


def _as_json_flags(t: torch.Tensor) -> list:
    if t.dtype == torch.bool:
        return [int(v) for v in t.tolist()]
    return [None if math.isinf(v) else v for v in t.tolist()]


def _from_json(values: list, kind: str) -> torch.Tensor:
    if kind == "cw":
        return torch.tensor([math.inf if v is None else v for v in values], dtype=torch.float64)
    return torch.tensor(values, dtype=torch.bool)


def per_sample(state: dict, name: str, eps: float | None = None) -> torch.Tensor:
    """One entry of a state's per-sample results as a tensor.

    Args:
        state: as returned by :func:`robust_evaluation` (or its JSON round trip).
        name: ``"clean"``, ``"cw"`` or an attack name.
        eps: the radius, for attacks other than C&W.

    Returns:
        ``"cw"``: float64 (N,) L2 distances, +inf where C&W failed; otherwise bool (N,):
        correct without attack / after the attack.

    Raises:
        KeyError: the entry is not in the state.
        ValueError: the entry is not complete (fewer than N samples).
    """
    if name == "clean":
        values = state["per_sample"]["clean"]
    elif name == "cw":
        values = state["per_sample"]["cw"]["l2"]
    else:
        values = state["per_sample"][parse_attack(name).name][eps_key(eps)]
    if len(values) < state["samples"]:
        raise ValueError(f"{name}: only {len(values)} of {state['samples']} samples evaluated")
    return _from_json(values, "cw" if name == "cw" else "flags")


def robust_evaluation(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      attacks: Sequence[str], *, eps: Sequence[float] = (8 / 255,),
                      eps_l2: Sequence[float] = (0.5,), settings: EvalSettings | None = None,
                      device: torch.device | str | None = None, state: dict | None = None,
                      on_batch: Callable[[dict], None] | None = None,
                      progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Evaluate every attack at every radius of its norm on every sample, per sample.

    Batches run in order; after each, ``state`` holds the per-sample results so far and
    ``on_batch(state)`` is called (e.g. to save it). Passing a saved ``state`` back resumes:
    finished (attack, ε) entries are kept and unfinished ones continue at the first missing
    sample (the caller makes sure the model, data and settings are the same).

    Args:
        model: maps x to logits (N, C); evaluated in eval mode, its mode restored.
        x: float tensor (N, ...) in [0, 1] (uint8 images are scaled by 1/255 per batch).
        y: int64 tensor (N,) of labels.
        attacks: attack names (:func:`parse_attack`); C&W takes no ε.
        eps: L∞ radii for the L∞ attacks, in input units.
        eps_l2: L2 radii for the L2 attacks (and C&W's L2 columns).
        settings: attack parameters (:class:`EvalSettings`; default: its defaults).
        device: where to run (the model must be there); default x's device.
        state: a previous return value (or its JSON round trip) to resume, or None.
        on_batch: called with the state after every batch.
        progress: called as ``progress(label, done, total)`` after every batch.

    Returns:
        The state: ``{"samples": N, "per_sample": {"clean": [0/1]*N, "<attack>": {"<eps>":
        [0/1]*N}, "cw": {"l2": [float or None]*N}}}`` (lists grow batch by batch; None is an
        unsuccessful C&W sample) plus ``"results"`` from :func:`summarize`.

    Raises:
        TypeError / ValueError: an unknown attack name, a ``state`` for another number of
            samples, or what an attack refuses.
    """
    specs = [parse_attack(a) for a in attacks]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"attacks: listed twice: {attacks!r}")
    settings = settings or EvalSettings()
    n = len(x)
    state = state if state is not None else {}
    if state.get("samples", n) != n:
        raise ValueError(f"state: saved for {state.get('samples')} samples, not {n}")
    state["samples"] = n
    per_sample = state.setdefault("per_sample", {})
    jobs: list[tuple[str, AttackSpec | None, float | None, list]] = [
        ("clean", None, None, per_sample.setdefault("clean", []))]
    for spec in specs:
        if spec.kind == "cw":
            jobs.append(("cw", spec, None, per_sample.setdefault("cw", {}).setdefault("l2", [])))
            continue
        entry = per_sample.setdefault(spec.name, {})
        for e in (eps if spec.norm == "Linf" else eps_l2):
            jobs.append((f"{spec.name} eps={float(e):.4g}", spec, float(e),
                         entry.setdefault(eps_key(e), [])))
    with eval_mode(model):
        for label, spec, e, done in jobs:
            if len(done) >= n:
                continue
            start0 = len(done)
            for i, (xb, yb) in enumerate(batches(x[start0:], y[start0:], settings.batch_size,
                                                 device=device)):
                start = start0 + i * settings.batch_size
                if spec is None:
                    result = _predict(model, xb) == yb
                else:
                    result = attack_batch(model, spec, xb, yb, e, settings, start)
                done.extend(_as_json_flags(result.cpu()))
                state["results"] = summarize(state, attacks, eps=eps, eps_l2=eps_l2)
                if on_batch is not None:
                    on_batch(state)
                if progress is not None:
                    progress(label, len(done), n)
    state["results"] = summarize(state, attacks, eps=eps, eps_l2=eps_l2)
    return state


def summarize(state: dict, attacks: Sequence[str], *, eps: Sequence[float],
              eps_l2: Sequence[float]) -> dict:
    """Accuracies and worst cases from per-sample results (complete entries only).

    Args:
        state: as returned by :func:`robust_evaluation` (possibly partial).
        attacks: the attack names evaluated.
        eps: the L∞ radii.
        eps_l2: the L2 radii.

    Returns:
        ``{"clean": acc, "<attack>": {"<eps>": acc}, "cw": {"success_rate", "median_l2",
        "attacked", "accuracy_at": {"<L2 eps>": acc}}, "worst_case": {"Linf": {"<eps>": acc}, "L2": {...}},
        "worst_case_attacks": {"Linf": [...], "L2": [...]}}``: accuracies are fractions of
        all N samples; C&W's success rate is over the samples classified correctly without
        attack (``attacked``), its median L2 over the successful ones (None if none), its
        accuracy at an L2 radius counts the samples correct clean and not broken within it.
        Entries still running are left out, and so is a worst case missing any of them.

    Raises:
        ValueError: an unknown attack name.
    """
    n = state["samples"]
    per_sample = state["per_sample"]
    specs = [parse_attack(a) for a in attacks]
    out: dict = {}
    clean_list = per_sample.get("clean", [])
    if len(clean_list) < n or n == 0:
        return out
    clean = _from_json(clean_list, "clean")
    out["clean"] = clean.float().mean().item()
    flags: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    complete = True
    cw_l2 = None
    for spec in specs:
        if spec.kind == "cw":
            values = per_sample.get("cw", {}).get("l2", [])
            if len(values) < n:
                complete = False
                continue
            cw_l2 = _from_json(values, "cw")
            hits = cw_l2[clean]
            hits = hits[torch.isfinite(hits)]
            attacked = int(clean.sum())
            out["cw"] = {"success_rate": len(hits) / attacked if attacked else None,
                         "median_l2": hits.median().item() if len(hits) else None,
                         "attacked": attacked,
                         "accuracy_at": {eps_key(e): worst_case(clean, [~(cw_l2 <= float(e))])
                                         .float().mean().item() for e in eps_l2}}
            continue
        accs = {}
        for e in (eps if spec.norm == "Linf" else eps_l2):
            values = per_sample.get(spec.name, {}).get(eps_key(e), [])
            if len(values) < n:
                complete = False
                continue
            f = _from_json(values, "flags")
            accs[eps_key(e)] = f.float().mean().item()
            flags.setdefault((spec.norm, eps_key(e)), {})[spec.name] = f
        out[spec.name] = accs
    worst: dict = {}
    used: dict = {}
    for norm, radii in (("Linf", eps), ("L2", eps_l2)):
        norm_specs = [s.name for s in specs if s.norm == norm]
        if not norm_specs or not complete:
            continue
        for e in radii:
            columns = list(flags.get((norm, eps_key(e)), {}).values())
            if norm == "L2" and cw_l2 is not None:
                columns.append(~(cw_l2 <= float(e)))
            worst.setdefault(norm, {})[eps_key(e)] = worst_case(clean, columns).float().mean().item()
        used[norm] = norm_specs + (["cw"] if norm == "L2" and cw_l2 is not None else [])
    if worst:
        out["worst_case"] = worst
        out["worst_case_attacks"] = used
    return out
