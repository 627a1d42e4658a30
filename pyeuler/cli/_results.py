"""Result files of the command line that must never silently replace one another: the
configuration hash that names a training run's checkpoint, and the merge of successive
``pyeuler eval`` results of one checkpoint.

An eval results file describes one model state (:data:`EVAL_CONTEXT`). Its per-sample
records are grouped by *sample set* (which test samples, identified by their count and a
hash of their data): the top level holds the newest run's sample set, with every attack
measured on it by any run (an attack evaluated with another ``--grad`` than the
checkpoint's is its own attack, ``pgd-20@detached``), and the worst case recomputed as the
per-sample minimum over all of them; results on other sample sets are kept apart under
``"other_sample_sets"``, keyed by their sample set, and never enter that worst case.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

__all__ = ["config_hash", "read_eval_results", "merge_eval_results", "EVAL_CONTEXT",
           "attack_key", "split_attack_key", "sample_set_id", "summarize_records",
           "SAMPLE_SET_FIELDS", "sample_sets"]

# What an evaluation is of: results may be merged only between evaluations of the same
# weights (the checkpoint's run, epoch and contents) rebuilt the same way (the checkpoint's
# model kwargs; another --grad is not another model: its attacks are keyed ``name@grad``).
EVAL_CONTEXT = ("model", "model_kwargs", "data", "epochs", "run_id", "checkpoint_sha256")
# What belongs to a sample set rather than to a run: merged over every run on those samples.
SAMPLE_SET_FIELDS = ("sample_set", "samples", "attacks", "eps", "eps_l2", "eps_format",
                     "notes", "per_sample", "measured_with", "results")
# A run's record in "runs" keeps its settings and its own accuracies, not a second copy of
# the per-sample data, and no worst case of its own (the sample set's is over every run).
_NOT_IN_RUN_RECORDS = ("runs", "per_sample", "measured_with", "other_sample_sets")
_NOT_IN_RUN_RESULTS = ("worst_case", "worst_case_attacks", "worst_case_attacks_by_eps")


def config_hash(config: Mapping) -> str:
    """8 hex digits of the SHA-256 of ``config`` as canonical JSON (sorted keys): equal for
    equal configurations, whatever the order they were built in."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]


def read_eval_results(path: str | Path) -> dict | None:
    """The eval results already in ``path``, or ``None`` when there is no file.

    Raises ValueError naming the path when the file exists but is not a ``pyeuler eval``
    result (not JSON, or no ``results`` mapping): writing there would destroy it."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        previous = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} exists and is not a pyeuler eval result ({type(e).__name__}); "
                         "give another path or remove it") from None
    if not isinstance(previous, dict) or not isinstance(previous.get("results"), dict):
        raise ValueError(f"{path} exists and is not a pyeuler eval result (no 'results' "
                         "mapping); give another path or remove it")
    return previous


def attack_key(name: str, grad: str | None = None) -> str:
    """The results key of an attack run through ``grad`` gradients: ``name@grad``, or
    ``name`` for the checkpoint's own gradient mode (``grad`` None)."""
    return f"{name}@{grad}" if grad else name


def split_attack_key(key: str) -> tuple[str, str | None]:
    """``"pgd-20@detached"`` → ``("pgd-20", "detached")``; ``"fgsm"`` → ``("fgsm", None)``."""
    name, _, grad = key.partition("@")
    return name, grad or None


def sample_set_id(data: str, x, y) -> str:
    """Names the evaluated samples: the data set, the index range (the first ``len(x)``
    test samples) and 8 hex digits of the SHA-256 of their inputs and labels, so that
    results on other samples (another count, another --data-dir) are never mixed."""
    import numpy as np

    digest = hashlib.sha256()
    for t in (x, y):
        a = np.ascontiguousarray(t.detach().cpu().numpy())
        digest.update(f"{a.dtype}{a.shape}".encode())
        digest.update(a.tobytes())
    return f"{data} test[0:{len(x)}] sha256:{digest.hexdigest()[:8]}"


def _legacy_sample_set(payload: Mapping) -> str:
    """The sample set of results recorded without one (before sample sets were named):
    never equal to a named one, so they are never mixed with new results."""
    return f"{payload.get('data')} test[0:{payload.get('samples')}] (data not recorded)"


def _set_key(payload: Mapping) -> str:
    return payload.get("sample_set") or _legacy_sample_set(payload)


def _complete(values, n: int) -> bool:
    return isinstance(values, list) and len(values) >= n


