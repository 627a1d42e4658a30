"""Per-sample robust evaluation: the worst case is the per-sample minimum, every column is
the attack run on its own, C&W is an L2 distortion, and an interrupted run resumes to the
same results."""

import json

import pytest
import torch

from pyeuler.robust import (EvalSettings, cw, fgsm, parse_attack, per_sample, pgd,
                            robust_evaluation, worst_case)
from tests.test_attacks import trained_digits_mlp  # noqa: F401  (fixture)


def test_worst_case_is_the_per_sample_minimum():
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(200, generator=g) < 0.9
    attacks = [torch.rand(200, generator=g) < p for p in (0.8, 0.6, 0.7)]
    expected = torch.stack([clean] + attacks).int().min(0).values.bool()
    assert torch.equal(worst_case(clean, attacks), expected)
    assert torch.equal(worst_case(clean, []), clean)
    with pytest.raises(ValueError, match="attacks"):
        worst_case(clean, [clean[:10]])


@pytest.mark.parametrize("name, expected", [
    ("fgsm", ("fgsm", "fgsm", "Linf", 0, False)),
    ("PGD", ("pgd-20", "pgd", "Linf", 20, False)),
    ("pgd-50-l2-t", ("pgd-50-l2-t", "pgd", "L2", 50, True)),
    ("autoattack-l2", ("autoattack-l2", "autoattack", "L2", 0, False)),
    ("square", ("square", "square", "Linf", 0, False)),
    ("cw", ("cw", "cw", None, 0, False)),
])
def test_parse_attack(name, expected):
    spec = parse_attack(name)
    assert (spec.name, spec.kind, spec.norm, spec.steps, spec.targeted) == expected
    assert spec.white_box == (spec.kind != "square")


@pytest.mark.parametrize("bad", ["pgd-0", "deepfool", "pgd-5-l1"])
def test_parse_attack_refuses(bad):
    with pytest.raises(ValueError, match="attack"):
        parse_attack(bad)


ATTACKS = ["fgsm", "pgd-5", "pgd-5-l2", "pgd-3-t", "cw"]


def evaluate(model, x, y, **kwargs):
    settings = EvalSettings(batch_size=32, targets=2, cw_steps=20, cw_lr=0.05, restarts=2)
    return robust_evaluation(model, x, y, ATTACKS, eps=[0.05, 0.1], eps_l2=[0.5, 1.0],
                             settings=settings, **kwargs)


def test_columns_worst_case_and_cw(trained_digits_mlp):  # noqa: F811
    model, x, y = trained_digits_mlp
    x, y = x[:80], y[:80]
    state = evaluate(model, x, y)
    res = state["results"]
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        fgsm_ok = model(fgsm(model, x, y, 0.1)).argmax(1) == y
    assert torch.equal(per_sample(state, "clean"), clean)
    assert torch.equal(per_sample(state, "fgsm", 0.1), fgsm_ok)  # an independent run
    assert res["fgsm"]["0.1"] == pytest.approx(fgsm_ok.float().mean().item())
    # the headline: per-sample minimum over clean and every L∞ attack
    for e in (0.05, 0.1):
        columns = [per_sample(state, a, e) for a in ("fgsm", "pgd-5", "pgd-3-t")]
        expected = torch.stack([clean] + columns).int().min(0).values.float().mean().item()
        assert res["worst_case"]["Linf"][str(e)] == pytest.approx(expected)
        assert res["worst_case"]["Linf"][str(e)] <= min(res[a][str(e)] for a in
                                                        ("fgsm", "pgd-5", "pgd-3-t"))
    assert res["worst_case_attacks"] == {"Linf": ["fgsm", "pgd-5", "pgd-3-t"],
                                         "L2": ["pgd-5-l2", "cw"]}
    # C&W: an L2 distortion, recomputed from an independent call on the same batches
    l2 = per_sample(state, "cw")
    adv = torch.cat([cw(model, x[i:i + 32], y[i:i + 32], c=10, steps=20, lr=0.05)
                     for i in range(0, 80, 32)])
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    assert torch.equal(torch.isfinite(l2), fooled)
    hits = l2[clean & fooled]
    assert res["cw"]["success_rate"] == pytest.approx(len(hits) / int(clean.sum()))
    assert res["cw"]["median_l2"] == pytest.approx(hits.median().item())
    l2_worst = worst_case(clean, [per_sample(state, "pgd-5-l2", 0.5), ~(l2 <= 0.5)])
    assert res["worst_case"]["L2"]["0.5"] == pytest.approx(l2_worst.float().mean().item())
    assert "cw" not in res["worst_case_attacks"]["Linf"]


def test_interrupted_evaluation_resumes_to_the_same_results(trained_digits_mlp):  # noqa: F811
    model, x, y = trained_digits_mlp
    x, y = x[:80], y[:80]
    full = evaluate(model, x, y)
    calls = []

    def stop_after_four(state):  # 3 clean batches, then one of FGSM
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt

    partial = {}
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, x, y, state=partial, on_batch=stop_after_four)
    partial = json.loads(json.dumps(partial))  # as saved to and read from disk
    assert len(partial["per_sample"]["fgsm"]["0.05"]) == 32  # stopped mid-attack
    resumed = evaluate(model, x, y, state=partial)
    assert resumed["per_sample"] == json.loads(json.dumps(full["per_sample"]))
    assert resumed["results"] == full["results"]


def test_pgd_with_restarts_in_the_evaluation_is_seeded_per_batch(trained_digits_mlp):  # noqa: F811
    model, x, y = trained_digits_mlp
    x, y = x[:32], y[:32]
    settings = EvalSettings(batch_size=32, restarts=2, seed=7)
    state = robust_evaluation(model, x, y, ["pgd-5"], eps=[0.1], settings=settings)
    g = torch.Generator().manual_seed(7 * 1_000_003 + 0)
    adv = pgd(model, x, y, 0.1, 0.05, 5, generator=g, restarts=2)
    with torch.no_grad():
        assert torch.equal(per_sample(state, "pgd-5", 0.1), model(adv).argmax(1) == y)
    assert state["results"]["worst_case"]["Linf"]["0.1"] <= state["results"]["pgd-5"]["0.1"]
