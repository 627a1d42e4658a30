"""The launch / bytes counter (``pyeuler.cost``, ``pyeuler cost``) and its seams.

The counter runs the GPU code path on fake CPU tensors; these tests check that what it
counts is what runs: Triton launches counted on fake tensors equal the launches the CPU
interpreter really makes at a small shape, the CUDA extension's schemas equal
csrc/ops.cpp's, every kernel goes through the launch seam, and the classification and
byte rules hold on handcrafted ops.  The launch budget of the headline step runs in a
subprocess at full shape.
"""

import collections
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from pyeuler import backend
from pyeuler.cost import (
    CLASSES,
    TINY_BYTES,
    Recorder,
    StepConfig,
    build_workload,
    count_step,
    foreach_launches,
    kernel_class,
    operand_bytes,
    run_step,
)

triton = pytest.importorskip("triton")

from pyeuler.triton import _utils  # noqa: E402  (needs triton)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Kernel launches of one IE-WRN-34-10 training step (batch 128, bf16, K = 1 unrolled,
# backend triton; pyeuler cost's count): 5,817 at e2493fd
# (benchmarks/results/cost-before-e2493fd.json), 1,952 once the per-channel algebra ran as
# kernels, 1,437 with running statistics, forward coefficients and the second order's
# per-channel pass folded into kernels, 1,317 with each conv weight cast once per IE-Skip
# call and the IE update's backward folded into the second order's pass, 1,269 with the
# recomputed activation of norm_relu_conv's backward written by its reduce pass, 1,257 with
# the VJP's norm gradient kept (recompute="selective"), 1,233 with the IE step reading e's
# term and one adjoint pass combining their gradients, 1,221 with the VJP fused again,
# keeping its norm gradient, 1,216 with SGD's fused update, 1,180 with the IE step's
# gradient shares summed in kernel epilogues (gradient relays), 1,144 with the block input's
# shares relayed too and weight gradients cast into the weights' strides
# (cost-after-*.json).  It must not grow; work that removes launches lowers it.
LAUNCH_BUDGET = 1144

# A small step whose Triton path still splits reductions and merges the partials: the
# digits' 8×8 images at batch 32 fill two 16K-element partials on one modelled SM.
SMALL = StepConfig(model="wrn-10-1", data="digits", batch_size=32, precision="bf16",
                   ie_steps=1, grad="unrolled", backend="triton")
ONE_SM = backend.DeviceModel("one SM", sm_count=1)


# ------------------------------------------------------------------ seams


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "On", "y", "0", "false", "off",
                                   "no", "", "2"])
