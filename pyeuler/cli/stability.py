"""``pyeuler stability``: the seed papers' stability conditions measured block by block.

For every residual block of a model, at test inputs: ‖I + J_f‖₂ (the explicit step does not
amplify perturbations when ≤ 1; Li, He & Lin, ICML 2020, Prop. 2) and 1/σ_min(I − θJ_f)
(the implicit step, Prop. 3), at x0 and, for IE-Skips, at the IE output; the spectral norm
of the whole block map for post-activation and down-sampling blocks; the amplification of
Gaussian noise and the feature norms through depth (Zhang et al., IJCAI 2019, §3.3).
Prints a per-block table (medians over samples, [share of samples meeting the condition]),
writes JSON and draws the per-depth curves (PNG).

  pyeuler stability --checkpoint runs/digits-wrn-10-1-K1-unrolled-none-seed0-<hash>.pt
  pyeuler stability --data moons --model mlp --ie-steps 0 1 3 --epochs 30
  pyeuler stability --data digits --model wrn-10-1 --h 0.1          # at initialisation

With --model the model is built as ``pyeuler train`` builds it (same flags, same seed) and
trained for --epochs with its quick preset first (0: measured at initialisation).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from pyeuler.cli.train import (_nonneg_int, _pos_float, _pos_int, add_common_runtime_args,
                               apply_threads, check_backend, check_output_path, print_error,
                               resolve_device)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "stability", help="the papers' stability conditions per block, noise amplification "
                          "through depth",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model: a checkpoint, or one built as pyeuler train builds it")
    g.add_argument("--checkpoint", default=None,
                   help="checkpoint written by pyeuler train --out (its model and data)")
    g.add_argument("--model", default=None,
                   help="resnet-20|32|44|56|110|218, preact-18|34|50, wrn-D-W, mlp or "
                        "mlp-WIDTH-DEPTH [digits: wrn-10-1, moons: mlp, cifar10: preact-18]")
    g.add_argument("--h", type=_pos_float, default=1.0, help="step factor h [1.0]")
    g.add_argument("--ie-steps", type=_nonneg_int, nargs="+", default=None, metavar="K",
                   help="IE-Skip inner steps; several values measure one model each "
                        "[0 1; 0 for resnet-*]")
    g.add_argument("--ie-step-size", type=_pos_float, default=0.1, help="IE step size γ [0.1]")
    g.add_argument("--theta", type=float, default=1.0, help="θ-method parameter in [0, 1] [1.0]")
    g.add_argument("--norm", default=None, choices=("batch", "group"),
                   help="normalisation in the blocks [group; batch for resnet-*]")
    g.add_argument("--grad", default="unrolled", choices=("unrolled", "detached", "implicit"),
                   help="IE-Skip gradient mode [unrolled]")
    g.add_argument("--epochs", type=_nonneg_int, default=0,
                   help="with --model: train this many epochs first (pyeuler train's default "
                        "preset for the data) [0: at initialisation]")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, choices=("digits", "moons", "cifar10"),
                   help="digits, moons or cifar10 (needs --data-dir) [the checkpoint's; digits]")
    g.add_argument("--data-dir", default=None,
                   help="folder with the CIFAR-10 python batches (cifar-10-batches-py)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed for the split and init (with --model), the start vectors and "
                        "the noise [the checkpoint's; 0]")
    g.add_argument("--samples", type=_pos_int, default=64,
                   help="measure at the first N test inputs [64]")
    g = p.add_argument_group("measurement")
    g.add_argument("--iters", type=_pos_int, default=100,
                   help="power / inverse iterations per estimate (iterative method) [100]")
    g.add_argument("--tol", type=_pos_float, default=1e-5,
                   help="relative change at which an estimate has converged (iterative "
                        "method) [1e-5]")
    g.add_argument("--method", default="auto", choices=("auto", "iterative", "dense"),
                   help="dense: form each sample's Jacobian and take its singular values "
                        "(exact, no iteration; refused for blocks of more than 4096 entries "
                        "per sample); iterative: power / inverse iteration on matrix-free "
                        "products; auto: dense up to 1024 entries per sample [auto]")
    g.add_argument("--noise-scale", type=_pos_float, default=1e-2,
                   help="Gaussian noise with ‖δ‖ ≈ SCALE·‖x‖ per sample [0.01]")
    g.add_argument("--noise-draws", type=_pos_int, default=1, help="noise draws averaged [1]")
    g.add_argument("--perturb", default="state", choices=("state", "input"),
                   help="add the noise to the first block's input (state) or to the model "
                        "input [state]")
    g.add_argument("--batch-size", type=_pos_int, default=None,
                   help="samples per chunk (memory) [all at once]")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="folder for <name>.stability.json / .png [the checkpoint's folder; "
                        "stability/]")
    g.add_argument("--json", default=None, metavar="PATH",
                   help="JSON path [DIR/<name>.stability.json]")
    g.add_argument("--plot", default=None, metavar="PATH",
                   help="PNG path [DIR/<name>.stability.png]")
    g.add_argument("--no-plot", action="store_true", help="no PNG")
    add_common_runtime_args(p)
    p.set_defaults(func=run)
    return p


def _error(msg: str) -> int:
    print_error(msg)
    return 2


def _train_config(args) -> dict:
    """``pyeuler train``'s configuration for these flags (its defaults for the rest)."""
    from pyeuler.cli import train

    parser = argparse.ArgumentParser()
    train.add_parser(parser.add_subparsers())
    targs = parser.parse_args(["train"])
    for key in ("model", "h", "ie_steps", "ie_step_size", "theta", "norm", "grad", "data_dir",
                "backend"):
        setattr(targs, key, getattr(args, key))
    targs.data = args.data or "digits"
    targs.seed = 0 if args.seed is None else args.seed
    targs.epochs = args.epochs
    return train.resolve_config(targs)


