"""The benchmark tooling on CPU: a tiny real run through `pyeuler bench`, and result files."""

import json

import pytest

from pyeuler.benchmark import StepCase, time_train_step, write_results
from pyeuler.cli import main


def test_bench_cli_writes_a_table_per_run_without_overwriting(tmp_path):
    args = ["bench", "--depth", "10", "--widen-factor", "1", "--batch-size", "2",
            "--image-size", "8", "--steps", "1", "--grads", "unrolled", "--backends", "reference",
            "eager", "--warmup", "1", "--iters", "1", "--no-progress", "--out", str(tmp_path)]
    assert main(args) == 0
    assert main(args) == 0
    first, second = sorted(tmp_path.glob("*.json"), key=lambda path: len(path.name))
    assert second.name == first.stem + "-2.json"
    rows = json.loads(first.read_text())["results"]
    assert [r["label"] for r in rows] == ["K=1 unrolled fp32 reference", "K=1 unrolled fp32 eager"]
    assert all(r["median_ms"] > 0 and r["saved_mib"] > 0 for r in rows)
    assert all(0 < r["min_ms"] <= r["median_ms"] and r["iqr_ms"] >= 0 for r in rows)
    assert "| case | min ms | median ms | IQR ms |" in first.with_suffix(".md").read_text()


def test_a_bench_run_cut_short_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    """The files are rewritten after every row: a run stopped by a time limit (a lent GPU's)
    leaves the rows it timed, and says how many were planned."""
    import pyeuler.benchmark

    timed = []

    def time_then_stop(case, **kwargs):
        if timed:
            raise KeyboardInterrupt  # as a timeout's signal would stop the run
        timed.append(case)
        return real(case, **kwargs)

    real = pyeuler.benchmark.time_train_step
    monkeypatch.setattr(pyeuler.benchmark, "time_train_step", time_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "--depth", "10", "--widen-factor", "1", "--batch-size", "2",
              "--image-size", "8", "--steps", "1", "--grads", "unrolled", "--backends",
              "reference", "eager", "--warmup", "1", "--iters", "1", "--no-progress",
              "--out", str(tmp_path)])
    (written,) = tmp_path.glob("*.json")
    payload = json.loads(written.read_text())
    assert [r["label"] for r in payload["results"]] == ["K=1 unrolled fp32 reference"]
    assert payload["config"]["rows_planned"] == 2
    assert "K=1 unrolled fp32 reference" in written.with_suffix(".md").read_text()


def test_results_record_the_environment(tmp_path):
    result = time_train_step(StepCase(0, "unrolled", "fp32", "eager"), depth=10, widen_factor=1,
                             batch_size=2, image_size=8, warmup=1, iters=1)
    json_path, md_path = write_results([result], {"depth": 10}, tmp_path)
    env = json.loads(json_path.read_text())["environment"]
    assert {"torch", "triton", "cuda", "device", "date", "commit", "dirty"} <= set(env)
    from pyeuler.cost import source_revision

    commit, dirty = source_revision()  # the checkout the figures come from
    assert (env["commit"], env["dirty"]) == (commit, dirty)
    if commit is not None:
        assert f"pyeuler {commit[:12]}" in md_path.read_text()


def _cli(*argv, cwd=None):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pyeuler", *argv], capture_output=True,
                          text=True, timeout=300, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_bench_help_describes_the_run_and_shows_every_default():
    text = _cli("bench", "--help")
    assert "time one training step" in text and "relative to the current directory" in text
    for default in ("[0 1 3]", "[unrolled detached]", "[3]", "[10]", "[benchmarks/results]",
                    "[34 on a GPU, 10 on a CPU]", "LOCAL_WORLD_SIZE", "[selective]"):
        assert default in " ".join(text.split()), default


def test_bench_reports_spread_prints_absolute_paths_and_labels_k0_without_a_mode(tmp_path):
    """--out is relative to the working directory and printed absolute; every row has min,
    median and IQR; the K = 0 row has no gradient mode (label "—", JSON null)."""
    stdout = _cli("bench", "--depth", "10", "--widen-factor", "1", "--batch-size", "2",
                  "--image-size", "8", "--steps", "0", "1", "--grads", "detached",
                  "--backends", "eager", "--warmup", "1", "--iters", "3", "--threads", "1",
                  "--no-progress", "--out", "results", cwd=tmp_path)
    (json_path,) = (tmp_path / "results").glob("*.json")
    assert f"results to {tmp_path / 'results'}" in stdout and f"wrote {json_path}" in stdout
    rows = json.loads(json_path.read_text())["results"]
    assert [r["label"] for r in rows] == ["K=0 — fp32 eager", "K=1 detached fp32 eager"]
    assert [r["case"]["grad"] for r in rows] == [None, "detached"]
    for r in rows:
        times = sorted(r["extra"]["times_ms"])
        assert r["min_ms"] == times[0] and r["median_ms"] == times[1]
        assert r["iqr_ms"] == pytest.approx((times[1] + times[2]) / 2 - (times[0] + times[1]) / 2)
    assert "| K=0 — fp32 eager |" in json_path.with_suffix(".md").read_text()
    assert "unrolled" not in stdout


