"""Reproduction report: step factor h and IE-Skips under FGSM / PGD on digits and two-moons.

    python -m pyeuler.robust.report            # writes docs/robustness_report.md,
                                               # docs/figures/*.png, docs/figures/results.json

Every number in the report comes from the run that writes it (several seeds, mean ± std).
Experiments, on each data set:

1. step factor: a deep ResNet with h = 1 vs h = 0.1 (natural training);
2. IE-Skips: ResNet (K=0) vs IE-ResNet-1 and -3, natural and PGD adversarial training;
3. gradient masking: the IE-ResNet-3 models attacked through exact (unrolled) gradients
   and through detached ones;
4. BatchNorm vs GroupNorm inside IE-Skips (eval-mode accuracy).

Clean, FGSM and PGD accuracy over a grid of eps, plotted as accuracy vs eps.

The stability section comes from its own run (``--stability``; it retrains the models of
experiments 1 and 2, natural training, and measures them with :mod:`pyeuler.stability`):

    python -m pyeuler.robust.report --stability   # docs/figures/stability.json, *_stability.png

Each run rewrites the markdown from both JSON files, so either section can be refreshed
without rerunning the other.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from pyeuler.data import load
from pyeuler.robust.attacks import fgsm, pgd
from pyeuler.robust.training import accuracy
from pyeuler.robust.zoo import build_model

SETTINGS = {
    "digits": dict(eps=0.1, grid=[0.0, 0.05, 0.1, 0.15, 0.2], ie_model="wrn-10-1",
                   deep_model="resnet-56", epochs=6, lr=3e-3, batch_size=64),
    "moons": dict(eps=0.05, grid=[0.0, 0.025, 0.05, 0.1, 0.15], ie_model="mlp-32-4",
                  deep_model="mlp-32-32", epochs=30, lr=3e-3, batch_size=64),
}


def make_cfg(data: str, model: str, seed: int, *, h=1.0, adv="none", norm=None, epochs=None,
             attack_steps=5) -> dict:
    s = SETTINGS[data]
    eps = s["eps"]
    is_ie = not model.startswith("resnet-")
    return dict(data=data, data_dir=None, seed=seed, model=model, h=h, ie_steps=[0],
                ie_step_size=0.1, theta=1.0, grad="unrolled",
                norm=norm or ("group" if is_ie else "batch"), preset="quick",
                epochs=epochs or s["epochs"], batch_size=s["batch_size"], lr=s["lr"],
                optimizer="adam", momentum=0.9, weight_decay=0.0, schedule="cosine",
                milestones=[], adv=adv, eps=eps, alpha=2.5 * eps / attack_steps,
                attack_steps=attack_steps, beta=6.0, attacks=["fgsm"], eval_samples=None,
                backend=None)


def eps_curves(model, x, y, grid, pgd_steps: int, seed: int) -> dict:
    out = {"clean": accuracy(model, x, y, progress=False), "fgsm": [], "pgd": []}
    for e in grid:
        out["fgsm"].append(accuracy(model, x, y, lambda m, a, b: fgsm(m, a, b, e), progress=False))
        if e == 0:  # PGD at eps = 0 is the clean accuracy
            out["pgd"].append(out["clean"])
            continue
        g = torch.Generator().manual_seed(seed)
        atk = lambda m, a, b: pgd(m, a, b, e, 2.5 * e / pgd_steps, pgd_steps, generator=g)
        out["pgd"].append(accuracy(model, x, y, atk, progress=False))
    return out


def run_experiments(datasets, seeds, pgd_steps, samples, epochs_scale, at_steps, log) -> dict:
    from pyeuler.cli.train import train_one

    results = {"runs": []}
    for data_name in datasets:
        s = SETTINGS[data_name]
        for seed in seeds:
            data = load(data_name, seed=seed)
            x, y = data.x_test[:samples], data.y_test[:samples]
            epochs = max(1, round(s["epochs"] * epochs_scale))
            jobs = [("step factor", s["deep_model"], dict(h=1.0)),
                    ("step factor", s["deep_model"], dict(h=0.1))]
            for adv in ("none", "pgd"):
                for k in (0, 1, 3):
                    jobs.append(("IE-Skips", s["ie_model"], dict(k=k, adv=adv)))
            if data_name == "digits":
                jobs.append(("BatchNorm in IE-Skips", s["ie_model"], dict(k=1, norm="batch")))
            for exp, model_name, o in jobs:
                k = o.get("k", 0)
                cfg = make_cfg(data_name, model_name, seed, h=o.get("h", 1.0),
                               adv=o.get("adv", "none"), norm=o.get("norm"), epochs=epochs,
                               attack_steps=at_steps)
                t0 = time.perf_counter()
                trained = train_one(cfg, data, k, torch.device("cpu"), False, log=log)
                model = trained["model"]
                run = dict(experiment=exp, data=data_name, seed=seed, model=model_name,
                           h=cfg["h"], ie_steps=k, adv=cfg["adv"], norm=cfg["norm"],
                           epochs=epochs, train_seconds=trained["train_seconds"],
                           grid=s["grid"], **eps_curves(model, x, y, s["grid"], pgd_steps, seed))
                if exp == "BatchNorm in IE-Skips":
                    model.train()
                    with torch.no_grad():
                        run["clean_train_mode_bn"] = (model(x).argmax(1) == y).float().mean().item()
                    model.eval()
                if exp == "IE-Skips" and k == 3:
                    # same weights, attacked through detached IE gradients (gradient masking)
                    det = build_model(model_name, data.input_shape, data.num_classes, h=cfg["h"],
                                      ie_steps=k, grad="detached", norm=cfg["norm"])
                    det.load_state_dict(model.state_dict())
                    det.eval()
                    e = s["eps"]
                    g = torch.Generator().manual_seed(seed)
                    xs = [pgd(det, a, b, e, 2.5 * e / pgd_steps, pgd_steps, generator=g)
                          for a, b in zip(x.split(256), y.split(256))]
                    with torch.no_grad():
                        run["pgd_detached_at_eps"] = (model.eval()(torch.cat(xs)).argmax(1) == y
                                                      ).float().mean().item()
                results["runs"].append(run)
                log(f"[{data_name} seed {seed}] {exp}: {model_name} h={cfg['h']:g} K={k} "
                    f"adv={cfg['adv']} norm={cfg['norm']}: clean {run['clean']:.3f}, "
                    f"FGSM@{s['eps']} {run['fgsm'][s['grid'].index(s['eps'])]:.3f}, "
                    f"PGD@{s['eps']} {run['pgd'][s['grid'].index(s['eps'])]:.3f} "
                    f"({time.perf_counter() - t0:.0f} s)")
    return results


# ------------------------------------------------------------------------- reporting

def _ms(values) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _group(runs, **match):
    return [r for r in runs if all(r.get(k) == v for k, v in match.items())]


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


def plot(results: dict, figdir: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    runs = results["runs"]
    for data_name in dict.fromkeys(r["data"] for r in runs):
        for exp in ("step factor", "IE-Skips"):
            group = _group(runs, data=data_name, experiment=exp)
            if not group:
                continue
            fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
            for ax, attack in zip(axes, ("fgsm", "pgd")):
                for variant in _variants(group):
                    grid = variant[0]["grid"]
                    vals = torch.tensor([r[attack] for r in variant]) * 100
                    mean = vals.mean(0)
                    std = vals.std(0) if len(variant) > 1 else torch.zeros_like(mean)
                    v0 = variant[0]
                    style = "--" if v0["adv"] == "pgd" else "-"
                    color = (f"C{[1.0, 0.1].index(v0['h']) if v0['h'] in (1.0, 0.1) else 2}"
                             if exp == "step factor" else f"C{ {0: 0, 1: 1, 3: 2}.get(v0['ie_steps'], 3)}")
                    ax.plot(grid, mean, style, marker="o", ms=3, color=color, label=_label(v0))
                    ax.fill_between(grid, mean - std, mean + std, alpha=0.12, color=color)
                ax.set_title(f"{data_name}: {exp}, {attack.upper()}")
                ax.set_xlabel("ε (L∞, inputs in [0, 1])")
                ax.grid(alpha=0.3)
            axes[0].set_ylabel("test accuracy (%)")
            axes[1].legend(fontsize=8)
            fig.tight_layout()
            name = f"{data_name}_{exp.replace(' ', '_').replace('-', '').lower()}.png"
            fig.savefig(figdir / name, dpi=110)
            plt.close(fig)
            files.append(name)
    return files


def write_markdown(results: dict, figures: list[str], path: Path, figrel: str,
                   stability: dict | None = None, stability_figures: list[str] = ()) -> None:
    """The report: the accuracy sections from ``results``, then (when given) the stability
    section from ``stability`` (:func:`run_stability`'s output)."""
    if results is None:
        L = ["# Robustness report: step factor h and IE-Skips", ""]
        L.extend(stability_markdown(stability, stability_figures, figrel))
        path.write_text("\n".join(L))
        return
    runs = results["runs"]
    meta = results["meta"]
    L = ["# Robustness report: step factor h and IE-Skips",
         "",
         f"Generated by `{meta['command']}` ({meta['date']}, {meta['seconds'] / 60:.1f} min on "
         f"{meta['machine']}, torch {meta['torch']}). Every number below comes from that run; "
         f"raw results: [`{figrel}/results.json`]({figrel}/results.json). Mean ± std over "
         f"seeds {meta['seeds']} (each seed changes the train/test split, the initialisation "
         "and the batch order).",
         "",
         "## Setup", "",
         "| | digits | two-moons |", "|---|---|---|",
         "| data | scikit-learn 8×8 digits, [0, 1], 75/25 stratified split | make_moons(2000, "
         "noise 0.15) scaled to [0, 1]², 75/25 split |",
         f"| ResNet / IE-ResNet | `{SETTINGS['digits']['ie_model']}` (GroupNorm(1, C)) | "
         f"`{SETTINGS['moons']['ie_model']}` (residual MLP, GroupNorm(1, C)) |",
         f"| deep ResNet (h experiment) | `{SETTINGS['digits']['deep_model']}` (post-activation, "
         f"BatchNorm) | `{SETTINGS['moons']['deep_model']}` (32 residual blocks) |",
         f"| training | Adam 3e-3, cosine, batch 64, {meta['epochs']['digits']} epochs | Adam 3e-3, "
         f"cosine, batch 64, {meta['epochs']['moons']} epochs |",
         f"| headline ε | {SETTINGS['digits']['eps']} | {SETTINGS['moons']['eps']} |",
         "",
         f"IE-Skips: γ = 0.1, θ = 1, exact (`grad=\"unrolled\"`) gradients for training and attacks. "
         f"PGD-AT: PGD-{meta['at_steps']} with random start, α = 2.5ε/{meta['at_steps']}, at the "
         f"headline ε. Evaluation: FGSM, and PGD-{meta['pgd_steps']} (random start, α = 2.5ε/"
         f"{meta['pgd_steps']}) on {meta['samples']} test samples per seed (clean accuracy on the "
         "same samples). Train times are wall-clock seconds of this run on the machine "
         "named above, which may have been shared with other jobs: indicative only.",
         ""]

    def table(title, group, extra=None):
        d = group[0]["data"]
        e = SETTINGS[d]["eps"]
        i = group[0]["grid"].index(e)
        cols = ["model", "clean", f"FGSM ε={e}", f"PGD ε={e}", f"PGD ε={2 * e:g}"
                if 2 * e in group[0]["grid"] else None, "train time (s)"]
        cols = [c for c in cols if c]
        if extra:
            cols.insert(-1, extra[0].format(e=e))
        L.extend([f"### {title}", "", "| " + " | ".join(cols) + " |",
                  "|" + "---|" * len(cols)])
        for v in _variants(group):
            row = [_label(v[0]), _ms([r["clean"] for r in v]), _ms([r["fgsm"][i] for r in v]),
                   _ms([r["pgd"][i] for r in v])]
            if 2 * e in v[0]["grid"]:
                j = v[0]["grid"].index(2 * e)
                row.append(_ms([r["pgd"][j] for r in v]))
            if extra:
                row.append(extra[1](v))
            row.append(f"{statistics.mean(r['train_seconds'] for r in v):.1f}")
            L.append("| " + " | ".join(row) + " |")
        L.append("")

    for data_name in dict.fromkeys(r["data"] for r in runs):
        L.extend([f"## {data_name}", ""])
        sf = _group(runs, data=data_name, experiment="step factor")
        if sf:
            table(f"Step factor: deep ResNet, h = 1 vs h = 0.1 ({data_name})", sf)
        ie = _group(runs, data=data_name, experiment="IE-Skips")
        if ie:
            table(f"ResNet vs IE-ResNet-1 / -3, natural and PGD adversarial training ({data_name})",
                  ie, extra=("PGD ε={e} through detached IE gradients",
                             lambda v: _ms([r["pgd_detached_at_eps"] for r in v])
                             if "pgd_detached_at_eps" in v[0] else "—"))
        bn = _group(runs, data=data_name, experiment="BatchNorm in IE-Skips")
        if bn:
            L.extend([f"### BatchNorm inside IE-Skips ({data_name})", "",
                      "IE-ResNet-1 with BatchNorm instead of GroupNorm, same training: test "
                      f"accuracy in eval mode (running statistics) {_ms([r['clean'] for r in bn])}"
                      f"%, in train mode (batch statistics) "
                      f"{_ms([r['clean_train_mode_bn'] for r in bn])}%.", ""])
        for f in figures:
            if f.startswith(data_name):
                L.extend([f"![{f}]({figrel}/{f})", ""])
    L.extend(["## What it shows", "", "_Findings are computed from the numbers above by "
              "`pyeuler.robust.report.findings`; \"about the same\" means the difference of "
              f"the means is within the larger seed-to-seed std ({len(meta['seeds'])} seeds, "
              f"{meta['samples']} attacked test samples each)._", ""])
    L.extend(f"- {line}" for line in findings(runs))
    L.append("")
    if stability is not None:
        L.extend(stability_markdown(stability, stability_figures, figrel))
    path.write_text("\n".join(L))


def findings(runs) -> list[str]:
    """Plain-language comparisons drawn from the results (no fixed conclusions)."""
    out = []

    def vals(group, key, eps=None):
        return [r[key] if eps is None else r[key][r["grid"].index(eps)] for r in group]

    def mean_at(group, key, eps):
        return statistics.mean(vals(group, key, eps))

    def cmp(a, b, a_vals=None, b_vals=None):
        spread = max((statistics.stdev(v) for v in (a_vals, b_vals) if v and len(v) > 1),
                     default=0.0)
        tol = max(spread, 0.005)
        return ("higher than" if a > b + tol else "lower than" if a < b - tol
                else "about the same as")

    for d in dict.fromkeys(r["data"] for r in runs):
        e = SETTINGS[d]["eps"]
        sf = _group(runs, data=d, experiment="step factor")
        if sf:
            h1, h01 = _group(sf, h=1.0), _group(sf, h=0.1)
            c1, c01 = statistics.mean(vals(h1, "clean")), statistics.mean(vals(h01, "clean"))
            p1, p01 = mean_at(h1, "pgd", e), mean_at(h01, "pgd", e)
            f1, f01 = mean_at(h1, "fgsm", e), mean_at(h01, "fgsm", e)
            out.append(
                f"{d}, {sf[0]['model']}: with h = 0.1 clean accuracy is "
                f"{cmp(c01, c1, vals(h01, 'clean'), vals(h1, 'clean'))} h = 1 "
                f"({100 * c01:.1f}% vs {100 * c1:.1f}%), FGSM accuracy at ε={e} is "
                f"{cmp(f01, f1, vals(h01, 'fgsm', e), vals(h1, 'fgsm', e))} h = 1 "
                f"({100 * f01:.1f}% vs {100 * f1:.1f}%) and PGD accuracy "
                f"{cmp(p01, p1, vals(h01, 'pgd', e), vals(h1, 'pgd', e))} h = 1 "
                f"({100 * p01:.1f}% vs {100 * p1:.1f}%).")
        for adv in ("none", "pgd"):
            g = _group(runs, data=d, experiment="IE-Skips", adv=adv)
            if not g:
                continue
            base = _group(g, ie_steps=0)
            tr = "natural training" if adv == "none" else "PGD-AT"
            pb, fb = mean_at(base, "pgd", e), mean_at(base, "fgsm", e)
            parts = []
            for k in (1, 3):
                gk = _group(g, ie_steps=k)
                if gk:
                    pk, fk = mean_at(gk, "pgd", e), mean_at(gk, "fgsm", e)
                    parts.append(f"IE-ResNet-{k} FGSM {100 * fk:.1f}% / PGD {100 * pk:.1f}% "
                                 f"({cmp(pk, pb, vals(gk, 'pgd', e), vals(base, 'pgd', e))} "
                                 "the ResNet under PGD)")
            out.append(f"{d}, {tr}, ε={e}: ResNet FGSM {100 * fb:.1f}% / PGD {100 * pb:.1f}%; "
                       + "; ".join(parts) + ".")
            g3 = _group(g, ie_steps=3)
            if g3 and "pgd_detached_at_eps" in g3[0]:
                det = statistics.mean(r["pgd_detached_at_eps"] for r in g3)
                exact = mean_at(g3, "pgd", e)
                out.append(f"{d}, {tr}: PGD through detached IE gradients leaves "
                           f"{100 * det:.1f}% accuracy vs {100 * exact:.1f}% with exact gradients"
                           + (" — the detached attack is weaker, i.e. detached gradients would "
                              "overstate robustness (gradient masking)." if det > exact + 0.01
                              else "; here the approximation costs the attacker little."))
        bn = _group(runs, data=d, experiment="BatchNorm in IE-Skips")
        if bn:
            out.append(f"{d}: IE-ResNet-1 with BatchNorm scores "
                       f"{100 * statistics.mean(r['clean'] for r in bn):.1f}% in eval mode but "
                       f"{100 * statistics.mean(r['clean_train_mode_bn'] for r in bn):.1f}% with "
                       "batch statistics: BN running statistics mix the branch evaluations at "
                       "x0 and at the IE iterates, which is why the models above use "
                       "GroupNorm(1, C) as the IE authors' code does.")
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


def run_stability(datasets, seeds, samples, epochs_scale, log, iters=100, tol=1e-5) -> dict:
    """Train the step-factor and IE-Skip models of :func:`run_experiments` (natural
    training, same settings and seeds) and measure them with
    :func:`pyeuler.stability.model_stability` at the first ``samples`` test inputs."""
    from pyeuler.cli.train import train_one
    from pyeuler.stability import ConvergenceWarning, model_stability

    results = {"runs": []}
    for data_name in datasets:
        s = SETTINGS[data_name]
        for seed in seeds:
            data = load(data_name, seed=seed)
            epochs = max(1, round(s["epochs"] * epochs_scale))
            jobs = [("step factor", s["deep_model"], h, 0) for h in (1.0, 0.1)]
            jobs += [("IE-Skips", s["ie_model"], 1.0, k) for k in (0, 1, 3)]
            for exp, model_name, h, k in jobs:
                cfg = make_cfg(data_name, model_name, seed, h=h, epochs=epochs)
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
         f"Generated by `{meta['command']}` ({meta['date']}, {meta['seconds'] / 60:.1f} min on "
         f"{meta['machine']}, torch {meta['torch']}); raw results: "
         f"[`{figrel}/stability.json`]({figrel}/stability.json). The models of the step-factor "
         "and IE-Skip experiments above (natural training, same builders, seeds and "
         f"epochs: digits {meta['epochs']['digits']}, moons {meta['epochs']['moons']}) are "
         "retrained in this run and measured with `pyeuler.stability.model_stability` at the "
         f"first {meta['samples']} test inputs of each seed's split; mean ± std over seeds "
         f"{meta['seeds']}. Clean accuracy: these models, first 200 test samples.",
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
         "where it applies; medians pooled likewise. Per-sample Jacobians are formed densely "
         f"(`method=\"auto\"`), so values are exact up to the iteration tolerance "
         f"{meta['tol']:g}.",
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
              "\"about the same\" means within the larger seed-to-seed std._", ""])
    L.extend(f"- {line}" for line in stability_findings(runs))
    L.append(f"- Convergence: {100 * min(conv):.1f}% of the estimates converged in the worst "
             f"model ({100 * statistics.mean(conv):.1f}% on average; iters {meta['iters']}, "
             f"tol {meta['tol']:g}); an unconverged estimate is a lower bound of the norm.")
    L.append("")
    return L


