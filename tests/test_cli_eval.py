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


# --- successive runs on one checkpoint: merged per sample set, --grad as its own attack ---

MERGE = ["--eps", "0.2", "--no-progress"]


def _all_sample_sets(res):
    yield res["sample_set"], res
    yield from res.get("other_sample_sets", {}).items()


def _check_worst_case_is_the_per_sample_minimum(res):
    """In every sample set of the file: the worst case at each ε is the per-sample AND of
    clean and every complete record at that ε, so never above any attack's accuracy."""
    for label, entry in _all_sample_sets(res):
        n, ps, r = entry["samples"], entry["per_sample"], entry["results"]
        assert len(ps["clean"]) == n, label
        for e, worst in r["worst_case"]["Linf"].items():
            attacks = r["worst_case_attacks"]["Linf"]
            assert set(attacks) == {a for a in ps if a != "clean" and e in ps[a]}
            robust = [all([ps["clean"][i]] + [ps[a][e][i] for a in attacks]) for i in range(n)]
            assert worst == pytest.approx(sum(robust) / n), label
            assert all(worst <= r[a][e] + 1e-9 for a in attacks), label


@pytest.fixture(scope="module")
def merged_runs(moons_checkpoint, tmp_path_factory):
    """fgsm on 24 samples, then pgd-5 on them, then pgd-5 on 12 samples, then pgd-5 with
    detached IE gradients on the 24 again: the file (and stdout, .md) after each run."""
    out = tmp_path_factory.mktemp("merge") / "e.json"
    steps = [["--attack", "fgsm", "--samples", "24"], ["--attack", "pgd-5", "--samples", "24"],
             ["--attack", "pgd-5", "--samples", "12"],
             ["--attack", "pgd-5", "--samples", "24", "--grad", "detached"]]
    snapshots = []
    for argv in steps:
        done = pyeuler("eval", "--checkpoint", str(moons_checkpoint), *argv, *MERGE,
                       "--json", str(out))
        assert done.returncode == 0, done.stdout + done.stderr
        snapshots.append((json.loads(out.read_text()), done.stdout,
                          out.with_suffix(".md").read_text()))
    return snapshots


def test_a_second_attack_on_the_same_samples_merges_per_sample(merged_runs):
    (first, _, _), (res, stdout, md) = merged_runs[:2]
    assert res["attacks"] == ["fgsm", "pgd-5"] and res["samples"] == 24
    assert set(res["per_sample"]) == {"clean", "fgsm", "pgd-5"}
    assert res["per_sample"]["fgsm"] == first["per_sample"]["fgsm"]  # kept, not re-measured
    assert "resuming" not in stdout and "other_sample_sets" not in res
    assert res["results"]["worst_case_attacks"] == {"Linf": ["fgsm", "pgd-5"]}
    _check_worst_case_is_the_per_sample_minimum(res)
    worst = res["results"]["worst_case"]["Linf"]["0.2"]
    row = (f"| L∞ | 0.2 | {100 * res['results']['clean']:.1f} | **{100 * worst:.1f}** | "
           f"{100 * res['results']['fgsm']['0.2']:.1f} | {100 * res['results']['pgd-5']['0.2']:.1f} |")
    assert "| **worst case** | fgsm | pgd-5 |" in md and row in md and row in stdout
    assert [run["attacks"] for run in res["runs"]] == [["fgsm"], ["pgd-5"]]
    assert all("worst_case" not in run["results"] for run in res["runs"])


