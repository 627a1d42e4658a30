"""``pyeuler train`` / ``pyeuler eval`` end to end on tiny runs (digits, moons)."""

import json
import warnings

import pytest
import torch

from pyeuler.checkpoint import load_checkpoint
from pyeuler.cli import main
from pyeuler.robust import GradientMaskingWarning


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One short epoch on digits: ResNet (K=0) vs IE-ResNet (K=1), checkpoints + JSON."""
    out = tmp_path_factory.mktemp("run")
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["train", "--epochs", "1", "--eval-samples", "64", "--out", str(out),
                   "--json", str(out / "results.json"), "--no-progress"])
    return rc, buf.getvalue(), out


def test_train_prints_table_and_writes_results(digits_run):
    rc, text, out = digits_run
    assert rc == 0
    assert "ResNet (K=0)" in text and "IE-ResNet (K=1)" in text
    assert "clean acc" in text and "FGSM acc (eps=0.1)" in text and "train time" in text
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["model"] == "wrn-10-1" and res["config"]["epochs"] == 1
    rows = res["results"]
    assert [r["ie_steps"] for r in rows] == [0, 1]
    for r in rows:
        assert 0.3 < r["clean"] <= 1 and 0 <= r["fgsm"] <= r["clean"] + 0.2
        ckpt = load_checkpoint(r["checkpoint"])
        assert ckpt["epoch"] == 1 and ckpt["model"]["kwargs"]["ie_steps"] == r["ie_steps"]


def test_resume_continues_from_checkpoint(digits_run, capsys):
    _, _, out = digits_run
    rc = main(["train", "--epochs", "2", "--ie-steps", "0", "--eval-samples", "32",
               "--out", str(out), "--resume", "--no-progress"])
    assert rc == 0
    assert "resumed" in capsys.readouterr().out
    ckpt = load_checkpoint(out / "digits-wrn-10-1-K0-none-seed0.pt")
    assert ckpt["epoch"] == 2


def test_resume_refuses_a_checkpoint_of_another_model(digits_run, tmp_path, capsys):
    _, _, out = digits_run
    (tmp_path / "digits-wrn-10-1-K1-none-seed0.pt").write_bytes(
        (out / "digits-wrn-10-1-K0-none-seed0.pt").read_bytes())
    rc = main(["train", "--epochs", "2", "--ie-steps", "1", "--out", str(tmp_path), "--resume",
               "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "K1-none-seed0.pt was saved for" in err and "'ie_steps': 0" in err


def test_eval_prints_and_writes_json(digits_run, tmp_path, capsys):
    _, _, out = digits_run
    ckpt = out / "digits-wrn-10-1-K1-none-seed0.pt"
    rc = main(["eval", "--checkpoint", str(ckpt), "--attack", "fgsm", "pgd-3", "cw",
               "--cw-steps", "5", "--eps", "0.05", "0.1", "--samples", "48",
               "--json", str(tmp_path / "e.json"), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "clean accuracy" in text and "pgd-3 accuracy (eps=0.1)" in text and "cw accuracy" in text
    res = json.loads((tmp_path / "e.json").read_text())
    r = res["results"]
    assert res["samples"] == 48 and set(r) == {"clean", "fgsm", "pgd-3", "cw"}
    assert r["pgd-3"]["0.1"] <= r["pgd-3"]["0.05"] + 0.05
    assert r["fgsm"]["0.1"] <= r["clean"]
    # default JSON path: next to the checkpoint
    assert main(["eval", "--checkpoint", str(ckpt), "--samples", "16", "--no-progress"]) == 0
    assert (out / (ckpt.name + ".eval.json")).exists()


@pytest.mark.parametrize("content, message", [
    (b"garbage" * 20, "is corrupt"),
    (None, "does not exist"),
])
def test_eval_bad_checkpoint_gives_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "model.pt"
    if content is not None:
        path.write_bytes(content)
    assert main(["eval", "--checkpoint", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err


def test_eval_mismatched_checkpoint(digits_run, tmp_path, capsys):
    _, _, out = digits_run
    ckpt = load_checkpoint(out / "digits-wrn-10-1-K0-none-seed0.pt")
    ckpt["model"]["name"] = "wrn-10-2"  # claims a wider net than the stored weights
    path = tmp_path / "renamed.pt"
    torch.save(ckpt, path)
    assert main(["eval", "--checkpoint", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "renamed.pt does not match the model" in err and "shape mismatches" in err


def test_moons_detached_gradients_warn_and_unrolled_does_not(tmp_path, capsys):
    rc = main(["train", "--data", "moons", "--epochs", "1", "--ie-steps", "1", "--grad",
               "detached", "--eval-samples", "32", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    ckpt = tmp_path / "moons-mlp-K1-none-seed0.pt"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert main(["eval", "--checkpoint", str(ckpt), "--samples", "64", "--no-progress"]) == 0
    assert any(issubclass(i.category, GradientMaskingWarning) for i in w)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert main(["eval", "--checkpoint", str(ckpt), "--grad", "unrolled", "--samples", "64",
                     "--no-progress"]) == 0
    assert not any(issubclass(i.category, GradientMaskingWarning) for i in w)


def test_adversarial_training_runs(tmp_path, capsys):
    rc = main(["train", "--data", "moons", "--epochs", "1", "--adv", "trades",
               "--attack-steps", "2", "--ie-steps", "0", "--attacks", "fgsm", "pgd-5",
               "--eval-samples", "64",
               "--json", str(tmp_path / "r.json"), "--no-progress"])
    assert rc == 0
    cfg = json.loads((tmp_path / "r.json").read_text())["config"]
    assert cfg["adv"] == "trades" and cfg["beta"] == 6.0 and cfg["model"] == "mlp"
    assert "PGD-5 acc" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "wrn-11-1"], "wrn-D-W needs D = 6n+4"),
    (["train", "--model", "resnet-20", "--ie-steps", "1"], "ie_steps"),
    (["train", "--data", "moons", "--model", "preact-18"], "needs image inputs"),
])
def test_train_bad_model_arguments(argv, message, capsys):
    assert main(argv + ["--epochs", "1", "--no-progress"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--attacks", "deepfool"], "--attacks"),
    (["train", "--data", "cifar10"], "--data-dir"),
    (["train", "--resume"], "--resume needs --out"),
    (["train", "--theta", "2"], "--theta"),
    (["train", "--ie-steps", "-1"], "--ie-steps"),
])
def test_train_bad_options_exit_with_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    text = str(e.value.code) + capsys.readouterr().err
    assert e.value.code != 0 and message in text


def test_cifar10_from_pickle_batches(tmp_path, capsys):
    import pickle

    import numpy as np
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"labels": rng.integers(0, 10, 8).tolist(),
                         b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8)}, f)
    rc = main(["train", "--data", "cifar10", "--data-dir", str(tmp_path), "--model", "wrn-10-1",
               "--epochs", "1", "--batch-size", "16", "--ie-steps", "0", "--out",
               str(tmp_path / "ck"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "cifar10: 40 train / 8 test" in out and "FGSM acc (eps=8/255)" in out
    ckpt = tmp_path / "ck" / "cifar10-wrn-10-1-K0-none-seed0.pt"
    assert main(["eval", "--checkpoint", str(ckpt), "--attack", "pgd-2", "--no-progress"]) == 0
    assert "pgd-2 accuracy (eps=8/255)" in capsys.readouterr().out


@pytest.mark.parametrize("adv", ["pgd", "trades"])
def test_adversarial_training_resumes_bit_identically(tmp_path, adv):
    """2 epochs straight == 1 epoch, then --resume to 2: attack starts and TRADES noise
    derive from (seed, epoch), so no generator state needs restoring (through subprocesses,
    as a user runs them)."""
    import subprocess
    import sys

    def train(epochs, out, *extra):
        done = subprocess.run(
            [sys.executable, "-m", "pyeuler", "train", "--data", "moons", "--adv", adv,
             "--attack-steps", "2", "--ie-steps", "1", "--epochs", str(epochs),
             "--eval-samples", "16", "--threads", "1", "--out", str(out), "--no-progress",
             *extra], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return load_checkpoint(out / f"moons-mlp-K1-{adv}-seed0.pt")

    straight = train(2, tmp_path / "straight")
    train(1, tmp_path / "resumed")
    resumed = train(2, tmp_path / "resumed", "--resume")
    assert resumed["epoch"] == straight["epoch"] == 2
    differing = [k for k, v in straight["state_dict"].items()
                 if not torch.equal(v, resumed["state_dict"][k])]
    assert not differing, differing
