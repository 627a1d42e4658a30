"""Activation bytes one training step keeps for its backward, at the real shapes.

The forward and loss of ``pyeuler cost``'s workload (IE-WRN-34-10, batch 128 by default)
run on fake tensors through the GPU code path, as in ``pyeuler cost``, and every storage
autograd saves is counted once (:func:`pyeuler.benchmark.saved_tensor_bytes`).  The rows
compare the reference (plain PyTorch with native norms, the baseline) with a fused backend
under each policy of what unrolled IE-Skips recompute in the backward (``IESkip(recompute=)``:
``"selective"``, the default, ``"full"`` and ``"none"``)::

    python benchmarks/saved_activations.py --json benchmarks/results/saved-activations.json

No GPU and no arithmetic: the bytes are those a GPU step would keep (the peak of memory
adds the backward's transients and the allocator's rounding, which this does not count).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from pyeuler import cost
from pyeuler.backend import counting_device
from pyeuler.benchmark import saved_tensor_bytes
from pyeuler.ops.ie_skip import RECOMPUTE_POLICIES
from pyeuler.ops.reference_norm import native_norms
from pyeuler.triton._utils import launch_hook


def saved_bytes(config: cost.StepConfig) -> int:
    """Bytes autograd keeps after the forward and loss of ``config``'s step."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(counting_device(cost.H100))
        stack.enter_context(cost._cuda_autocast_policy())
        stack.enter_context(FakeTensorMode())
        stack.enter_context(launch_hook(lambda *launch: True))  # fake tensors: never run
        work = cost.build_workload(config)
        norms = native_norms() if config.backend == "reference" else contextlib.nullcontext()
        autocast = (torch.autocast(work.x.device.type, dtype=torch.bfloat16)
                    if config.precision == "bf16" else contextlib.nullcontext())
        with norms, autocast:
            nbytes, _ = saved_tensor_bytes(lambda: F.cross_entropy(work.model(work.x), work.y))
    return nbytes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="wrn-34-10")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--backend", default="triton", choices=("triton", "cuda"))
    p.add_argument("--ie-steps", type=int, nargs="+", default=[1, 3])
    p.add_argument("--precision", nargs="+", default=["bf16", "fp32"])
    p.add_argument("--json", default=None, metavar="FILE")
    args = p.parse_args(argv)
    commit, dirty = cost.source_revision()
    rows = []
    print(f"{'configuration':28s} {'reference MiB':>14s} "
          + " ".join(f"{policy:>16s}" for policy in RECOMPUTE_POLICIES))
    for precision in args.precision:
        for k in args.ie_steps:
            base = cost.StepConfig(model=args.model, batch_size=args.batch_size,
                                   precision=precision, ie_steps=k, backend=args.backend)
            reference = saved_bytes(dataclasses.replace(base, backend="reference"))
            fused = {policy: saved_bytes(dataclasses.replace(base, recompute=policy))
                     for policy in RECOMPUTE_POLICIES}
            rows.append({"label": base.label, "reference_bytes": reference,
                         **{f"{policy}_bytes": fused[policy] for policy in RECOMPUTE_POLICIES}})
            print(f"{base.label:28s} {reference / 2**20:14.0f} " + " ".join(
                f"{fused[policy] / 2**20:9.0f} {fused[policy] / reference:5.3f}x"
                for policy in RECOMPUTE_POLICIES))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"commit": commit, "dirty": dirty, "model": args.model,
                       "batch_size": args.batch_size, "rows": rows}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
