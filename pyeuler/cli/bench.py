"""``pyeuler bench``: the headline workload of docs/benchmarks.md, every available backend side
by side.

On a GPU the default is IE-WRN-34-10, batch 128, 32×32; on a CPU a reduced size (WRN-10-1,
batch 16, 16×16) so the run finishes in a minute.  Results go to
``benchmarks/results/<device>-<date>.json`` and ``.md``.  The "vs reference" column divides
by the reference rows: plain PyTorch with torch's native norms, what users write (not the
oracle's decomposed norms; see :func:`pyeuler.ops.reference_norm.native_norms`).
"""

from __future__ import annotations

import itertools

import torch


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="time an IE-WideResNet training step per backend")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="backends to time (default: reference, eager and every available "
                             "fused backend for the device)")
    parser.add_argument("--steps", nargs="+", type=int, default=[0, 1, 3], help="IE steps K")
    parser.add_argument("--grads", nargs="+", default=["unrolled", "detached"],
                        choices=["unrolled", "detached", "implicit"],
                        help="IE gradient modes (docs/benchmarks.md's rows: unrolled, "
                             "detached); with 'implicit', K is the solver's evaluation budget")
    parser.add_argument("--precisions", nargs="+", default=None, choices=["bf16", "fp32"],
                        help="default: bf16 and fp32 on a GPU, fp32 on a CPU")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="also time torch.compile of the reference and of the fused "
                             "backends (default on a GPU)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--widen-factor", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--profile", action="store_true",
                        help="also measure the share of time spent in convolutions")
    parser.add_argument("--out", default="benchmarks/results", help="directory for the result files")
    parser.add_argument("--no-progress", action="store_true")
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
    cases = []
    for precision, steps, grad in itertools.product(precisions, args.steps, args.grads):
        if steps == 0 and grad != args.grads[0]:
            continue  # K = 0 has no IE gradient mode
        for backend in backends:
            cases.append(StepCase(steps, grad, precision, backend))
        if compile_reference:
            cases.append(StepCase(steps, grad, precision, "reference", compiled=True))
            # compiled fused backends: inductor fuses the per-channel algebra around the
            # kernels (host launches), the kernels stay opaque custom ops
            cases += [StepCase(steps, grad, precision, backend, compiled=True)
                      for backend in backends if backend in ("triton", "cuda")]
    return cases


def run(args) -> int:
    from tqdm import tqdm

    from pyeuler.benchmark import time_train_step, write_results

    gpu = torch.cuda.is_available()
    config = dict(depth=args.depth or (34 if gpu else 10),
                  widen_factor=args.widen_factor or (10 if gpu else 1),
                  batch_size=args.batch_size or (128 if gpu else 16),
                  image_size=args.image_size or (32 if gpu else 16),
                  warmup=args.warmup, iters=args.iters)
    cases = _cases(args, gpu)
    results = []
    for case in tqdm(cases, desc="bench", disable=args.no_progress):
        try:
            results.append(time_train_step(case, profile=args.profile, **config))
        except Exception as error:  # one failing row must not hide the others
            print(f"{case.label}: failed: {type(error).__name__}: {error}")
    json_path, md_path = write_results(results, config, args.out)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0 if len(results) == len(cases) else 1
