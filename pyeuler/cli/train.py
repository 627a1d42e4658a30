"""``pyeuler train``: train ResNet vs IE-ResNet (naturally or adversarially) and print a
table of clean and robust accuracy.

With no arguments: a tiny WideResNet (wrn-10-1) on scikit-learn's bundled 8×8 digits,
K = 0 (ResNet) and K = 1 (IE-ResNet), a few epochs, FGSM at eps = 0.1; about a minute
on two CPU cores, nothing downloaded.
"""

from __future__ import annotations

import argparse
import fractions
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from pyeuler.backend import BACKENDS
from pyeuler.ops.ie_skip import RECOMPUTE_POLICIES

# Training schedules. "quick" is for the small bundled data sets; the others are the
# papers' CIFAR schedules (milestones as fractions of the epochs, so --epochs rescales them).
PRESETS: dict[str, dict] = {
    "quick": dict(optimizer="adam", lr=3e-3, momentum=0.9, weight_decay=0.0, schedule="cosine",
                  milestones=(), batch_size=64, epochs=None,
                  doc="Adam 3e-3, cosine decay, batch 64; epochs: digits 8, moons 30, cifar10 10"),
    "he2016": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="step",
                   milestones=(0.5, 0.75), batch_size=128, epochs=164,
                   doc="He et al. 2016 CIFAR ResNet: SGD 0.1, momentum 0.9, wd 1e-4, batch 128, "
                       "164 epochs (64k iterations), lr x0.1 at 50%% and 75%%"),
    "madry": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=2e-4, schedule="step",
                  milestones=(0.5, 0.75), batch_size=128, epochs=205, adv="pgd",
                  eps=8 / 255, alpha=2 / 255, attack_steps=10,
                  doc="Madry et al. PGD-AT: SGD 0.1, momentum 0.9, wd 2e-4, batch 128, "
                      "205 epochs (80k iterations), lr x0.1 at 50%% and 75%%; PGD-10, "
                      "eps 8/255, alpha 2/255"),
    "trades": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=2e-4, schedule="step",
                   milestones=(75 / 76,), batch_size=128, epochs=76, adv="trades",
                   eps=0.031, alpha=0.007, attack_steps=10, beta=6.0,
                   doc="Zhang et al. 2019 TRADES (WRN-34-10): SGD 0.1, momentum 0.9, wd 2e-4, "
                       "batch 128, 76 epochs, lr x0.1 at epoch 75; 10 steps, eps 0.031, "
                       "step 0.007, beta 6"),
}

_QUICK_EPOCHS = {"digits": 8, "moons": 30, "cifar10": 10}
_DEFAULT_EPS = {"digits": 0.1, "moons": 0.05, "cifar10": 8 / 255}


def _nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {s}")
    return v


def _pos_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {s}")
    return v


def _number(s: str) -> float:
    """A decimal or a fraction: ``0.031``, ``1e-3`` or ``8/255`` (how ε is usually given)."""
    try:
        return float(fractions.Fraction(s.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number like 0.1 or 8/255, got {s}")


def _nonneg_float(s: str) -> float:
    v = _number(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s}")
    return v


def _pos_float(s: str) -> float:
    v = _number(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s}")
    return v


def _val_size(s: str) -> float:
    """``--val-split``: a fraction in (0, 1) or a count >= 1 (written as an integer: 1.0
    is neither, rather than one sample)."""
    v = _number(s)
    if not v > 0 or (v >= 1 and not s.strip().isdigit()):
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) or a count >= 1, "
                                         f"got {s}")
    return int(v) if v >= 1 else v


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_pos_int, default=None,
                   help="torch CPU threads, shown in the run's header line [OMP_NUM_THREADS "
                        "when set, else the cores this process may use (its CPU affinity) "
                        "divided by LOCAL_WORLD_SIZE, the ranks on this machine; at least 1]")