def _models_from_flags(args, device, progress):
    """[(name, model, description)] built (and trained for --epochs) as pyeuler train does."""
    from pyeuler.cli.train import row_name, train_one
    from pyeuler.data import load

    cfg = _train_config(args)
    data = load(cfg["data"], seed=cfg["seed"], data_dir=cfg["data_dir"])
    out = []
    for k in cfg["ie_steps"]:
        trained = train_one(cfg, data, k, device, progress, log=lambda m: None)
        h = f"-h{cfg['h']:g}" if cfg["h"] != 1 else ""
        name = f"{cfg['data']}-{cfg['model']}{h}-K{k}-seed{cfg['seed']}"
        desc = (f"{row_name(k)}: {cfg['model']}, h={cfg['h']:g}, norm={cfg['norm']}, "
                f"{cfg['epochs']} epochs" + (" (at initialisation)" if not cfg["epochs"] else ""))
        out.append((name, trained["model"], desc, dict(model=cfg["model"], ie_steps=k, h=cfg["h"],
                                                       epochs=cfg["epochs"], norm=cfg["norm"])))
    return cfg, data, out


def _model_from_checkpoint(args, path: Path):
    from pyeuler.checkpoint import load_checkpoint, load_model_state
    from pyeuler.data import load
    from pyeuler.robust import build_model

    ckpt = load_checkpoint(path, map_location="cpu")
    cfg = dict(ckpt.get("config") or {})
    spec = ckpt["model"]
    if not spec.get("name") or "data" not in cfg:
        raise ValueError(f"checkpoint: {path} does not say which model/data it was trained with "
                         "(it was not written by pyeuler train)")
    if args.data and args.data != cfg["data"]:
        raise ValueError(f"--data {args.data}: {path} was trained on {cfg['data']}")
    kwargs = dict(spec.get("kwargs") or {})
    data = load(cfg["data"], seed=int(cfg.get("seed", 0)),
                data_dir=args.data_dir or cfg.get("data_dir"))
    torch.manual_seed(0)
    model = build_model(spec["name"], data.input_shape, data.num_classes,
                        backend=args.backend or cfg.get("backend"), **kwargs)
    load_model_state(model, ckpt, path)
    cfg["seed"] = int(cfg.get("seed", 0)) if args.seed is None else args.seed
    desc = f"{path}: {spec['name']} {kwargs}, trained {ckpt['epoch']} epochs on {cfg['data']}"
    meta = dict(model=spec["name"], ie_steps=kwargs.get("ie_steps", 0), h=kwargs.get("h", 1.0),
                epochs=ckpt["epoch"], checkpoint=str(path))
    return cfg, data, [(path.stem, model, desc, meta)]


