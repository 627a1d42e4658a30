"""The reproduction report's generator (``python -m pyeuler.robust.report``): provenance,
worst case over the attacks with AutoAttack, spread in every finding, one section per run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyeuler.data import load
from pyeuler.robust import report
from pyeuler.robust.evaluation import EvalSettings

ROOT = Path(__file__).resolve().parents[1]


def test_difference_is_paired_by_seed_and_says_whether_it_exceeds_the_spread():
    # per-seed differences 2, 4, 6 points: mean 4 > std 2
    assert report.difference({0: 0.52, 1: 0.54, 2: 0.56}, {0: 0.50, 1: 0.50, 2: 0.50}) == (
        "difference +4.0 ± 2.0 points, 3 of 3 seeds positive: exceeds the seed spread")
    # −1, +3 points: mean 1 < std 2.8
    assert report.difference({0: 0.49, 1: 0.53}, {0: 0.50, 1: 0.50}).endswith(
        "1 of 2 seeds positive: within the seed spread")
    assert "one seed: no spread" in report.difference({0: 0.6}, {0: 0.5, 1: 0.4})


def test_provenance_names_the_commit_its_state_and_the_library_versions():
    prov = report.provenance()
    assert {"python", "pyeuler", "torch", "numpy", "scikit-learn", "pyautoattack"} <= set(
        prov["versions"])
    assert prov["versions"]["pyautoattack"] is not None  # the eval extra is installed
    expected = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True)
    if expected.returncode != 0:  # not a git checkout: said so, not guessed
        assert prov["commit"] is None and prov["dirty"] is None
        return
    assert prov["commit"] == expected.stdout.strip()
    assert prov["dirty"] == bool(prov["changes"])


def test_headline_is_the_per_sample_worst_case_over_fgsm_pgd_and_autoattack():
    """evaluate_model on a tiny two-moons classifier: AutoAttack runs on the samples FGSM
    and PGD leave, and the headline is the per-sample minimum over all of them."""
    torch.manual_seed(0)
    data = load("moons", seed=0)
    x, y = data.x_test[:40], data.y_test[:40]
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data.x_train), data.y_train).backward()
        opt.step()
    grid = [0.0, 0.05, 0.1]
    opts = dict(pgd_steps=3, aa_eps=[0.05, 0.1], square_queries=20)
    settings = EvalSettings(seed=0, aa_attacks=["apgd-ce"], square_queries=20,
                            batch_size=len(x))
    out = report.evaluate_model(model, x, y, grid, opts, settings)
    bits = out["per_sample"]
    assert out["fgsm"][0] == out["pgd"][0] == out["worst_fp"][0] == out["clean"]
    for i, e in enumerate(grid[1:], 1):
        key = str(e)
        flags = [c == f == p == a == "1" for c, f, p, a in zip(
            bits["clean"], bits["fgsm"][key], bits["pgd"][key], bits["autoattack"][key])]
        assert out["worst"][key] == pytest.approx(sum(flags) / len(flags))
        left = [c == f == p == "1" for c, f, p in zip(bits["clean"], bits["fgsm"][key],
                                                       bits["pgd"][key])]
        assert out["worst_fp"][i] == pytest.approx(sum(left) / len(left))
        # AutoAttack ran exactly on the samples FGSM and PGD left
        assert [a != "-" for a in bits["autoattack"][key]] == left
        assert out["worst"][key] <= min(out["fgsm"][i], out["pgd"][i], out["worst_fp"][i])


def test_an_autoattack_subset_the_classes_cannot_run_is_refused_before_training(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pyeuler.robust.report", "--data", "moons",
                        "--aa-attacks", "apgd-t", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--aa-attacks" in r.stderr and "4 classes" in r.stderr
    assert not (tmp_path / "figures" / "results.json").exists()


def test_sections_are_kept_and_findings_state_the_spread_over_seeds(tmp_path):
    """From a results.json of two seeds (no training): each section renders on its own,
    every comparison carries mean ± std and its verdict against the seed spread."""
    grid = report.SETTINGS["moons"]["grid"]
    e = str(float(report.SETTINGS["moons"]["eps"]))

    def run(seed, exp, model, h, k, adv, base):
        curve = [base - 0.1 * i for i in range(len(grid))]
        return dict(experiment=exp, data="moons", seed=seed, model=model, h=h, ie_steps=k,
                    adv=adv, norm="group", epochs=1, train_flags=[], grid=grid,
                    train_seconds=1.0, eval_seconds=1.0, clean=base, fgsm=curve, pgd=curve,
                    worst_fp=curve, worst={e: curve[2] - 0.01},
                    **({"pgd_detached_at_eps": curve[2]} if k == 3 else {}))

    runs = []
    for seed in (0, 1, 2):
        runs += [run(seed, "step factor", "mlp-32-32", h, 0, "none", 0.9 + 0.01 * seed
                     + (0.03 if h == 0.1 else 0)) for h in (1.0, 0.1)]
        runs += [run(seed, "IE-Skips", "mlp-32-4", 1.0, k, adv, 0.9 - 0.01 * seed * k)
                 for adv in ("none", "pgd") for k in (0, 1, 3)]
    settings = dict(epochs=1, samples=10, pgd_steps=10, pgd_restarts=1, at_steps=3,
                    eps=0.05, grid=grid, aa_attacks=["apgd-ce"], square_queries=100,
                    aa_note=None, aa_eps=[0.05])
    meta = dict(command="python -m pyeuler.robust.report --data moons", date="today",
                seconds=60.0, machine="test", seeds=[0, 1, 2], settings=settings,
                complete=True, provenance=dict(commit="a" * 40, dirty=False, changes=[],
                                               versions={"torch": "x"}, backend="auto"))
    results = {"format": report.RESULTS_FORMAT, "version": report.RESULTS_VERSION,
               "sections": {"moons": {"meta": meta, "runs": runs}}}
    figdir = tmp_path / "figures"
    figdir.mkdir()
    (figdir / "results.json").write_text(json.dumps(results))
    assert report.main(["--render-only", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "robustness_report.md").read_text()
    assert "## digits" in md and "_Not generated yet" in md  # the other section: a note
    assert f"`{'a' * 40}`, clean working tree" in md
    findings = [ln for ln in md.split("### What it shows (moons)")[1].splitlines()
                if ln.startswith("- ")]
    h_line = next(ln for ln in findings if "h = 0.1 vs h = 1" in ln)
    # h = 0.1 is 3 points above h = 1 in every seed: a difference with no spread
    assert "difference +3.0 ± 0.0 points, 3 of 3 seeds positive: exceeds the seed spread" \
        in h_line
    for line in findings:
        if " vs " in line:
            assert "±" in line and ("within the seed spread" in line
                                    or "exceeds the seed spread" in line), line
    assert (figdir / "moons_step_factor.png").exists()


def test_the_dense_stability_sentence_follows_the_method_the_run_used():
    """A stability section run before the dense method took singular values directly says
    its values are exact up to the iteration tolerance; one run since says exact."""
    from pyeuler.robust.report import dense_method_sentence

    assert "up to the iteration tolerance 1e-05" in dense_method_sentence({"tol": 1e-5})
    now = dense_method_sentence({"tol": 1e-5, "dense": "svdvals"})
    assert "svdvals" in now and "tolerance" not in now