def add_common_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (cuda if available) [auto]")
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="pyeuler kernel backend for the model (reference, eager, triton, cuda, "
                        "auto) [PYEULER_BACKEND or the library default]")
    add_threads_arg(p)
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are off anyway when stderr is not a terminal)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="train ResNet vs IE-ResNet and report clean / robust accuracy",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets:\n" + "\n".join(f"  {k:7s} {v['doc'].replace('%%', '%')}"
                                         for k, v in PRESETS.items()))
    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits", choices=("digits", "moons", "cifar10"),
                   help="digits (bundled with scikit-learn), moons, or cifar10 (needs "
                        "--data-dir) [digits]")
    g.add_argument("--data-dir", default=None,
                   help="folder with the CIFAR-10 python batches (cifar-10-batches-py)")
    g.add_argument("--seed", type=int, default=0, help="seed for the split, init and order [0]")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="resnet-20|32|44|56|110|218, preact-18|34|50, wrn-D-W (wrn-34-10, "
                        "wrn-10-1), mlp or mlp-WIDTH-DEPTH [digits: wrn-10-1, moons: mlp, "
                        "cifar10: preact-18]")
    g.add_argument("--h", type=_pos_float, default=1.0, help="step factor h [1.0]")
    g.add_argument("--ie-steps", type=_nonneg_int, nargs="+", default=None, metavar="K",
                   help="IE-Skip inner steps; several values train one model each "
                        "[0 1; 0 for resnet-*]")
    g.add_argument("--ie-step-size", type=_pos_float, default=0.1, help="IE step size γ [0.1]")
    g.add_argument("--theta", type=float, default=1.0, help="θ-method parameter in [0, 1] [1.0]")
    g.add_argument("--norm", default=None, choices=("batch", "group"),
                   help="normalisation in the blocks: group = GroupNorm(1, C) as in the IE "
                        "authors' code (BatchNorm's running statistics fit IE-Skips' repeated "
                        "branch evaluations badly in eval mode) [group; batch for resnet-*]")
    g.add_argument("--grad", default="unrolled", choices=("unrolled", "detached", "implicit"),
                   help="IE-Skip gradient mode [unrolled]")
    g.add_argument("--recompute", default="selective", choices=RECOMPUTE_POLICIES,
                   help="what unrolled IE-Skips on the fused backends (triton, cuda) recompute "
                        "in the backward instead of keeping (IESkip(recompute=)): 'full' the "
                        "least memory, 'none' the fewest bytes; the same weights up to "
                        "rounding, so not part of the checkpoint's name [selective]")
    g = p.add_argument_group("training")
    g.add_argument("--preset", default=None, choices=tuple(PRESETS),
                   help="schedule preset [quick for digits/moons, he2016 for cifar10]; "
                        "explicit options override it")
    g.add_argument("--epochs", type=_pos_int, default=None)
    g.add_argument("--batch-size", type=_pos_int, default=None)
    g.add_argument("--lr", type=_pos_float, default=None)
    g.add_argument("--optimizer", choices=("sgd", "adam"), default=None)
    g.add_argument("--momentum", type=_nonneg_float, default=None)
    g.add_argument("--weight-decay", type=_nonneg_float, default=None)
    g.add_argument("--adv", choices=("none", "pgd", "trades"), default=None,
                   help="adversarial training: none, pgd (Madry PGD-AT) or trades [none]")
    g.add_argument("--eps", type=_nonneg_float, default=None,
                   help="L∞ radius for adversarial training and the table's attacks, a "
                        "number or a fraction like 8/255 [digits 0.1, moons 0.05, "
                        "cifar10 8/255]")
    g.add_argument("--alpha", type=_nonneg_float, default=None,
                   help="PGD/TRADES training step [2.5·eps/steps: 2/255 for PGD-10 at 8/255]")
    g.add_argument("--attack-steps", type=_pos_int, default=None,
                   help="PGD/TRADES steps during training [10]")
    g.add_argument("--beta", type=_nonneg_float, default=None, help="TRADES β [6]")
    capture = g.add_mutually_exclusive_group()
    capture.add_argument("--cuda-graph", dest="capture", action="store_const", const="cuda-graph",
                         help="capture each training step (attack, forward, loss, backward, "
                              "optimizer) once in a CUDA graph and replay it: no host work per "
                              "step. Needs CUDA; the last partial batch of each epoch is "
                              "dropped (pyeuler.robust.capture)")
    capture.add_argument("--compile", dest="capture", action="store_const", const="compile",
                         help="the same through torch.compile(mode='reduce-overhead'): "
                              "forward, loss and backward as one graph, the optimizer step "
                              "apart. Needs CUDA; drops the last partial batch too")
    g.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                   help="mixed precision: the forward passes (the attack's too) under "
                        "torch.autocast in bfloat16 or float16; fp16 also scales the loss "
                        "with a GradScaler (its state is checkpointed) [off]")
    g.add_argument("--channels-last", action="store_true",
                   help="model and image batches in channels-last memory format (faster "
                        "convolutions on tensor-core GPUs; image data only)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: convert BatchNorm with "
                        "nn.SyncBatchNorm.convert_sync_batchnorm, so every rank normalises "
                        "with the global batch's statistics (pyeuler's fused norms "
                        "synchronise, gloo or NCCL); GroupNorm models need none")
    g = p.add_argument_group("validation (a split of the training data; never the test set)")
    g.add_argument("--val-split", type=_val_size, default=None, metavar="F|N",
                   help="hold out a fraction F in (0, 1) or N samples of the training data, "
                        "drawn from --seed, and report clean and robust (PGD-10 at --eps) "
                        "accuracy on it after every epoch; with --out also "
                        "<checkpoint>.best.pt, the best robust accuracy so far [off]")
    g.add_argument("--val-samples", type=_pos_int, default=256,
                   help="attack only the first N validation samples (clean accuracy uses "
                        "all) [256]")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--attacks", nargs="+", default=["fgsm"],
                   help="attacks for the table: fgsm, pgd-N, cw [fgsm]")
    g.add_argument("--eval-samples", type=_pos_int, default=None,
                   help="attack only the first N test samples (clean accuracy uses all)")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="save a checkpoint per model to DIR after every epoch, with its "
                        "per-epoch log <checkpoint>.csv, curves <checkpoint>.png (needs "
                        "matplotlib) and, when tensorboard is installed, <checkpoint>.tb/; "
                        "named "
                        "<data>-<model>-K<k>[-<grad>][-h<h>]-<adv>-seed<seed>-<hash>.pt: the "
                        "hash is of every option that changes the trained weights (all but "
                        "--epochs and the evaluation, data-dir, backend and recompute "
                        "options), so runs of other configurations never share a file")
    g.add_argument("--resume", action="store_true",
                   help="continue from this configuration's checkpoints in --out when they "
                        "exist; refused when --out holds only other configurations of the "
                        "same model, data and seed (naming the options that differ)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a file at a checkpoint's path that is not a checkpoint of "
                        "this configuration (refused without it)")
    g.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    add_common_runtime_args(p)
    p.set_defaults(func=run)
    return p


