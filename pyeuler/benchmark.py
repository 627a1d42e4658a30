"""The workloads of docs/benchmarks.md, shared by ``pyeuler bench`` and the pytest-benchmark
suites.

- :func:`time_train_step`: one full training step of an (IE-)WideResNet (forward,
  cross-entropy, backward, SGD-momentum step); min, median and interquartile range over
  timed steps after warm-up, CUDA events on a GPU; peak memory; optionally the share of
  GPU time in convolutions.  Eagerly, compiled as a whole or replayed from a CUDA graph
  (:class:`pyeuler.robust.capture.CapturedStep`).
  The ``"reference"`` rows, the baseline every speed-up is quoted against, run plain
  PyTorch as users write it, native BatchNorm and SGD's default update included
  (:func:`native_norms`), not the oracle's decomposed norms; the other rows step the
  optimizer ``pyeuler train`` builds (:func:`pyeuler.robust.make_optimizer`: fused on CUDA).
- :func:`saved_tensor_bytes`: the activation memory autograd keeps for the backward, a
  device-independent count (peak memory needs a GPU).
- :func:`op_bytes`: the bytes an op must move ("ideal" in docs/benchmarks.md), for GB/s
  figures.
- :func:`write_results`: ``benchmarks/results/<device>-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import platform
import statistics
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import pyeuler
from pyeuler.models import wide_resnet
from pyeuler.ops.reference_norm import native_norms
from pyeuler.robust.capture import CapturedStep
from pyeuler.robust.training import make_optimizer

__all__ = ["StepCase", "StepResult", "time_train_step", "saved_tensor_bytes", "op_bytes",
           "environment", "write_results"]


@dataclass(frozen=True)
class StepCase:
    """One row of the headline table."""

    steps: int  # IE steps K (0 = the plain network)
    grad: str  # "unrolled" | "detached" | "implicit"
    precision: str  # "bf16" (autocast, channels_last) | "fp32" (TF32 allowed)
    backend: str  # "reference" (plain PyTorch, native norms) | "eager" | "triton" | "cuda"
    # the whole step (forward, loss, backward, optimizer) through torch.compile(mode=
    # "reduce-overhead"), or replayed from one CUDA graph (pyeuler.robust.capture)
    compiled: bool = False
    graph: bool = False
    # what unrolled IE-Skips on the fused backends recompute in the backward instead of
    # keeping (pyeuler.nn.IESkip(recompute=)); ignored where it does not apply
    recompute: str = "selective"

    @property
    def recompute_applies(self) -> bool:
        """Whether ``recompute`` changes the step: unrolled IE-Skips (K > 0) on a fused
        backend (triton, cuda), as ``pyeuler cost`` counts them."""
        return self.steps > 0 and self.grad == "unrolled" and self.backend in ("triton", "cuda")

    @property
    def label(self) -> str:
        """``K=<k> <grad> <precision> <backend>[+compile|+graph][ recompute=<policy>]``; K = 0
        has no IE-Skip, hence no gradient mode: ``—`` stands in its place.  The policy is
        named only where it applies (:attr:`recompute_applies`) and is not the default."""
        name = self.backend + ("+compile" if self.compiled else "+graph" if self.graph else "")
        grad = self.grad if self.steps else "—"
        policy = (f" recompute={self.recompute}"
                  if self.recompute_applies and self.recompute != "selective" else "")
        return f"K={self.steps} {grad} {self.precision} {name}{policy}"


@dataclass
class StepResult:
    case: StepCase
    median_ms: float
    images_per_s: float
    peak_mem_gib: float | None
    conv_share: float | None = None
    saved_mib: float | None = None
    extra: dict = field(default_factory=dict)
    min_ms: float | None = None
    iqr_ms: float | None = None  # q75 − q25 of the timed steps (inclusive quartiles)


def _timer(device: torch.device):
    if device.type == "cuda":
        def measure(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
    else:
        def measure(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return measure


def saved_tensor_bytes(forward):
    """``(bytes, forward())``: the storages autograd holds for the backward once ``forward``
    has run, each counted once whatever views of it are saved (tensors saved by graphs
    already freed inside the forward, like a detached IE-Skip's inner one, do not count)."""
    saved: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    storages = {}
    for ref in saved:
        t = ref()
        if t is not None:  # keyed by the storage itself: fake tensors (pyeuler.cost) have no data
            storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(storages.values()), out


def time_train_step(case: StepCase, *, depth: int = 34, widen_factor: int = 10,
                    batch_size: int = 128, image_size: int = 32, warmup: int = 3, iters: int = 10,
                    device: str | torch.device | None = None, profile: bool = False,
                    seed: int = 0) -> StepResult:
    """Time one training step of ``wide_resnet(depth, widen_factor)``: min, median and
    interquartile range (ms) of ``iters`` timed steps; every time is in ``extra["times_ms"]``.
    On a busy machine single steps vary widely (26–190 ms in one CPU row), so the spread
    is reported with the median rather than hidden by it."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    model = wide_resnet(depth, widen_factor, ie_steps=case.steps, grad=case.grad,
                        recompute=case.recompute, backend=case.backend).to(device)
    x = torch.rand(batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    bf16 = case.precision == "bf16"
    if bf16:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not bf16
    if case.backend == "reference":  # plain PyTorch: SGD's default (foreach on CUDA)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    else:  # pyeuler train's (fused on CUDA)
        optimizer = make_optimizer("sgd", model.parameters(), lr=0.01, momentum=0.9)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    # The baseline times what users write: torch's native norms, not the oracle's exact ones.
    norms = native_norms if case.backend == "reference" else contextlib.nullcontext

    def forward_backward(inputs, labels):
        with autocast:
            loss = F.cross_entropy(model(inputs), labels)
        loss.backward()
        return loss.detach()

    if case.compiled or case.graph:
        captured = CapturedStep(forward_backward, model, optimizer,
                                mode="compile" if case.compiled else "cuda-graph")

        def step():
            with norms():
                captured(x, y)
    else:
        def step():
            optimizer.zero_grad(set_to_none=True)
            with norms():
                forward_backward(x, y)
            optimizer.step()

    measure = _timer(device)
    compile_ms = measure(step)  # first step: compilation, autotuning, allocator warm-up
    for _ in range(warmup - 1):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = [measure(step) for _ in range(iters)]
    median = statistics.median(times)
    if len(times) > 1:
        q25, _, q75 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q25 = q75 = times[0]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    conv_share = _conv_share(step, device) if profile else None
    saved_mib = None
    if not case.compiled:  # compiled graphs keep their own buffers, invisible to the hooks
        with norms(), autocast:
            saved, _ = saved_tensor_bytes(lambda: F.cross_entropy(model(x), y))
        saved_mib = saved / 2**20
    return StepResult(case, median, batch_size / median * 1e3, peak, conv_share, saved_mib,
                      {"first_step_ms": compile_ms, "times_ms": times}, min(times), q75 - q25)


def _conv_share(step, device: torch.device) -> float:
    """Fraction of device (CPU: self CPU) time spent in convolution kernels over one step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    total = conv = 0.0
    for event in prof.key_averages():
        t = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        total += t
        name = event.key.lower()
        if "conv" in name or "cudnn" in name or "sm90_xmma" in name or "implicit_gemm" in name:
            conv += t
    return conv / total if total else float("nan")


def op_bytes(numel: int, element_size: int, op: str, backward: bool) -> int:
    """Bytes an op must move: the "ideal" passes of docs/benchmarks.md (read x, write y, ...)."""
    passes = {("bn_relu", False): 2, ("bn_add_relu", False): 3,
              ("bn_relu", True): 2 + 3, ("bn_add_relu", True): 3 + 4}[(op, backward)]
    return passes * numel * element_size


def environment() -> dict:
    """Device, library versions and the pyeuler commit (and whether the checkout had
    changes) recorded with every result file."""
    from pyeuler.cost import source_revision

    commit, dirty = source_revision()
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "pyeuler": pyeuler.__version__,
        "commit": commit,
        "dirty": dirty,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "backends": {k: v[0] for k, v in pyeuler.available_backends().items()},
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def _markdown(results: list[StepResult], env: dict, config: dict) -> str:
    lines = [f"# pyeuler bench — {env['device']}", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, {env['date']}",
             f"pyeuler {(env.get('commit') or 'outside a git checkout')[:12]}"
             + (" (with uncommitted changes)" if env.get("dirty") else ""),
             f"config: {json.dumps(config)}", "",
             "| case | min ms | median ms | IQR ms | images/s | peak GiB | saved MiB | "
             "conv share | vs reference |",
             "|---|---|---|---|---|---|---|---|---|"]

    def configuration(case: StepCase) -> tuple:
        return case.steps, case.grad if case.steps else None, case.precision

    ref = {configuration(r.case): r.median_ms for r in results
           if r.case.backend == "reference" and not r.case.compiled}
    for r in results:
        base = ref.get(configuration(r.case))
        speedup = f"{base / r.median_ms:.2f}×" if base else "—"
        peak = f"{r.peak_mem_gib:.2f}" if r.peak_mem_gib is not None else "—"
        share = f"{100 * r.conv_share:.0f} %" if r.conv_share is not None else "—"
        saved = f"{r.saved_mib:.0f}" if r.saved_mib is not None else "—"
        spread = (f"{r.min_ms:.1f} | {r.median_ms:.1f} | {r.iqr_ms:.1f}" if r.min_ms is not None
                  else f"— | {r.median_ms:.1f} | —")
        lines.append(f"| {r.case.label} | {spread} | {r.images_per_s:.0f} | {peak} | "
                     f"{saved} | {share} | {speedup} |")
    return "\n".join(lines) + "\n"


def _json_row(result: StepResult) -> dict:
    """``asdict(result)`` with its label; a K = 0 row's ``case.grad`` is null (no IE-Skip),
    and ``case.recompute`` is null where no policy applies (:attr:`StepCase.recompute_applies`)."""
    row = dict(asdict(result), label=result.case.label)
    if not result.case.steps:
        row["case"]["grad"] = None
    if not result.case.recompute_applies:
        row["case"]["recompute"] = None
    return row


def write_results(results: list[StepResult], config: dict, out_dir: str | Path,
                  over: Path | None = None) -> tuple[Path, Path]:
    """Write ``<device>-<date>.json`` and ``.md`` (``-2``, ``-3``… when a run of the same day
    is already there: a table split over several runs keeps every part); returns both paths.
    ``over``: a JSON path this run wrote before, rewritten with the rows so far (a run cut
    short keeps the rows it finished)."""
    env = environment()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "".join(c if c.isalnum() else "-" for c in env["device"]).strip("-").lower()
    base = f"{device}-{env['date'][:10]}"
    stem, part = out_dir / base, 1
    while over is None and stem.with_suffix(".json").exists():
        part += 1
        stem = out_dir / f"{base}-{part}"
    if over is not None:
        stem = Path(over).with_suffix("")
    payload = {"environment": env, "config": config,
               "results": [_json_row(r) for r in results]}
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(_markdown(results, env, config))
    return json_path, md_path
