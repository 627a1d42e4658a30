"""``pyeuler cost``: the kernel launches and HBM bytes of one training step on a GPU,
counted on this machine (no GPU needed, no arithmetic done), and the host time to issue it.

The step is forward, loss, backward and an SGD-momentum step, with ``--adv`` the attack's
input-gradient passes before them, at the real shapes, through the code path CUDA tensors
take with the chosen backend (see ``pyeuler.cost``).  Several values of ``--backend``,
``--ie-steps`` and ``--grad`` count every combination (K = 0 once: it has no gradient mode).

Classes: conv, gemm, fused (Triton / CUDA-extension kernels with an operand of 64 KiB or
more), tiny (every operand under 64 KiB, whatever launched it), activation (other ATen
kernels), optimizer (the optimizer step).  Example, the headline workload of the
benchmark protocol (an IE-WRN-34-10 step as trained with TRADES):

  pyeuler cost --model wrn-34-10 --batch-size 128 --precision bf16 --ie-steps 1 \\
      --grad unrolled --backend triton --json cost.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

from pyeuler.cli.train import _nonneg_int, _pos_float, _pos_int, check_output_path, usage_error
from pyeuler.ops.ie_skip import RECOMPUTE_POLICIES


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "cost", help="count the kernel launches and HBM bytes of a training step (no GPU needed)",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model (names as in pyeuler train)")
    g.add_argument("--model", default="wrn-34-10",
                   help="resnet-D, preact-18|34|50, wrn-D-W or mlp [wrn-34-10]")
    g.add_argument("--data", default="cifar10", choices=("cifar10", "digits", "moons"),
                   help="the data set whose input shape and classes the step uses [cifar10]")
    g.add_argument("--h", type=_pos_float, default=1.0, help="step factor h [1.0]")
    g.add_argument("--ie-steps", type=_nonneg_int, nargs="+", default=[1], metavar="K",
                   help="IE-Skip inner steps [1]")
    g.add_argument("--ie-step-size", type=_pos_float, default=0.1, help="IE step size γ [0.1]")
    g.add_argument("--theta", type=float, default=1.0, help="θ-method parameter [1.0]")
    g.add_argument("--norm", default="batch", choices=("batch", "group"),
                   help="normalisation in the blocks [batch, docs/benchmarks.md's workload]")
    g.add_argument("--grad", nargs="+", default=["unrolled"],
                   choices=("unrolled", "detached", "implicit"),
                   help="IE-Skip gradient mode [unrolled]")
    g.add_argument("--recompute", nargs="+", default=["selective"], choices=RECOMPUTE_POLICIES,
                   help="what unrolled IE-Skips recompute in the backward instead of keeping "
                        "(IESkip(recompute=)): 'full' the least memory, 'none' the fewest "
                        "bytes; benchmarks/saved_activations.py gives the memory side "
                        "[selective]")
    g = p.add_argument_group("step")
    g.add_argument("--batch-size", type=_pos_int, default=128, help="[128]")
    g.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                   help="bf16: autocast, channels_last; fp32: float32, contiguous [bf16]")
    g.add_argument("--adv", default="none", choices=("none", "pgd", "trades"),
                   help="adversarial training: the attack's passes are counted too [none]")
    g.add_argument("--attack-steps", type=_pos_int, default=3,
                   help="PGD / TRADES steps counted (training uses 10; each step costs the "
                        "same) [3]")
    g.add_argument("--backend", nargs="+", default=["triton"],
                   choices=("triton", "cuda", "eager", "reference"),
                   help="reference: plain PyTorch with torch's native norms, the baseline "
                        "pyeuler bench times [triton]")
    g = p.add_argument_group("counting and output")
    g.add_argument("--sm-count", type=_pos_int, default=132,
                   help="SMs of the GPU counted for: they size split reductions [132, H100]")
    g.add_argument("--no-host-time", dest="host_time", action="store_false",
                   help="skip measuring the host time (and the reference's)")
    g.add_argument("--top", type=_nonneg_int, default=12,
                   help="list the N pyeuler functions with the most launches [12]")
    g.add_argument("--json", default=None, metavar="FILE",
                   help="write the report: one configuration's keys at the top level; for "
                        "several, {commit, dirty, device, reports: {label: report}}")
    p.set_defaults(func=run)
    return p


def configs(args: argparse.Namespace) -> list:
    """Every (backend, K, grad, recompute) combination; K = 0 with the first grad mode only,
    and one row with the default policy where policies do not apply (:func:`_recomputes`),
    so that no row is named after a policy it cannot show."""
    from pyeuler.cost import StepConfig

    policies = list(dict.fromkeys(args.recompute))
    out = []
    for backend, k, grad, recompute in itertools.product(args.backend, args.ie_steps, args.grad,
                                                         policies):
        if k == 0 and grad != args.grad[0]:
            continue
        if not _recomputes(backend, k, grad):
            if recompute != policies[0]:
                continue
            recompute = "selective"
        out.append(StepConfig(model=args.model, data=args.data, batch_size=args.batch_size,
                              precision=args.precision, ie_steps=k, grad=grad, norm=args.norm,
                              adv=args.adv, attack_steps=args.attack_steps, backend=backend,
                              h=args.h, ie_step_size=args.ie_step_size, theta=args.theta,
                              recompute=recompute))
    return out


def _recomputes(backend: str, ie_steps: int, grad: str) -> bool:
    """Whether a recompute policy applies: unrolled IE-Skips on a fused backend."""
    return backend in ("triton", "cuda") and ie_steps > 0 and grad == "unrolled"


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3f}"


def format_report(report, top: int) -> str:
    from pyeuler.cost import CLASSES, probe_step

    c = report.config
    adv = "" if c.adv == "none" else f" · {c.adv} ({c.attack_steps} attack steps)"
    ie = f"K={c.ie_steps} {c.grad}" if c.ie_steps else "K=0"
    if _recomputes(c.backend, c.ie_steps, c.grad):
        ie += f" · recompute {c.recompute}"
    lines = [f"{c.model} · {c.data} · batch {c.batch_size} · {c.precision} · {ie} "
             f"· norm {c.norm}{adv} · {c.backend}   "
             f"(as on {report.device.name}, {report.device.sm_count} SMs)"]
    if report.commit:
        changes = " (uncommitted changes)" if report.dirty else ""
        lines.append(f"pyeuler {report.commit[:12]}{changes}")
    lines += ["", f"{'class':12s}{'launches':>10s}{'HBM GB':>10s}"]
    for name in CLASSES:
        lines.append(f"{name:12s}{report.launches_by_class[name]:10d}"
                     f"{_gb(report.hbm_bytes_by_class[name]):>10s}")
    lines += [f"{'total':12s}{report.launches:10d}{_gb(report.hbm_bytes):>10s}", ""]
    lines.append("launches by phase: " + ", ".join(
        f"{phase} {n}" for phase, n in report.launches_by_phase.items() if n))
    calls = sorted(report.custom_op_calls.items(), key=lambda item: -item[1])
    lines.append(f"custom-op calls: {sum(report.custom_op_calls.values())}"
                 + (" (" + ", ".join(f"{name} {n}" for name, n in calls) + ")" if calls else ""))
    lines.append(f"host syncs: {report.syncs}")
    if report.host_ms is not None:
        probe, shape = probe_step(c)
        lines.append(f"host time to issue the step: {report.host_ms:.1f} ms (reference backend "
                     f"{report.host_ms_reference:.1f} ms); CPU time on this machine, "
                     f"{probe.model}, batch {probe.batch_size}, inputs {'×'.join(map(str, shape))}")
    lines.append(_captured_line(report))
    if top and report.top_sources:
        rows = report.top_sources[:top]
        width = max(len(row["source"]) for row in rows) + 2
        context = max(len(row["context"]) for row in rows) + 2
        lines += ["", f"{'top sources: pyeuler function < caller':{width}s}{'context':{context}s}"
                      f"{'launches':>8s}{'tiny':>6s}{'GB':>8s}  kernels"]
        for row in rows:
            kernels = ", ".join(f"{name.removeprefix('aten.')}×{n}"
                                for name, n in row["kernels"].items())
            lines.append(f"{row['source']:{width}s}{row['context']:{context}s}{row['launches']:8d}"
                         f"{row['tiny']:6d}{_gb(row['hbm_bytes']):>8s}  {kernels}")
    return "\n".join(lines)


def _captured_line(report) -> str:
    """What a CUDA-graph replay of the step would cost next to eager dispatch: host time
    and the GPU's idle gaps between kernels (model parameters: pyeuler.cost.LAUNCH_GAP_US)."""
    gap, gaps = report.launch_gap_us, report.launch_gaps_ms
    eager_host = f"host {report.host_ms:.1f} ms (this CPU), " if report.host_ms is not None else ""
    eager = (f"eager dispatch: {eager_host}launch gaps {report.launches} × {gap['eager']:g} µs "
             f"= {gaps['eager']:.2f} ms")
    if not report.capturable:
        return (f"captured step (CUDA graph): not capturable, {report.syncs} host syncs; "
                f"{eager}")
    return (f"captured step (CUDA graph): host {report.captured_host_ms:g} ms, launch gaps "
            f"{report.launches} × {gap['graph']:g} µs = {gaps['graph']:.2f} ms; {eager}")