def test_triton_interpret_has_one_meaning(monkeypatch, value):
    """The backend's check and the kernels' check read TRITON_INTERPRET as Triton does."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert backend.triton_interpreted() == _utils.interpreting() == triton.knobs.runtime.interpret


def test_every_kernel_launches_through_the_seam():
    import importlib
    import pkgutil

    from triton.runtime.jit import KernelInterface

    import pyeuler.triton as package

    kernels = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"pyeuler.triton.{info.name}")
        kernels |= {(info.name, name): value for name, value in vars(module).items()
                    if name.endswith("_kernel") and isinstance(value, (KernelInterface,
                                                                       _utils.Launcher))}
    assert kernels
    assert all(isinstance(k, _utils.Launcher) for k in kernels.values()), [
        name for name, k in kernels.items() if not isinstance(k, _utils.Launcher)]


def test_counting_device_is_scoped():
    cpu = torch.device("cpu")
    with backend.counting_device(ONE_SM) as model:
        assert model is ONE_SM and backend.counted_device() is ONE_SM
        assert backend.device_type(cpu) == "cuda"
        assert _utils._split_targets(cpu) == (4, 16384)
        with backend.counting_device():
            assert backend.counted_device() is backend.H100
        assert backend.counted_device() is ONE_SM
    assert backend.counted_device() is None and backend.device_type(cpu) == "cpu"


def test_cuda_schemas_are_csrc_ops_cpp():
    from pyeuler.cuda import _FAKES, KERNEL_LAUNCHES, SCHEMAS

    text = open(os.path.join(ROOT, "csrc", "ops.cpp")).read()
    block = re.search(r"TORCH_LIBRARY_FRAGMENT\(pyeuler, m\) \{(.*?)\n\}", text, re.S).group(1)
    defined = [" ".join("".join(re.findall(r'"([^"]*)"', call)).split())
               for call in re.findall(r"m\.def\((.*?)\);", block, re.S)]
    assert defined == list(SCHEMAS)
    names = {schema.split("(")[0] for schema in SCHEMAS}
    assert set(KERNEL_LAUNCHES) == names == {name.split("::")[1] for name in _FAKES}


# ------------------------------------------------------------------ (a) counted == launched


@pytest.mark.skipif(not _utils.interpreting(), reason="compares with Triton's CPU interpreter")
# the skipped first step leaves uninitialised outputs behind: values do not decide launches
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_counted_triton_launches_are_the_interpreters(monkeypatch):
    """The fake count of a small step's Triton launches equals the launches the step makes
    for real in the interpreter, seen at the launch hook and inside Triton itself."""
    from triton.runtime.interpreter import InterpretedFunction

    counted = collections.Counter(k.name.removeprefix("triton:") for k in
                                  count_step(SMALL, ONE_SM).kernels if k.name.startswith("triton:"))
    hooked, ran = collections.Counter(), collections.Counter()
    run = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        ran[self.fn.__name__] += 1
        return run(self, *args, **kwargs)

    def hook(name, grid, args, kwargs):
        hooked[name] += 1
        return False  # launch it

    torch.manual_seed(0)
    with backend.counting_device(ONE_SM):  # the same split reductions as the count
        work = build_workload(SMALL)
        with _utils.launch_hook(lambda *launch: True):  # the unrecorded first step: skipped
            run_step(SMALL, work)
        monkeypatch.setattr(InterpretedFunction, "run", counting_run)
        with _utils.launch_hook(hook):
            run_step(SMALL, work)
    # splits, merges, both layouts' reductions and the fused backward all ran
    assert {"_sum_partials_kernel", "_merge_stats_kernel", "_grad_sums_columns_kernel",
            "_affine_act_double_backward_apply_kernel"} <= set(ran)
    assert counted == hooked == ran


def test_cuda_backend_is_counted_with_its_reductions():
    count = count_step(StepConfig(**{**SMALL.__dict__, "backend": "cuda"}), ONE_SM)
    cuda = [k for k in count.kernels if k.name.startswith("pyeuler.cuda_")]
    assert cuda and count.custom_op_calls
    # the statistics with the forward coefficients in their final stage: two launches
    stats = "pyeuler.cuda_norm_stats_and_coefficients.default"
    assert {k.launches for k in cuda if k.name == stats} == {2}
    assert {k.launches for k in cuda if k.name == "pyeuler.cuda_affine_act_forward.default"} == {1}


def test_each_attack_step_costs_the_same():
    attack = [count_step(StepConfig(**{**SMALL.__dict__, "adv": "pgd", "attack_steps": n}),
                         ONE_SM).by_phase()["attack"] for n in (1, 2, 3)]
    assert 0 < attack[0] and attack[2] - attack[1] == attack[1] - attack[0] > 0


# ------------------------------------------------------------------ (b) classes and bytes


def test_kernel_class_and_operand_bytes():
    assert kernel_class("conv", 0) == "conv" and kernel_class("gemm", 10**9) == "gemm"
    for kind, big in (("triton", "fused"), ("cuda", "fused"), ("aten", "activation")):
        assert kernel_class(kind, TINY_BYTES - 1) == "tiny"
        assert kernel_class(kind, TINY_BYTES) == big
    v = torch.zeros(160)
    assert operand_bytes(v.view(1, 160, 1, 1).expand(128, 160, 32, 32)) == 160 * 4
    assert operand_bytes(torch.zeros(0, 3)) == 0


def test_foreach_launches_replay_multi_tensor_apply():
    assert foreach_launches([10] * 110, depth=1) == 1
    assert foreach_launches([10] * 111, depth=1) == 2
    assert foreach_launches([10] * 48, depth=3) == 1 and foreach_launches([10] * 49, depth=3) == 2
    assert foreach_launches([320 * 65536], depth=2) == 1
    assert foreach_launches([320 * 65536 + 1], depth=2) == 2  # a tensor split over launches
    assert foreach_launches([0, 0], depth=2) == 0


def test_recorded_classes_launches_and_bytes():
    """Handcrafted ops at WRN-34-10's widest shape, recorded as the counter records them."""
    n, c = 128, 160
    act, f32, vec = n * c * 32 * 32 * 2, n * c * 32 * 32 * 4, c * 4  # bytes: bf16, fp32, [C]
    recorder = Recorder()
    with FakeTensorMode():
        x = torch.empty(n, c, 32, 32, dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last)
        y, xf = torch.empty_like(x), torch.empty(n, c, 32, 32)
        w = torch.empty(c, c, 3, 3, dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last)
        v, vb = torch.empty(c), torch.empty(c, dtype=torch.bfloat16)
        stats = torch.zeros(c), torch.ones(c)
        scale = torch.ones(())
        wb = w.numel() * 2
        with recorder:
            x.permute(0, 2, 3, 1)  # a view: no kernel
            x + y  # read two, write one
            x.add_(y)  # in place: x read and written
            x.copy_(y)  # overwrite: x only written
            v * v  # per-channel vectors: tiny
            x * vb.view(1, c, 1, 1)  # the broadcast vector counts once
            torch.nn.functional.batch_norm(xf, *stats, training=True)  # 3 kernels, x read twice
            out = torch.ops.aten.convolution.default(x, w, None, [1, 1], [1, 1], [1, 1], False,
                                                     [0, 0], 1)
            torch.ops.aten.convolution_backward.default(out, x, w, None, [1, 1], [1, 1], [1, 1],
                                                        False, [0, 0], 1, [True, True, False])
            assert not bool(x.sum() > 0)  # a host read: a sync, answered False
            # buffers updated in place: two declared passes each (read and write)
            recorder.triton_launch("_update_running_stats_kernel", (1,),
                                   (v, v, None, v, v, None, 0.1, 1.0, c),
                                   {"HAS_COUNTER": False, "MOMENTUM_MODE": 0, "BLOCK": 256})
            # y passed as the shortcut but HAS_SHORTCUT off: not touched, not counted
            recorder.triton_launch("_affine_act_forward_kernel", (1,),
                                   (x, v, v, y, y, None, n * 32 * 32, c, c, 32 * 32),
                                   {"HAS_SHORTCUT": False, "SAVE_MASK": False, "BLOCK_I": 64})
            recorder.phase = "optimizer"
            torch._foreach_add_([v, v], [v, v], alpha=0.1)
            # fused SGD: parameters and momentum read and written, gradients only read...
            torch._fused_sgd_([v], [v], [v], weight_decay=0.0, momentum=0.9, lr=0.1,
                              dampening=0.0, nesterov=False, maximize=False,
                              is_first_step=False)
            # ... unless a grad_scale makes it unscale them in place
            torch._fused_sgd_([v], [v], [v], weight_decay=0.0, momentum=0.9, lr=0.1,
                              dampening=0.0, nesterov=False, maximize=False,
                              is_first_step=False, grad_scale=scale)
    got = [(k.name, k.step_class, k.launches, k.bytes) for k in recorder.kernels]
    assert got == [
        ("aten.add.Tensor", "activation", 1, 3 * act),
        ("aten.add_.Tensor", "activation", 1, 3 * act),
        ("aten.copy_.default", "activation", 1, 2 * act),
        ("aten.mul.Tensor", "tiny", 1, 3 * vec),
        ("aten.mul.Tensor", "activation", 1, 2 * act + c * 2),
        # inputs x (twice), running mean and var; outputs y, saved mean and invstd
        ("aten.native_batch_norm.default", "activation", 3, 3 * f32 + 4 * vec),
        ("aten.convolution.default", "conv", 1, 2 * act + wb),
        ("aten.convolution_backward.default dgrad", "conv", 1, 2 * act + wb),
        ("aten.convolution_backward.default wgrad", "conv", 1, 2 * act + wb),
        ("aten.sum.default", "activation", 1, act + 2),
        ("aten.gt.Scalar", "tiny", 1, 2 + 1),
        ("triton:_update_running_stats_kernel", "tiny", 1, 2 * 2 * vec + 2 * vec),
        ("triton:_affine_act_forward_kernel", "fused", 1, 2 * act + 2 * vec),
        ("aten._foreach_add_.List", "optimizer", 1, 6 * vec),  # two lists read, the first written
        ("aten._fused_sgd_.default", "optimizer", 1, 5 * vec),
        ("aten._fused_sgd_.default", "optimizer", 1, 6 * vec),
    ]
    assert recorder.syncs == 1