def summarize_records(per_sample: Mapping, samples: int, eps_l2=()) -> dict:
    """Accuracies and worst cases of every attack recorded for one sample set.

    Args:
        per_sample: ``{"clean": [0/1]*N, "<attack key>": {"<eps>": [0/1]*N}, "cw…":
            {"l2": [float or None]*N}}`` (attack keys as :func:`attack_key`).
        samples: N.
        eps_l2: L2 radii at which C&W's accuracy is reported (beside those of the L2
            attacks recorded).

    Returns:
        As :func:`pyeuler.robust.evaluation.summarize`, over every attack recorded: the
        worst case at (norm, ε) is the per-sample minimum (:func:`worst_case`) over the
        clean flags and every complete record at that norm and ε (C&W at each L2 ε), so it
        is never above any of them; ``worst_case_attacks`` lists per norm the attacks
        taken, ``worst_case_attacks_by_eps`` per ε when not every ε has all of them. An
        ε with an unfinished record (an interrupted run) has no worst case until that
        record is finished; ``unfinished`` lists those records. Nothing if clean is
        incomplete.
    """
    import torch

    from pyeuler.robust.evaluation import eps_key, parse_attack, worst_case

    n = int(samples)
    clean_values = per_sample.get("clean")
    if n <= 0 or not _complete(clean_values, n):
        return {}
    clean = torch.tensor(clean_values[:n], dtype=torch.bool)
    out: dict = {"clean": clean.float().mean().item()}
    radii = {"Linf": set(), "L2": {eps_key(e) for e in eps_l2}}
    flags: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    cws: dict[str, torch.Tensor] = {}
    unfinished: dict[str, list[str]] = {}
    blocked: set[tuple[str, str | None]] = set()
    for key, record in per_sample.items():
        if key == "clean" or not isinstance(record, Mapping):
            continue
        try:
            spec = parse_attack(split_attack_key(key)[0])
        except (TypeError, ValueError):
            continue
        if spec.kind == "cw":
            values = record.get("l2")
            if not _complete(values, n):
                unfinished[key] = ["l2"]
                blocked.add(("L2", None))  # every L2 ε
                continue
            cws[key] = torch.tensor([float("inf") if v is None else v for v in values[:n]],
                                    dtype=torch.float64)
            continue
        accs = {}
        for e in sorted(record, key=float):
            radii[spec.norm].add(e)
            if not _complete(record[e], n):
                unfinished.setdefault(key, []).append(e)
                blocked.add((spec.norm, e))
                continue
            f = torch.tensor(record[e][:n], dtype=torch.bool)
            accs[e] = f.float().mean().item()
            flags.setdefault((spec.norm, e), {})[key] = f
        out[key] = accs
    l2_radii = sorted(radii["L2"], key=float)
    for key, l2 in cws.items():
        hits = l2[clean]
        hits = hits[torch.isfinite(hits)]
        attacked = int(clean.sum())
        out[key] = {"success_rate": len(hits) / attacked if attacked else None,
                    "median_l2": hits.median().item() if len(hits) else None,
                    "attacked": attacked,
                    "accuracy_at": {e: worst_case(clean, [~(l2 <= float(e))]).float().mean()
                                    .item() for e in l2_radii}}
    worst: dict = {}
    by_eps: dict = {}
    for norm in ("Linf", "L2"):
        for e in sorted(radii[norm], key=float):
            columns = flags.get((norm, e), {})
            if not columns or (norm, e) in blocked or (norm == "L2" and ("L2", None) in blocked):
                continue
            names = list(columns) + (list(cws) if norm == "L2" else [])
            tensors = list(columns.values()) + ([~(l2 <= float(e)) for l2 in cws.values()]
                                                if norm == "L2" else [])
            worst.setdefault(norm, {})[e] = worst_case(clean, tensors).float().mean().item()
            by_eps.setdefault(norm, {})[e] = names
    if worst:
        out["worst_case"] = worst
        out["worst_case_attacks"] = {
            norm: list(dict.fromkeys(a for names in per_eps.values() for a in names))
            for norm, per_eps in by_eps.items()}
        uneven = {norm: per_eps for norm, per_eps in by_eps.items()
                  if any(names != out["worst_case_attacks"][norm] for names in per_eps.values())}
        if uneven:
            out["worst_case_attacks_by_eps"] = uneven
    if unfinished:
        out["unfinished"] = unfinished
    return out


def _merge_results(old: Mapping, new: Mapping) -> dict:
    """``new`` over ``old`` by attack, and within an attack by ε (results without
    per-sample records, of one sample set): an attack measured per ε keeps the ε values
    only ``old`` has; anything else is replaced whole. No worst case: it cannot be
    recomputed without the per-sample records."""
    merged = copy.deepcopy(dict(old))
    for attack, value in new.items():
        if isinstance(value, Mapping) and isinstance(merged.get(attack), Mapping):
            merged[attack] = {**merged[attack], **copy.deepcopy(dict(value))}
        else:
            merged[attack] = copy.deepcopy(value)
    for k in _NOT_IN_RUN_RESULTS:
        merged.pop(k, None)
    return merged


def _records_over(old: Mapping, new: Mapping) -> dict:
    """Per-sample records (or their provenance) of ``new`` over ``old``: an attack's
    radii ``old`` alone has are kept, a re-measured record takes ``new``'s."""
    merged = copy.deepcopy(dict(old))
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **copy.deepcopy(dict(value))}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _union(*lists) -> list:
    return list(dict.fromkeys(v for values in lists for v in (values or [])))


def _sample_set_of(payload: Mapping) -> dict:
    entry = {k: copy.deepcopy(payload[k]) for k in SAMPLE_SET_FIELDS if k in payload}
    entry["sample_set"] = _set_key(payload)
    return entry