def print_error(message: str, every_rank: bool = False) -> None:
    """``pyeuler: error: MESSAGE``, one line on stderr; under torchrun printed by the first
    rank of each machine only (:func:`pyeuler.robust.distributed.reports_errors`: the other
    ranks hit the same error and exit non-zero silently), or by every rank with
    ``every_rank`` (an error about this rank's own place in the run, which rank 0 may not
    share)."""
    from pyeuler.robust.distributed import reports_errors

    if every_rank or reports_errors():
        print(f"pyeuler: error: {message}", file=sys.stderr)


def usage_error(message: str, every_rank: bool = False):
    """A user's mistake: one line on stderr (:func:`print_error`), exit status 2
    (argparse's), no traceback."""
    print_error(message, every_rank)
    raise SystemExit(2)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        usage_error(f"--device: expected cpu, cuda, cuda:N or auto, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        usage_error("--device: CUDA is not available on this machine")
    return dev


def check_backend(name: str | None, device: torch.device, flag: str = "--backend") -> None:
    """``--backend`` (or what ``flag`` names) usable for tensors on ``device``, checked
    before any work."""
    from pyeuler.backend import resolve_backend

    try:
        resolve_backend(name, device)
    except (RuntimeError, ValueError) as e:
        usage_error(f"{flag}: {e}")


def check_output_path(path: str | None, flag: str, directory: bool = False) -> None:
    """``flag``'s path can be written (a folder with ``directory``), checked before any work,
    so a long run never ends in a write error: the path is not the other kind (folder /
    file), and its nearest existing ancestor is a folder this process may write in."""
    if path is None:
        return
    target = Path(path)
    if directory and target.exists() and not target.is_dir():
        usage_error(f"{flag}: {path} exists and is not a folder")
    if not directory and target.is_dir():
        usage_error(f"{flag}: {path} is a folder; give a file path")
    if target.exists():
        if not os.access(target, os.W_OK):
            usage_error(f"{flag}: cannot write {path}: no permission")
        return
    for parent in target.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                usage_error(f"{flag}: cannot write {path}: {parent} is not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                usage_error(f"{flag}: cannot write {path}: no permission to write in {parent}")
            break


def default_threads() -> int:
    """torch's CPU threads when ``--threads`` is not given: the cores this process may run on
    (its affinity mask, which containers and ``taskset`` narrow; not the host's count)
    divided by ``LOCAL_WORLD_SIZE``, the ranks torchrun starts on this machine; at least 1.
    More threads than free cores makes every OpenMP barrier wait for a descheduled thread
    (one TRADES step on a loaded 2-core machine: 6.5 s with torch's default, 139 ms with 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS, Windows)
        cores = os.cpu_count() or 1
    ranks = os.environ.get("LOCAL_WORLD_SIZE", "1")
    if not ranks.strip().isdigit() or int(ranks) < 1:
        usage_error(f"LOCAL_WORLD_SIZE: expected an int >= 1, got {ranks!r}")
    return max(1, cores // int(ranks))


def apply_threads(args: argparse.Namespace) -> int:
    """Set torch's CPU threads from ``--threads``, else ``OMP_NUM_THREADS`` (which torch
    has read already), else :func:`default_threads`; returns the count for the run's header
    line."""
    if args.threads is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    return threads


def check_models(cfg: dict) -> None:
    """Every model of the run can be built from the flags, tried on the meta device (no
    memory, no data) before any work."""
    from pyeuler.cost import DATA_SHAPES
    from pyeuler.robust import build_model

    input_shape, num_classes = DATA_SHAPES[cfg["data"]]
    for k in cfg["ie_steps"]:
        try:
            with torch.device("meta"):
                build_model(cfg["model"], input_shape, num_classes, backend=cfg["backend"],
                            **model_kwargs(cfg, k))
        except (ValueError, TypeError) as e:
            usage_error(str(e))


def resolve_config(args: argparse.Namespace) -> dict:
    """Merge preset and explicit options into one JSON-able run configuration."""
    from pyeuler.robust.zoo import default_model, is_ie_capable

    preset_name = args.preset or ("he2016" if args.data == "cifar10" else "quick")
    preset = PRESETS[preset_name]

    def pick(key, fallback):
        v = getattr(args, key, None)
        if v is not None:
            return v
        v = preset.get(key)
        return fallback if v is None else v

    model = args.model or default_model(args.data)
    ie_steps = args.ie_steps if args.ie_steps is not None else ([0, 1] if is_ie_capable(model) else [0])
    adv = pick("adv", "none")
    eps = pick("eps", _DEFAULT_EPS[args.data])
    steps = pick("attack_steps", 10)
    if not 0 <= args.theta <= 1:
        usage_error(f"--theta: expected a number in [0, 1], got {args.theta}")
    if args.resume and not args.out:
        usage_error("--resume needs --out DIR (where the checkpoints are)")
    if args.data == "cifar10" and not args.data_dir:
        usage_error("--data-dir: cifar10 needs the folder with the CIFAR-10 python batches "
                    "(nothing is downloaded)")
    return dict(
        data=args.data, data_dir=args.data_dir, seed=args.seed, model=model, h=args.h,
        ie_steps=list(dict.fromkeys(ie_steps)), ie_step_size=args.ie_step_size,
        theta=args.theta, grad=args.grad, recompute=args.recompute,
        norm=args.norm or ("group" if is_ie_capable(model) else "batch"), preset=preset_name,
        epochs=pick("epochs", _QUICK_EPOCHS[args.data]), batch_size=pick("batch_size", 64),
        lr=pick("lr", 1e-3), optimizer=pick("optimizer", "adam"),
        momentum=pick("momentum", 0.9), weight_decay=pick("weight_decay", 0.0),
        schedule=preset["schedule"], milestones=list(preset["milestones"]),
        adv=adv, eps=eps, alpha=pick("alpha", 2.5 * eps / steps), attack_steps=steps,
        beta=pick("beta", 6.0), attacks=list(args.attacks), eval_samples=args.eval_samples,
        backend=args.backend, channels_last=args.channels_last,
        val_samples=args.val_samples if args.val_split is not None else None,
        # options that change the trained weights enter only when given, so that the
        # checkpoint names of runs without them stay what they were
        **{key: value for key, value in (("amp", args.amp), ("sync_bn", args.sync_bn),
                                         ("val_split", args.val_split)) if value},
    )


def lr_at(cfg: dict, epoch: int) -> float:
    """Learning rate for ``epoch`` (0-based) under the configured schedule."""
    if cfg["schedule"] == "cosine":
        return cfg["lr"] * 0.5 * (1 + math.cos(math.pi * epoch / cfg["epochs"]))
    drops = sum(epoch >= math.floor(f * cfg["epochs"]) for f in cfg["milestones"])
    return cfg["lr"] * 0.1 ** drops


def model_kwargs(cfg: dict, k: int) -> dict:
    return dict(h=cfg["h"], ie_steps=k, ie_step_size=cfg["ie_step_size"], theta=cfg["theta"],
                grad=cfg["grad"], norm=cfg["norm"], recompute=cfg["recompute"])


def row_name(k: int) -> str:
    return "ResNet (K=0)" if k == 0 else f"IE-ResNet (K={k})"


# Resolved options that do not change the trained weights, so a checkpoint is no other
# run's when only they differ: --epochs (a resumed run extends it; "cosine" rescales with
# it, as it always has), the evaluation options, where the data lives, and the backend
# (the same math, docs/semantics.md).  ie_steps is replaced by the one K of the model.
# channels-last, the IE-Skips' recompute policy (docs/semantics.md) and the number of
# ranks change only rounding (the global batches and the loss are the same for every
# number of ranks: pyeuler.robust.distributed).
_NOT_RUN_IDENTITY = ("epochs", "attacks", "eval_samples", "data_dir", "backend", "preset",
                     "channels_last", "recompute", "val_samples", "world_size")


def run_identity(cfg: dict, k: int) -> dict:
    """The options the weights of model ``k`` depend on: what its checkpoint is a run of.

    Presets enter through the values they resolve to.  A plain ResNet (K = 0) has no
    IE-Skip, so its gradient mode, IE step size and θ are left out, and natural training
    leaves out the attack's options (ε also sets the table's attacks: evaluation)."""
    identity = {key: k if key == "ie_steps" else value for key, value in cfg.items()
                if key not in _NOT_RUN_IDENTITY}
    unused = []
    if k == 0:
        unused += ["grad", "ie_step_size", "theta"]
    if cfg["adv"] == "none":
        unused += ["eps", "alpha", "attack_steps", "beta"]
    elif cfg["adv"] != "trades":
        unused.append("beta")
    for key in unused:
        identity.pop(key, None)
    return identity


def checkpoint_path(out: str, cfg: dict, k: int) -> Path:
    """``<data>-<model>-K<k>[-<grad>][-h<h>]-<adv>-seed<seed>-<hash>.pt`` in ``out``: a
    readable prefix and the hash of :func:`run_identity`, so runs that differ in any option
    the weights depend on never share (and overwrite) a file."""
    from pyeuler.cli._results import config_hash

    parts = [cfg["data"], cfg["model"], f"K{k}"]
    if k:
        parts.append(cfg["grad"])
    if cfg["h"] != 1:
        parts.append(f"h{cfg['h']:g}")
    parts += [cfg["adv"], f"seed{cfg['seed']}", config_hash(run_identity(cfg, k))]
    return Path(out) / ("-".join(parts) + ".pt")


def _flag_values(identity: dict, keys) -> str:
    def show(value):
        return f"{value:g}" if isinstance(value, float) else json.dumps(value).strip('"')

    flags = {"schedule": "--preset", "milestones": "--preset", "ie_steps": "--ie-steps"}
    return ", ".join(f"{flags.get(key, '--' + key.replace('_', '-'))} "
                     f"{show(identity[key]) if key in identity else '(unused)'}" for key in keys)


def describe_difference(path: Path, saved: dict, wanted: dict) -> str:
    """"PATH was trained with --lr 0.1; this run asks for --lr 0.01" for two identities."""
    keys = [key for key in dict.fromkeys([*wanted, *saved]) if saved.get(key) != wanted.get(key)]
    return (f"{path.name} was trained with {_flag_values(saved, keys)}; this run asks for "
            f"{_flag_values(wanted, keys)}")


def _saved_identity(path: Path):
    """The run identity recorded in the checkpoint at ``path``, or the reason there is none."""
    from pyeuler.checkpoint import CheckpointError, load_checkpoint

    try:
        config = load_checkpoint(path).get("config")
    except (CheckpointError, FileNotFoundError) as e:
        return None, str(e)
    if not isinstance(config, dict) or not isinstance(config.get("run"), dict):
        return None, f"{path.name} records no run configuration (written by an older pyeuler?)"
    return config["run"], None


def plan_checkpoints(cfg: dict, out: str | None, resume: bool, overwrite: bool) -> dict:
    """``{K: resume from its checkpoint?}`` for every model of the run, decided before any
    work: a file at a checkpoint's path that is not a checkpoint of this configuration is
    replaced only with ``--overwrite``; ``--resume`` without a checkpoint of this
    configuration, while ``out`` holds others of the same model, data and seed, is refused
    naming the options that differ (a mistyped or forgotten flag would otherwise start
    over).  Same configuration: resume with ``--resume``, else train afresh over it."""
    plan = {k: False for k in cfg["ie_steps"]}
    if out is None:
        return plan
    for k in cfg["ie_steps"]:
        path, wanted = checkpoint_path(out, cfg, k), run_identity(cfg, k)
        if path.exists():
            saved, why = _saved_identity(path)
            if saved == wanted:
                plan[k] = resume
            elif not overwrite:
                what = why if saved is None else describe_difference(path, saved, wanted)
                usage_error(f"--out: {path} is not a checkpoint of this configuration: {what}; "
                            "use another --out, or --overwrite to replace it")
            continue
        if resume:
            others = []
            for sibling in sorted(path.parent.glob(f"{cfg['data']}-{cfg['model']}-K{k}-*"
                                                   f"-seed{cfg['seed']}-*.pt")):
                if sibling.name.endswith(".best.pt"):
                    continue
                saved, _ = _saved_identity(sibling)
                if saved is not None:
                    differing = sum(saved.get(key) != wanted.get(key) for key in {*saved, *wanted})
                    others.append((differing, sibling.name, sibling, saved))
            if others:
                _, _, nearest, saved = min(others)
                usage_error(f"--resume: no checkpoint of this configuration in {out}: "
                            f"{describe_difference(nearest, saved, wanted)} (resume with the "
                            "same options, or drop --resume to start this configuration)")
    return plan


_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_CSV_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_clean", "val_robust", "seconds")


def sharded_accuracy(model, x, y, attack, device, run) -> float:
    """:func:`~pyeuler.robust.training.accuracy` of (x, y) with each rank taking its part
    (:func:`~pyeuler.robust.distributed.shard_bounds`), the correct counts summed over the
    ranks; the whole of (x, y) when ``run`` is None."""
    from pyeuler.robust.distributed import all_sum, shard_bounds
    from pyeuler.robust.training import accuracy

    if run is None:
        return accuracy(model, x, y, attack, device=device, progress=False)
    start, stop = shard_bounds(len(x), run.rank, run.world_size)
    local = accuracy(model, x[start:stop], y[start:stop], attack, device=device, progress=False)
    correct, seen = all_sum([local * (stop - start), stop - start], device)
    return correct / max(seen, 1)


def validate(cfg: dict, model, data, device, run, epoch: int) -> dict:
    """Clean accuracy on the whole validation split and PGD-10 accuracy (at ``--eps``) on
    its first ``--val-samples``, each rank attacking its part; attack starts drawn from
    (seed, epoch, rank)."""
    from pyeuler.robust.attacks import make_attack
    from pyeuler.robust.distributed import derive_seed

    n = min(cfg["val_samples"], len(data.x_val))
    torch.manual_seed(derive_seed(cfg["seed"], epoch, run.rank if run else 0, 1))
    return {"val_clean": sharded_accuracy(model, data.x_val, data.y_val, None, device, run),
            "val_robust": sharded_accuracy(model, data.x_val[:n], data.y_val[:n],
                                           make_attack("pgd-10", eps=cfg["eps"]), device, run)}


def _extra_path(path: Path, suffix: str) -> Path:
    """``<checkpoint stem><suffix>`` beside the checkpoint: ``.best.pt``, ``.csv``, ..."""
    return path.with_name(path.stem + suffix)


def write_curves(path: Path, history: list[dict], log=print) -> None:
    """The epochs so far as ``<checkpoint>.csv`` and, with matplotlib, ``<checkpoint>.png``
    (loss and accuracies per epoch); one line saying why when there is no plot."""
    import csv

    csv_path = _extra_path(path, ".csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    try:
        import matplotlib
    except ImportError:
        if len(history) == 1:
            log(f"no training-curve plot beside {path.name}: matplotlib is not installed "
                "(pip install 'pyeuler[plot]'); the curves are in "
                f"{csv_path.name}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title=path.stem)
    for key, label in (("train_acc", "train"), ("val_clean", "validation, clean"),
                       ("val_robust", "validation, PGD-10")):
        if key not in history[-1]:  # no --val-split
            continue
        ax_acc.plot(epochs, [row[key] for row in history], marker="o", label=label)
    ax_acc.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1))
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(_extra_path(path, ".png"), dpi=120)
    plt.close(fig)


def _tensorboard(path: Path):
    """A ``SummaryWriter`` logging to ``<checkpoint>.tb/``, or None when tensorboard is not
    installed (the CSV has the same numbers)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(_extra_path(path, ".tb")))


