"""Attacks: constraints, strength ordering, torchattacks parity, input checks."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pyeuler.robust import cw, default_alpha, eval_mode, fgsm, make_attack, pgd


def small_cnn(seed=0, offset=0.0):
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 6, 3, padding=1)
            self.bn = nn.BatchNorm2d(6)
            self.fc = nn.Linear(6 * 8 * 8, 10)
            self.offset = offset

        def forward(self, x):
            return self.fc(F.relu(self.bn(self.conv(x))).flatten(1)) + self.offset

    net = Net()
    with torch.no_grad():  # non-trivial running stats so eval vs train mode differ
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


def batch(n=16, seed=1, lo=0.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


@pytest.fixture(scope="module")
def trained_digits_mlp():
    from pyeuler.data import load_digits
    d = load_digits(seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        for i in range(0, len(d.x_train), 128):
            loss = F.cross_entropy(model(d.x_train[i:i + 128]), d.y_train[i:i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), d.x_test[:200], d.y_test[:200]


@pytest.mark.parametrize("eps", [0.0, 0.03, 0.3])
def test_linf_attacks_stay_in_ball_and_box(eps):
    model = small_cnn()
    x, y = batch()
    for adv in (fgsm(model, x, y, eps), pgd(model, x, y, eps, eps / 4, 5),
                pgd(model, x, y, eps, eps / 4, 5, random_start=False)):
        assert adv.shape == x.shape and adv.dtype == x.dtype
        assert adv.min() >= 0 and adv.max() <= 1
        assert (adv - x).abs().max() <= eps + 1e-6
    if eps > 0:  # FGSM moves every pixel that is not clipped by exactly eps
        d = (fgsm(model, x, y, eps) - x).abs()
        inside = (x > eps) & (x < 1 - eps)
        assert torch.allclose(d[inside], torch.full_like(d[inside], eps), atol=1e-6)


def test_cw_stays_in_box_and_returns_originals_when_it_fails():
    model = small_cnn()
    x, y = batch()
    adv = cw(model, x, y, c=10, steps=20, lr=0.05)
    assert adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        wrong = model.eval()(adv).argmax(1) != y
        orig_wrong = model(x).argmax(1) != y
    changed = (adv != x).flatten(1).any(1)
    # any sample CW changed is misclassified; unchanged ones were not fooled (or were
    # misclassified already; CW still records them at distance 0)
    assert bool(wrong[changed].all())
    assert bool(((~changed) & ~orig_wrong).eq(~changed & ~wrong).all())


def test_attacks_are_stronger_than_clean_and_pgd_beats_fgsm(trained_digits_mlp):
    model, x, y = trained_digits_mlp
    eps = 0.1
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
        acc_f = (model(fgsm(model, x, y, eps)).argmax(1) == y).float().mean().item()
        torch.manual_seed(0)
        acc_p = (model(pgd(model, x, y, eps, default_alpha(eps, 20), 20)).argmax(1) == y
                 ).float().mean().item()
        acc_cw = (model(cw(model, x, y, c=10, steps=50, lr=0.01)).argmax(1) == y
                  ).float().mean().item()
    assert clean > 0.9
    assert acc_f < clean - 0.1
    assert acc_p <= acc_f
    assert acc_p < clean - 0.3
    assert acc_cw < clean


def test_attack_restores_train_mode_and_leaves_param_grads_alone():
    model = small_cnn().train()
    x, y = batch()
    stats = model.bn.running_mean.clone()
    pgd(model, x, y, 0.1, 0.02, 3)
    cw(model, x, y, steps=3)
    assert model.training and model.bn.training
    assert torch.equal(model.bn.running_mean, stats)  # attacked in eval mode
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training


def test_pgd_zero_steps_no_start_is_identity_and_seeded_start_reproducible():
    model = small_cnn()
    x, y = batch()
    assert torch.equal(pgd(model, x, y, 0.1, 0.01, 0, random_start=False), x)
    a = pgd(model, x, y, 0.1, 0.01, 2, generator=torch.Generator().manual_seed(3))
    b = pgd(model, x, y, 0.1, 0.01, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_float64_inputs_stay_float64():
    model = small_cnn().double()
    x, y = batch()
    assert fgsm(model, x.double(), y, 0.1).dtype == torch.float64


@pytest.mark.parametrize("call, match", [
    (lambda m, x, y: fgsm(m, x * 2, y, 0.1), "x: attacks expect inputs in"),
    (lambda m, x, y: fgsm(m, x, y, -0.1), "eps"),
    (lambda m, x, y: fgsm(m, x, y.float(), 0.1), "y: expected an int64"),
    (lambda m, x, y: fgsm(m, x, y[:3], 0.1), "y: expected shape"),
    (lambda m, x, y: pgd(m, x, y, 0.1, 0.01, -1), "steps"),
    (lambda m, x, y: pgd(m, x, y, 0.1, float("nan"), 3), "alpha"),
    (lambda m, x, y: cw(m, x, y, c=-1), "c: must be >= 0"),
    (lambda m, x, y: fgsm(m, (x * 255).to(torch.uint8), y, 0.1), "x: expected a floating"),
])
def test_bad_inputs_name_the_argument(call, match):
    x, y = batch(4)
    with pytest.raises((ValueError, TypeError), match=match):
        call(small_cnn(), x, y)


def test_make_attack_by_name():
    model = small_cnn()
    x, y = batch()
    assert make_attack("none") is None
    assert torch.equal(make_attack("fgsm", eps=0.1)(model, x, y), fgsm(model, x, y, 0.1))
    a = make_attack("pgd-7", eps=0.1, random_start=False)(model, x, y)
    assert torch.equal(a, pgd(model, x, y, 0.1, default_alpha(0.1, 7), 7, random_start=False))
    for bad in ("pgd-0", "pgd-x", "deepfool"):
        with pytest.raises(ValueError, match="attack"):
            make_attack(bad, eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        make_attack("fgsm")


# ----------------------------------------------------------------- torchattacks parity

def test_fgsm_pgd_match_torchattacks():
    ta = pytest.importorskip("torchattacks")
    model = small_cnn().train()  # torchattacks and pyeuler both attack in eval mode
    x, y = batch(32)
    ours = fgsm(model, x, y, 8 / 255)
    theirs = ta.FGSM(model, eps=8 / 255)(x, y)
    assert torch.equal(ours, theirs)
    ours = pgd(model, x, y, 0.1, 0.01, 10, random_start=False)
    theirs = ta.PGD(model, eps=0.1, alpha=0.01, steps=10, random_start=False)(x, y)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    assert (ours - x).abs().max() > 0.05  # the attack really moved


def test_cw_matches_torchattacks_where_its_margin_is_correct():
    ta = pytest.importorskip("torchattacks")
    # torchattacks computes max_{j != y} Z_j as max((1 - onehot) * Z), which is wrong when
    # every other logit is negative; a positive logit offset makes both formulas agree.
    # Inputs inside (0, 1) (torchattacks freezes pixels at exactly 0 or 1, and so do we).
    model = small_cnn(offset=50.0).eval()
    x, y = batch(16, lo=0.05, hi=0.95)
    ours = cw(model, x, y, c=10, steps=30, lr=0.05)
    theirs = ta.CW(model, c=10, kappa=0, steps=30, lr=0.05)(x, y)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    assert (ours != x).any()


# ----------------------------------------------------------------- L2, targeted, restarts

@pytest.mark.parametrize("eps", [0.0, 0.3, 2.0])
def test_l2_pgd_stays_in_ball_and_box(eps):
    model = small_cnn()
    x, y = batch()
    for random_start in (True, False):
        adv = pgd(model, x, y, eps, eps / 4, 5, random_start, norm="L2")
        assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
        assert (adv - x).flatten(1).norm(dim=1).max() <= eps + 1e-5


def test_l2_and_targeted_pgd_match_torchattacks():
    ta = pytest.importorskip("torchattacks")
    model = small_cnn().train()
    x, y = batch(32)
    ours = pgd(model, x, y, 1.0, 0.2, 10, random_start=False, norm="L2")
    theirs = ta.PGDL2(model, eps=1.0, alpha=0.2, steps=10, random_start=False)(x, y)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    assert (ours - x).flatten(1).norm(dim=1).max() > 0.5
    target = (y + 1) % 10
    ours = pgd(model, x, target, 0.1, 0.01, 10, random_start=False, targeted=True)
    attack = ta.PGD(model, eps=0.1, alpha=0.01, steps=10, random_start=False)
    attack.set_mode_targeted_by_label(quiet=True)
    assert torch.allclose(ours, attack(x, target), atol=1e-6, rtol=0)


def test_targeted_pgd_reaches_the_target(trained_digits_mlp):
    model, x, y = trained_digits_mlp
    target = (y + 3) % 10
    adv = pgd(model, x, target, 0.3, 0.03, 20, random_start=False, targeted=True)
    with torch.no_grad():
        hit = (model(adv).argmax(1) == target).float().mean().item()
    assert hit > 0.8


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_restarts_break_every_sample_any_single_run_breaks(trained_digits_mlp, norm):
    """restarts=3 == per sample, the first of three runs (same generator stream) that
    misclassifies; an independent recomputation from three single runs."""
    model, x, y = trained_digits_mlp
    eps = 0.08 if norm == "Linf" else 0.6
    g = torch.Generator().manual_seed(5)
    singles = [pgd(model, x, y, eps, eps / 4, 3, generator=g, norm=norm) for _ in range(3)]
    combined = pgd(model, x, y, eps, eps / 4, 3, generator=torch.Generator().manual_seed(5),
                   norm=norm, restarts=3)
    with torch.no_grad():
        broken = torch.stack([model(a).argmax(1) != y for a in singles])
        assert torch.equal(model(combined).argmax(1) != y, broken.any(0))
    first = broken.float().argmax(0)  # index of the first run that broke the sample
    for i in torch.nonzero(broken.any(0)).flatten().tolist():
        assert torch.equal(combined[i], singles[first[i]][i])
    assert broken.any(0).sum() > broken[0].sum()  # restarts found more than one run


@pytest.mark.parametrize("kwargs, match", [
    (dict(restarts=0), "restarts"),
    (dict(restarts=2, random_start=False), "restarts"),
    (dict(norm="L1"), "norm"),
])
def test_pgd_bad_options_name_the_argument(kwargs, match):
    x, y = batch(4)
    with pytest.raises(ValueError, match=match):
        pgd(small_cnn(), x, y, 0.1, 0.01, 2, **kwargs)