def _merge_sample_set(old: Mapping | None, new: Mapping) -> dict:
    """One sample set's records: ``new``'s over ``old``'s, results recomputed over all."""
    if old is None:
        entry = copy.deepcopy(dict(new))
    else:
        entry = copy.deepcopy(dict(old))
        entry["sample_set"], entry["samples"] = new["sample_set"], new.get("samples")
        entry["per_sample"] = _records_over(old.get("per_sample") or {},
                                            new.get("per_sample") or {})
        entry["measured_with"] = _records_over(old.get("measured_with") or {},
                                               new.get("measured_with") or {})
        entry["eps"] = sorted(set(_union(old.get("eps"), new.get("eps"))))
        entry["eps_l2"] = sorted(set(_union(old.get("eps_l2"), new.get("eps_l2"))))
        entry["eps_format"] = {**(old.get("eps_format") or {}), **(new.get("eps_format") or {})}
        entry["notes"] = _union(old.get("notes"), new.get("notes"))
        entry["attacks"] = _union(old.get("attacks"), new.get("attacks"))
        entry["results"] = _merge_results(old.get("results") or {}, new.get("results") or {})
    per_sample = entry.get("per_sample") or {}
    if per_sample.get("clean") is not None:
        entry["attacks"] = _union(entry.get("attacks"), [k for k in per_sample if k != "clean"])
        entry["results"] = summarize_records(per_sample, entry.get("samples") or 0,
                                             entry.get("eps_l2") or ())
    return entry


def _run_record(new: Mapping) -> dict:
    run = {k: copy.deepcopy(v) for k, v in new.items()
           if k not in EVAL_CONTEXT and k not in _NOT_IN_RUN_RECORDS}
    run["sample_set"] = _set_key(new)
    per_sample = new.get("per_sample") or {}
    if per_sample.get("clean") is not None:  # the run's own accuracies, from its records
        run["results"] = summarize_records(per_sample, new.get("samples") or 0,
                                           new.get("eps_l2") or ())
    run["results"] = {k: v for k, v in (run.get("results") or {}).items()
                      if k not in _NOT_IN_RUN_RESULTS}
    return run


def sample_sets(payload: Mapping | None) -> dict[str, dict]:
    """Every sample set of a results file, keyed by its id: the top level's first."""
    if not payload:
        return {}
    sets = {_set_key(payload): _sample_set_of(payload)}
    for key, entry in (payload.get("other_sample_sets") or {}).items():
        if isinstance(entry, Mapping):
            sets.setdefault(key, {**copy.deepcopy(dict(entry)), "sample_set": key})
    return sets


def merge_eval_results(previous: Mapping | None, new: Mapping) -> tuple[dict, str | None]:
    """One eval run's ``new`` payload merged into the ``previous`` file's; returns the
    payload to write and a note to print when earlier results were dropped or kept apart.

    The top level describes ``new``'s sample set (:data:`SAMPLE_SET_FIELDS`): its
    per-sample records are the earlier runs' on the same samples with ``new``'s over them
    (a re-measured attack and ε takes the new record), ``attacks``, ``eps`` and
    ``eps_l2`` are over all of them, and ``results`` is recomputed from them
    (:func:`summarize_records`: the worst case over every attack stored). Results on other
    sample sets go under ``"other_sample_sets"`` keyed by their sample set, never into
    that worst case. ``runs`` lists every evaluation with its own settings, sample set and
    accuracies, oldest first; the other top-level entries are the newest run's.  When
    ``previous`` evaluated other weights or another model build (:data:`EVAL_CONTEXT`:
    the checkpoint was trained further) its results no longer describe this model and are
    replaced, and the note says so."""
    new = copy.deepcopy(dict(new))
    notes = []
    sets: dict[str, dict] = {}
    earlier_runs: list = []
    if previous is not None:
        changed = [k for k in EVAL_CONTEXT if previous.get(k) != new.get(k)]
        if changed:
            detail = ", ".join(f"{k} {previous.get(k)!r} there, {new.get(k)!r} now"
                               for k in changed)
            notes.append(f"replaced the earlier results: they were of another model state "
                         f"({detail})")
        else:
            sets = sample_sets(previous)
            earlier_runs = previous.get("runs")
            if not isinstance(earlier_runs, list):  # written before runs were recorded
                earlier_runs = [_run_record(previous)]
            earlier_runs = [{**run, "results": {k: v for k, v in (run.get("results") or {})
                                                .items() if k not in _NOT_IN_RUN_RESULTS}}
                            if isinstance(run, Mapping) else run for run in earlier_runs]
    key = _set_key(new)
    entry = _merge_sample_set(sets.pop(key, None), _sample_set_of(new))
    merged = {k: v for k, v in new.items()
              if k not in SAMPLE_SET_FIELDS and k not in ("runs", "other_sample_sets")}
    merged.update(entry)
    if sets:
        merged["other_sample_sets"] = sets
        notes.append("results on other samples are kept apart under \"other_sample_sets\", "
                     "not in this worst case: " + "; ".join(sets))
    merged["runs"] = copy.deepcopy(earlier_runs) + [_run_record(new)]
    return merged, " ".join(notes) or None
