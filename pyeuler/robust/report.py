"""Reproduction report: step factor h and IE-Skips on digits and two-moons, with robust
accuracy as the per-sample worst case over FGSM, PGD and AutoAttack.

One section per data set, each from its own run (a run of one data set keeps the other's
section from results.json)::

    python -m pyeuler.robust.report --data digits --threads 1
    python -m pyeuler.robust.report --data moons --threads 1
    # write docs/robustness_report.md, docs/figures/<data>_*.png, docs/figures/results.json

Experiments, on each data set and seed (default seeds 0-4; each seed changes the
train/test split, the initialisation and the batch order):

1. step factor: a deep ResNet with h = 1 vs h = 0.1 (natural training);
2. IE-Skips: ResNet (K=0) vs IE-ResNet-1 and -3, natural and PGD adversarial training;
3. gradient masking: the IE-ResNet-3 models attacked by PGD through exact (unrolled) and
   through detached IE gradients, same weights and random starts;
4. BatchNorm vs GroupNorm inside IE-Skips (digits; eval- vs train-mode clean accuracy).

Every model is trained exactly as ``pyeuler train`` with the flags recorded in
results.json, and attacked on the first ``--samples`` test samples at every ε of the
data set's grid by FGSM, PGD and AutoAttack (``pyautoattack``, :mod:`pyeuler.robust.
autoattack`); a sample is robust at ε only if it is classified correctly clean and after
every attack (:func:`pyeuler.robust.evaluation.worst_case`). Every finding states its
spread over seeds; differences are paired by seed.

The stability section comes from its own run (``--stability``; it retrains the models of
experiments 1 and 2, natural training, and measures them with :mod:`pyeuler.stability`)::

    python -m pyeuler.robust.report --stability --threads 1   # docs/figures/stability.json

Each run rewrites the markdown from both JSON files, so any section can be refreshed
without rerunning the others; ``--render-only`` only rewrites it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

import torch

from pyeuler.data import load
from pyeuler.robust.autoattack import autoattack_plan
from pyeuler.robust.evaluation import (
    EvalSettings, eps_key, per_sample, robust_evaluation, worst_case,
)
from pyeuler.robust.masking import ie_gradients
from pyeuler.robust.training import accuracy

RESULTS_FORMAT, RESULTS_VERSION = "pyeuler-report", 2

# Per data set: the headline ε and the ε grid (L∞, inputs in [0, 1]), the models, and the
# defaults of the CPU-sized run: one section of 5 seeds in <= 30 min on a 2-core CPU with
# --threads 1 (per-seed times measured in the report's provenance). AutoAttack runs through
# pyeuler.robust.autoattack with the custom subset aa_attacks (the package's defaults:
# APGD with 5 restarts of 100 iterations), plus the black-box Square attack with
# square_queries where given, at the radii of --aa-eps, on the samples FGSM and PGD leave
# (AutoAttack's own order: every attack runs on the samples the earlier ones left).
SETTINGS = {
    "digits": dict(eps=0.1, grid=[0.0, 0.05, 0.1, 0.15, 0.2], ie_model="wrn-10-1",
                   deep_model="resnet-56", epochs=6, samples=100, pgd_steps=10,
                   aa_attacks=["apgd-ce"], square_queries=None),
    # 2 classes: no DLR loss or targeted attacks, so AutoAttack is APGD-CE + Square. On a
    # 2-D input L∞ Square only moves between the 4 corners of the ε-box, accepting a corner
    # when the margin drops: 100 queries (each proposes one of the 2 neighbouring corners)
    # reach where its 5000 end, and cost 1/50 of the time.
    "moons": dict(eps=0.05, grid=[0.0, 0.025, 0.05, 0.1, 0.15], ie_model="mlp-32-4",
                  deep_model="mlp-32-32", epochs=10, samples=500, pgd_steps=10,
                  aa_attacks=["apgd-ce"], square_queries=100),
}


def train_flags(data: str, model: str, seed: int, *, epochs: int, at_steps: int, h=1.0, k=0,
                adv="none", norm=None) -> list[str]:
    """The ``pyeuler train`` flags of one model of the report (the quick preset: Adam 3e-3,
    cosine, batch 64; IE-Skips γ = 0.1, θ = 1, unrolled gradients; PGD-AT at the
    headline ε with α = 2.5ε/steps)."""
    flags = ["--data", data, "--model", model, "--seed", str(seed), "--h", f"{h:g}",
             "--ie-steps", str(k), "--adv", adv, "--eps", f"{SETTINGS[data]['eps']:g}",
             "--attack-steps", str(at_steps), "--epochs", str(epochs), "--preset", "quick"]
    return flags + (["--norm", norm] if norm else [])


def make_cfg(flags: list[str]) -> dict:
    """The run configuration ``pyeuler train`` resolves from ``flags``."""
    from pyeuler.cli import build_parser
    from pyeuler.cli.train import resolve_config

    return resolve_config(build_parser().parse_args(["train", *flags]))


def experiment_jobs(data_name: str) -> list[tuple[str, str, dict]]:
    """(experiment, model, options) of every model trained per seed."""
    s = SETTINGS[data_name]
    jobs = [("step factor", s["deep_model"], dict(h=h)) for h in (1.0, 0.1)]
    jobs += [("IE-Skips", s["ie_model"], dict(k=k, adv=adv))
             for adv in ("none", "pgd") for k in (0, 1, 3)]
    if data_name == "digits":
        jobs.append(("BatchNorm in IE-Skips", s["ie_model"], dict(k=1, norm="batch")))
    return jobs


def _bits(flags) -> str:
    return "".join(str(int(v)) for v in flags)


def aa_names(opts: dict) -> list[str]:
    """The evaluation's names of the AutoAttack part (:mod:`pyeuler.robust.evaluation`)."""
    return ["autoattack"] + (["square"] if opts["square_queries"] else [])


def evaluate_model(model, x, y, grid, opts: dict, settings: EvalSettings) -> dict:
    """Robust accuracy of one model on (x, y).

    FGSM and PGD run on every sample at every ε of ``grid`` (ε = 0: clean); their
    per-sample worst case is ``"worst_fp"``. AutoAttack (:func:`aa_names`) runs at each ε
    of ``opts["aa_eps"]`` on the samples that are still robust there, and ``"worst"`` is
    the per-sample worst case over all of them (:func:`pyeuler.robust.evaluation.
    worst_case`), the headline number. Returns accuracies (fractions; lists over ``grid``,
    dicts over the AutoAttack radii) and the per-sample flags as strings (1 correct, 0
    not; for AutoAttack "-" where the sample was already broken)."""
    pgd_name = f"pgd-{opts['pgd_steps']}"
    radii = [e for e in grid if e > 0]
    state = robust_evaluation(model, x, y, ["fgsm", pgd_name], eps=radii, eps_l2=(),
                              settings=settings)
    res = state["results"]

    def curve(values: dict) -> list[float]:
        return [res["clean"] if e == 0 else values[eps_key(e)] for e in grid]

    clean = per_sample(state, "clean")
    out = {"clean": res["clean"], "fgsm": curve(res["fgsm"]), "pgd": curve(res[pgd_name]),
           "worst_fp": curve(res["worst_case"]["Linf"]), "worst": {}}
    bits = {"clean": _bits(clean), "fgsm": {}, "pgd": {}, "autoattack": {}}
    for e in radii:
        bits["fgsm"][eps_key(e)] = _bits(per_sample(state, "fgsm", e))
        bits["pgd"][eps_key(e)] = _bits(per_sample(state, pgd_name, e))
    names = aa_names(opts)
    for e in opts["aa_eps"]:
        left = worst_case(clean, [per_sample(state, "fgsm", e), per_sample(state, pgd_name, e)])
        robust = torch.zeros_like(left)
        idx = left.nonzero().flatten()
        if len(idx):
            aa = robust_evaluation(model, x[idx], y[idx], names, eps=[e], eps_l2=(),
                                   settings=settings)
            robust[idx] = worst_case(per_sample(aa, "clean"),
                                     [per_sample(aa, n, e) for n in names])
        out["worst"][eps_key(e)] = robust.float().mean().item()
        bits["autoattack"][eps_key(e)] = "".join(
            str(int(r)) if a else "-" for a, r in zip(left.tolist(), robust.tolist()))
    out["per_sample"] = bits
    return out


