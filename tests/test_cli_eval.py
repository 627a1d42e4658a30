"""``pyeuler eval`` through subprocesses, as a user runs it: AutoAttack, L2 and C&W columns,
the worst case, the masking verdict, the three output files, resumption, errors."""

import json
import subprocess
import sys

import pytest


def pyeuler(*argv, cwd=None):
    return subprocess.run([sys.executable, "-m", "pyeuler", *argv, "--threads", "1"],
                          capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def moons_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("moons")
    done = pyeuler("train", "--data", "moons", "--epochs", "2", "--ie-steps", "1",
                   "--eval-samples", "16", "--out", str(out), "--no-progress")
    assert done.returncode == 0, done.stdout + done.stderr
    (ckpt,) = out.glob("moons-mlp-K1-*.pt")
    return ckpt


ARGS = ["--attack", "fgsm", "pgd-5", "pgd-5-l2", "cw", "--eps", "0.05", "0.1", "--eps-l2",
        "0.1", "--samples", "32", "--cw-steps", "10", "--no-progress"]


def test_eval_reports_worst_case_and_cw_writes_three_files_and_resumes(moons_checkpoint,
                                                                       tmp_path):
    out = tmp_path / "e.json"
    done = pyeuler("eval", "--checkpoint", str(moons_checkpoint), *ARGS, "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout
    assert "**worst case**" in text and "| L∞ | 0.1 |" in text and "| L2 | 0.1 |" in text
    assert "C&W L2 (c=10, 10 Adam steps" in text and "median L2 distortion" in text
    res = json.loads(out.read_text())
    assert res["samples"] == 32
    r = res["results"]
    for e in ("0.05", "0.1"):
        assert r["worst_case"]["Linf"][e] <= min(r[a][e] for a in ("fgsm", "pgd-5"))
    assert r["worst_case_attacks"] == {"Linf": ["fgsm", "pgd-5"], "L2": ["pgd-5-l2", "cw"]}
    assert set(r["cw"]) >= {"success_rate", "median_l2", "attacked"}
    assert len(res["per_sample"]["pgd-5-l2"]["0.1"]) == 32
    assert len(res["per_sample"]["cw"]["l2"]) == 32
    assert "**worst case**" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    # the same command again resumes from the saved per-sample results: same numbers
    again = pyeuler("eval", "--checkpoint", str(moons_checkpoint), *ARGS, "--json", str(out))
    assert again.returncode == 0, again.stderr
    assert "resuming the evaluation saved in" in again.stdout
    assert json.loads(out.read_text())["per_sample"] == res["per_sample"]


def test_eval_autoattack_and_masking_verdict(moons_checkpoint, tmp_path):
    out = tmp_path / "m.json"
    done = pyeuler("eval", "--checkpoint", str(moons_checkpoint), "--attack", "pgd-5",
                   "autoattack", "--aa-attacks", "apgd-ce", "--eps", "0.1", "--samples", "16",
                   "--check-masking", "--square-queries", "20", "--json", str(out),
                   "--no-progress")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gradient masking: " in done.stdout
    res = json.loads(out.read_text())
    r = res["results"]
    assert r["worst_case"]["Linf"]["0.1"] <= min(r["pgd-5"]["0.1"], r["autoattack"]["0.1"])
    names = [c["name"] for c in res["masking"]["checks"]]
    assert names == ["exact_vs_detached", "black_box_vs_white", "monotone_in_steps",
                     "monotone_in_eps", "unbounded_eps"]
    assert res["masking"]["checks"][0]["status"] != "n/a"  # an IE model: both gradients ran
    assert "| masking check |" in out.with_suffix(".md").read_text()


def test_markdown_says_when_few_classes_changed_autoattack():
    from pyeuler.cli.eval import markdown_report
    from pyeuler.robust import autoattack_plan

    note = autoattack_plan(2)[2]
    payload = {"model": "mlp", "model_kwargs": {}, "data": "moons", "samples": 4,
               "attacks": ["autoattack"], "eps": [0.1], "eps_l2": [], "notes": [note],
               "settings": {}, "results": {"clean": 1.0, "autoattack": {"0.1": 0.5},
                                           "worst_case": {"Linf": {"0.1": 0.5}}}}
    text = markdown_report(payload)
    assert "2 classes are too few" in text and "apgd-ce + square" in text
    assert "| L∞ | 0.1 | 100.0 | **50.0** | 50.0 |" in text


@pytest.mark.parametrize("argv, message", [
    (["--attack", "deepfool"], "--attack: attack: unknown attack 'deepfool'"),
    (["--attack", "fgsm", "FGSM"], "listed twice"),
    (["--restarts", "3", "--no-random-start"], "--restarts"),
    (["--attack", "autoattack", "--aa-attacks", "apgd-t"], "need at least 4 classes"),
])
def test_bad_options_exit_2_with_a_message(moons_checkpoint, argv, message):
    done = pyeuler("eval", "--checkpoint", str(moons_checkpoint), *argv, "--no-progress")
    assert done.returncode == 2 and message in done.stderr, done.stderr
