"""Adversarial training losses, loops, evaluation and the gradient-masking warning."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pyeuler.robust import (GradientMaskingWarning, accuracy, evaluate, pgd, pgd_at_loss,
                            trades_adversarial, trades_loss, train_epoch,
                            uses_detached_ie_gradients)


def mlp(seed=0, in_features=2, classes=2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_features, 32), nn.ReLU(), nn.Linear(32, classes))


def points(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g)
    return x, (x[:, 0] > x[:, 1]).long()


def test_trades_loss_equals_its_formula():
    model = mlp()
    x, y = points()
    x_adv = torch.clamp(x + 0.05 * torch.randn_like(x), 0, 1)
    loss, logits = trades_loss(model, x, y, beta=6.0, x_adv=x_adv)
    p = F.softmax(model(x), 1)
    q = F.softmax(model(x_adv), 1)
    ce = -torch.log(p[torch.arange(len(y)), y]).mean()
    kl = (p * (p.log() - q.log())).sum(1).mean()
    assert torch.allclose(loss, ce + 6.0 * kl, rtol=1e-5, atol=1e-6)
    assert torch.allclose(logits, model(x))
    assert kl > 0  # the test is not vacuous
    # beta = 0 is plain cross entropy; x_adv = x gives zero KL
    assert torch.allclose(trades_loss(model, x, y, beta=0.0, x_adv=x_adv)[0], ce)
    assert torch.allclose(trades_loss(model, x, y, beta=6.0, x_adv=x)[0], ce, atol=1e-6)


def test_trades_adversarial_increases_kl_within_ball():
    model = mlp()
    x, _ = points()
    eps = 0.1
    adv = trades_adversarial(model, x, eps=eps, alpha=0.02, steps=10)
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        p = F.log_softmax(model(x), 1)
        kl = lambda z: F.kl_div(F.log_softmax(model(z), 1), p, reduction="sum", log_target=True)
        assert kl(adv) > kl(torch.clamp(x + eps * torch.sign(torch.randn_like(x)), 0, 1))


def test_pgd_at_loss_is_cross_entropy_on_pgd_examples():
    model = mlp()
    x, y = points()
    loss0, _ = pgd_at_loss(model, x, y, eps=0.0, alpha=0.0, steps=3)
    assert torch.allclose(loss0, F.cross_entropy(model(x), y))
    loss, logits = pgd_at_loss(model, x, y, eps=0.1, alpha=0.025, steps=10)
    assert loss > loss0
    assert torch.allclose(loss, F.cross_entropy(logits, y))


@pytest.mark.parametrize("adv", ["none", "pgd", "trades"])
def test_train_epoch_learns(adv):
    model = mlp()
    x, y = points(256)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    first = train_epoch(model, x, y, opt, batch_size=64, adv=adv, eps=0.03, steps=3,
                        generator=g, progress=False)
    for _ in range(15):
        last = train_epoch(model, x, y, opt, batch_size=64, adv=adv, eps=0.03, steps=3,
                           generator=g, progress=False)
    assert last.samples == 256 and last.loss < first.loss
    assert accuracy(model, x, y) > 0.85
    assert model.training


def test_pgd_training_beats_natural_training_under_attack():
    from pyeuler.data import load_digits
    d = load_digits(seed=0)
    eps = 0.1
    results = {}
    for adv in ("none", "pgd"):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64),
                              nn.ReLU(), nn.Linear(64, 10))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(10):
            train_epoch(model, d.x_train, d.y_train, opt, batch_size=64, adv=adv, eps=eps,
                        steps=5, generator=g, progress=False)
        atk = lambda m, xb, yb: pgd(m, xb, yb, eps, eps / 4, 10, random_start=False)
        results[adv] = (accuracy(model, d.x_test, d.y_test),
                        accuracy(model, d.x_test, d.y_test, attack=atk))
    assert results["none"][0] > 0.9 and results["pgd"][0] > 0.9, results
    assert results["pgd"][1] > results["none"][1] + 0.15, results


def test_train_epoch_rejects_bad_adv():
    with pytest.raises(ValueError, match="adv"):
        train_epoch(mlp(), *points(), torch.optim.SGD(mlp().parameters(), lr=0.1), adv="fgsm")
    with pytest.raises(ValueError, match="batch_size"):
        train_epoch(mlp(), *points(), torch.optim.SGD(mlp().parameters(), lr=0.1), batch_size=0)


class FakeIE(nn.Module):
    """Stands in for an IE-Skip: exposes .grad and .steps like pyeuler's IE modules."""

    def __init__(self, grad, steps):
        super().__init__()
        self.grad, self.steps = grad, steps
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("grad, steps, masked", [
    ("detached", 1, True), ("detached", 0, False), ("unrolled", 3, False), ("implicit", 1, False)])