def run_key(r: dict) -> tuple:
    """What identifies a run within a section (resumption matches on it)."""
    return (r["seed"], r["experiment"], r["model"], r["h"], r["ie_steps"], r["adv"], r["norm"])


def run_section(data_name: str, seeds, opts: dict, log, done=(), on_run=None) -> list[dict]:
    """Train and attack every model of :func:`experiment_jobs` for each seed.

    Args:
        data_name: ``"digits"`` or ``"moons"``.
        seeds: the seeds (ints).
        opts: the section's settings (:func:`section_settings`).
        log: called with one line per model.
        done: runs of an interrupted run with the same settings, kept and not rerun.
        on_run: called with the list of runs after each model (to save it).

    Returns:
        The runs: per model its configuration, ``pyeuler train`` flags, train and eval
        seconds, and the columns of :func:`evaluate_model`.
    """
    from pyeuler.cli.train import train_one

    s = SETTINGS[data_name]
    e, grid = s["eps"], s["grid"]
    pgd_name = f"pgd-{opts['pgd_steps']}"
    runs = list(done)
    finished = {run_key(r) for r in runs}
    for seed in seeds:
        data = load(data_name, seed=seed)
        x, y = data.x_test[:opts["samples"]], data.y_test[:opts["samples"]]
        settings = EvalSettings(seed=seed, restarts=opts["pgd_restarts"],
                                aa_attacks=opts["aa_attacks"], batch_size=max(1, len(x)),
                                square_queries=opts["square_queries"] or 5000)
        for exp, model_name, o in experiment_jobs(data_name):
            flags = train_flags(data_name, model_name, seed, epochs=opts["epochs"],
                                at_steps=opts["at_steps"], **o)
            cfg = make_cfg(flags)
            k = cfg["ie_steps"][0]
            run = dict(experiment=exp, data=data_name, seed=seed, model=model_name,
                       h=cfg["h"], ie_steps=k, adv=cfg["adv"], norm=cfg["norm"],
                       epochs=cfg["epochs"], train_flags=flags, grid=grid)
            if run_key(run) in finished:
                continue
            t0 = time.perf_counter()
            trained = train_one(cfg, data, k, torch.device("cpu"), False, log=log)
            model = trained["model"].eval()
            run["train_seconds"] = trained["train_seconds"]
            t1 = time.perf_counter()
            if exp == "BatchNorm in IE-Skips":  # clean accuracy only, in both modes
                run["clean"] = accuracy(model, x, y, progress=False)
                model.train()
                with torch.no_grad():
                    run["clean_train_mode_bn"] = (model(x).argmax(1) == y).float().mean().item()
                model.eval()
            else:
                run.update(evaluate_model(model, x, y, grid, opts, settings))
            if exp == "IE-Skips" and k == 3:
                # same weights and random starts, attacked through detached IE gradients
                with ie_gradients(model, "detached"):
                    det = robust_evaluation(model, x, y, [pgd_name], eps=[e], eps_l2=(),
                                            settings=settings)
                run["pgd_detached_at_eps"] = det["results"][pgd_name][eps_key(e)]
            run["eval_seconds"] = time.perf_counter() - t1
            runs.append(run)
            if on_run is not None:
                on_run(runs)
            line = f"clean {run['clean']:.3f}"
            if "worst" in run:
                i = grid.index(e)
                line += ", " + ", ".join(f"{key}@{e:g} {run[key][i]:.3f}"
                                         for key in ("fgsm", "pgd", "worst_fp"))
                line += f", worst incl. AutoAttack {run['worst'].get(eps_key(e), math.nan):.3f}"
            log(f"[{data_name} seed {seed}] {exp}: {model_name} h={cfg['h']:g} K={k} "
                f"adv={cfg['adv']} norm={cfg['norm']}: {line} (train "
                f"{run['train_seconds']:.0f} s, eval {run['eval_seconds']:.0f} s, all "
                f"{time.perf_counter() - t0:.0f} s)")
    return runs


# ----------------------------------------------------------------------- provenance

_LIBRARIES = (("torch", "torch"), ("numpy", "numpy"), ("scikit-learn", "scikit-learn"),
              ("pyautoattack", "pyautoattack"), ("matplotlib", "matplotlib"),
              ("triton", "triton"))


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def provenance() -> dict:
    """Where the numbers come from: the git commit of the pyeuler source tree that runs
    (None when it is not a git checkout), whether it differs from that commit (``dirty``,
    and the ``git status --porcelain`` lines), and the versions of Python, pyeuler and the
    libraries that decide the results (None: not installed)."""
    import pyeuler

    root = Path(pyeuler.__file__).resolve().parents[1]
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read-only: no index refresh

    def git(*args) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              check=True, env=env).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if top != root:
            raise ValueError(f"{root} is not the root of its git checkout ({top})")
        commit = git("rev-parse", "HEAD")
        changes = git("status", "--porcelain").splitlines()
    except (OSError, ValueError, subprocess.CalledProcessError):
        commit, changes = None, None
    versions = {"python": platform.python_version(), "pyeuler": pyeuler.__version__}
    versions.update({label: _dist_version(dist) for label, dist in _LIBRARIES})
    return dict(commit=commit, dirty=bool(changes) if changes is not None else None,
                changes=changes, versions=versions,
                backend=os.environ.get("PYEULER_BACKEND", "auto"))


def provenance_lines(meta: dict) -> list[str]:
    """Markdown bullets: command, commit, libraries, seeds, machine and time."""
    p = meta.get("provenance")
    if p is None:
        return [f"- command: `{meta['command']}` ({meta['date']}; no provenance recorded)"]
    if p["commit"] is None:
        commit = "unknown (the source tree was not a git checkout)"
    else:
        commit = f"`{p['commit']}`" + (
            f", **dirty**: {len(p['changes'])} path(s) differ from it (`git status --porcelain` "
            "in the JSON)" if p["dirty"] else ", clean working tree")
    libs = ", ".join(f"{k} {v or 'not installed'}" for k, v in p["versions"].items())
    return [f"- command: `{meta['command']}`",
            f"- commit: {commit}",
            f"- libraries: {libs}; backend `{p['backend']}`",
            f"- seeds: {meta['seeds']}",
            f"- run: {meta['date']}, {meta['seconds'] / 60:.1f} min on {meta['machine']}"
            + (" (resumed: runs of an interrupted run kept)" if meta.get("resumed") else "")]


# ------------------------------------------------------------------------- reporting

