"""AutoAttack through the pyautoattack package: the same results as calling it directly.

pyautoattack is imported unconditionally: CI installs it (the ``test`` extra includes
``eval``) and must fail, not skip, without it. Small models and attack subsets keep this
fast; the full standard version runs FAB-T and 5000 Square queries.
"""

import warnings

import pyautoattack
import pytest
import torch
import torch.nn as nn
from pyautoattack.square import SquareAttack

from pyeuler.robust import autoattack, autoattack_plan, square
from tests.test_attacks import batch, small_cnn


def package_direct(model, x, y, **kwargs):
    model.eval()
    adversary = pyautoattack.AutoAttack(model, device=x.device, **kwargs)
    return adversary.run_standard_evaluation(x, y, batch_size=len(x))[0]


def test_subset_matches_the_package_and_leaves_mode_and_rng_alone():
    model = small_cnn().train()  # ours runs it in eval mode and restores train mode
    x, y = batch(16)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    ours = autoattack(model, x, y, eps=0.1, attacks=["apgd-ce", "apgd-t"], seed=3)
    assert model.training and model.bn.training
    assert torch.equal(torch.get_rng_state(), before)  # the package re-seeds; we restore
    theirs = package_direct(model, x, y, eps=0.1, attacks=["apgd-ce", "apgd-t"],
                            version="custom", seed=3)
    assert torch.equal(ours, theirs)
    assert ours.shape == x.shape and ours.dtype == x.dtype
    assert (ours - x).abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        assert (model(ours).argmax(1) != y).sum() > (model(x).argmax(1) != y).sum()


def test_l2_subset_matches_the_package():
    model = small_cnn().eval()
    x, y = batch(8)
    ours = autoattack(model, x, y, eps=0.5, norm="L2", attacks=["apgd-ce"], seed=0)
    theirs = package_direct(model, x, y, eps=0.5, norm="L2", attacks=["apgd-ce"],
                            version="custom", seed=0)
    assert torch.equal(ours, theirs)
    assert (ours - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5


def test_square_matches_the_packages_square_attack():
    model = small_cnn().eval()
    x, _ = batch(8)
    with torch.no_grad():
        y = model(x).argmax(1)  # all correct: every sample is attacked
    ours = square(model, x, y, eps=0.3, queries=40, seed=1)
    theirs = SquareAttack(model, p_init=0.8, n_queries=40, eps=0.3, norm="Linf", n_restarts=1,
                          seed=1, verbose=False, device=x.device,
                          resc_schedule=False).perturb(x, y)
    assert torch.equal(ours, theirs)
    assert (ours != x).any()


def test_vector_inputs_go_through_as_one_row_images():
    """Two-moons points (N, 2): the package's Square reads (N, C, H, W); the wrapper passes
    (N, 1, 1, 2) to the package and gives back (N, 2), with APGD's result unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(24, 2, generator=g), torch.randint(0, 2, (24,), generator=g)
    ours = autoattack(model, x, y, eps=0.2, attacks=["apgd-ce"])
    as_images = nn.Sequential(nn.Flatten(), model)
    theirs = package_direct(as_images, x.view(24, 1, 1, 2), y, eps=0.2, attacks=["apgd-ce"],
                            version="custom", seed=0)
    assert ours.shape == x.shape and torch.equal(ours, theirs.view(24, 2))
    assert square(model, x, y, eps=0.2, queries=10).shape == x.shape


def test_few_classes_run_apgd_ce_and_square_and_say_so():
    assert autoattack_plan(10) == ("standard", None, None)
    version, attacks, note = autoattack_plan(2)
    assert version == "custom" and attacks == ["apgd-ce", "square"]
    assert "2 classes are too few" in note and "apgd-ce + square" in note
    assert autoattack_plan(3, attacks=["apgd-ce"]) == ("custom", ["apgd-ce"], None)
    # the warning comes from autoattack itself (moons: 2 classes)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.full((2, 2), 0.5), torch.tensor([0, 0])
    with torch.no_grad():  # always class 1: both samples wrong, nothing left to attack
        model[2].weight.zero_()
        model[2].bias.copy_(torch.tensor([0.0, 100.0]))
    with pytest.warns(UserWarning, match="too few"):
        autoattack(model, x, y, eps=0.1)


@pytest.mark.parametrize("call, error, match", [
    (lambda m, x, y: autoattack(m, x, y, eps=0.1, attacks=["apgd-t"]), ValueError, "4 classes"),
    (lambda m, x, y: autoattack(m, x, y, eps=0.1, version="plus", attacks=["apgd-ce"]),
     ValueError, "custom"),
    (lambda m, x, y: autoattack(m, x, y, eps=0.1, attacks=["pgd"]), ValueError, "attacks"),
    (lambda m, x, y: autoattack(m, x, y, eps=0.1, norm="L1"), ValueError, "norm"),
    (lambda m, x, y: autoattack(m, x, y, eps=-1.0), ValueError, "eps"),
    (lambda m, x, y: autoattack(m, x, y, eps=0.1, seed=0.5), TypeError, "seed"),
    (lambda m, x, y: square(m, x, y, eps=0.1, queries=0), ValueError, "queries"),
])
def test_bad_arguments_name_themselves(call, error, match):
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.rand(4, 2), torch.tensor([0, 1, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=match):
            call(model, x, y)