def test_gradient_masking_warning(grad, steps, masked):
    model = nn.Sequential(FakeIE(grad, steps), nn.ReLU(), nn.Linear(2, 2))
    x, y = points(32)
    assert uses_detached_ie_gradients(model) is masked
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = evaluate(model, x, y, attacks=["fgsm"], eps=[0.05])
    assert any(issubclass(i.category, GradientMaskingWarning) for i in w) is masked
    assert set(res) == {"clean", "fgsm"} and set(res["fgsm"]) == {0.05}


def test_evaluate_structure_and_monotone_in_eps():
    model = mlp()
    x, y = points(128)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        train_epoch(model, x, y, opt, batch_size=32, progress=False)
    res = evaluate(model, x, y, attacks=["fgsm", "pgd-10", "cw"], eps=[0.0, 0.05, 0.2],
                   random_start=False)
    assert res["fgsm"][0.0] == res["clean"] == res["pgd-10"][0.0]
    assert res["pgd-10"][0.2] <= res["pgd-10"][0.05] <= res["clean"]
    assert 0 <= res["cw"] <= res["clean"]


def test_make_optimizer_builds_sgd_and_adam_and_names_a_bad_choice():
    from pyeuler.robust import make_optimizer

    w = torch.nn.Parameter(torch.ones(3))
    sgd = make_optimizer("sgd", [w], lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 1e-4)
    assert not group["fused"]  # CPU parameters: torch's default update
    assert isinstance(make_optimizer("adam", [w], lr=1e-3), torch.optim.Adam)
    assert make_optimizer("sgd", [w], lr=0.1, fused=True).param_groups[0]["fused"]
    with pytest.raises(ValueError, match="optimizer.*'lamb'"):
        make_optimizer("lamb", [w], lr=0.1)


def test_fused_sgd_takes_the_same_step_as_the_default():
    """fused=True changes the kernels, not the update: the same parameters after three steps."""
    from pyeuler.robust import make_optimizer

    torch.manual_seed(0)
    start, grads = torch.randn(10), [torch.randn(10) for _ in range(3)]
    results = []
    for fused in (False, True):
        w = torch.nn.Parameter(start.clone())
        opt = make_optimizer("sgd", [w], lr=0.1, momentum=0.9, weight_decay=1e-3, fused=fused)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        results.append(w.detach())
    torch.testing.assert_close(results[1], results[0])


def test_make_optimizer_takes_groups_and_named_parameters_and_names_bad_arguments():
    from pyeuler.robust import make_optimizer

    w, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(3))
    grouped = make_optimizer("sgd", [{"params": [w]}, {"params": [b], "lr": 0.01}], lr=0.1)
    assert [g["lr"] for g in grouped.param_groups] == [0.1, 0.01]
    named = make_optimizer("adam", torch.nn.Linear(2, 2).named_parameters(), lr=1e-3)
    assert len(named.param_groups[0]["params"]) == 2
    for kwargs, error, match in [
            (dict(lr="0.1"), TypeError, "lr must be a number, got str"),
            (dict(lr=float("nan")), ValueError, "lr must be finite and >= 0"),
            (dict(lr=0.1, momentum=-0.9), ValueError, "momentum must be finite and >= 0"),
            (dict(lr=0.1, weight_decay=True), TypeError, "weight_decay must be a number"),
            (dict(lr=0.1, fused="yes"), TypeError, "fused must be True, False or None")]:
        with pytest.raises(error, match=match):
            make_optimizer("sgd", [w], **kwargs)
    with pytest.raises(ValueError, match="parameters: the optimizer got none"):
        make_optimizer("sgd", iter([]), lr=0.1)


@pytest.mark.parametrize("name", ["sgd", "adam"])
@pytest.mark.parametrize("saved_fused,own_fused", [(False, True), (True, False)])
def test_load_optimizer_state_keeps_the_runs_own_kernels(name, saved_fused, own_fused):
    """Resuming restores what the optimizer learnt (momentum, Adam's moments and step
    counts) but not how the checkpoint's run stepped: a fused optimizer stays fused."""
    from pyeuler.robust import load_optimizer_state, make_optimizer

    torch.manual_seed(0)
    start, grads = torch.randn(5), [torch.randn(5) for _ in range(3)]

    def trained(fused, steps):
        w = torch.nn.Parameter(start.clone())
        opt = make_optimizer(name, [w], lr=0.1, momentum=0.9, fused=fused)
        for g in grads[:steps]:
            w.grad = g.clone()
            opt.step()
        return w, opt

    _, saved = trained(saved_fused, 2)
    w, resumed = trained(own_fused, 0)
    with torch.no_grad():
        w.copy_(saved.param_groups[0]["params"][0])
    load_optimizer_state(resumed, saved.state_dict())
    assert bool(resumed.param_groups[0]["fused"]) == own_fused
    w.grad = grads[2].clone()
    resumed.step()  # Adam's step counts were placed for this run's kernels
    uninterrupted, _ = trained(own_fused, 3)
    torch.testing.assert_close(w.detach(), uninterrupted.detach())