def stability_findings(runs) -> list[str]:
    """Plain-language comparisons of the stability numbers (no fixed conclusions)."""
    out = []

    def vals(group, q, key="median"):
        return [r[q][key] for r in group]

    def cmp(a_vals, b_vals, other, tol=0.005):
        a, b = statistics.mean(a_vals), statistics.mean(b_vals)
        spread = max((statistics.stdev(v) for v in (a_vals, b_vals) if len(v) > 1), default=0.0)
        t = max(spread, tol * max(abs(a), abs(b), 1e-12))
        word = "higher than" if a > b + t else "lower than" if a < b - t else "about the same as"
        return f"{word} {other}"

    def m(v):
        return f"{statistics.mean(v):.3g}"

    def pct(group, q):
        return f"{100 * statistics.mean(vals(group, q, 'pass_rate')):.1f}%"

    def last(group):
        return [r["noise_median"][-1] for r in group]

    def peak(group):
        return [max(r["noise_median"][1:]) for r in group]

    for d in dict.fromkeys(r["data"] for r in runs):
        sf = _group(runs, data=d, experiment="step factor")
        if sf:
            h1, h01 = _group(sf, h=1.0), _group(sf, h=0.1)
            parts = []
            for q, title in STABILITY_CONDITIONS:
                if q in h1[0] and q in h01[0]:
                    parts.append(f"median {title} {m(vals(h01, q))} vs {m(vals(h1, q))} "
                                 f"({cmp(vals(h01, q), vals(h1, q), 'h = 1')}; ≤ 1 for "
                                 f"{pct(h01, q)} vs {pct(h1, q)} of pairs)")
            g01, g1 = [r["growth_median"] for r in h01], [r["growth_median"] for r in h1]
            out.append(f"{d}, {sf[0]['model']}, h = 0.1 vs h = 1: " + "; ".join(parts)
                       + f"; noise amplification through the {len(h1[0]['noise_median']) - 1} "
                       f"blocks {m(last(h01))} vs {m(last(h1))} "
                       f"({cmp(last(h01), last(h1), 'h = 1', 0.02)}), at its peak over the blocks "
                       f"{m(peak(h01))} vs {m(peak(h1))} "
                       f"({cmp(peak(h01), peak(h1), 'h = 1', 0.02)}); feature growth "
                       f"‖x_B‖/‖x_0‖ {m(g01)} vs {m(g1)} ({cmp(g01, g1, 'h = 1', 0.02)}).")
        ie = _group(runs, data=d, experiment="IE-Skips")
        base = _group(ie, ie_steps=0)
        for k in (1, 3):
            gk = _group(ie, ie_steps=k)
            if not (gk and base):
                continue
            e_k, e_0 = vals(gk, "explicit_x0"), vals(base, "explicit_x0")
            out.append(
                f"{d}, IE-ResNet-{k} vs ResNet (K=0): median 1/σmin(I−J_f) at the IE output "
                f"{m(vals(gk, 'implicit_out'))} (≤ 1 for {pct(gk, 'implicit_out')} of pairs), "
                f"median ‖I+J_f(x0)‖₂ {m(e_k)} vs the ResNet's {m(e_0)} "
                f"({cmp(e_k, e_0, 'the ResNet')}); "
                f"median ‖J_block‖₂ of the blocks as run {m(vals(gk, 'map_lipschitz'))} vs "
                f"{m(vals(base, 'map_lipschitz'))} "
                f"({cmp(vals(gk, 'map_lipschitz'), vals(base, 'map_lipschitz'), 'the ResNet')})"
                f"; noise amplification {m(last(gk))} vs {m(last(base))} "
                f"({cmp(last(gk), last(base), 'the ResNet', 0.02)}).")
        pre = [r for r in _group(runs, data=d) if "explicit_x0" in r]
        if pre:
            out.append(f"{d}, every model with blocks x + f(x), at the same inputs x0: the "
                       f"implicit condition holds for {pct(pre, 'implicit_x0')} of pairs, the "
                       f"explicit one for {pct(pre, 'explicit_x0')} (the first cannot be "
                       "lower).")
    return out


