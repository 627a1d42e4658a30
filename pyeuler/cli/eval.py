"""``pyeuler eval``: clean and robust accuracy of a trained checkpoint, per sample.

Rebuilds the model from the checkpoint (loaded with ``weights_only=True``), runs every
attack at every radius of its norm on the first N test samples of the data set it was
trained on, and reports, per norm and ε, the per-sample worst case over all attacks run
(the headline robust accuracy; a sample misclassified without attack is not robust) with
each attack beside it. C&W is an L2 attack: its success rate and median L2 distortion.

Successive runs on one checkpoint merge: on the same test samples (same count and data)
the per-sample records of every run are kept and the worst case is over all of them; an
attack run with another --grad than the checkpoint's is its own attack (pgd-20@detached)
beside the others; results on other samples are kept apart, labelled by their sample set
("other_sample_sets"), never in the worst case.

Writes, next to the checkpoint unless --json says otherwise:
  <checkpoint>.eval.json  settings, results and per-sample results; saved after every
                          batch, so a run interrupted with the same settings resumes
                          (--fresh starts over)
  <checkpoint>.eval.md    the results table (also printed)
  <checkpoint>.eval.png   robust accuracy vs ε, one panel per norm (needs matplotlib)

--check-masking adds the gradient-masking checks of pyeuler.robust.masking and a verdict.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from pyeuler.cli._results import (EVAL_CONTEXT, attack_key, config_hash, merge_eval_results,
                                  read_eval_results, sample_set_id, sample_sets,
                                  split_attack_key)
from pyeuler.cli.train import (_nonneg_float, _pos_float, _pos_int, add_common_runtime_args,
                               apply_threads, check_backend, check_output_path, resolve_device)

FORMAT, VERSION = "pyeuler-eval", 3
_SAVE_EVERY_S = 5.0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="robust accuracy of a checkpoint: worst case over FGSM, PGD, AutoAttack, "
                     "Square; C&W distortion; gradient-masking checks",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint written by pyeuler train --out")
    p.add_argument("--attack", nargs="+", default=["fgsm", "pgd-20"], metavar="ATTACK",
                   help="fgsm, pgd-N (L∞), pgd-N-l2, pgd-N-t / pgd-N-l2-t (targeted), "
                        "autoattack[-l2], square[-l2], cw; several allowed [fgsm pgd-20]")
    p.add_argument("--eps", type=_nonneg_float, nargs="+", default=None,
                   help="L∞ radii, numbers or fractions like 8/255 [the training run's eps]")
    p.add_argument("--eps-l2", type=_nonneg_float, nargs="+", default=[0.5],
                   help="L2 radii for the -l2 attacks and C&W's L2 columns [0.5]")
    p.add_argument("--alpha", type=_nonneg_float, default=None,
                   help="PGD step size [2.5·eps/steps: 1/255 for PGD-20 at 8/255]")
    p.add_argument("--restarts", type=_pos_int, default=1,
                   help="PGD runs per sample from random starts; a sample is broken if any "
                        "run breaks it [1]")
    p.add_argument("--targets", type=_pos_int, default=None,
                   help="targeted PGD: attack toward each of the top T wrong classes "
                        "[min(9, classes − 1)]")
    p.add_argument("--no-random-start", action="store_true", help="PGD starts at x")
    p.add_argument("--aa-version", choices=("standard", "plus", "rand"), default="standard",
                   help="AutoAttack version [standard]")
    p.add_argument("--aa-attacks", nargs="+", default=None, metavar="NAME",
                   help="custom AutoAttack subset, e.g. apgd-ce apgd-t (the package's custom "
                        "version)")
    p.add_argument("--square-queries", type=_pos_int, default=5000,
                   help="Square attack queries per sample (square, --check-masking) [5000]")
    p.add_argument("--cw-c", type=_nonneg_float, default=10.0, help="CW c [10]")
    p.add_argument("--cw-steps", type=_pos_int, default=50, help="CW Adam steps [50]")
    p.add_argument("--cw-lr", type=_pos_float, default=6e-4, help="CW Adam lr [6e-4]")
    p.add_argument("--cw-kappa", type=_nonneg_float, default=0.0, help="CW confidence κ [0]")
    p.add_argument("--check-masking", action="store_true",
                   help="run the gradient-masking checks (exact vs detached IE gradients, "
                        "Square vs white box, monotone in steps and eps, eps = 0.5) and "
                        "print a verdict")
    p.add_argument("--grad", choices=("unrolled", "detached", "implicit"), default=None,
                   help="rebuild the IE-Skips with this gradient mode (same weights); e.g. "
                        "unrolled to attack a model trained with detached gradients honestly")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder, if not the training one")
    p.add_argument("--samples", type=_pos_int, default=None, help="first N test samples only")
    p.add_argument("--batch-size", type=_pos_int, default=256)
    p.add_argument("--seed", type=int, default=0,
                   help="seed for PGD random starts, AutoAttack and Square [0]")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="where to write the results [<checkpoint>.eval.json]; the Markdown "
                        "table and the plot go beside it (.md, .png)")
    p.add_argument("--fresh", action="store_true",
                   help="measure this run's attacks afresh instead of resuming saved "
                        "records of them (other attacks' records are kept)")
    add_common_runtime_args(p)
    p.set_defaults(func=run)
    return p


def _error(msg: str) -> int:
    print(f"pyeuler: error: {msg}", file=sys.stderr)
    return 2


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _resumable(saved: dict | None, context: dict, sample_set: str, provenance: str,
               attacks, grad: str | None, eps, eps_l2) -> tuple[dict, bool]:
    """The state to resume: the saved per-sample records (finished or not) of this run's
    attacks and radii that were measured on the same model state and samples with the same
    settings (``provenance``), under this run's plain attack names; and whether any attack
    record was among them."""
    from pyeuler.robust.evaluation import eps_key, parse_attack

    state = {"per_sample": {}}
    if not isinstance(saved, dict) or saved.get("format") != FORMAT \
            or saved.get("version") != VERSION \
            or any(saved.get(k) != v for k, v in context.items()):
        return state, False
    entry = sample_sets(saved).get(sample_set) or {}
    old, made = entry.get("per_sample") or {}, entry.get("measured_with") or {}
    keep = state["per_sample"]
    if old.get("clean") is not None and made.get("clean") == provenance:
        keep["clean"] = old["clean"]
    for spec in map(parse_attack, attacks):
        key = attack_key(spec.name, grad)
        radii = ["l2"] if spec.kind == "cw" else \
            [eps_key(e) for e in (eps if spec.norm == "Linf" else eps_l2)]
        records = {r: (old.get(key) or {})[r] for r in radii
                   if r in (old.get(key) or {}) and (made.get(key) or {}).get(r) == provenance}
        if records:
            keep[spec.name] = records
    return state, any(k != "clean" for k in keep)


def _percent(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _settings_of(payload: dict, key: str, radius: str) -> dict:
    """The settings of the run that measured ``key`` at ``radius`` (the newest run's when
    the file does not say)."""
    made = ((payload.get("measured_with") or {}).get(key) or {}).get(radius)
    for run in reversed(payload.get("runs") or []):
        if isinstance(run, dict) and made is not None and made == config_hash(
                {"settings": run.get("settings"), "backend": run.get("backend")}):
            return run["settings"]
    return payload["settings"]


def markdown_report(payload: dict) -> str:
    """The results as Markdown: a table per norm and ε (clean, worst case, each attack),
    C&W's line, notes, and the masking checks."""
    from pyeuler.robust.evaluation import eps_key, parse_attack

    res = payload["results"]
    keys = [(a, parse_attack(split_attack_key(a)[0])) for a in payload["attacks"]]
    fmt = payload.get("eps_format") or {}
    on = f" ({payload['sample_set']})" if payload.get("sample_set") else ""
    lines = [f"**{payload['model']}** {payload['model_kwargs']} on {payload['data']}, "
             f"{payload['samples']} test samples{on}, clean accuracy "
             f"{_percent(res.get('clean'))} %.", ""]
    for norm, radii in (("Linf", payload["eps"]), ("L2", payload["eps_l2"])):
        names = [a for a, s in keys if s.norm == norm]
        if not names:
            continue
        extra = [a for a, s in keys if s.kind == "cw" and a in res] if norm == "L2" else []
        lines += ["| norm | ε | clean | **worst case** | " + " | ".join(names + extra) + " |",
                  "|---|---|---|---|" + "---|" * (len(names) + len(extra))]
        for e in radii:
            key = eps_key(e)
            worst = (res.get("worst_case") or {}).get(norm, {}).get(key)
            cells = [_percent((res.get(a) or {}).get(key)) for a in names]
            cells += [_percent(res[a].get("accuracy_at", {}).get(key)) for a in extra]
            label = fmt.get(key, f"{e:g}") if norm == "Linf" else f"{e:g}"
            lines.append(f"| {'L∞' if norm == 'Linf' else 'L2'} | {label} | "
                         f"{_percent(res.get('clean'))} | **{_percent(worst)}** | "
                         + " | ".join(cells) + " |")
        used = (res.get("worst_case_attacks") or {}).get(norm) or names + extra
        lines += ["", f"Robust accuracy in % of all samples. Worst case: a sample counts only "
                      f"if correct clean and after every attack ({', '.join(used)})."]
        for e, taken in ((res.get("worst_case_attacks_by_eps") or {}).get(norm) or {}).items():
            lines[-1] += f" At ε = {fmt.get(e, e)}: {', '.join(taken)} only."
        unfinished = [f"{a} at {', '.join(r)}" for a, r in (res.get("unfinished") or {}).items()]
        if unfinished:
            lines[-1] += (" Unfinished (interrupted; run it again to finish), so no worst case "
                          f"where they are: {'; '.join(unfinished)}.")
        lines.append("")
    for a in (a for a, spec in keys if spec.kind == "cw" and a in res):
        cw, s = res[a], _settings_of(payload, a, "l2")
        median = "—" if cw["median_l2"] is None else f"{cw['median_l2']:.4g}"
        label = "C&W" + a[len("cw"):]
        lines += [f"{label} L2 (c={s['cw_c']:g}, {s['cw_steps']} Adam steps, lr {s['cw_lr']:g}, "
                  f"κ={s['cw_kappa']:g}): success rate {_percent(cw['success_rate'])} % of the "
                  f"{cw['attacked']} samples classified correctly, median L2 distortion "
                  f"{median} (successful samples).", ""]
    for note in payload.get("notes", []):
        lines += [f"Note: {note}", ""]
    for label, entry in (payload.get("other_sample_sets") or {}).items():
        other = entry.get("results") or {}
        parts = [f"clean {_percent(other.get('clean'))} %"]
        for norm, per_eps in (other.get("worst_case") or {}).items():
            taken = ", ".join((other.get("worst_case_attacks") or {}).get(norm, []))
            parts += [f"worst case {'L∞' if norm == 'Linf' else 'L2'} ε = {e}: {_percent(v)} % "
                      f"(over {taken})" for e, v in per_eps.items()]
        parts += [f"{a} ε = {e}: {_percent(v)} %" for a, accs in other.items()
                  if a not in ("clean", "worst_case", "worst_case_attacks",
                               "worst_case_attacks_by_eps", "unfinished")
                  and isinstance(accs, dict) and "success_rate" not in accs
                  for e, v in accs.items()]
        lines += [f"Other samples, {entry.get('samples')} ({label}), not in the tables above: "
                  + "; ".join(parts) + ".", ""]
    masking = payload.get("masking")
    if masking:
        lines += ["| masking check | status | result | fires when |", "|---|---|---|---|"]
        lines += [f"| {c['name']} | {c['status']} | {c['summary']} | {c['threshold']} |"
                  for c in masking["checks"]]
        lines += ["", f"**{masking['verdict']}**", ""]
    return "\n".join(lines)


