"""``pyeuler eval``: clean and robust accuracy of a trained checkpoint.

Rebuilds the model from the checkpoint (loaded with ``weights_only=True``), evaluates it
on the test split of the data set it was trained on, prints the results and writes them
as JSON (default: next to the checkpoint, ``<checkpoint>.eval.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from pyeuler.cli.train import _nonneg_float, _pos_int, add_common_runtime_args, resolve_device


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="clean and robust accuracy (FGSM, PGD-N, CW) of a checkpoint",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint written by pyeuler train --out")
    p.add_argument("--attack", nargs="+", default=["fgsm"], metavar="ATTACK",
                   help="fgsm, pgd-N (e.g. pgd-20), cw; several allowed [fgsm]")
    p.add_argument("--eps", type=_nonneg_float, nargs="+", default=None,
                   help="L∞ radius, a number or a fraction like 8/255 (several allowed) "
                        "[the training run's eps]")
    p.add_argument("--alpha", type=_nonneg_float, default=None,
                   help="PGD step size [2.5·eps/steps: 1/255 for PGD-20 at 8/255]")
    p.add_argument("--no-random-start", action="store_true", help="PGD starts at x")
    p.add_argument("--cw-c", type=_nonneg_float, default=10.0, help="CW c [10]")
    p.add_argument("--cw-steps", type=_pos_int, default=50, help="CW Adam steps [50]")
    p.add_argument("--cw-lr", type=_nonneg_float, default=6e-4, help="CW Adam lr [6e-4]")
    p.add_argument("--cw-kappa", type=_nonneg_float, default=0.0, help="CW confidence κ [0]")
    p.add_argument("--grad", choices=("unrolled", "detached", "implicit"), default=None,
                   help="rebuild the IE-Skips with this gradient mode (same weights); e.g. "
                        "unrolled to attack a model trained with detached gradients honestly")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder, if not the training one")
    p.add_argument("--samples", type=_pos_int, default=None, help="first N test samples only")
    p.add_argument("--batch-size", type=_pos_int, default=256)
    p.add_argument("--seed", type=int, default=0, help="seed for PGD random starts [0]")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="where to write the results [<checkpoint>.eval.json]")
    add_common_runtime_args(p)
    p.set_defaults(func=run)
    return p


def _error(msg: str) -> int:
    print(f"pyeuler: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from pyeuler.checkpoint import CheckpointError, load_checkpoint, load_model_state
    from pyeuler.data import load
    from pyeuler.robust import build_model, evaluate, make_attack

    if args.threads:
        torch.set_num_threads(args.threads)
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
    kwargs = dict(spec.get("kwargs") or {})
    if args.grad:
        kwargs["grad"] = args.grad
    eps_list = args.eps if args.eps is not None else [float(cfg.get("eps", 8 / 255))]
    for a in args.attack:
        try:
            make_attack(a, eps=eps_list[0])
        except ValueError as e:
            return _error(f"--attack: {e}")
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
    model.to(device).eval()
    n = args.samples or len(data.x_test)
    x, y = data.x_test[:n], data.y_test[:n]
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    res = evaluate(model, x, y, attacks=args.attack, eps=eps_list, alpha=args.alpha,
                   batch_size=args.batch_size, device=device,
                   progress=False if args.no_progress else None,
                   random_start=not args.no_random_start, c=args.cw_c, cw_steps=args.cw_steps,
                   lr=args.cw_lr, kappa=args.cw_kappa)
    seconds = time.perf_counter() - t0

    def fmt_eps(e):
        return f"{e * 255:.3g}/255" if cfg["data"] == "cifar10" else f"{e:g}"

    print(f"{path}: {spec['name']} {kwargs} trained {ckpt['epoch']} epochs on {cfg['data']} "
          f"({cfg.get('adv', 'none')} training)")
    print(f"{n} test samples on {device}, {seconds:.1f} s")
    print(f"  clean accuracy: {100 * res['clean']:.2f}%")
    results = {"clean": res["clean"]}
    for a in args.attack:
        if a.lower() == "cw":
            print(f"  {a} accuracy (c={args.cw_c:g}, {args.cw_steps} steps, lr {args.cw_lr:g}): "
                  f"{100 * res[a]:.2f}%")
            results[a] = res[a]
        else:
            results[a] = {str(e): acc for e, acc in res[a].items()}
            for e, acc in res[a].items():
                print(f"  {a} accuracy (eps={fmt_eps(e)}): {100 * acc:.2f}%")
    out = Path(args.json) if args.json else path.with_name(path.name + ".eval.json")
    payload = {"checkpoint": str(path), "model": spec["name"], "model_kwargs": kwargs,
               "epochs": ckpt["epoch"], "data": cfg["data"], "samples": n,
               "attacks": args.attack, "eps": eps_list, "alpha": args.alpha,
               "gradient_masking": bool(kwargs.get("grad") == "detached"
                                        and kwargs.get("ie_steps", 0) > 0),
               "results": results, "seconds": seconds}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"results written to {out}")
    return 0