def train_one(cfg: dict, data, k: int, device: torch.device, progress: bool | None,
              out: str | None = None, resume: bool = False, log=print, run=None) -> dict:
    """Train one model (IE steps ``k``) per ``cfg``; returns its results row.

    With ``run`` (a :class:`~pyeuler.robust.distributed.DistributedRun`) this is one
    rank's part of a data-parallel run: only rank 0 reads and writes ``out`` (the resumed
    checkpoint is broadcast), every rank trains its part of each global batch."""
    from pyeuler.checkpoint import CheckpointError, load_checkpoint, load_model_state, save_checkpoint
    from pyeuler.cli._results import config_hash
    from pyeuler.data import random_crop_flip
    from pyeuler.robust import build_model, load_optimizer_state, make_optimizer, train_epoch
    from pyeuler.robust.capture import CapturedTraining
    from pyeuler.robust.distributed import (
        broadcast_object, derive_seed, has_batch_norm, wrap_model,
    )

    is_main = run is None or run.is_main
    rank, world_size = (run.rank, run.world_size) if run else (0, 1)
    # --cuda-graph / --compile: the same epochs, each step one replayed graph
    run_epoch = CapturedTraining(cfg["capture"]) if cfg.get("capture") else train_epoch
    kwargs = model_kwargs(cfg, k)
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg["model"], data.input_shape, data.num_classes, backend=cfg["backend"],
                        **kwargs).to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if cfg.get("sync_bn") and not has_batch_norm(model):
        log(f"--sync-bn: {row_name(k)} has no BatchNorm (norm={cfg['norm']}: GroupNorm "
            "normalises each sample on its own, so its ranks need no synchronisation)")
    opt = make_optimizer(cfg["optimizer"], model.parameters(), lr=cfg["lr"],
                         momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    amp = _AMP_DTYPES.get(cfg.get("amp"))
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    start, elapsed, history, best = 0, 0.0, [], None
    path = checkpoint_path(out, cfg, k) if out else None
    identity = run_identity(cfg, k) if path is not None else None
    ckpt = None
    if is_main and path is not None and resume and path.exists():
        ckpt = load_checkpoint(path, map_location="cpu")
        saved = ckpt["config"].get("run") if isinstance(ckpt["config"], dict) else None
        if saved != identity:  # plan_checkpoints refuses this before any work
            raise CheckpointError(f"checkpoint: {path} is not a checkpoint of this "
                                  "configuration (drop --resume, or use another --out)")
    ckpt = broadcast_object(ckpt, run)
    if ckpt is not None:
        load_model_state(model, ckpt, path)
        if ckpt.get("optimizer") is not None:
            load_optimizer_state(opt, ckpt["optimizer"])
        if scaler is not None and ckpt.get("grad_scaler") is not None:
            scaler.load_state_dict(ckpt["grad_scaler"])
        start = ckpt["epoch"]
        elapsed = float(ckpt["metrics"].get("train_seconds", 0.0))
        history = list(ckpt["metrics"].get("history", []))
        best = ckpt["metrics"].get("best_robust")
        ranks_before = ckpt["config"].get("world_size", 1)
        across = (f" (trained on {ranks_before} ranks so far, {world_size} now)"
                  if ranks_before != world_size else "")
        log(f"resumed {path} at epoch {start}{across}")
    trained = wrap_model(model, run, device, sync_bn=bool(cfg.get("sync_bn")),
                         cuda_graph=cfg.get("capture") == "cuda-graph")
    augment = random_crop_flip if cfg["data"] == "cifar10" else None

    def prepare(xb):
        xb = augment(xb) if augment is not None else xb
        return xb.contiguous(memory_format=torch.channels_last) if cfg["channels_last"] else xb

    tensorboard = _tensorboard(path) if is_main and path is not None else None
    for epoch in range(start, cfg["epochs"]):
        lr = lr_at(cfg, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        # The global order of the epoch derives from (seed, epoch), the same on every rank
        # and for every number of ranks; each step's draws (augmentation, attack starts,
        # TRADES noise, dropout) from (seed, epoch, step, rank).  A run resumed at an
        # epoch boundary so repeats the uninterrupted one bit for bit, without restoring
        # generator states.
        g = torch.Generator().manual_seed(cfg["seed"] * 100003 + epoch)
        stats = run_epoch(trained, data.x_train, data.y_train, opt, batch_size=cfg["batch_size"],
                          adv=cfg["adv"], eps=cfg["eps"], alpha=cfg["alpha"],
                          steps=cfg["attack_steps"], beta=cfg["beta"], generator=g,
                          device=device, transform=prepare if augment or cfg["channels_last"]
                          else None, progress=progress if is_main else False,
                          desc=f"{row_name(k)} epoch {epoch + 1}/{cfg['epochs']}",
                          shard=(rank, world_size), seed=derive_seed(cfg["seed"], epoch, rank),
                          amp=amp, grad_scaler=scaler)
        elapsed += stats.seconds
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": stats.loss,
               "train_acc": stats.accuracy, "seconds": stats.seconds}
        if data.x_val is not None:
            row.update(validate(cfg, model, data, device, run, epoch))
            log(f"  {row_name(k)} epoch {epoch + 1}/{cfg['epochs']}: loss {stats.loss:.4f}, "
                f"train {100 * stats.accuracy:.1f}%, validation clean "
                f"{100 * row['val_clean']:.1f}%, PGD-10 {100 * row['val_robust']:.1f}%")
        history.append(row)
        if path is None or not is_main:
            continue
        metrics = {"train_seconds": elapsed, "train_loss": stats.loss, "history": history}
        improved = data.x_val is not None and (best is None or
                                               row["val_robust"] > best["val_robust"])
        if improved:
            best = {"epoch": epoch + 1, "val_clean": row["val_clean"],
                    "val_robust": row["val_robust"]}
        metrics["best_robust"] = best
        saved = dict(model=model, name=cfg["model"], model_kwargs=kwargs, optimizer=opt,
                     epoch=epoch + 1, grad_scaler=scaler,
                     config=dict(cfg, run=identity, run_id=config_hash(identity),
                                 world_size=world_size), metrics=metrics)
        save_checkpoint(path, **saved)
        if improved:
            save_checkpoint(_extra_path(path, ".best.pt"), **saved)
        write_curves(path, history, log)
        if tensorboard is not None:
            for key in _CSV_COLUMNS[1:]:
                if key in row:
                    tensorboard.add_scalar(key, row[key], epoch + 1)
            tensorboard.flush()
    if tensorboard is not None:
        tensorboard.close()
    return {"model": model, "train_seconds": elapsed, "checkpoint": str(path) if path else None,
            "best_robust": best}


def evaluate_row(cfg: dict, model, data, device, progress, run=None) -> dict:
    """Clean accuracy on the test split and the table's attacks on its first
    ``--eval-samples``; each rank evaluates its part under torchrun, the accuracies are
    combined over the ranks."""
    from pyeuler.robust import evaluate
    from pyeuler.robust.distributed import all_sum, shard_bounds
    from pyeuler.robust.training import accuracy

    rank, world_size = (run.rank, run.world_size) if run else (0, 1)
    n = cfg["eval_samples"] or len(data.x_test)
    start, stop = shard_bounds(len(data.x_test), rank, world_size)
    clean = accuracy(model, data.x_test[start:stop], data.y_test[start:stop], device=device,
                     progress=progress, desc="clean")
    first, last = shard_bounds(min(n, len(data.x_test)), rank, world_size)
    res = evaluate(model, data.x_test[first:last], data.y_test[first:last],
                   attacks=cfg["attacks"], eps=[cfg["eps"]], device=device, progress=progress)
    row = {"clean": clean}
    for name in cfg["attacks"]:
        row[name] = res[name] if name.lower() == "cw" else res[name][float(cfg["eps"])]
    if world_size > 1:  # accuracies of parts, weighted by their sizes
        weights = [stop - start] + [last - first] * len(cfg["attacks"])
        sums = all_sum([row[key] * w for key, w in zip(row, weights)] + weights[:2], device)
        totals = sums[len(weights):]
        row = {key: value / max(totals[0] if key == "clean" else totals[1], 1)
               for key, value in zip(row, sums)}
    return row


def format_table(cfg: dict, rows: list[dict]) -> str:
    eps = cfg["eps"]
    eps_s = f"{eps * 255:.3g}/255" if cfg["data"] == "cifar10" else f"{eps:g}"
    cols = ["clean acc"] + [f"{a.upper() if a.lower() in ('fgsm', 'cw') else a.upper()} acc"
                            + ("" if a.lower() == "cw" else f" (eps={eps_s})")
                            for a in cfg["attacks"]] + ["train time"]
    names = [r["name"] for r in rows]
    w0 = max(len("model"), *(len(n) for n in names))
    widths = [max(len(c), 9) for c in cols]
    lines = ["  ".join(["model".ljust(w0)] + [c.rjust(w) for c, w in zip(cols, widths)])]
    lines.append("-" * len(lines[0]))
    for r in rows:
        vals = [f"{100 * r['clean']:.1f}%"] + [f"{100 * r[a]:.1f}%" for a in cfg["attacks"]]
        vals.append(f"{r['train_seconds']:.1f} s")
        lines.append("  ".join([r["name"].ljust(w0)] + [v.rjust(w) for v, w in zip(vals, widths)]))
    return "\n".join(lines)


def _interrupted(cfg: dict, out: str | None, k: int) -> int:
    """Ctrl-C: one line saying where the last checkpoint is and how to resume; exit 130."""
    path = checkpoint_path(out, cfg, k) if out else None
    if path is not None and path.exists():
        from pyeuler.checkpoint import load_checkpoint

        epoch = load_checkpoint(path)["epoch"]
        where = (f"the last checkpoint is {path} (epoch {epoch}); run the same command with "
                 "--resume to continue")
    elif path is not None:
        where = f"no checkpoint was written yet (it would be {path})"
    else:
        where = "nothing was saved (no --out)"
    print(f"\npyeuler: interrupted: {where}", file=sys.stderr)
    return 130


def check_distributed(cfg: dict, args: argparse.Namespace, device: torch.device) -> torch.device:
    """torchrun's ranks checked before any work: ``--batch-size`` (the global batch) splits
    evenly among them, and each rank drives ``cuda:LOCAL_RANK``; returns this rank's
    device."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.strip().isdigit() or int(world) < 1:
        usage_error(f"WORLD_SIZE: expected an int >= 1 (set by torchrun), got {world!r}")
    world = int(world)
    if world == 1:
        return device
    if cfg["batch_size"] % world:
        usage_error(f"--batch-size: {cfg['batch_size']} is the global batch and must split "
                    f"evenly among the {world} ranks; give a multiple of {world}")
    if device.type != "cuda":
        return device
    if args.device not in ("auto", "cuda"):
        usage_error(f"--device: under torchrun each rank drives cuda:LOCAL_RANK; give "
                    f"--device cuda (or auto), not {args.device}")
    local = os.environ.get("LOCAL_RANK", "0")
    if not local.strip().isdigit():
        usage_error(f"LOCAL_RANK: expected an int >= 0 (set by torchrun), got {local!r}")
    return torch.device("cuda", int(local))


def _quiet(*args, **kwargs) -> None:
    """The print of ranks other than 0."""


def run(args: argparse.Namespace) -> int:
    from pyeuler.cost import DATA_SHAPES
    from pyeuler.data import hold_out, load
    from pyeuler.robust.attacks import make_attack
    from pyeuler.robust.distributed import from_environment

    # Every mistake in the command is reported before any work (data loading, training).
    cfg = resolve_config(args)
    for a in cfg["attacks"]:
        try:
            make_attack(a, eps=cfg["eps"])
        except ValueError as e:
            usage_error(f"--attacks: {e}")
    threads = apply_threads(args)
    device = resolve_device(args.device)
    capture = getattr(args, "capture", None)
    if capture:
        if device.type != "cuda":
            usage_error(f"--{capture}: needs CUDA (a GPU); this run is on {device}")
        if cfg.get("amp") == "fp16":
            usage_error(f"--amp fp16: its GradScaler reads the found-inf flag on the host "
                        f"every step, which --{capture} cannot; use --amp bf16")
        cfg["capture"] = capture  # drops partial batches: part of the run's identity
    if cfg["channels_last"] and len(DATA_SHAPES[cfg["data"]][0]) != 3:
        usage_error(f"--channels-last: needs image data; {cfg['data']} inputs are "
                    f"{len(DATA_SHAPES[cfg['data']][0])}-D")
    device = check_distributed(cfg, args, device)
    check_backend(cfg["backend"], device)
    check_output_path(args.json, "--json")
    check_output_path(args.out, "--out", directory=True)
    check_models(cfg)
    # rank 0 alone reads and writes --out (other machines may not see it)
    is_main = os.environ.get("RANK", "0") in ("0", "")
    resume = (plan_checkpoints(cfg, args.out, args.resume, args.overwrite) if is_main
              else {k: False for k in cfg["ie_steps"]})
    progress = False if args.no_progress else None
    try:
        data = load(cfg["data"], seed=cfg["seed"], data_dir=cfg["data_dir"])
        if "val_split" in cfg:
            data = hold_out(data, cfg["val_split"], seed=cfg["seed"])
    except ValueError as e:
        usage_error(str(e).replace("val_split:", "--val-split:"))
    except FileNotFoundError as e:
        usage_error(str(e))
    if capture == "cuda-graph":  # PyTorch's recipe for NCCL inside CUDA graphs
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    try:
        dist_run = from_environment(device.type)
    except (ValueError, RuntimeError) as e:  # e.g. a LOCAL_RANK beyond this machine's GPUs
        usage_error(str(e), every_rank=True)
    try:
        return _train_and_report(cfg, args, data, device, dist_run, resume, progress, threads)
    finally:
        if dist_run is not None:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train_and_report(cfg, args, data, device, dist_run, resume, progress, threads) -> int:
    from pyeuler.checkpoint import CheckpointError

    is_main = dist_run is None or dist_run.is_main
    say = print if is_main else _quiet
    cfg["world_size"] = dist_run.world_size if dist_run else 1
    adv = {"none": "natural training", "pgd": f"PGD-{cfg['attack_steps']} adversarial training",
           "trades": f"TRADES (beta={cfg['beta']:g}) training"}[cfg["adv"]]
    val = "" if data.x_val is None else f" / {len(data.x_val)} validation"
    ranks = "" if dist_run is None else (f" | {dist_run.world_size} ranks ({dist_run.backend}), "
                                         f"{cfg['batch_size'] // dist_run.world_size} samples "
                                         "per rank and step")
    recompute = "" if cfg["recompute"] == "selective" else f", recompute={cfg['recompute']}"
    say(f"{cfg['data']}: {len(data.x_train)} train{val} / {len(data.x_test)} test | model "
        f"{cfg['model']}, h={cfg['h']:g}, IE step {cfg['ie_step_size']:g}, theta="
        f"{cfg['theta']:g}, grad={cfg['grad']}{recompute}, norm={cfg['norm']} | {adv}, "
        f"{cfg['epochs']} epochs "
        f"({cfg['preset']}: {cfg['optimizer']} lr {cfg['lr']:g}){ranks} | {device}, {threads} "
        f"threads", flush=True)
    rows = []
    for k in cfg["ie_steps"]:
        try:
            trained = train_one(cfg, data, k, device, progress, args.out, resume[k], log=say,
                                run=dist_run)
        except (CheckpointError, FileNotFoundError) as e:
            print_error(str(e))
            return 2
        except ValueError as e:  # bad model name / arguments from build_model
            print_error(str(e))
            return 2
        except KeyboardInterrupt:
            return _interrupted(cfg, args.out, k) if is_main else 130
        row = {"name": row_name(k), "ie_steps": k, "train_seconds": trained["train_seconds"],
               "checkpoint": trained["checkpoint"]}
        if trained["best_robust"] is not None:
            row["best_robust"] = trained["best_robust"]
        t0 = time.perf_counter()
        try:
            row.update(evaluate_row(cfg, trained["model"], data, device,
                                    progress if is_main else False, dist_run))
        except KeyboardInterrupt:
            return _interrupted(cfg, args.out, k) if is_main else 130
        row["eval_seconds"] = time.perf_counter() - t0
        rows.append(row)
        say(f"  {row['name']}: clean {100 * row['clean']:.1f}%, trained in "
            f"{row['train_seconds']:.1f} s", flush=True)
    if not is_main:
        return 0
    print()
    print(format_table(cfg, rows))
    if args.out:
        print(f"\ncheckpoints in {args.out}/ (evaluate with: pyeuler eval --checkpoint "
              f"{rows[-1]['checkpoint']} --attack pgd-20)")
        for row in rows:
            if "best_robust" in row:
                best = row["best_robust"]
                print(f"  {row['name']}: best validation PGD-10 accuracy "
                      f"{100 * best['val_robust']:.1f}% at epoch {best['epoch']}: "
                      f"{_extra_path(Path(row['checkpoint']), '.best.pt')}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"config": cfg, "results": rows}, indent=2))
        print(f"results written to {args.json}")
    return 0
