"""The benchmark tooling on CPU: a tiny real run through `pyeuler bench`, and result files."""

import json

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
    assert "saved MiB" in first.with_suffix(".md").read_text()


def test_results_record_the_environment(tmp_path):
    result = time_train_step(StepCase(0, "unrolled", "fp32", "eager"), depth=10, widen_factor=1,
                             batch_size=2, image_size=8, warmup=1, iters=1)
    json_path, _ = write_results([result], {"depth": 10}, tmp_path)
    env = json.loads(json_path.read_text())["environment"]
    assert {"torch", "triton", "cuda", "device", "date"} <= set(env)
