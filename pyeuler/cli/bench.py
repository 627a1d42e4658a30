"""pyeuler bench: time one training step (forward, cross-entropy, backward, SGD) of an
IE-WideResNet, every available backend side by side: the headline workload of
docs/benchmarks.md.

On a GPU the default is IE-WRN-34-10, batch 128, 32×32, bf16 and fp32, with torch.compile
rows; on a CPU a reduced size (WRN-10-1, batch 16, 16×16, fp32) so the run finishes in a
minute.  Each row reports the min, median and interquartile range (IQR) of the timed
steps, images/s (from the median), peak GPU memory, the activation memory autograd keeps,
and the median's ratio to the reference row of the same configuration ("vs reference"):
plain PyTorch with torch's native norms, what users write.  K = 0 has no IE-Skip, so it is
timed once and labelled without a gradient mode ("—").

Results go to OUT/<device>-<date>.json and .md (-2, -3, ... when that day's file exists);
OUT is relative to the current directory, and the absolute paths are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path

import torch

from pyeuler.cli.train import _nonneg_int, _pos_int, add_threads_arg, usage_error
from pyeuler.ops.ie_skip import RECOMPUTE_POLICIES

_BACKENDS = ("reference", "eager", "triton", "cuda")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="time an IE-WideResNet training step per backend",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=None, choices=_BACKENDS,
                        help="backends to time [reference, eager and every fused backend "
                             "available for the device]")
    parser.add_argument("--steps", nargs="+", type=_nonneg_int, default=[0, 1, 3],
                        metavar="K", help="IE steps K [0 1 3]")
    parser.add_argument("--grads", nargs="+", default=["unrolled", "detached"],
                        choices=["unrolled", "detached", "implicit"],
                        help="IE gradient modes (docs/benchmarks.md's rows); with 'implicit', "
                             "K is the solver's evaluation budget [unrolled detached]")
    parser.add_argument("--recompute", nargs="+", default=["selective"],
                        choices=RECOMPUTE_POLICIES,
                        help="what unrolled IE-Skips on the fused backends recompute in the "
                             "backward instead of keeping (IESkip(recompute=)): 'full' the "
                             "least memory, 'none' the fewest bytes; one row per policy where "
                             "one applies (K > 0, unrolled, triton or cuda), named in its label "
                             "unless selective [selective]")
    parser.add_argument("--precisions", nargs="+", default=None, choices=["bf16", "fp32"],
                        help="[bf16 fp32 on a GPU, fp32 on a CPU]")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="also time the whole step (forward, loss, backward, optimizer) "
                             "through torch.compile(mode='reduce-overhead') for the reference "
                             "and the fused backends; needs CUDA [on a GPU]")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="no torch.compile rows [on a CPU]")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time each backend's whole step captured once in a CUDA "
                             "graph and replayed (no host work per step); needs CUDA")
    parser.add_argument("--depth", type=_pos_int, default=None,
                        help="WRN depth, 6n+4 [34 on a GPU, 10 on a CPU]")
    parser.add_argument("--widen-factor", type=_pos_int, default=None,
                        help="WRN width [10 on a GPU, 1 on a CPU]")
    parser.add_argument("--batch-size", type=_pos_int, default=None,
                        help="[128 on a GPU, 16 on a CPU]")
    parser.add_argument("--image-size", type=_pos_int, default=None,
                        help="input height and width [32 on a GPU, 16 on a CPU]")
    parser.add_argument("--warmup", type=_pos_int, default=3,
                        help="untimed steps before timing; the first is recorded apart as "
                             "first_step_ms (compilation, autotuning) [3]")
    parser.add_argument("--iters", type=_pos_int, default=10,
                        help="timed steps: min, median and IQR over them [10]")
    parser.add_argument("--profile", action="store_true",
                        help="also measure the share of time spent in convolutions")
    parser.add_argument("--out", default="benchmarks/results", metavar="DIR",
                        help="folder for the result files, relative to the current directory "
                             "[benchmarks/results]")
    add_threads_arg(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _cases(args, gpu: bool):
    import pyeuler
    from pyeuler.benchmark import StepCase

    backends = args.backends
    if backends is None:
        backends = ["reference", "eager"] + [
            name for name in ("triton", "cuda")
            if gpu and pyeuler.available_backends()[name][0]]
    precisions = args.precisions or (["bf16", "fp32"] if gpu else ["fp32"])
    compile_reference = gpu if args.compile is None else args.compile
    recomputes = list(dict.fromkeys(args.recompute))

    def per_policy(case: StepCase) -> list:
        """``case`` once per --recompute policy where a policy applies, else once."""
        if not case.recompute_applies:
            return [case]
        return [dataclasses.replace(case, recompute=policy) for policy in recomputes]

    cases = []
    for precision, steps, grad in itertools.product(precisions, args.steps, args.grads):
        if steps == 0 and grad != args.grads[0]:
            continue  # K = 0 has no IE gradient mode
        for backend in backends:
            cases += per_policy(StepCase(steps, grad, precision, backend))
        if args.cuda_graph:
            for backend in backends:
                cases += per_policy(StepCase(steps, grad, precision, backend, graph=True))
        if compile_reference:
            cases.append(StepCase(steps, grad, precision, "reference", compiled=True))
            # compiled fused backends: inductor fuses the per-channel algebra around the
            # kernels (host launches), the kernels stay opaque custom ops
            for backend in backends:
                if backend in ("triton", "cuda"):
                    cases += per_policy(StepCase(steps, grad, precision, backend,
                                                 compiled=True))
    return cases


def run(args) -> int:
    from tqdm import tqdm

    from pyeuler.benchmark import environment, time_train_step, write_results
    from pyeuler.cli.train import apply_threads, check_backend, check_output_path

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    for flag, given in (("--cuda-graph", args.cuda_graph), ("--compile", args.compile)):
        if given and not gpu:
            usage_error(f"{flag}: needs CUDA (a GPU); none on this machine")
    for backend in args.backends or ():
        check_backend(backend, device, "--backends")
    check_output_path(args.out, "--out", directory=True)
    out = Path(args.out).absolute()
    threads = apply_threads(args)
    config = dict(depth=args.depth or (34 if gpu else 10),
                  widen_factor=args.widen_factor or (10 if gpu else 1),
                  batch_size=args.batch_size or (128 if gpu else 16),
                  image_size=args.image_size or (32 if gpu else 16),
                  warmup=args.warmup, iters=args.iters)
    if (config["depth"] - 4) % 6:
        usage_error(f"--depth: a WideResNet's depth is 6n+4 (10, 16, 28, 34), got "
                    f"{config['depth']}")
    cases = _cases(args, gpu)
    if set(args.recompute) != {"selective"} and not any(c.recompute_applies for c in cases):
        hint = "" if args.backends else (
            f" (the default --backends here: {' '.join(sorted({c.backend for c in cases}))})")
        usage_error(f"--recompute {' '.join(args.recompute)}: a policy applies only to unrolled "
                    "IE-Skips (--steps above 0, --grads unrolled) on the triton or cuda backend, "
                    f"and no requested row is one{hint}")
    print(f"bench: {environment()['device']}, WRN-{config['depth']}-{config['widen_factor']}, "
          f"batch {config['batch_size']}, {config['image_size']}×{config['image_size']}, "
          f"{config['warmup']} warm-up + {config['iters']} timed steps, {len(cases)} rows | "
          f"{threads} threads | results to {out}", flush=True)
    results, json_path = [], None
    header = dict(config, threads=threads, rows_planned=len(cases))
    for case in tqdm(cases, desc="bench", disable=args.no_progress):
        try:
            results.append(time_train_step(case, profile=args.profile, **config))
        except Exception as error:  # one failing row must not hide the others
            print(f"{case.label}: failed: {type(error).__name__}: {error}")
            continue
        # after every row: a run stopped by a time limit (a lent GPU's) keeps what it timed
        json_path, md_path = write_results(results, header, out, over=json_path)
    if json_path is None:
        json_path, md_path = write_results(results, header, out)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0 if len(results) == len(cases) else 1