def test_results_on_other_samples_are_kept_apart_and_labelled(merged_runs):
    (before, _, _), (res, stdout, md) = merged_runs[1], merged_runs[2]
    assert res["samples"] == 12 and res["sample_set"].startswith("moons test[0:12] sha256:")
    assert res["attacks"] == ["pgd-5"] and set(res["per_sample"]) == {"clean", "pgd-5"}
    assert res["results"]["worst_case_attacks"] == {"Linf": ["pgd-5"]}
    (label, other), = res["other_sample_sets"].items()
    assert label == before["sample_set"] and label.startswith("moons test[0:24] sha256:")
    assert other["per_sample"] == before["per_sample"] and other["results"] == before["results"]
    assert 'kept apart under "other_sample_sets"' in stdout and label in stdout
    assert f"Other samples, 24 ({label}), not in the tables above" in md
    assert [run["sample_set"] for run in res["runs"]] == [label, label, res["sample_set"]]
    _check_worst_case_is_the_per_sample_minimum(res)


def test_another_grad_is_another_attack_beside_the_others(merged_runs):
    (before, _, _), (res, stdout, md) = merged_runs[1], merged_runs[3]
    assert "replaced" not in stdout and res["sample_set"] == before["sample_set"]
    assert res["attacks"] == ["fgsm", "pgd-5", "pgd-5@detached"]
    assert res["model_kwargs"] == before["model_kwargs"]  # the checkpoint's, not --grad's
    assert res["model_kwargs"].get("grad", "unrolled") == "unrolled"
    for a in ("fgsm", "pgd-5"):
        assert res["per_sample"][a] == before["per_sample"][a]
    assert res["results"]["worst_case_attacks"] == {"Linf": ["fgsm", "pgd-5", "pgd-5@detached"]}
    _check_worst_case_is_the_per_sample_minimum(res)
    assert "| fgsm | pgd-5 | pgd-5@detached |" in md
    assert [run["grad"] for run in res["runs"]] == ["unrolled"] * 3 + ["detached"]
    assert list(res["other_sample_sets"]) == [merged_runs[2][0]["sample_set"]]


def _records(flags_by_attack, clean):
    return {"clean": clean, **{a: {"0.1": f} for a, f in flags_by_attack.items()}}


def test_summarize_records_takes_the_per_sample_minimum_over_every_record():
    from pyeuler.cli._results import summarize_records

    ps = _records({"fgsm": [1, 1, 0, 1], "pgd-5@detached": [1, 0, 1, 1]}, [1, 1, 1, 0])
    ps["pgd-5"] = {"0.1": [0, 1, 1, 1], "0.2": [0, 0, 0, 1]}
    ps["pgd-5-l2"] = {"0.5": [1, 1, 1, 1]}
    ps["cw"] = {"l2": [0.1, None, 0.7, None]}
    r = summarize_records(ps, 4, eps_l2=[0.5])
    assert r["fgsm"] == {"0.1": 0.75} and r["pgd-5"] == {"0.1": 0.75, "0.2": 0.25}
    assert r["worst_case"]["Linf"] == {"0.1": 0.0, "0.2": 0.0}
    assert r["worst_case"]["L2"] == {"0.5": 0.5}  # cw breaks sample 0 within 0.5
    assert r["worst_case_attacks"] == {"Linf": ["fgsm", "pgd-5@detached", "pgd-5"],
                                       "L2": ["pgd-5-l2", "cw"]}
    assert r["worst_case_attacks_by_eps"] == {
        "Linf": {"0.1": ["fgsm", "pgd-5@detached", "pgd-5"], "0.2": ["pgd-5"]}}
    assert r["cw"]["accuracy_at"] == {"0.5": 0.5} and r["cw"]["attacked"] == 3
    # an unfinished record (interrupted run): no worst case at its ε until it is finished
    ps["pgd-5"]["0.2"] = [0, 0]
    r = summarize_records(ps, 4)
    assert r["worst_case"]["Linf"] == {"0.1": 0.0} and r["unfinished"] == {"pgd-5": ["0.2"]}
    assert summarize_records({"clean": [1, 0]}, 4) == {}