def _ms(values, digits=1) -> str:
    """Mean ± std (sample std, over seeds) of fractions, in percent."""
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def difference(a: dict, b: dict, scale: float = 100.0, unit: str = " points",
               fmt: str = ".1f") -> str:
    """A − B over the seeds both have (``{seed: value}``), paired by seed: "difference
    +3.1 ± 4.0 points, 4 of 5 seeds positive: within the seed spread". It exceeds the seed
    spread when the mean difference is larger in size than the std of the per-seed
    differences; with one seed there is no spread to compare with."""
    seeds = sorted(set(a) & set(b))
    d = [scale * (a[s] - b[s]) for s in seeds]
    if not d:
        return "no common seeds"
    if len(d) == 1:
        return f"difference {d[0]:+{fmt}}{unit} (one seed: no spread)"
    mean, std = statistics.mean(d), statistics.stdev(d)
    positive = sum(v > 0 for v in d)
    verdict = "exceeds the seed spread" if abs(mean) > std else "within the seed spread"
    return (f"difference {mean:+{fmt}} ± {std:{fmt}}{unit}, {positive} of {len(d)} seeds "
            f"positive: {verdict}")


def _exceeds(a: dict, b: dict) -> int:
    """+1 / −1 when A − B exceeds the seed spread upwards / downwards, else 0."""
    d = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    if len(d) < 2 or abs(statistics.mean(d)) <= statistics.stdev(d):
        return 0
    return 1 if statistics.mean(d) > 0 else -1


def _group(runs, **match):
    return [r for r in runs if all(r.get(k) == v for k, v in match.items())]


def _at(r: dict, key: str, e: float) -> float:
    return r[key][r["grid"].index(e)]


def _seeds(group, value) -> dict:
    """``{seed: value(run)}``."""
    return {r["seed"]: value(r) for r in group}


def _label(r) -> str:
    if r["experiment"] == "step factor":
        return f"{r['model']}, h = {r['h']:g}"
    name = "ResNet (K=0)" if r["ie_steps"] == 0 else f"IE-ResNet-{r['ie_steps']}"
    return name + (", PGD-AT" if r["adv"] == "pgd" else "")


def _variants(runs):
    seen = {}
    for r in runs:
        key = (r["model"], r["h"], r["ie_steps"], r["adv"], r["norm"])
        seen.setdefault(key, []).append(r)
    return list(seen.values())


def _figure_name(data_name: str, exp: str) -> str:
    return f"{data_name}_{exp.replace(' ', '_').replace('-', '').lower()}.png"


def _aa_title(o: dict) -> str:
    if o["aa_attacks"] is None:
        return "AutoAttack (standard version)"
    names = o["aa_attacks"] + (["square"] if o["square_queries"] else [])
    return "AutoAttack (" + " + ".join(n.upper() if n.startswith("apgd") else n.capitalize()
                                       for n in names) + ")"