def plot_report(payload: dict, path: Path) -> bool:
    """Robust accuracy vs ε, a panel per norm: each attack, the worst case (bold) and, if
    the masking checks ran, their PGD-20 sweep. Returns False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from pyeuler.robust.evaluation import eps_key, parse_attack

    res = payload["results"]
    specs = [(a, parse_attack(split_attack_key(a)[0])) for a in payload["attacks"]]
    norms = [(n, r) for n, r in (("Linf", payload["eps"]), ("L2", payload["eps_l2"]))
             if any(s.norm == n for _, s in specs)]
    fig, axes = plt.subplots(1, max(len(norms), 1), figsize=(5.5 * max(len(norms), 1), 4),
                             squeeze=False)
    for ax, (norm, radii) in zip(axes[0], norms):
        radii = sorted(radii)
        clean = res.get("clean")
        xs = [0.0] + radii
        for name in (a for a, s in specs if s.norm == norm):
            ys = [clean] + [(res.get(name) or {}).get(eps_key(e)) for e in radii]
            ax.plot(xs, [None if v is None else 100 * v for v in ys], marker="o", label=name)
        worst = (res.get("worst_case") or {}).get(norm, {})
        ax.plot(xs, [None if v is None else 100 * v
                     for v in [clean] + [worst.get(eps_key(e)) for e in radii]],
                color="black", linewidth=2.5, marker="s", label="worst case")
        masking = payload.get("masking")
        if norm == "Linf" and masking:
            sweep = next(c for c in masking["checks"] if c["name"] == "monotone_in_eps")["values"]
            n = payload["samples"]
            ex = sorted(float(k) for k in sweep)
            ax.plot([0.0] + ex, [100 * clean] + [100 * sweep[str(e)] / n for e in ex],
                    color="gray", linestyle="--", label="PGD-20 ×5 restarts (masking check)")
        ax.set_xlabel(f"ε ({'L∞' if norm == 'Linf' else 'L2'})")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{payload['model']} {payload['model_kwargs']} on {payload['data']} "
                 f"({payload['samples']} samples)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> int:
    from pyeuler.checkpoint import CheckpointError, load_checkpoint, load_model_state
    from pyeuler.data import load
    from pyeuler.robust import build_model, warn_if_gradient_masking
    from pyeuler.robust.autoattack import autoattack_plan
    from pyeuler.robust.evaluation import (EvalSettings, eps_key, parse_attack, per_sample,
                                           robust_evaluation, worst_case)

    threads = apply_threads(args)
    device = resolve_device(args.device)
    path = Path(args.checkpoint)
    try:
        ckpt = load_checkpoint(path, map_location="cpu")
    except (CheckpointError, FileNotFoundError) as e:
        return _error(str(e))
    cfg = ckpt.get("config") or {}
    spec = ckpt["model"]
    if not spec.get("name") or "data" not in cfg:
        return _error(f"checkpoint: {path} does not say which model/data it was trained with "
                      "(it was not written by pyeuler train)")
    trained_kwargs = dict(spec.get("kwargs") or {})
    kwargs = dict(trained_kwargs)
    if args.grad:
        kwargs["grad"] = args.grad
    # The same weights attacked through other gradients: its own attacks (pgd-20@detached)
    grad_tag = args.grad if args.grad and args.grad != trained_kwargs.get("grad", "unrolled") \
        else None
    eps_list = args.eps if args.eps is not None else [float(cfg.get("eps", 8 / 255))]
    try:
        specs = [parse_attack(a) for a in args.attack]
    except ValueError as e:
        return _error(f"--attack: {e}")
    attacks = [s.name for s in specs]
    if len(set(attacks)) != len(attacks):
        return _error(f"--attack: an attack is listed twice: {' '.join(args.attack)}")
    needs_package = args.check_masking or any(s.kind in ("autoattack", "square") for s in specs)
    if needs_package:
        try:
            import pyautoattack  # noqa: F401  (only to say what to install)
        except ImportError:
            return _error("AutoAttack and Square need the pyautoattack package: "
                          'pip install "pyeuler[eval]"')
    # Checked before any work; earlier results in --json are merged into, never lost.
    if args.backend or not cfg.get("backend"):
        check_backend(args.backend, device)
    else:
        check_backend(cfg["backend"], device, f"--backend (the checkpoint's, {cfg['backend']}; "
                                              "pass --backend to choose another)")
    out = Path(args.json) if args.json else path.with_name(path.name + ".eval.json")
    check_output_path(str(out), "--json")
    try:
        earlier = read_eval_results(out)
    except ValueError as e:
        return _error(f"--json: {e}")
    try:
        data = load(cfg["data"], seed=int(cfg.get("seed", 0)),
                    data_dir=args.data_dir or cfg.get("data_dir"))
        torch.manual_seed(0)
        model = build_model(spec["name"], data.input_shape, data.num_classes,
                            backend=args.backend or cfg.get("backend"), **kwargs)
        load_model_state(model, ckpt, path)
    except CheckpointError as e:
        return _error(str(e))
    except (ValueError, FileNotFoundError, TypeError) as e:
        return _error(f"checkpoint: {path}: cannot rebuild its model/data: {e}")
    notes = []
    if any(s.kind == "autoattack" for s in specs):
        try:
            _, _, note = autoattack_plan(data.num_classes, args.aa_version, args.aa_attacks)
        except ValueError as e:
            return _error(f"--aa-attacks/--aa-version: {e}")
        if note:
            notes.append(note)
    model.to(device).eval()
    warn_if_gradient_masking(model)
    n = min(args.samples or len(data.x_test), len(data.x_test))
    x, y = data.x_test[:n], data.y_test[:n]
    settings = EvalSettings(
        alpha=args.alpha, restarts=args.restarts, random_start=not args.no_random_start,
        targets=args.targets, seed=args.seed, aa_version=args.aa_version,
        aa_attacks=args.aa_attacks, square_queries=args.square_queries, cw_c=args.cw_c,
        cw_steps=args.cw_steps, cw_lr=args.cw_lr, cw_kappa=args.cw_kappa,
        batch_size=args.batch_size)
    if settings.restarts > 1 and not settings.random_start:
        return _error("--restarts: several runs need random starts (drop --no-random-start)")
    backend = args.backend or cfg.get("backend")
    context = {"checkpoint_sha256": _sha256(path), "model_kwargs": trained_kwargs,
               "data": cfg["data"], "model": spec["name"], "epochs": ckpt["epoch"],
               "run_id": cfg.get("run_id")}
    assert set(context) == set(EVAL_CONTEXT)
    sample_set = sample_set_id(cfg["data"], x, y)
    # what a per-sample record depends on besides the model state, samples and attack key
    provenance = config_hash({"settings": settings.to_dict(), "backend": backend})
    state, resumed = ({"per_sample": {}}, False) if args.fresh else _resumable(
        earlier, context, sample_set, provenance, attacks, grad_tag, eps_list, args.eps_l2)
    if resumed:
        print(f"resuming the evaluation saved in {out} (--fresh starts over)")
    keys = {a: attack_key(a, grad_tag) for a in attacks}

    def fmt_eps(e):
        return f"{e * 255:.3g}/255" if cfg["data"] == "cifar10" else f"{e:g}"

    payload = {"format": FORMAT, "version": VERSION, "checkpoint": str(path), **context,
               "sample_set": sample_set, "samples": n, "settings": settings.to_dict(),
               "backend": backend, "grad": kwargs.get("grad", "unrolled"),
               "attacks": list(keys.values()), "eps": eps_list, "eps_l2": args.eps_l2,
               "eps_format": {eps_key(e): fmt_eps(e) for e in eps_list},
               "gradient_masking": bool(kwargs.get("grad") == "detached"
                                        and kwargs.get("ie_steps", 0) > 0),
               "notes": notes, "complete": False}
    last_save = [0.0]

    def merged_with_earlier(current: dict) -> tuple[dict, str | None]:
        """This run's records (under their attack keys) merged into the file's."""
        records = {keys.get(k, k): v for k, v in (current.get("per_sample") or {}).items()}
        made = {k: {r: provenance for r in v} if isinstance(v, dict) else provenance
                for k, v in records.items()}
        return merge_eval_results(earlier, {**payload, "per_sample": records,
                                            "measured_with": made})

    def save(current: dict, force: bool = False) -> None:
        if force or time.perf_counter() - last_save[0] > _SAVE_EVERY_S:
            _write_atomic(out, json.dumps(merged_with_earlier(current)[0]))
            last_save[0] = time.perf_counter()

    show = sys.stderr.isatty() and not args.no_progress

    def progress(label, done, total):
        if show:
            print(f"\r  {label}: {done}/{total} samples\033[K", end="", file=sys.stderr,
                  flush=True)

    print(f"{path}: {spec['name']} {kwargs} trained {ckpt['epoch']} epochs on {cfg['data']} "
          f"({cfg.get('adv', 'none')} training)")
    t0 = time.perf_counter()
    try:
        robust_evaluation(model, x, y, attacks, eps=eps_list, eps_l2=args.eps_l2,
                          settings=settings, device=device, state=state, on_batch=save,
                          progress=progress)
    except ValueError as e:
        return _error(str(e))
    except KeyboardInterrupt:
        save(state, force=True)
        print(f"\ninterrupted; the results so far are in {out}: run the same command again "
              "to resume", file=sys.stderr)
        return 130
    finally:
        if show:
            print("\r\033[K", end="", file=sys.stderr)
    res = state["results"]
    if args.check_masking:
        from pyeuler.robust.masking import check_gradient_masking

        clean = per_sample(state, "clean")
        white_box = [s.name for s in specs if s.norm == "Linf" and s.white_box]
        white = {e: worst_case(clean, [per_sample(state, a, e) for a in white_box])
                 for e in eps_list} if white_box else {}
        black = {e: per_sample(state, "square", e) for e in eps_list} if "square" in attacks \
            else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            report = check_gradient_masking(
                model, x, y, eps=eps_list, white_box=white, black_box=black,
                square_queries=args.square_queries, seed=args.seed,
                batch_size=args.batch_size, device=device)
        payload["masking"] = report.to_dict()
    payload["seconds"] = time.perf_counter() - t0
    payload["complete"] = True
    merged, merge_note = merged_with_earlier(state)
    _write_atomic(out, json.dumps(merged))
    text = markdown_report(merged)
    out.with_suffix(".md").write_text(text + "\n")
    print(f"{n} test samples ({sample_set}) on {device}, {threads} threads, "
          f"{time.perf_counter() - t0:.1f} s")
    if merge_note:
        print(f"{out}: {merge_note}")
    print(f"  clean accuracy: {100 * res['clean']:.2f}%\n")
    print(text)
    if args.check_masking:
        print(payload["masking"]["verdict"])
    plotted = plot_report(merged, out.with_suffix(".png"))
    written = [out, out.with_suffix(".md")] + ([out.with_suffix(".png")] if plotted else [])
    print(f"results written to {', '.join(map(str, written))}"
          + ("" if plotted else " (no plot: matplotlib is not installed)"))
    return 0