def test_merge_keeps_records_per_sample_set_and_replaces_other_weights():
    from pyeuler.cli._results import merge_eval_results

    def payload(samples_set, n, attack, flags, **extra):
        return {"model": "mlp", "epochs": 1, "sample_set": samples_set, "samples": n,
                "attacks": [attack], "eps": [0.1], "eps_l2": [0.5],
                "per_sample": _records({attack: flags}, [1] * n),
                "measured_with": {"clean": "a", attack: {"0.1": "a"}}, **extra}

    merged, note = merge_eval_results(None, payload("A", 4, "fgsm", [1, 1, 0, 1]))
    merged, note = merge_eval_results(merged, payload("A", 4, "pgd-5", [0, 1, 1, 1]))
    assert note is None and merged["attacks"] == ["fgsm", "pgd-5"]
    assert merged["results"]["worst_case"]["Linf"]["0.1"] == 0.5
    merged, note = merge_eval_results(merged, payload("B", 2, "pgd-5", [1, 1]))
    assert merged["sample_set"] == "B" and merged["results"]["worst_case"]["Linf"]["0.1"] == 1
    assert set(merged["per_sample"]) == {"clean", "pgd-5"} and "A" in note
    assert merged["other_sample_sets"]["A"]["results"]["worst_case"]["Linf"]["0.1"] == 0.5
    # back on A: merged into A's records again, B kept apart
    merged, note = merge_eval_results(merged, payload("A", 4, "pgd-5@detached", [1, 0, 1, 1]))
    assert merged["attacks"] == ["fgsm", "pgd-5", "pgd-5@detached"]
    assert merged["results"]["worst_case"]["Linf"]["0.1"] == 0.25
    assert list(merged["other_sample_sets"]) == ["B"] and len(merged["runs"]) == 4
    # results recorded without a sample set (older files) are never mixed with new ones
    legacy = {"model": "mlp", "epochs": 1, "samples": 4, "results": {"clean": 1.0}}
    kept, note = merge_eval_results(legacy, payload("A", 4, "fgsm", [1, 1, 1, 1]))
    assert "data not recorded" in note and kept["results"]["worst_case"]["Linf"]["0.1"] == 1
    # other weights: replaced, and the note says so
    retrained, note = merge_eval_results(merged, payload("A", 4, "fgsm", [1] * 4, epochs=2))
    assert "epochs 1 there, 2 now" in note and "other_sample_sets" not in retrained
    assert retrained["attacks"] == ["fgsm"] and len(retrained["runs"]) == 1


def test_resume_takes_only_records_measured_with_the_same_settings():
    from pyeuler.cli._results import merge_eval_results
    from pyeuler.cli.eval import FORMAT, VERSION, _resumable

    context = {"model": "mlp", "epochs": 1}
    saved = merge_eval_results(None, {
        "format": FORMAT, "version": VERSION, **context, "sample_set": "A", "samples": 2,
        "per_sample": {"clean": [1, 1], "pgd-5": {"0.1": [1, 0]}, "pgd-5@detached":
                       {"0.1": [1]}, "fgsm": {"0.1": [0, 0]}},
        "measured_with": {"clean": "s0", "pgd-5": {"0.1": "s0"}, "pgd-5@detached":
                          {"0.1": "s0"}, "fgsm": {"0.1": "s1"}}})[0]
    state, resumed = _resumable(saved, context, "A", "s0", ["pgd-5", "fgsm"], None, [0.1], [])
    assert resumed and state["per_sample"] == {"clean": [1, 1], "pgd-5": {"0.1": [1, 0]}}
    state, _ = _resumable(saved, context, "A", "s0", ["pgd-5"], "detached", [0.1], [])
    assert state["per_sample"]["pgd-5"] == {"0.1": [1]}  # the unfinished detached record
    assert _resumable(saved, context, "B", "s0", ["pgd-5"], None, [0.1], [])[1] is False
    assert _resumable(saved, dict(context, epochs=2), "A", "s0", ["pgd-5"], None, [0.1],
                      [])[1] is False
