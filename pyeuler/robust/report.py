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
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
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


def write_markdown(results: dict, figures: list[str], path: Path, figrel: str) -> None:
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
                   help="rewrite the report and figures from OUT/figures/results.json, no training")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        results = json.loads((figdir / "results.json").read_text())
        figures = plot(results, figdir)
        write_markdown(results, figures, out / "robustness_report.md", "figures")
        print(f"rewrote {out / 'robustness_report.md'} and {len(figures)} figures")
        return 0
    t0 = time.perf_counter()
    results = run_experiments(args.data, args.seeds, args.pgd_steps, args.samples,
                              args.epochs_scale, args.at_steps,
                              log=lambda m: print(m, flush=True))
    results["meta"] = dict(
        command="python -m pyeuler.robust.report " + " ".join(argv if argv is not None
                                                                else sys.argv[1:]),
        date=time.strftime("%Y-%m-%d"), seconds=time.perf_counter() - t0,
        machine=f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        torch=torch.__version__, seeds=args.seeds, pgd_steps=args.pgd_steps,
        at_steps=args.at_steps, samples=args.samples,
        epochs={d: max(1, round(SETTINGS[d]["epochs"] * args.epochs_scale)) for d in SETTINGS})
    (figdir / "results.json").write_text(json.dumps(results, indent=1))
    figures = plot(results, figdir)
    write_markdown(results, figures, out / "robustness_report.md", "figures")
    print(f"wrote {out / 'robustness_report.md'} and {len(figures)} figures in {figdir}/ "
          f"({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