def plot(results: dict, figdir: Path) -> list[str]:
    """Accuracy vs ε (mean ± std over seeds) per data set and experiment: PGD alone, and
    the per-sample worst case over FGSM and PGD with, as stars, the worst case that adds
    AutoAttack at its radii."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for data_name, section in results["sections"].items():
        runs, o = section["runs"], section["meta"]["settings"]
        for exp in ("step factor", "IE-Skips"):
            group = _group(runs, experiment=exp)
            if not group:
                continue
            fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
            titles = (f"PGD-{o['pgd_steps']}", "worst case: FGSM, PGD (lines); "
                      f"+ {_aa_title(o)} (stars)")
            for ax, key, title in zip(axes, ("pgd", "worst_fp"), titles):
                for variant in _variants(group):
                    grid = variant[0]["grid"]
                    vals = torch.tensor([r[key] for r in variant]) * 100
                    mean = vals.mean(0)
                    std = vals.std(0) if len(variant) > 1 else torch.zeros_like(mean)
                    v0 = variant[0]
                    style = "--" if v0["adv"] == "pgd" else "-"
                    color = (f"C{[1.0, 0.1].index(v0['h']) if v0['h'] in (1.0, 0.1) else 2}"
                             if exp == "step factor"
                             else f"C{ {0: 0, 1: 1, 3: 2}.get(v0['ie_steps'], 3)}")
                    ax.plot(grid, mean, style, marker="o", ms=3, color=color, label=_label(v0))
                    ax.fill_between(grid, mean - std, mean + std, alpha=0.12, color=color)
                    if key == "worst_fp":
                        radii = [float(k) for k in v0["worst"]]
                        aa = torch.tensor([[r["worst"][k] for k in v0["worst"]]
                                           for r in variant]) * 100
                        ax.errorbar(radii, aa.mean(0), yerr=aa.std(0) if len(variant) > 1
                                    else None, fmt="*", ms=9, color=color, capsize=3)
                ax.set_title(f"{data_name}: {exp}, {title}", fontsize=9)
                ax.set_xlabel("ε (L∞, inputs in [0, 1])")
                ax.grid(alpha=0.3)
            axes[0].set_ylabel("test accuracy (%)")
            axes[-1].legend(fontsize=8)
            fig.tight_layout()
            name = _figure_name(data_name, exp)
            fig.savefig(figdir / name, dpi=110)
            plt.close(fig)
            files.append(name)
    return files


def _setup_lines(data_name: str, meta: dict) -> list[str]:
    s, o = SETTINGS[data_name], meta["settings"]
    data = ("scikit-learn's 8×8 digits, pixels / 16 in [0, 1], 75/25 stratified split"
            if data_name == "digits" else
            "make_moons(2000, noise 0.15) min-max scaled to [0, 1]², 75/25 stratified split")
    aa = (f"{_aa_title(o)} at ε = {', '.join(f'{e:g}' for e in o['aa_eps'])}: "
          + ("`pyeuler.robust.autoattack`, the `pyautoattack` package's standard version"
             if o["aa_attacks"] is None else
             f"`pyeuler.robust.autoattack` with the subset {o['aa_attacks']} (the "
             "`pyautoattack` package's custom version: APGD with 5 restarts × 100 "
             "iterations)"))
    if o["square_queries"]:
        aa += (f", and the package's Square attack with {o['square_queries']} queries "
               "(AutoAttack's settings otherwise)")
    aa += (". It runs on the samples FGSM and PGD leave, as AutoAttack runs each of its "
           "attacks on the samples the earlier ones left")
    if o.get("aa_note"):
        aa += f". {o['aa_note']}"
    if data_name == "digits" and o["aa_attacks"] is not None:
        aa += (". AutoAttack's standard version (APGD-CE, APGD-T, FAB-T, Square) does not fit "
               "the CPU budget: about 4 minutes per model and ε on 200 samples here, for an "
               "IE-ResNet-3")
    elif o["square_queries"]:
        aa += (". On a 2-D input L∞ Square only moves between the 4 corners of the ε-box, "
               "taking a corner when the margin drops, so its standard 5000 queries end "
               f"where {o['square_queries']} do")
    restarts = f", {o['pgd_restarts']} restarts" if o["pgd_restarts"] > 1 else ""
    return [
        f"Data: {data}. Models: `{s['deep_model']}` for the step factor (h = 1 vs 0.1), "
        f"`{s['ie_model']}` as ResNet (K=0) and IE-ResNet-1/-3 (GroupNorm(1, C) in the "
        "blocks, as the IE authors' code; `resnet-*`: post-activation with BatchNorm). "
        f"Training: `pyeuler train --preset quick` (Adam 3e-3, cosine, batch 64), "
        f"{o['epochs']} epochs; IE-Skips γ = 0.1, θ = 1, exact (`grad=\"unrolled\"`) "
        f"gradients; PGD-AT: PGD-{o['at_steps']} with random start, α = 2.5ε/{o['at_steps']}, "
        f"at the headline ε = {s['eps']:g}. Each run's exact `pyeuler train` flags are in "
        "the JSON.",
        "",
        f"Evaluation on the first {o['samples']} test samples of each seed's split, L∞ on "
        f"inputs in [0, 1]: FGSM and PGD-{o['pgd_steps']} (random start, "
        f"α = 2.5ε/{o['pgd_steps']}{restarts}) at ε in {s['grid']}; {aa}. **Worst case**: a "
        "sample counts as robust only if it is classified correctly clean and after every "
        "attack run at that ε (per-sample minimum); with AutoAttack it is the headline "
        "robust accuracy, without it (other ε) a bound from above. Cells: mean ± std over "
        "the seeds, in %. Train times are wall-clock seconds on the machine above, which may "
        "have been shared: indicative only.",
        ""]


def _table(L: list, title: str, group: list, meta: dict, detached: bool) -> None:
    e = SETTINGS[group[0]["data"]]["eps"]
    grid, o = group[0]["grid"], meta["settings"]
    steps = o["pgd_steps"]
    wide = 2 * e if 2 * e in grid else None
    cols = ["model", "clean", f"FGSM ε={e:g}", f"PGD-{steps} ε={e:g}",
            f"worst case FGSM, PGD ε={e:g}", f"**worst case + {_aa_title(o)} ε={e:g}**"]
    if wide is not None:
        with_aa = eps_key(wide) in group[0]["worst"]
        cols.append(f"worst case{' + AutoAttack' if with_aa else ' FGSM, PGD'} ε={wide:g}")
    if detached:
        cols.append(f"PGD-{steps} ε={e:g}, detached IE gradients")
    cols.append("train time (s)")
    L.extend([f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)])
    for v in _variants(group):
        row = [_label(v[0]), _ms([r["clean"] for r in v])]
        row += [_ms([_at(r, key, e) for r in v]) for key in ("fgsm", "pgd", "worst_fp")]
        row.append(f"**{_ms([_worst(r, e) for r in v])}**")
        if wide is not None:
            row.append(_ms([_worst(r, wide) for r in v]))
        if detached:
            row.append(_ms([r["pgd_detached_at_eps"] for r in v])
                       if "pgd_detached_at_eps" in v[0] else "—")
        row.append(f"{statistics.mean(r['train_seconds'] for r in v):.1f}")
        L.append("| " + " | ".join(row) + " |")
    L.append("")


def _worst(r: dict, e: float) -> float:
    """The worst case at ε: with AutoAttack where it ran there, else over FGSM and PGD."""
    return r["worst"].get(eps_key(e), _at(r, "worst_fp", e))


def section_markdown(data_name: str, section: dict | None, figures, figrel: str) -> list[str]:
    """The markdown of one data set's section (a note with the command when it has not
    been generated)."""
    L = [f"## {data_name}", ""]
    if section is None:
        return L + [f"_Not generated yet: `python -m pyeuler.robust.report --data {data_name} "
                    "--threads 1`._", ""]
    meta, runs = section["meta"], section["runs"]
    if not meta.get("complete", True):
        L.extend(["**Incomplete**: this run stopped before every model was evaluated; the "
                  "numbers below are its finished runs (rerun with --resume).", ""])
    L.extend(["### Provenance", ""] + provenance_lines(meta) + ["", "### Setup", ""]
             + _setup_lines(data_name, meta))
    sf = _group(runs, experiment="step factor")
    if sf:
        _table(L, f"Step factor: deep ResNet, h = 1 vs h = 0.1 ({data_name})", sf, meta, False)
    ie = _group(runs, experiment="IE-Skips")
    if ie:
        _table(L, f"ResNet vs IE-ResNet-1 / -3, natural and PGD adversarial training "
                  f"({data_name})", ie, meta, True)
    bn = _group(runs, experiment="BatchNorm in IE-Skips")
    if bn:
        L.extend([f"### BatchNorm inside IE-Skips ({data_name})", "",
                  "IE-ResNet-1 with BatchNorm instead of GroupNorm, same training: clean test "
                  f"accuracy in eval mode (running statistics) {_ms([r['clean'] for r in bn])}"
                  f"%, in train mode (batch statistics) "
                  f"{_ms([r['clean_train_mode_bn'] for r in bn])}%.", ""])
    for f in figures:
        if f.startswith(data_name + "_"):
            L.extend([f"![{f}]({figrel}/{f})", ""])
    L.extend([f"### What it shows ({data_name})", "",
              "_Computed from the numbers above by `pyeuler.robust.report.findings`. Values: "
              "mean ± std over seeds. Differences are paired by seed (same split and test "
              "samples): mean ± std of the per-seed differences, and how many seeds show a "
              "positive one; a difference \"exceeds the seed spread\" when its mean is "
              "larger in size than that std, else it is \"within the seed spread\" and no "
              f"conclusion is drawn ({len(meta['seeds'])} seeds, "
              f"{meta['settings']['samples']} attacked test samples each)._", ""])
    L.extend(f"- {line}" for line in findings(runs, meta))
    L.append("")
    return L


def write_markdown(results: dict | None, figures: list[str], path: Path, figrel: str,
                   stability: dict | None = None, stability_figures=()) -> None:
    """The report: an introduction, one section per data set of ``results`` (its
    ``"sections"``; a missing one says how to generate it), then (when given) the stability
    section from ``stability`` (:func:`run_stability`'s output)."""
    sections = (results or {}).get("sections", {})
    L = ["# Robustness report: step factor h and IE-Skips", "",
         "Written by `python -m pyeuler.robust.report`; every number comes from the run "
         f"named in its section (raw results, per-sample flags included: "
         f"[`{figrel}/results.json`]({figrel}/results.json)). Robust accuracy is the "
         "**per-sample worst case** over FGSM, PGD and AutoAttack (`pyautoattack`): a sample "
         "is robust only if it is classified correctly without attack and after every "
         "attack. Every number is a mean ± std over seeds, and every finding states its "
         "spread. Each data set's section is its own run, with its own provenance (commit, "
         "library versions, seeds, command).", ""]
    for data_name in SETTINGS:
        L.extend(section_markdown(data_name, sections.get(data_name), figures, figrel))
    if stability is not None:
        L.extend(stability_markdown(stability, stability_figures, figrel))
    path.write_text("\n".join(L))


def findings(runs, meta: dict) -> list[str]:
    """Plain-language comparisons drawn from one section's runs, each with its spread
    over seeds (no fixed conclusions)."""
    if not runs:
        return []
    out = []
    d = runs[0]["data"]
    e = SETTINGS[d]["eps"]
    o = meta["settings"]
    steps = o["pgd_steps"]
    with_aa = "with AutoAttack" if e in o["aa_eps"] else "over FGSM and PGD"

    def clean(group):
        return _seeds(group, lambda r: r["clean"])

    def worst(group, eps=e):
        return _seeds(group, lambda r: _worst(r, eps))

    def ms(values: dict) -> str:
        return _ms(list(values.values()))

    sf = _group(runs, experiment="step factor")
    h1, h01 = _group(sf, h=1.0), _group(sf, h=0.1)
    if h1 and h01:
        out.append(
            f"{d}, {sf[0]['model']}, h = 0.1 vs h = 1: worst-case robust accuracy ({with_aa}) at "
            f"ε={e:g} "
            f"{ms(worst(h01))}% vs {ms(worst(h1))}% ({difference(worst(h01), worst(h1))}); "
            f"clean {ms(clean(h01))}% vs {ms(clean(h1))}% "
            f"({difference(clean(h01), clean(h1))}).")
    for adv, tr in (("none", "natural training"), ("pgd", "PGD-AT")):
        g = _group(runs, experiment="IE-Skips", adv=adv)
        base = _group(g, ie_steps=0)
        for k in (1, 3):
            gk = _group(g, ie_steps=k)
            if gk and base:
                out.append(
                    f"{d}, {tr}: IE-ResNet-{k} vs ResNet (K=0), worst case ({with_aa}) at "
                    f"ε={e:g} "
                    f"{ms(worst(gk))}% vs {ms(worst(base))}% "
                    f"({difference(worst(gk), worst(base))}); clean {ms(clean(gk))}% vs "
                    f"{ms(clean(base))}% ({difference(clean(gk), clean(base))}).")
        g3 = [r for r in _group(g, ie_steps=3) if "pgd_detached_at_eps" in r]
        if g3:
            det = _seeds(g3, lambda r: r["pgd_detached_at_eps"])
            exact = _seeds(g3, lambda r: _at(r, "pgd", e))
            sign = _exceeds(det, exact)
            out.append(
                f"{d}, {tr}, IE-ResNet-3: PGD-{steps} at ε={e:g} through detached IE gradients "
                f"leaves {ms(det)}% robust vs {ms(exact)}% through exact ones "
                f"({difference(det, exact)}): "
                + ("one seed, no conclusion." if len(g3) < 2 else
                   "detached gradients overstate robustness (gradient masking)." if sign > 0
                   else "the detached attack is the stronger one here." if sign < 0
                   else "no sign that detached gradients overstate robustness."))
    attacked = [r for r in runs if "worst" in r]
    if attacked:
        gaps = []
        titles = (("fgsm", "FGSM"), ("pgd", f"PGD-{steps}"), ("worst_fp", "FGSM and PGD together"))
        for key, title in titles:
            per_seed = {}
            for r in attacked:
                per_seed.setdefault(r["seed"], []).append(_at(r, key, e) - _worst(r, e))
            gap = {s: statistics.mean(v) for s, v in per_seed.items()}
            gaps.append(f"{title} by {_ms(list(gap.values()))} points")
        models = len(attacked) // max(1, len({r['seed'] for r in attacked}))
        out.append(f"{d}, ε={e:g}, mean over the {models} attacked models: the robust "
                   f"accuracy without {_aa_title(o)} lies above the worst case with it, for "
                   + ", ".join(gaps)
                   + " (mean ± std over seeds)." if e in o["aa_eps"] else
                   f"{d}: AutoAttack did not run at the headline ε={e:g}.")
        rises = [r for r in attacked
                 if any(b > a + 1e-9 for a, b in zip(r["worst_fp"], r["worst_fp"][1:]))]
        out.append(f"{d}: the worst case over FGSM and PGD falls monotonically with ε in "
                   f"{len(attacked) - len(rises)} of {len(attacked)} runs"
                   + (": it rises somewhere in " + ", ".join(
                       f"{_label(r)} seed {r['seed']}" for r in rises) + " (a sign of gradient "
                       "masking or of too weak attacks)." if rises else "."))
    bn = _group(runs, experiment="BatchNorm in IE-Skips")
    if bn:
        ev, tm = clean(bn), _seeds(bn, lambda r: r["clean_train_mode_bn"])
        sign = _exceeds(ev, tm)
        out.append(f"{d}: IE-ResNet-1 with BatchNorm scores {ms(ev)}% in eval mode vs "
                   f"{ms(tm)}% with batch statistics ({difference(ev, tm)})"
                   + (": BN running statistics mix the branch evaluations at x0 and at the "
                      "IE iterates, which is why the models above use GroupNorm(1, C) as the "
                      "IE authors' code does." if sign < 0 else ": one seed, no conclusion."
                      if len(bn) < 2 else
                      ": no eval-mode penalty beyond the seed spread here."))
    return out


# ------------------------------------------------------------------- stability section

#: Quantities pooled over blocks in the stability tables: (key, column title).
STABILITY_CONDITIONS = (
    ("explicit_x0", "‖I+J_f(x0)‖₂"),
    ("implicit_x0", "1/σmin(I−J_f(x0))"),
    ("implicit_out", "1/σmin(I−J_f(y)), IE output"),
    ("map_lipschitz", "‖J_block‖₂"),
)


def _stability_summary(res) -> dict:
    """Per-model numbers from a :class:`pyeuler.stability.ModelStability`: for each
    quantity the share of (sample, block) pairs ≤ 1 (+ ``PASS_TOLERANCE``) pooled over the
    blocks where it was measured and the pooled median; the median noise amplification and
    feature norm per depth; the median growth ‖x_B‖/‖x_0‖; the share of converged
    estimates."""
    from pyeuler.stability import PASS_TOLERANCE

    out = {}
    for q, _ in STABILITY_CONDITIONS:
        values = [getattr(b, q) for b in res.blocks if getattr(b, q) is not None]
        if values:
            v = torch.cat(values).double()
            out[q] = dict(pass_rate=float((v <= 1 + PASS_TOLERANCE).double().mean()),
                          median=float(v.median()), blocks=len(values))
    conv = [c for b in res.blocks for c in b.converged.values()]
    amp, norms = res.noise_amplification.double(), res.feature_norms.double()
    out["noise_median"] = amp.median(1).values.tolist()
    out["norm_median"] = norms.median(1).values.tolist()
    out["growth_median"] = float((norms[-1] / norms[0]).median())
    out["converged"] = statistics.mean(conv) if conv else 1.0
    out["kinds"] = sorted({b.kind for b in res.blocks})
    return out


def dense_method_sentence(meta: dict) -> str:
    """How exact the stability section's dense values are, from its run's ``meta``: runs
    since the dense method took singular values directly record ``dense="svdvals"``;
    earlier ones power-iterated on the formed Jacobian to ``meta["tol"]``."""
    if meta.get("dense") == "svdvals":
        return ("Per-sample Jacobians are formed densely (`method=\"auto\"`) and their "
                "singular values taken directly (`torch.linalg.svdvals`), so values are exact.")
    return ("Per-sample Jacobians are formed densely (`method=\"auto\"`), so values are exact "
            f"up to the iteration tolerance {meta['tol']:g}.")


def run_stability(datasets, seeds, samples, epochs_scale, log, iters=100, tol=1e-5,
                  at_steps=3) -> dict:
    """Train the step-factor and IE-Skip models of :func:`run_section` (natural
    training, same settings and seeds) and measure them with
    :func:`pyeuler.stability.model_stability` at the first ``samples`` test inputs."""
    from pyeuler.cli.train import train_one
    from pyeuler.stability import ConvergenceWarning, model_stability

    results = {"runs": []}
    for data_name in datasets:
        s = SETTINGS[data_name]
        for seed in seeds:
            data = load(data_name, seed=seed)
            epochs = _epochs(data_name, epochs_scale)
            jobs = [("step factor", s["deep_model"], h, 0) for h in (1.0, 0.1)]
            jobs += [("IE-Skips", s["ie_model"], 1.0, k) for k in (0, 1, 3)]
            for exp, model_name, h, k in jobs:
                cfg = make_cfg(train_flags(data_name, model_name, seed, epochs=epochs,
                                           at_steps=at_steps, h=h, k=k))
                t0 = time.perf_counter()
                trained = train_one(cfg, data, k, torch.device("cpu"), False, log=log)
                model = trained["model"].eval()
                clean = accuracy(model, data.x_test[:200], data.y_test[:200], progress=False)
                t1 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    res = model_stability(model, data.x_test[:samples], iters=iters, tol=tol,
                                          generator=torch.Generator().manual_seed(seed))
                run = dict(experiment=exp, data=data_name, seed=seed, model=model_name, h=h,
                           ie_steps=k, norm=cfg["norm"], epochs=epochs, clean=clean,
                           train_seconds=trained["train_seconds"],
                           stability_seconds=time.perf_counter() - t1,
                           **_stability_summary(res), detail=res.to_dict())
                results["runs"].append(run)
                rates = ", ".join(f"{q} {100 * run[q]['pass_rate']:.0f}%"
                                  for q, _ in STABILITY_CONDITIONS if q in run)
                log(f"[{data_name} seed {seed}] stability: {model_name} h={h:g} K={k}: clean "
                    f"{clean:.3f}; ≤ 1: {rates}; noise x{run['noise_median'][-1]:.3g} at depth "
                    f"{len(run['noise_median']) - 1} ({time.perf_counter() - t0:.0f} s)")
    return results


def _stability_label(r) -> str:
    if r["experiment"] == "step factor":
        return f"{r['model']}, h = {r['h']:g}"
    return "ResNet (K=0)" if r["ie_steps"] == 0 else f"IE-ResNet-{r['ie_steps']}"


def _stability_variants(runs):
    seen = {}
    for r in runs:
        seen.setdefault((r["experiment"], r["model"], r["h"], r["ie_steps"]), []).append(r)
    return list(seen.values())


def _ms_plain(values, digits=2) -> str:
    values = list(values)
    if len(values) == 1:
        return f"{values[0]:.{digits}g}"
    return f"{statistics.mean(values):.{digits}g} ± {statistics.stdev(values):.{digits}g}"


def plot_stability(stability: dict, figdir: Path) -> list[str]:
    """Per data set: median noise amplification and feature norm through depth (mean ± std
    over seeds), step factor and IE-Skips side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    runs = stability["runs"]
    for data_name in dict.fromkeys(r["data"] for r in runs):
        fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex="col")
        for col, exp in enumerate(("step factor", "IE-Skips")):
            for i, variant in enumerate(_stability_variants(_group(runs, data=data_name,
                                                                   experiment=exp))):
                for row, key in enumerate(("noise_median", "norm_median")):
                    vals = torch.tensor([r[key] for r in variant])
                    mean = vals.mean(0)
                    std = vals.std(0) if len(variant) > 1 else torch.zeros_like(mean)
                    depth = list(range(len(mean)))
                    ax = axes[row, col]
                    ax.plot(depth, mean, marker="o", ms=2, color=f"C{i}",
                            label=_stability_label(variant[0]))
                    ax.fill_between(depth, (mean - std).clamp_min(1e-3), mean + std,
                                    color=f"C{i}", alpha=0.15)
            axes[0, col].set(title=f"{data_name}, {exp}: noise amplification", yscale="log")
            axes[1, col].set(title=f"{data_name}, {exp}: feature norm ‖x_k‖", xlabel="depth k "
                             "(blocks; 0 = first block's input)")
            axes[0, col].legend(fontsize=8)
        from matplotlib.ticker import MaxNLocator
        for ax in axes.flat:
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0, 0].set_ylabel("median ‖x_k(x0+δ) − x_k(x0)‖ / ‖δ‖")
        axes[1, 0].set_ylabel("median ‖x_k‖")
        fig.tight_layout()
        name = f"{data_name}_stability.png"
        fig.savefig(figdir / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def stability_markdown(stability: dict, figures, figrel: str) -> list[str]:
    meta = stability["meta"]
    runs = stability["runs"]
    L = ["## Stability diagnostics", "",
         *provenance_lines(meta), "",
         f"Raw results: [`{figrel}/stability.json`]({figrel}/stability.json). The models of "
         "the step-factor "
         "and IE-Skip experiments above (natural training, same builders, seeds and "
         f"epochs: digits {meta['epochs']['digits']}, moons {meta['epochs']['moons']}) are "
         "retrained in this run and measured with `pyeuler.stability.model_stability` at the "
         f"first {meta['samples']} test inputs of each seed's split; mean ± std over the "
         "seeds. Clean accuracy: these models, first 200 test samples.",
         "",
         "- **‖I+J_f(x0)‖₂ ≤ 1**: the explicit step x0 + f(x0) does not amplify input "
         "perturbations (Li, He & Lin, ICML 2020, Prop. 2); blocks of the form x + f(x).",
         "- **1/σmin(I−J_f) ≤ 1**: the exact implicit step does not amplify them (Prop. 3), "
         "at x0 and, for IE-ResNets, at the IE output y where the implicit step's Jacobian is "
         "taken. Wherever the explicit condition holds the implicit one holds too at the same "
         "point (‖I+J‖ ≤ 1 ⇒ σmin(I−J) ≥ 2 − ‖I+J‖ ≥ 1), the containment of stability "
         "regions behind their Theorem 1.",
         "- **‖J_block‖₂ ≤ 1**: the block map as the network runs it (for IE-ResNets the "
         "K-step map), the only quantity for post-activation blocks ReLU(S(x) + h·F(x)) "
         "(`resnet-56`) and for down-sampling blocks, which are not of the form x + f(x).",
         "- [share]: the share of (test input, block) pairs meeting the condition (value "
         f"≤ 1 + {meta.get('pass_tolerance', 1e-3):g}, for rounding), pooled over the blocks "
         "where it applies; medians pooled likewise. " + dense_method_sentence(meta),
         "- With GroupNorm(1, C) in the branch (`wrn-10-1`, the `mlp-*` models) f(x) is "
         "unchanged by x ↦ αx and x ↦ x + c·1 (up to the norm's ε), so J_f x = 0 and "
         "J_f 1 = 0: ‖I+J_f‖₂ ≥ 1 and 1/σmin(I−J_f) ≥ 1 at every point, and either condition "
         "can hold at best with equality. The medians show how far above 1 the blocks are.",
         f"- Noise: Gaussian δ with ‖δ‖ ≈ {meta['noise_scale']:g}·‖x0‖ added to the first "
         "block's input x0; amplification ‖x_k(x0+δ) − x_k(x0)‖/‖δ‖ at the last block and "
         "its peak over the block outputs k ≥ 1 (median over inputs; Zhang et al., IJCAI 2019, §3.3), and the "
         "growth "
         "‖x_B‖/‖x_0‖ of the features through the blocks (Zhang & Schaeffer, JMIV 2020).",
         ""]
    L.extend(["Each cell: median over (test input, block) pairs, mean ± std over seeds, and in "
              "brackets the share of pairs with the value ≤ 1 (mean over seeds); noise "
              "amplification and feature growth: medians over inputs.", ""])
    for data_name in dict.fromkeys(r["data"] for r in runs):
        cols = ["model", "clean (%)"] + [t for _, t in STABILITY_CONDITIONS]
        cols += ["noise amplification: last block", "peak over the blocks", "‖x_B‖/‖x_0‖"]
        L.extend([f"### {data_name}", "", "| " + " | ".join(cols) + " |",
                  "|" + "---|" * len(cols)])
        for v in _stability_variants(_group(runs, data=data_name)):
            row = [_stability_label(v[0]) + ("" if v[0]["experiment"] == "IE-Skips"
                                              else " (step factor)"),
                   _ms([r["clean"] for r in v])]
            for q, _ in STABILITY_CONDITIONS:
                if q not in v[0]:
                    row.append("—")
                    continue
                share = 100 * statistics.mean(r[q]["pass_rate"] for r in v)
                row.append(f"{_ms_plain([r[q]['median'] for r in v], 3)} [{share:.0f}%]")
            row.append(_ms_plain([r["noise_median"][-1] for r in v], 3))
            row.append(_ms_plain([max(r["noise_median"][1:]) for r in v], 3))
            row.append(_ms_plain([r["growth_median"] for r in v], 3))
            L.append("| " + " | ".join(row) + " |")
        blocks = {_stability_label(v[0]): (len(v[0]["noise_median"]) - 1, v[0]["kinds"])
                  for v in _stability_variants(_group(runs, data=data_name))}
        L.extend(["", "Blocks: " + "; ".join(f"{k}: {n} ({', '.join(kinds)})"
                                              for k, (n, kinds) in blocks.items()) + ".", ""])
        for f in figures:
            if f.startswith(data_name):
                L.extend([f"![{f}]({figrel}/{f})", ""])
    conv = [r["converged"] for r in runs]
    L.extend(["### What the stability diagnostics show", "",
              "_Computed from the numbers above by `pyeuler.robust.report.stability_findings`; "
              "values mean ± std over seeds, differences paired by seed as in the sections "
              "above._", ""])
    L.extend(f"- {line}" for line in stability_findings(runs))
    L.append(f"- Convergence: {100 * min(conv):.1f}% of the estimates converged in the worst "
             f"model ({100 * statistics.mean(conv):.1f}% on average; iters {meta['iters']}, "
             f"tol {meta['tol']:g}); an unconverged estimate is a lower bound of the norm.")
    L.append("")
    return L


def stability_findings(runs) -> list[str]:
    """Plain-language comparisons of the stability numbers, each with its spread over
    seeds (values mean ± std; differences paired by seed, as :func:`difference`)."""
    out = []

    def vals(group, q, key="median"):
        return _seeds(group, lambda r: r[q][key])

    def ms(values: dict) -> str:
        return _ms_plain(list(values.values()), 3)

    def vs(a: dict, b: dict) -> str:
        return f"{ms(a)} vs {ms(b)} ({difference(a, b, 1.0, '', '.3g')})"

    def pct(group, q):
        return _ms([r[q]["pass_rate"] for r in group]) + "%"

    def last(group):
        return _seeds(group, lambda r: r["noise_median"][-1])

    def peak(group):
        return _seeds(group, lambda r: max(r["noise_median"][1:]))

    def growth(group):
        return _seeds(group, lambda r: r["growth_median"])

    for d in dict.fromkeys(r["data"] for r in runs):
        sf = _group(runs, data=d, experiment="step factor")
        if sf:
            h1, h01 = _group(sf, h=1.0), _group(sf, h=0.1)
            parts = []
            for q, title in STABILITY_CONDITIONS:
                if q in h1[0] and q in h01[0]:
                    parts.append(f"median {title} {vs(vals(h01, q), vals(h1, q))}, ≤ 1 for "
                                 f"{pct(h01, q)} vs {pct(h1, q)} of pairs")
            out.append(f"{d}, {sf[0]['model']}, h = 0.1 vs h = 1: " + "; ".join(parts)
                       + f"; noise amplification through the {len(h1[0]['noise_median']) - 1} "
                       f"blocks {vs(last(h01), last(h1))}, at its peak over the blocks "
                       f"{vs(peak(h01), peak(h1))}; feature growth ‖x_B‖/‖x_0‖ "
                       f"{vs(growth(h01), growth(h1))}.")
        ie = _group(runs, data=d, experiment="IE-Skips")
        base = _group(ie, ie_steps=0)
        for k in (1, 3):
            gk = _group(ie, ie_steps=k)
            if not (gk and base):
                continue
            out.append(
                f"{d}, IE-ResNet-{k} vs ResNet (K=0): median 1/σmin(I−J_f) at the IE output "
                f"{ms(vals(gk, 'implicit_out'))} (≤ 1 for {pct(gk, 'implicit_out')} of pairs); "
                "median ‖I+J_f(x0)‖₂ "
                f"{vs(vals(gk, 'explicit_x0'), vals(base, 'explicit_x0'))}; "
                "median ‖J_block‖₂ of the blocks as run "
                f"{vs(vals(gk, 'map_lipschitz'), vals(base, 'map_lipschitz'))}; noise "
                f"amplification {vs(last(gk), last(base))}.")
        pre = [r for r in _group(runs, data=d) if "explicit_x0" in r]
        if pre:
            out.append(f"{d}, every model with blocks x + f(x), at the same inputs x0: the "
                       f"implicit condition holds for {pct(pre, 'implicit_x0')} of pairs, the "
                       f"explicit one for {pct(pre, 'explicit_x0')} (mean ± std over models "
                       "and seeds; the first cannot be lower).")
    return out


# -------------------------------------------------------------------- the command line

def _epochs(data_name: str, scale: float) -> int:
    return max(1, round(SETTINGS[data_name]["epochs"] * scale))


def section_settings(data_name: str, args: argparse.Namespace) -> dict:
    """Everything besides the seeds that decides a section's numbers (a run resumes only
    under equal settings), with the AutoAttack plan for the data set's classes.

    Raises:
        ValueError: an AutoAttack subset the data set's classes cannot run.
    """
    s = SETTINGS[data_name]
    requested = args.aa_attacks if args.aa_attacks is not None else s["aa_attacks"]
    if requested == ["standard"]:
        requested = None
    num_classes = load(data_name, seed=0).num_classes
    autoattack_plan(num_classes, "standard", requested)  # refuses what cannot run
    square_queries = (s["square_queries"] if args.square_queries is None
                      else args.square_queries or None)
    note = None
    if num_classes < 4:
        note = (f"{num_classes} classes are too few for the DLR loss and the targeted "
                "attacks, so AutoAttack is APGD-CE + Square here, as "
                "`pyeuler.robust.autoattack` substitutes")
    return dict(epochs=_epochs(data_name, args.epochs_scale),
                samples=args.samples or s["samples"],
                pgd_steps=args.pgd_steps or s["pgd_steps"], pgd_restarts=args.pgd_restarts,
                at_steps=args.at_steps, eps=s["eps"], grid=s["grid"], aa_attacks=requested,
                square_queries=square_queries, aa_note=note,
                aa_eps=[s["eps"]] if args.aa_eps == "headline" else
                [e for e in s["grid"] if e > 0])


def _meta(argv, t0, args, source: dict, **extra) -> dict:
    """A run's record; ``source`` is :func:`provenance` taken when the run started (the tree
    may change while it runs)."""
    return dict(command=shlex.join(["python", "-m", "pyeuler.robust.report",
                                    *(argv if argv is not None else sys.argv[1:])]),
                date=time.strftime("%Y-%m-%d %H:%M"), seconds=time.perf_counter() - t0,
                machine=f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                seeds=list(args.seeds), provenance=source,
                epochs={d: _epochs(d, args.epochs_scale) for d in SETTINGS}, **extra)


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def read_results(path: Path, log=print) -> dict:
    """results.json's sections (``{"sections": {}}`` when there is none, or when it is of
    an older format, whose robust numbers were not worst cases over AutoAttack)."""
    results = _read(path)
    if results is None:
        return {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "sections": {}}
    if results.get("format") != RESULTS_FORMAT or results.get("version") != RESULTS_VERSION:
        log(f"{path}: an older format (robust numbers without AutoAttack and worst case); "
            "its sections are dropped")
        return {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "sections": {}}
    return results


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")  # a killed run leaves the last whole file
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def _figure_names(results: dict, figdir: Path) -> list[str]:
    """The accuracy figures :func:`plot` writes for ``results``, where they exist (so a run
    can rewrite the markdown without redrawing them)."""
    return [_figure_name(d, exp) for d, section in results["sections"].items()
            for exp in ("step factor", "IE-Skips")
            if _group(section["runs"], experiment=exp) and (figdir / _figure_name(d, exp)).exists()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyeuler.robust.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                   help="the sections to run, each replacing its own in results.json "
                        "[digits moons]")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="seeds; each changes the split, initialisation and batch order [0-4]")
    p.add_argument("--samples", type=int, default=None,
                   help="test samples attacked per seed [digits 100, moons 500: all]")
    p.add_argument("--pgd-steps", type=int, default=None, help="PGD steps in evaluation [10]")
    p.add_argument("--pgd-restarts", type=int, default=1,
                   help="PGD runs from random starts per sample in evaluation [1]")
    p.add_argument("--aa-attacks", nargs="+", default=None, metavar="NAME",
                   help="AutoAttack: 'standard' for the standard version, or a custom subset "
                        "of apgd-ce apgd-dlr apgd-t fab fab-t square [apgd-ce]")
    p.add_argument("--square-queries", type=int, default=None,
                   help="also run the Square attack with this many queries, as part of "
                        "AutoAttack (0: not) [digits 0, moons 100]")
    p.add_argument("--aa-eps", choices=("headline", "all"), default="headline",
                   help="where AutoAttack runs: at the headline ε only, or at every ε of "
                        "the grid [headline]")
    p.add_argument("--at-steps", type=int, default=3, help="PGD steps in adversarial training [3]")
    p.add_argument("--epochs-scale", type=float, default=1.0,
                   help="multiply the epochs (digits 6, moons 10; 0.25 for a quick look) [1]")
    p.add_argument("--out", default="docs", help="folder for robustness_report.md and figures/")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 avoids OpenMP oversubscription on a busy machine)")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished models of an interrupted run of the same settings "
                        "(results.json is saved after every model) and run the rest")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite the report and figures from OUT/figures/results.json (and "
                        "stability.json), no training; with --stability, redraw only the "
                        "stability figures")
    p.add_argument("--stability", action="store_true",
                   help="run the stability section only (retrains the step-factor and IE-Skip "
                        "models, natural training) and rewrite the report; the accuracy "
                        "sections are rendered unchanged from results.json")
    p.add_argument("--stability-samples", type=int, default=16,
                   help="test inputs each model is measured at [16]")
    p.add_argument("--stability-iters", type=int, default=200,
                   help="power / inverse iterations per estimate [200]")
    args = p.parse_args(argv)
    for name in ("samples", "pgd_steps", "pgd_restarts", "at_steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')}: expected an int >= 1, got {value}")
    if args.square_queries is not None and args.square_queries < 0:
        p.error(f"--square-queries: expected an int >= 0, got {args.square_queries}")
    if args.epochs_scale <= 0:
        p.error(f"--epochs-scale: expected a number > 0, got {args.epochs_scale}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    report = out / "robustness_report.md"
    log = lambda m: print(m, flush=True)  # noqa: E731
    results_path = figdir / "results.json"
    if args.render_only:  # with --stability: redraw the stability figures only
        results = read_results(results_path, log)
        stability = _read(figdir / "stability.json")
        figures = _figure_names(results, figdir) if args.stability else plot(results, figdir)
        stab_figures = plot_stability(stability, figdir) if stability else []
        write_markdown(results, figures, report, "figures", stability, stab_figures)
        drawn = len(stab_figures) + (0 if args.stability else len(figures))
        print(f"rewrote {report} and {drawn} figures")
        return 0
    t0, source = time.perf_counter(), provenance()
    if args.stability:
        stability = run_stability(args.data, args.seeds, args.stability_samples,
                                  args.epochs_scale, log, iters=args.stability_iters,
                                  at_steps=args.at_steps)
        from pyeuler.stability import PASS_TOLERANCE

        stability["meta"] = _meta(argv, t0, args, source, samples=args.stability_samples,
                                  iters=args.stability_iters, tol=1e-5, noise_scale=1e-2,
                                  pass_tolerance=PASS_TOLERANCE, dense="svdvals")
        _write_json(figdir / "stability.json", stability)
        stab_figures = plot_stability(stability, figdir)
        results = read_results(results_path, log)
        write_markdown(results, _figure_names(results, figdir), report, "figures", stability,
                       stab_figures)
        print(f"wrote the stability section of {report} and {len(stab_figures)} figures in "
              f"{figdir}/ ({(time.perf_counter() - t0) / 60:.1f} min)")
        return 0
    try:  # refuse what AutoAttack cannot run before any training
        plans = {d: section_settings(d, args) for d in args.data}
    except ValueError as e:
        p.error(f"--aa-attacks: {e}")
    results = read_results(results_path, log)
    for data_name in args.data:
        t_section, section_source = time.perf_counter(), provenance()
        settings = plans[data_name]
        previous = results["sections"].get(data_name)
        done, earlier = [], None
        if args.resume and previous is not None:
            if previous["meta"]["settings"] == settings:
                done = [r for r in previous["runs"] if r["seed"] in args.seeds]
                earlier = previous["meta"].get("provenance")
                log(f"[{data_name}] resuming: {len(done)} finished models kept")
            else:
                log(f"[{data_name}] --resume: the saved section has other settings; "
                    "starting over")

        def section(runs, complete):
            meta = _meta(argv, t_section, args, section_source, settings=settings,
                         complete=complete, resumed=bool(done))
            if earlier is not None:
                meta["resumed_from"] = earlier
            return {"meta": meta, "runs": runs}

        def save(runs):
            results["sections"][data_name] = section(runs, False)
            _write_json(results_path, results)

        runs = run_section(data_name, args.seeds, settings, log, done=done, on_run=save)
        results["sections"][data_name] = section(runs, True)
        _write_json(results_path, results)
        log(f"[{data_name}] section done in {(time.perf_counter() - t_section) / 60:.1f} min")
    figures = plot(results, figdir)
    stability = _read(figdir / "stability.json")
    stab_figures = [f"{d}_stability.png" for d in dict.fromkeys(
        r["data"] for r in stability["runs"])] if stability else []
    write_markdown(results, figures, report, "figures", stability, stab_figures)
    print(f"wrote {report} and {len(figures)} figures in {figdir}/ "
          f"({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