def plot(results: list[tuple[str, dict]], path: Path) -> None:
    """Per-depth curves of several models: noise amplification and feature norms through
    depth, and per block the measured norms (log scale; the conditions read ≤ 1)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (label, r) in enumerate(results):
        color = f"C{i}"
        depth = r["depth"]
        for ax, key in zip(axes[:2], ("noise_amplification", "feature_norms")):
            ax.plot(depth, r[key]["median"], marker="o", ms=3, color=color, label=label)
            ax.fill_between(depth, r[key]["q25"], r[key]["q75"], color=color, alpha=0.15)
        for q, style in (("explicit_x0", "-"), ("implicit_x0", "--"), ("implicit_out", "-."),
                         ("map_lipschitz", ":")):
            xs, ys = [], []
            for b in r["blocks"]:
                s = b.get(q)
                if s is not None and isinstance(s["median"], float):
                    xs.append(b["index"] + 1)
                    ys.append(s["median"])
            if xs:
                axes[2].plot(xs, ys, style, marker="o", ms=3, color=color,
                             label=f"{label}: {_QUANTITY_LABELS[q]}")
    axes[0].set(title="noise amplification ‖x_k(x+δ) − x_k(x)‖ / ‖δ‖", xlabel="depth k (blocks)",
                yscale="log")
    axes[1].set(title="feature norm ‖x_k‖", xlabel="depth k (blocks)")
    for ax in axes[:2]:
        ax.text(0.01, 0.01, "median, band: quartiles over samples", transform=ax.transAxes,
                fontsize=7, color="0.4")
    axes[2].axhline(1.0, color="k", lw=0.8)
    axes[2].set(title="per block (median over samples; ≤ 1: condition met)", xlabel="block",
                yscale="log")
    from matplotlib.ticker import MaxNLocator
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


_QUANTITY_LABELS = {"explicit_x0": "‖I+J_f(x0)‖₂", "implicit_x0": "1/σmin(I−θJ_f(x0))",
                    "implicit_out": "1/σmin(I−θJ_f(y)) at the IE output",
                    "map_lipschitz": "‖J_block‖₂"}


def run(args: argparse.Namespace) -> int:
    from pyeuler.checkpoint import CheckpointError
    from pyeuler.stability import model_stability

    if args.checkpoint and args.model:
        return _error("--checkpoint and --model exclude each other (the checkpoint names its "
                      "model)")
    if not 0 <= args.theta <= 1:
        return _error(f"--theta: expected a number in [0, 1], got {args.theta}")
    threads = apply_threads(args)
    device = resolve_device(args.device)
    check_backend(args.backend, device)
    check_output_path(args.json, "--json")
    check_output_path(None if args.no_plot else args.plot, "--plot")
    check_output_path(args.out, "--out", directory=True)
    progress = False if args.no_progress else None
    try:
        if args.checkpoint:
            cfg, data, models = _model_from_checkpoint(args, Path(args.checkpoint))
            out_dir = Path(args.out) if args.out else Path(args.checkpoint).parent
        else:
            cfg, data, models = _models_from_flags(args, device, progress)
            out_dir = Path(args.out or "stability")
    except (CheckpointError, FileNotFoundError) as e:
        return _error(str(e))
    except (ValueError, TypeError) as e:
        return _error(str(e))
    x = data.x_test[:args.samples]
    x = (x.float() / 255 if x.dtype == torch.uint8 else x).to(device)  # CIFAR is kept as uint8
    seed = cfg["seed"]
    print(f"{cfg['data']}: {len(x)} test inputs | {args.iters} iterations, tol {args.tol:g}, "
          f"method {args.method} | noise ‖δ‖ ≈ {args.noise_scale:g}·‖x‖ at the "
          f"{'first block input' if args.perturb == 'state' else 'model input'} | {device}, "
          f"{threads} threads", flush=True)
    payload, curves = [], []
    for name, model, desc, meta in models:
        model.to(device).eval()
        t0 = time.perf_counter()
        generator = torch.Generator(device=device).manual_seed(seed)
        try:
            res = model_stability(model, x, iters=args.iters, tol=args.tol,
                                  noise_scale=args.noise_scale, noise_draws=args.noise_draws,
                                  perturb=args.perturb, batch_size=args.batch_size,
                                  generator=generator, method=args.method, progress=progress)
        except ValueError as e:  # the library names its arguments; here they are flags
            message = re.sub(r"\bmethod='(\w+)'", r"--method \1", str(e))
            return _error(f"{name}: {message}")
        seconds = time.perf_counter() - t0
        print(f"\n{desc} ({seconds:.1f} s)")
        print(res.table())
        d = res.to_dict(per_sample=True)
        d.update(name=name, description=desc, seconds=seconds, **meta)
        payload.append(d)
        curves.append((name, d))
    stem = models[0][0] if len(models) == 1 else models[0][0].rsplit("-K", 1)[0] + "-K" + "_".join(
        str(m[3]["ie_steps"]) for m in models) + "-seed" + str(seed)
    json_path = Path(args.json) if args.json else out_dir / f"{stem}.stability.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"data": cfg["data"], "samples": len(x), "seed": seed,
                                     "results": payload}, indent=1))
    print("\nmedians over samples, [share of samples with the value <= 1]; noise amp and ‖x‖: "
          "means; ‖J_block‖₂: spectral norm of the whole block map's Jacobian (the only "
          "quantity for post-activation and down-sampling blocks)")
    print(f"results written to {json_path}")
    if not args.no_plot:
        png = Path(args.plot) if args.plot else out_dir / f"{stem}.stability.png"
        plot(curves, png)
        print(f"curves drawn in {png}")
    return 0
