"""What pyeuler needs: torch and numpy only; scikit-learn ([data]), tqdm ([train]), Triton
([triton]) and matplotlib ([plot]) are extras, and code that needs a missing one says which
extra to install (or, for tqdm, runs without a progress bar)."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python >= 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_core_dependencies_are_torch_and_numpy_only():
    names = [d.split(">")[0].split("=")[0].split("<")[0].strip() for d in _project()["dependencies"]]
    assert sorted(names) == ["numpy", "torch"]


def test_the_test_extra_brings_what_ci_runs():
    extras = _project()["optional-dependencies"]
    test = " ".join(extras["test"])
    for needed in ("pytest", "triton", "train", "plot"):
        assert needed in test, needed
    assert "scikit-learn" in " ".join(extras["data"])
    assert "tqdm" in " ".join(extras["train"]) and "data" in " ".join(extras["train"])


def test_importing_the_library_pulls_no_extra():
    code = ("import sys, pyeuler, pyeuler.functional, pyeuler.nn, pyeuler.models, "
            "pyeuler.stability, pyeuler.data, pyeuler.checkpoint\n"
            "pyeuler.nn.PreActBranch\n"
            "print(sorted(m for m in ('sklearn', 'scipy', 'matplotlib', 'triton') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin"}, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def test_datasets_without_scikit_learn_name_the_extra(monkeypatch):
    from pyeuler import data

    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    for load in (data.load_digits, data.load_moons):
        with pytest.raises(ImportError, match=r"pip install 'pyeuler\[data\]'"):
            load()


def test_training_and_stability_run_without_tqdm(monkeypatch):
    from pyeuler.models import mlp_resnet
    from pyeuler.robust import train_epoch
    from pyeuler.stability import model_stability

    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    model = mlp_resnet(2, 4, 1, num_classes=2, norm="group")
    x, y = torch.rand(8, 2), torch.randint(0, 2, (8,))
    stats = train_epoch(model, x, y, torch.optim.SGD(model.parameters(), lr=0.1),
                        batch_size=4, progress=True)
    assert stats.samples == 8
    with warnings.catch_warnings():  # 5 iterations do not converge; not the point here
        warnings.simplefilter("ignore")
        result = model_stability(model.eval(), x[:2], iters=5, progress=True,
                                 generator=torch.Generator().manual_seed(0))
    assert len(result.blocks) == 1