def _figure_names(results: dict, figdir: Path) -> list[str]:
    """The accuracy figures :func:`plot` writes for ``results``, where they exist (so the
    stability run can rewrite the markdown without redrawing them)."""
    names = []
    for data_name in dict.fromkeys(r["data"] for r in results["runs"]):
        for exp in ("step factor", "IE-Skips"):
            name = f"{data_name}_{exp.replace(' ', '_').replace('-', '').lower()}.png"
            if _group(results["runs"], data=data_name, experiment=exp) and (figdir / name).exists():
                names.append(name)
    return names


def _meta(argv, t0, args, **extra) -> dict:
    return dict(command="python -m pyeuler.robust.report " + " ".join(
                    argv if argv is not None else sys.argv[1:]),
                date=time.strftime("%Y-%m-%d"), seconds=time.perf_counter() - t0,
                machine=f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                torch=torch.__version__, seeds=args.seeds,
                epochs={d: max(1, round(SETTINGS[d]["epochs"] * args.epochs_scale))
                        for d in SETTINGS}, **extra)


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyeuler.robust.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["digits", "moons"], choices=list(SETTINGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pgd-steps", type=int, default=10, help="PGD steps in evaluation [10]")
    p.add_argument("--at-steps", type=int, default=3, help="PGD steps in adversarial training [3]")
    p.add_argument("--samples", type=int, default=200, help="test samples attacked per seed [200]")
    p.add_argument("--epochs-scale", type=float, default=1.0,
                   help="multiply the epochs (0.25 for a quick look) [1]")
    p.add_argument("--out", default="docs", help="folder for robustness_report.md and figures/")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 avoids OpenMP oversubscription on a busy machine)")
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
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    report = out / "robustness_report.md"
    if args.render_only:  # with --stability: redraw the stability figures only
        results = _read(figdir / "results.json")
        stability = _read(figdir / "stability.json")
        figures = ((_figure_names(results, figdir) if args.stability else plot(results, figdir))
                   if results else [])
        stab_figures = plot_stability(stability, figdir) if stability else []
        write_markdown(results, figures, report, "figures", stability, stab_figures)
        drawn = len(stab_figures) + (0 if args.stability else len(figures))
        print(f"rewrote {report} and {drawn} figures")
        return 0
    t0 = time.perf_counter()
    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.stability:
        stability = run_stability(args.data, args.seeds, args.stability_samples,
                                  args.epochs_scale, log, iters=args.stability_iters)
        from pyeuler.stability import PASS_TOLERANCE

        stability["meta"] = _meta(argv, t0, args, samples=args.stability_samples,
                                  iters=args.stability_iters, tol=1e-5, noise_scale=1e-2,
                                  pass_tolerance=PASS_TOLERANCE)
        (figdir / "stability.json").write_text(json.dumps(stability, indent=1))
        stab_figures = plot_stability(stability, figdir)
        results = _read(figdir / "results.json")
        write_markdown(results, _figure_names(results, figdir) if results else [], report,
                       "figures", stability, stab_figures)
        print(f"wrote the stability section of {report} and {len(stab_figures)} figures in "
              f"{figdir}/ ({(time.perf_counter() - t0) / 60:.1f} min)")
        return 0
    results = run_experiments(args.data, args.seeds, args.pgd_steps, args.samples,
                              args.epochs_scale, args.at_steps, log=log)
    results["meta"] = _meta(argv, t0, args, pgd_steps=args.pgd_steps, at_steps=args.at_steps,
                            samples=args.samples)
    (figdir / "results.json").write_text(json.dumps(results, indent=1))
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