def printed_label(config) -> str:
    """``config.label`` without the gradient mode at K = 0 (no IE-Skip there: the mode
    means nothing); the JSON's report keys keep ``config.label`` unchanged."""
    if config.ie_steps:
        return config.label
    return config.label.replace(f"-K0-{config.grad}-", "-K0-")


def _summary(reports) -> str:
    width = max([34] + [len(printed_label(r.config)) + 2 for r in reports])
    lines = [f"{'configuration':{width}s}{'launches':>9s}{'tiny':>7s}{'fused':>7s}{'HBM GB':>9s}"
             f"{'host ms':>9s}"]
    for r in reports:
        host = f"{r.host_ms:.1f}" if r.host_ms is not None else "-"
        lines.append(f"{printed_label(r.config):{width}s}{r.launches:9d}"
                     f"{r.launches_by_class['tiny']:7d}{r.launches_by_class['fused']:7d}"
                     f"{r.hbm_bytes / 1e9:9.2f}{host:>9s}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pyeuler.backend import H100, DeviceModel
    from pyeuler.cost import cost

    device = H100 if args.sm_count == H100.sm_count else DeviceModel(
        f"a GPU with {args.sm_count} SMs", args.sm_count)
    if not 0 <= args.theta <= 1:
        usage_error(f"--theta: expected a number in [0, 1], got {args.theta}")
    check_output_path(args.json, "--json")
    try:
        todo = configs(args)
    except ValueError as exc:
        usage_error(str(exc))
    if set(args.recompute) != {"selective"} and not any(
            _recomputes(c.backend, c.ie_steps, c.grad) for c in todo):
        usage_error(f"--recompute {' '.join(args.recompute)}: a policy applies only to unrolled "
                    "IE-Skips (--ie-steps above 0, --grad unrolled) on the triton or cuda "
                    "backend, and no requested configuration is one")
    references: dict = {}  # the reference backend's host time, measured once per step
    reports = []
    for config in todo:
        key = dataclasses.replace(config, backend="reference")
        try:
            report = cost(config, device=device, host_time=args.host_time,
                          host_ms_reference=references.get(key))
        except ValueError as exc:  # bad model name or arguments (build_model)
            usage_error(str(exc))
        if report.host_ms_reference is not None:
            references[key] = report.host_ms_reference
        reports.append(report)
        print(format_report(report, args.top), end="\n\n", flush=True)
    if len(reports) > 1:
        print(_summary(reports))
    if args.json:
        if len(reports) == 1:
            payload = reports[0].to_json()
        else:
            payload = {"commit": reports[0].commit, "dirty": reports[0].dirty,
                       "device": dataclasses.asdict(device),
                       "reports": {r.config.label: r.to_json() for r in reports}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"report written to {args.json}")
    return 0