def test_cost_labels_k0_without_a_gradient_mode_and_keeps_json_keys(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert main(["cost", "--model", "wrn-10-1", "--data", "digits", "--batch-size", "2",
                 "--ie-steps", "0", "1", "--backend", "eager", "--no-host-time", "--top", "0",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "· K=0 · norm" in text and "· K=1 unrolled · norm" in text
    assert "K=0 unrolled" not in text and "eager-K0-bf16 " in text
    assert set(json.loads(out.read_text())["reports"]) == {"eager-K0-unrolled-bf16",
                                                          "eager-K1-unrolled-bf16"}


def test_bench_makes_a_row_per_recompute_policy_only_where_one_applies():
    """--recompute multiplies the rows of unrolled IE-Skips (K > 0) on the fused backends,
    eager, graphed and compiled; every other row is made once, with the default policy."""
    from pyeuler.cli import build_parser
    from pyeuler.cli.bench import _cases

    args = build_parser().parse_args([
        "bench", "--backends", "reference", "eager", "triton", "cuda", "--steps", "0", "1",
        "--grads", "unrolled", "detached", "--precisions", "fp32", "--recompute", "selective",
        "none", "full", "none", "--cuda-graph", "--compile"])
    cases = _cases(args, gpu=True)
    labels = [case.label for case in cases]
    assert len(labels) == len(set(labels))
    varied = [case for case in cases if case.recompute_applies]
    assert {(case.backend, case.steps, case.grad) for case in varied} == {
        ("triton", 1, "unrolled"), ("cuda", 1, "unrolled")}
    assert len(varied) == 2 * 3 * 3  # {triton, cuda} × {eager, graph, compile} × policies
    assert [case.recompute for case in varied[:3]] == ["selective", "none", "full"]
    assert all(case.recompute == "selective" for case in cases if not case.recompute_applies)
    assert "K=1 unrolled fp32 cuda+graph recompute=full" in labels
    assert "K=1 unrolled fp32 triton+compile recompute=none" in labels
    assert "K=1 unrolled fp32 triton" in labels and "K=1 detached fp32 triton" in labels
    assert all(case.recompute_applies for case in cases if "recompute" in case.label)
    # without the flag: one row per (K, grad, backend) as before it, none naming a policy
    default = _cases(build_parser().parse_args(["bench", "--backends", "eager", "triton"]),
                     gpu=False)
    assert len(default) == (1 + 2 + 2) * 2  # K = 0 once, K = 1 and 3 twice; two backends
    assert not any("recompute" in case.label for case in default)


def test_step_case_labels_name_a_recompute_policy_only_where_it_applies():
    assert StepCase(1, "unrolled", "bf16", "triton").label == "K=1 unrolled bf16 triton"
    assert (StepCase(1, "unrolled", "bf16", "triton", recompute="selective").label
            == "K=1 unrolled bf16 triton")
    assert (StepCase(3, "unrolled", "bf16", "cuda", compiled=True, recompute="none").label
            == "K=3 unrolled bf16 cuda+compile recompute=none")
    for case in (StepCase(1, "unrolled", "fp32", "eager", recompute="full"),
                 StepCase(1, "unrolled", "fp32", "reference", recompute="full"),
                 StepCase(1, "detached", "fp32", "triton", recompute="full"),
                 StepCase(1, "implicit", "fp32", "cuda", recompute="full"),
                 StepCase(0, "unrolled", "fp32", "triton", recompute="full")):
        assert not case.recompute_applies and "recompute" not in case.label, case


def test_time_train_step_builds_the_policy_and_json_rows_carry_it(tmp_path, monkeypatch):
    """The timed model's IE blocks have the case's policy; the JSON row records it where
    it applies and null elsewhere (as K = 0's gradient mode)."""
    import dataclasses

    import pyeuler.benchmark as benchmark

    built, original = [], benchmark.wide_resnet

    def recording_wide_resnet(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(benchmark, "wide_resnet", recording_wide_resnet)
    case = StepCase(1, "unrolled", "fp32", "eager", recompute="full")
    result = time_train_step(case, depth=10, widen_factor=1, batch_size=2, image_size=8,
                             warmup=1, iters=1)
    policies = {m.recompute for m in built[0].modules() if hasattr(m, "recompute")}
    assert policies == {"full"}
    fused = dataclasses.replace(result, case=dataclasses.replace(case, backend="triton"))
    json_path, _ = write_results([result, fused], {"depth": 10}, tmp_path)
    rows = json.loads(json_path.read_text())["results"]
    assert [row["case"]["recompute"] for row in rows] == [None, "full"]
    assert [row["label"] for row in rows] == ["K=1 unrolled fp32 eager",
                                              "K=1 unrolled fp32 triton recompute=full"]
