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


def test_results_record_the_environment(tmp_path):
    result = time_train_step(StepCase(0, "unrolled", "fp32", "eager"), depth=10, widen_factor=1,
                             batch_size=2, image_size=8, warmup=1, iters=1)
    json_path, _ = write_results([result], {"depth": 10}, tmp_path)
    env = json.loads(json_path.read_text())["environment"]
    assert {"torch", "triton", "cuda", "device", "date"} <= set(env)


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
                    "[34 on a GPU, 10 on a CPU]", "LOCAL_WORLD_SIZE"):
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