def test_bytes_are_multiplied_by_declared_passes(monkeypatch):
    """A Triton operand's bytes times the passes its kernel declares: a kernel declaring two
    passes over x counts x twice; a kernel without a declaration is an error."""
    from pyeuler.triton import ie

    recorder = Recorder()
    with FakeTensorMode():
        x = torch.empty(128, 160, 32, 32, dtype=torch.bfloat16)
        launch = (x, x, x, x, x.numel(), 0.2, 1.0)
        recorder.triton_launch("_ie_update_kernel", (1,), launch, {})
        names = ie._ie_update_kernel.fn.arg_names
        monkeypatch.setitem(_utils._DECLARED_PASSES, "_ie_update_kernel",
                            (tuple(names), {"x_ptr": 2, "e_ptr": 1, "v_ptr": 1, "out_ptr": 1}))
        recorder.triton_launch("_ie_update_kernel", (1,), launch, {})
        with pytest.raises(KeyError, match="declares no passes"):
            recorder.triton_launch("_undeclared_kernel", (1,), (x,), {})
    act = x.numel() * 2
    assert [k.bytes for k in recorder.kernels] == [4 * act, 5 * act]


def test_cuda_kernel_passes_are_declared_and_counted():
    """Every CUDA op declares its passes over schema arguments; the counter reads running
    statistics twice (in place) and the gate's scale and shift only when it recomputes the
    gate, or (the recomputing reduce) writes y = act(scale·x + shift), ReLU or not."""
    from pyeuler.cuda import KERNEL_LAUNCHES, KERNEL_PASSES, SCHEMAS

    assert set(KERNEL_PASSES) == set(KERNEL_LAUNCHES)
    for schema in SCHEMAS:
        arguments = [a.name for a in torch._C.parse_schema(f"pyeuler::{schema}").arguments]
        op = dict.fromkeys(arguments, None)
        assert set(KERNEL_PASSES[schema.split("(")[0]](op)) <= set(arguments), schema
    n, c = 128, 160
    act, vec = n * c * 32 * 32 * 2, c * 4
    recorder = Recorder()
    with backend.counting_device(backend.H100):
        import pyeuler.cuda

        assert pyeuler.cuda.is_available()[0]  # defines the ops for counting
        with FakeTensorMode():
            x = torch.empty(n, c, 32, 32, dtype=torch.bfloat16)
            mask = torch.empty(n, c, 32, 32, dtype=torch.bool)
            v, counter = torch.empty(c), torch.zeros((), dtype=torch.long)
            with recorder:
                torch.ops.pyeuler.cuda_update_running_stats(v, v, counter, v, v, 37, None, 0.1)
                torch.ops.pyeuler.cuda_affine_act_backward_reduce(x, x, v, v, v, mask, True, False)
                torch.ops.pyeuler.cuda_affine_act_backward_reduce(x, x, v, v, v, None, True, False)
                torch.ops.pyeuler.cuda_affine_act_backward_reduce_recompute(
                    x, x, v, v, v, False, False, torch.float32)
    sums = 2 * vec  # the two [C] results
    assert [k.bytes for k in recorder.kernels] == [
        2 * 2 * vec + 2 * 8 + 2 * vec,  # running mean, var and counter in place; mean, var
        2 * act + act // 2 + vec + sums,  # dy, x, the mask, the centre
        2 * act + 3 * vec + sums,  # dy, x, scale, shift, the centre
        2 * act + 3 * vec + sums + 2 * act]  # and y written in float32


