"""Result files of the command line that must never silently replace one another: the
configuration hash that names a training run's checkpoint, and the merge of successive
``pyeuler eval`` results of one checkpoint by attack and ε."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

__all__ = ["config_hash", "read_eval_results", "merge_eval_results", "EVAL_CONTEXT"]

# What an evaluation is of: results may be merged only between evaluations of the same
# weights (the checkpoint's run, epoch and contents) rebuilt the same way (model kwargs,
# --grad included, since the attacks differentiate through it).
EVAL_CONTEXT = ("model", "model_kwargs", "data", "epochs", "run_id", "checkpoint_sha256")
# Per-sample records are the newest run's only: a run's record in "runs" keeps its settings
# and summary results, not a second copy of them.
_NOT_IN_RUN_RECORDS = ("runs", "per_sample")


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


def _merge_results(old: Mapping, new: Mapping) -> dict:
    """``new`` over ``old`` by attack, and within an attack by ε: an attack measured per ε
    (a mapping) keeps the ε values only ``old`` has; anything else is replaced whole."""
    merged = copy.deepcopy(dict(old))
    for attack, value in new.items():
        if isinstance(value, Mapping) and isinstance(merged.get(attack), Mapping):
            merged[attack] = {**merged[attack], **copy.deepcopy(dict(value))}
        else:
            merged[attack] = copy.deepcopy(value)
    return merged


def merge_eval_results(previous: Mapping | None, new: Mapping) -> tuple[dict, str | None]:
    """One eval run's ``new`` payload merged into the ``previous`` file's; returns the
    payload to write and a note to print when earlier results were dropped.

    ``results`` is merged by attack and ε (a re-measured attack and ε takes the new value);
    ``runs`` lists every evaluation with its own settings (samples, attacks, ε, …) and
    results, oldest first; the other top-level entries are the newest run's.  When
    ``previous`` evaluated other weights or another model build (:data:`EVAL_CONTEXT`:
    the checkpoint was trained further, or another ``--grad``) its results no longer
    describe this model and are replaced, and the note says so."""
    run = {k: copy.deepcopy(v) for k, v in new.items()
           if k not in EVAL_CONTEXT and k not in _NOT_IN_RUN_RECORDS}
    if previous is None:
        return {**copy.deepcopy(dict(new)), "runs": [run]}, None
    changed = [k for k in EVAL_CONTEXT if previous.get(k) != new.get(k)]
    if changed:
        detail = ", ".join(f"{k} {previous.get(k)!r} there, {new.get(k)!r} now" for k in changed)
        return ({**copy.deepcopy(dict(new)), "runs": [run]},
                f"replaced the earlier results: they were of another model state ({detail})")
    earlier_runs = previous.get("runs")
    if not isinstance(earlier_runs, list):  # written before runs were recorded
        earlier_runs = [{k: v for k, v in previous.items()
                         if k not in EVAL_CONTEXT and k not in _NOT_IN_RUN_RECORDS}]
    merged = copy.deepcopy(dict(new))
    merged["results"] = _merge_results(previous["results"], new.get("results", {}))
    merged["runs"] = copy.deepcopy(earlier_runs) + [run]
    return merged, None
