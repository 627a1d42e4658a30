"""Checkpoints written by older pyeuler keep loading: tests/fixtures/v1_*.pt were written at
commit bda77d4, before the 0.2.0 signature changes (tests/fixtures/make_v1_checkpoints.py
says how), each with the eval-mode logits its model gave for a fixed input.  Today's code
must rebuild each model from the checkpoint's own description, load its state and give
those logits."""

import warnings
from pathlib import Path

import pytest
import torch

from pyeuler import models
from pyeuler.checkpoint import load_checkpoint, load_model_state
from pyeuler.robust import build_model

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CASES = sorted(p.name.removesuffix(".pt") for p in FIXTURES.glob("v1_*.pt")
               if not p.name.endswith(".expected.pt"))


def test_the_fixtures_are_there():
    assert CASES == ["v1_preact18_ie", "v1_preact50_group", "v1_resnet8_scalar_h",
                     "v1_zoo_mlp_ie"]


@pytest.mark.parametrize("stem", CASES)
def test_old_checkpoint_rebuilds_loads_and_gives_the_recorded_logits(stem):
    path = FIXTURES / f"{stem}.pt"
    ckpt = load_checkpoint(path)
    expected = torch.load(FIXTURES / f"{stem}.expected.pt", weights_only=True)
    spec, config = ckpt["model"], ckpt["config"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # stored keywords are current
        if config["how"] == "zoo":
            model = build_model(spec["name"], tuple(config["input_shape"]),
                                config["num_classes"], backend="eager", **spec["kwargs"])
        else:
            model = getattr(models, spec["name"])(backend="eager", **spec["kwargs"])
    load_model_state(model, ckpt, path)
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # BatchNorm inside IE-Skips in eval mode
        logits = model(expected["x"])
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-6)