# ------------------------------------------------------------------ (c) launch budget


def test_headline_step_launch_budget(tmp_path):
    """IE-WRN-34-10, batch 128, bf16, K = 1 unrolled, Triton: launches must not grow.

    In a subprocess, at full shape: a fresh process, without TRITON_INTERPRET."""
    out = tmp_path / "cost.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-m", "pyeuler", "cost", "--model", "wrn-34-10", "--batch-size", "128",
         "--precision", "bf16", "--ie-steps", "1", "--grad", "unrolled", "--backend", "triton",
         "--no-host-time", "--top", "0", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["launches"] <= LAUNCH_BUDGET, (
        f"{report['launches']} launches > budget {LAUNCH_BUDGET}: {report['launches_by_class']}")


# ------------------------------------------------------------------ (d) the command line


def test_cli_json_keys(tmp_path, capsys):
    from pyeuler.cli import main

    out = tmp_path / "one.json"
    args = ["cost", "--model", "wrn-10-1", "--data", "digits", "--batch-size", "4"]
    assert main(args + ["--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("launches", "launches_by_class", "hbm_bytes", "hbm_bytes_by_class", "host_ms",
                "host_ms_reference", "commit", "dirty"):
        assert key in report
    assert list(report["launches_by_class"]) == list(CLASSES) == list(report["hbm_bytes_by_class"])
    assert report["launches"] == sum(report["launches_by_class"].values()) > 0
    assert report["hbm_bytes"] == sum(report["hbm_bytes_by_class"].values()) > 0
    assert report["host_ms"] > 0 and report["host_ms_reference"] > 0
    assert "top sources" in capsys.readouterr().out

    many = tmp_path / "many.json"
    assert main(args + ["--backend", "triton", "reference", "--ie-steps", "0", "1",
                        "--grad", "unrolled", "detached", "--no-host-time",
                        "--json", str(many)]) == 0
    reports = json.loads(many.read_text())["reports"]
    assert sorted(reports) == sorted(f"{b}-K{k}-{g}-bf16" for b in ("triton", "reference")
                                     for k, g in ((0, "unrolled"), (1, "unrolled"),
                                                  (1, "detached")))
    assert all(r["host_ms"] is None for r in reports.values())


def test_cli_sweeps_recompute_policies_where_they_apply(tmp_path, capsys):
    """``--recompute`` takes several policies like the other swept flags; a policy applies to
    unrolled IE-Skips only, so K = 0 and detached are counted once.  Each report's header
    names its policy, and each policy's step differs ("full" recomputes what the others
    keep: more launches)."""
    from pyeuler.cli import main

    many = tmp_path / "many.json"
    assert main(["cost", "--model", "wrn-10-1", "--data", "digits", "--batch-size", "4",
                 "--ie-steps", "0", "1", "--grad", "unrolled", "detached", "--recompute",
                 "selective", "full", "none", "--no-host-time", "--top", "0",
                 "--json", str(many)]) == 0
    reports = json.loads(many.read_text())["reports"]
    assert sorted(reports) == sorted(["triton-K0-unrolled-bf16", "triton-K1-unrolled-bf16",
                                      "triton-K1-unrolled-bf16-recompute-full",
                                      "triton-K1-unrolled-bf16-recompute-none",
                                      "triton-K1-detached-bf16"])
    assert (reports["triton-K1-unrolled-bf16-recompute-full"]["launches"]
            > reports["triton-K1-unrolled-bf16"]["launches"])
    text = capsys.readouterr().out
    for policy in ("selective", "full", "none"):
        assert f"K=1 unrolled · recompute {policy} ·" in text


def test_cli_names_no_row_after_a_policy_it_cannot_show(tmp_path):
    """Rows where no policy applies (K = 0, detached, eager, reference) are counted once, with
    the default policy and no policy in their name, whichever policy comes first; a policy
    given twice is counted once."""
    from pyeuler.cli import main

    out = tmp_path / "c.json"
    assert main(["cost", "--model", "wrn-10-1", "--data", "digits", "--batch-size", "2",
                 "--ie-steps", "0", "1", "--backend", "triton", "eager", "--recompute", "none",
                 "full", "none", "--no-host-time", "--top", "0", "--json", str(out)]) == 0
    reports = json.loads(out.read_text())["reports"]
    assert sorted(reports) == sorted(["triton-K0-unrolled-bf16", "eager-K0-unrolled-bf16",
                                      "eager-K1-unrolled-bf16",
                                      "triton-K1-unrolled-bf16-recompute-none",
                                      "triton-K1-unrolled-bf16-recompute-full"])
    assert reports["eager-K1-unrolled-bf16"]["config"]["recompute"] == "selective"


# ------------------------------------------------------------------ (e) a captured step


_CAPTURE_CASES = [(0, "unrolled", "batch", "none"), (1, "unrolled", "batch", "none"),
                  (1, "unrolled", "group", "trades"), (1, "detached", "batch", "pgd"),
                  (1, "detached", "group", "none"), (2, "implicit", "batch", "trades"),
                  (2, "implicit", "group", "pgd")]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("k,grad,norm,adv", _CAPTURE_CASES)
def test_gpu_path_step_is_capturable(backend, k, grad, norm, adv):
    """The step CUDA tensors take (emulated) reads nothing on the host but the attacks'
    input check, which a capture skips; the report prices a replay: host 0, graph gaps."""
    from pyeuler.cost import LAUNCH_GAP_US, SKIPPED_WHEN_CAPTURED, cost

    config = StepConfig(**{**SMALL.__dict__, "backend": backend, "grad": grad, "adv": adv,
                           "norm": norm, "attack_steps": 1, "ie_steps": k})
    report = cost(config, device=ONE_SM, host_time=False)
    assert report.capturable and report.captured_host_ms == 0.0
    assert {source.split(" < ")[0] for source in report.sync_sources} <= set(
        SKIPPED_WHEN_CAPTURED)
    assert (adv != "none") == (report.syncs > 0)  # the check the capture skips is counted
    assert report.launch_gaps_ms == {kind: report.launches * gap / 1e3
                                     for kind, gap in LAUNCH_GAP_US.items()}
    assert report.launch_gaps_ms["graph"] < report.launch_gaps_ms["eager"]


def test_a_step_with_a_host_read_is_not_capturable():
    from pyeuler.cost import StepCount

    assert StepCount([], {}, 1, {"robust/attacks.py:_check < pgd": 1}).capturable
    assert not StepCount([], {}, 1, {"ops/fixed_point.py:anderson < _ie_implicit": 1}).capturable
    assert StepCount([], {}, 0).capturable


def test_cli_reports_the_captured_step(tmp_path, capsys):
    from pyeuler.cli import main

    out = tmp_path / "one.json"
    assert main(["cost", "--model", "wrn-10-1", "--data", "digits", "--batch-size", "4",
                 "--no-host-time", "--top", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["capturable"] is True and report["captured_host_ms"] == 0.0
    assert set(report["launch_gaps_ms"]) == set(report["launch_gap_us"]) == {"eager", "graph"}
    text = capsys.readouterr().out
    assert (f"captured step (CUDA graph): host 0 ms, launch gaps {report['launches']} × 0.5 µs"
            in text) and "eager dispatch: launch gaps" in text
