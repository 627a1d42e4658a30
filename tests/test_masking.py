"""Gradient-masking checks: they fire on deliberately masked models and stay quiet on an
honest one (two-moons MLPs, 100 samples, a small Square budget)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pyeuler.models import mlp_resnet
from pyeuler.robust import check_gradient_masking, ie_gradients


@pytest.fixture(scope="module")
def moons():
    from pyeuler.data import load_moons
    d = load_moons(seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = F.cross_entropy(model(d.x_train), d.y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), d.x_test[:100], d.y_test[:100]


class RoundInput(nn.Module):
    """Quantises its input to a 1/8 grid: the same classifier, but zero input gradients."""

    def forward(self, x):
        return torch.round(x * 8) / 8


class GradSwitch(nn.Module):
    """Stands for an IE-Skip: identity forward; with grad="detached" no input gradient."""

    def __init__(self, grad):
        super().__init__()
        self.grad, self.steps = grad, 1

    def forward(self, x):
        return x if self.grad == "unrolled" else x.detach() + 0 * x


def run(model, x, y, eps=(0.1,)):
    return check_gradient_masking(model, x, y, eps=eps, square_queries=300, seed=0)


def status(report):
    return {c.name: c.status for c in report.checks}


def test_quiet_on_an_honest_model(moons):
    model, x, y = moons
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.95
    report = run(model, x, y)
    assert status(report) == {"exact_vs_detached": "n/a", "black_box_vs_white": "pass",
                              "monotone_in_steps": "pass", "monotone_in_eps": "pass",
                              "unbounded_eps": "pass"}, report.to_dict()
    assert report.verdict().startswith("gradient masking: no sign")


def test_fires_on_a_model_that_rounds_its_input(moons):
    model, x, y = moons
    masked = nn.Sequential(RoundInput(), model).eval()
    report = run(masked, x, y)
    assert status(report)["black_box_vs_white"] == "flag", report.to_dict()
    assert report.verdict().startswith("gradient masking: SUSPECTED")
    assert "black_box_vs_white" in report.verdict()
    values = report.checks[1].values["0.1"]
    assert values["white_box"] - values["square"] > 1  # more than 1 % of 100 samples


def test_detached_ie_gradients_are_compared_with_exact_ones(moons):
    model, x, y = moons
    detached = nn.Sequential(GradSwitch("detached"), model).eval()
    report = run(detached, x, y)
    check = report.checks[0]
    assert check.name == "exact_vs_detached" and check.status == "flag", report.to_dict()
    assert check.values["0.1"]["own"] > check.values["0.1"]["exact"] + 1
    assert detached[0].grad == "detached"  # switched back
    honest = nn.Sequential(GradSwitch("unrolled"), model).eval()
    assert run(honest, x, y).checks[0].status == "pass"


def test_ie_gradients_switches_real_ie_skips_and_keeps_the_forward():
    torch.manual_seed(0)
    model = mlp_resnet(in_features=2, width=16, depth=2, ie_steps=1, grad="detached",
                       norm="group").eval()
    x = torch.rand(8, 2, requires_grad=True)

    def input_grad():
        (g,) = torch.autograd.grad(model(x).sum(), x)
        return g

    out, g_detached = model(x), input_grad()
    with ie_gradients(model, "unrolled") as switched:
        assert switched == 2
        assert torch.allclose(model(x), out, atol=1e-6)
        g_exact = input_grad()
    assert not torch.allclose(g_exact, g_detached)
    assert all(m.grad == "detached" for m in model.modules() if hasattr(m, "steps")
               and isinstance(getattr(m, "grad", None), str))
    with pytest.raises(ValueError, match="grad"):
        with ie_gradients(model, "implicit"):
            pass


def test_bad_eps_is_refused(moons):
    model, x, y = moons
    with pytest.raises(ValueError, match="eps"):
        check_gradient_masking(model, x, y, eps=[])
