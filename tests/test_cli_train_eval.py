"""``pyeuler train`` / ``pyeuler eval`` end to end on tiny runs (digits, moons)."""

import json
import warnings

import pytest
import torch

from pyeuler.checkpoint import load_checkpoint
from pyeuler.cli import main
from pyeuler.robust import GradientMaskingWarning


def checkpoint_of(out, prefix):
    """The one checkpoint in ``out`` whose name starts with ``prefix`` (the name ends in the
    hash of its configuration)."""
    found = sorted(out.glob(f"{prefix}-*.pt"))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One short epoch on digits: ResNet (K=0) vs IE-ResNet (K=1), checkpoints + JSON."""
    out = tmp_path_factory.mktemp("run")
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["train", "--epochs", "1", "--eval-samples", "64", "--out", str(out),
                   "--json", str(out / "results.json"), "--no-progress", "--threads", "1"])
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
               "--out", str(out), "--resume", "--no-progress", "--threads", "1"])
    assert rc == 0
    assert "resumed" in capsys.readouterr().out
    ckpt = load_checkpoint(checkpoint_of(out, "digits-wrn-10-1-K0"))
    assert ckpt["epoch"] == 2


def test_a_checkpoint_of_another_model_is_replaced_only_with_overwrite(digits_run, tmp_path,
                                                                        capsys):
    """A K = 0 checkpoint put where this run's K = 1 checkpoint belongs: refused before any
    work (nothing trained, the file kept), naming what differs; --overwrite replaces it."""
    _, _, out = digits_run
    k1_path = tmp_path / checkpoint_of(out, "digits-wrn-10-1-K1").name
    k0_bytes = checkpoint_of(out, "digits-wrn-10-1-K0").read_bytes()
    k1_path.write_bytes(k0_bytes)
    argv = ["train", "--epochs", "1", "--ie-steps", "1", "--eval-samples", "16", "--out",
            str(tmp_path), "--no-progress", "--threads", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--resume"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and k1_path.read_bytes() == k0_bytes
    assert (f"--out: {k1_path} is not a checkpoint of this configuration: {k1_path.name} was "
            "trained with --ie-steps 0") in captured.err and "--overwrite" in captured.err
    assert main(argv + ["--overwrite"]) == 0
    ckpt = load_checkpoint(k1_path)
    assert ckpt["model"]["kwargs"]["ie_steps"] == 1 and ckpt["config"]["run"]["ie_steps"] == 1


def test_eval_prints_and_writes_json(digits_run, tmp_path, capsys):
    _, _, out = digits_run
    ckpt = checkpoint_of(out, "digits-wrn-10-1-K1")
    rc = main(["eval", "--checkpoint", str(ckpt), "--attack", "fgsm", "pgd-3", "cw",
               "--cw-steps", "5", "--eps", "0.05", "0.1", "--samples", "48",
               "--json", str(tmp_path / "e.json"), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "clean accuracy" in text and "| L∞ | 0.1 |" in text and "C&W L2" in text
    res = json.loads((tmp_path / "e.json").read_text())
    r = res["results"]
    assert res["samples"] == 48 and set(r) == {"clean", "fgsm", "pgd-3", "cw", "worst_case",
                                               "worst_case_attacks"}
    assert r["pgd-3"]["0.1"] <= r["pgd-3"]["0.05"] + 0.05
    assert r["worst_case"]["Linf"]["0.1"] <= min(r["fgsm"]["0.1"], r["pgd-3"]["0.1"], r["clean"])
    assert 0 <= r["cw"]["success_rate"] <= 1
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
    ckpt = load_checkpoint(checkpoint_of(out, "digits-wrn-10-1-K0"))
    ckpt["model"]["name"] = "wrn-10-2"  # claims a wider net than the stored weights
    path = tmp_path / "renamed.pt"
    torch.save(ckpt, path)
    assert main(["eval", "--checkpoint", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "renamed.pt does not match the model" in err and "shape mismatches" in err


def test_moons_detached_gradients_warn_and_unrolled_does_not(tmp_path, capsys):
    rc = main(["train", "--data", "moons", "--epochs", "1", "--ie-steps", "1", "--grad",
               "detached", "--eval-samples", "32", "--out", str(tmp_path), "--no-progress",
               "--threads", "1"])
    assert rc == 0
    ckpt = checkpoint_of(tmp_path, "moons-mlp-K1-detached")
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
               "--eval-samples", "64", "--threads", "1",
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
    """Refused before any work: the models are tried on the meta device before data loads."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--epochs", "1", "--no-progress"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err


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
               str(tmp_path / "ck"), "--no-progress", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "cifar10: 40 train / 8 test" in out and "FGSM acc (eps=8/255)" in out
    ckpt = checkpoint_of(tmp_path / "ck", "cifar10-wrn-10-1-K0")
    assert main(["eval", "--checkpoint", str(ckpt), "--attack", "pgd-2", "--no-progress"]) == 0
    assert "| L∞ | 8/255 |" in capsys.readouterr().out


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
        return load_checkpoint(checkpoint_of(out, f"moons-mlp-K1-unrolled-{adv}"))

    straight = train(2, tmp_path / "straight")
    train(1, tmp_path / "resumed")
    resumed = train(2, tmp_path / "resumed", "--resume")
    assert resumed["epoch"] == straight["epoch"] == 2
    differing = [k for k, v in straight["state_dict"].items()
                 if not torch.equal(v, resumed["state_dict"][k])]
    assert not differing, differing


def _cli(*argv, env=None, cwd=None):
    """``python -m pyeuler ARGV`` as a user runs it, without OMP_NUM_THREADS or
    LOCAL_WORLD_SIZE from this process unless ``env`` sets them."""
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    done = subprocess.run([sys.executable, "-m", "pyeuler", *argv], capture_output=True,
                          text=True, timeout=300, env={**clean, **(env or {})}, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_checkpoint_names_hash_every_option_the_weights_depend_on():
    """Each training option moves the checkpoint to another file; --epochs, the evaluation
    options, the data folder and the backend do not (a resumed or re-evaluated run is the
    same run); K = 0 ignores the IE options, natural training the attack's."""
    import argparse

    from pyeuler.cli import train

    parser = argparse.ArgumentParser()
    train.add_parser(parser.add_subparsers())

    def path(*argv, k=1):
        return train.checkpoint_path("runs", train.resolve_config(parser.parse_args(
            ["train", "--data", "moons", *argv])), k)

    base = path()
    assert base.name.startswith("moons-mlp-K1-unrolled-none-seed0-") and base.suffix == ".pt"
    changes = [["--grad", "detached"], ["--lr", "0.01"], ["--norm", "batch"], ["--theta", "0.5"],
               ["--ie-step-size", "0.2"], ["--optimizer", "sgd"], ["--momentum", "0.5"],
               ["--weight-decay", "1e-4"], ["--batch-size", "32"], ["--h", "0.1"],
               ["--seed", "1"], ["--model", "mlp-16-2"], ["--preset", "madry"], ["--adv", "pgd"],
               ["--amp", "bf16"], ["--sync-bn"], ["--val-split", "0.1"]]
    names = {base.name} | {path(*argv).name for argv in changes}
    assert len(names) == len(changes) + 1
    for same in (["--epochs", "99"], ["--attacks", "pgd-5"], ["--eval-samples", "8"],
                 ["--backend", "eager"], ["--eps", "0.2"], ["--beta", "3"],
                 ["--channels-last"], ["--val-samples", "8"], ["--recompute", "full"]):
        assert path(*same) == base, same
    assert path("--grad", "detached", k=0) == path(k=0)
    assert path("--adv", "pgd", "--beta", "3") == path("--adv", "pgd")
    assert path("--adv", "trades", "--beta", "3") != path("--adv", "trades")


def test_recompute_leaves_checkpoint_names_and_run_identities_as_they_were():
    """--recompute changes only rounding: the default configuration's run identity and
    checkpoint name are those of a configuration without the key (what runs before the
    flag hashed), and configurations differing only in the policy share a checkpoint."""
    import argparse

    from pyeuler.cli import train
    from pyeuler.cli._results import config_hash

    parser = argparse.ArgumentParser()
    train.add_parser(parser.add_subparsers())

    def config(*argv):
        return train.resolve_config(parser.parse_args(["train", "--data", "moons", *argv]))

    default = config()
    assert default["recompute"] == "selective"
    before_the_flag = {key: value for key, value in default.items() if key != "recompute"}
    for k in (0, 1):
        identity = train.run_identity(default, k)
        assert identity == train.run_identity(before_the_flag, k) and "recompute" not in identity
        path = train.checkpoint_path("runs", default, k)
        assert path == train.checkpoint_path("runs", before_the_flag, k)
        assert path.stem.endswith("-" + config_hash(train.run_identity(before_the_flag, k)))
        for policy in ("full", "none"):
            other = config("--recompute", policy)
            assert other["recompute"] == policy
            assert train.checkpoint_path("runs", other, k) == path
            assert train.run_identity(other, k) == identity


def _recompute_policies(model) -> set:
    """The ``recompute`` of every IE block of ``model``."""
    return {module.recompute for module in model.modules() if hasattr(module, "recompute")}


def test_recompute_builds_the_models_with_it_and_old_checkpoints_with_the_default(tmp_path,
                                                                                   capsys):
    """--recompute full trains IE blocks with recompute="full" and records the policy in the
    checkpoint (model kwargs and config, not the run identity).  A checkpoint written before
    the flag (no "recompute" anywhere) evaluates with the default policy and resumes, with
    another policy too, into the same file."""
    from pyeuler.robust import build_model

    common = ["train", "--data", "moons", "--ie-steps", "1", "--eval-samples", "8",
              "--threads", "1", "--out", str(tmp_path), "--no-progress"]
    assert main([*common, "--epochs", "1", "--recompute", "full"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "grad=unrolled, recompute=full, norm=group" in header
    path = checkpoint_of(tmp_path, "moons-mlp-K1-unrolled")
    ckpt = load_checkpoint(path)
    kwargs = ckpt["model"]["kwargs"]
    assert kwargs["recompute"] == "full" and ckpt["config"]["recompute"] == "full"
    assert "recompute" not in ckpt["config"]["run"]
    assert _recompute_policies(build_model("mlp", (2,), 2, **kwargs)) == {"full"}

    del kwargs["recompute"], ckpt["config"]["recompute"]  # as written before the flag
    torch.save(ckpt, path)
    assert _recompute_policies(build_model("mlp", (2,), 2, **kwargs)) == {"selective"}
    assert main(["eval", "--checkpoint", str(path), "--attack", "fgsm", "--eps", "0.05",
                 "--samples", "16", "--threads", "1", "--no-progress"]) == 0
    assert main([*common, "--epochs", "2", "--resume", "--recompute", "none"]) == 0
    assert "resumed" in capsys.readouterr().out
    assert [p.name for p in tmp_path.glob("*.pt")] == [path.name]
    resumed = load_checkpoint(path)
    assert resumed["epoch"] == 2 and resumed["model"]["kwargs"]["recompute"] == "none"


def test_a_grad_sweep_keeps_one_checkpoint_per_configuration(tmp_path):
    """--grad unrolled then --grad detached into one --out: two checkpoints, the first
    untouched by the second run; each records its configuration and hash."""
    common = ["train", "--data", "moons", "--ie-steps", "1", "--epochs", "1", "--eval-samples",
              "8", "--threads", "1", "--out", str(tmp_path), "--no-progress"]
    _cli(*common, "--grad", "unrolled")
    unrolled = checkpoint_of(tmp_path, "moons-mlp-K1-unrolled")
    before = unrolled.read_bytes()
    _cli(*common, "--grad", "detached")
    detached = checkpoint_of(tmp_path, "moons-mlp-K1-detached")
    assert unrolled.read_bytes() == before and len(list(tmp_path.glob("*.pt"))) == 2
    for path, grad in ((unrolled, "unrolled"), (detached, "detached")):
        config = load_checkpoint(path)["config"]
        assert config["run"]["grad"] == grad and path.stem.endswith("-" + config["run_id"])
    assert "resumed" in _cli(*common, "--grad", "detached", "--epochs", "2", "--resume").stdout
    assert load_checkpoint(detached)["epoch"] == 2 and unrolled.read_bytes() == before


def test_a_second_eval_merges_into_the_first_by_attack_and_eps(tmp_path):
    """pyeuler eval with another attack and ε keeps the earlier results in
    <checkpoint>.eval.json; each evaluation is listed in "runs" with its own settings."""
    _cli("train", "--data", "moons", "--ie-steps", "0", "--epochs", "1", "--eval-samples", "8",
         "--threads", "1", "--out", str(tmp_path), "--no-progress")
    ckpt = checkpoint_of(tmp_path, "moons-mlp-K0")
    common = ["eval", "--checkpoint", str(ckpt), "--samples", "16", "--threads", "1",
              "--no-progress"]
    _cli(*common, "--attack", "fgsm", "--eps", "0.05")
    _cli(*common, "--attack", "pgd-2", "--eps", "0.05", "0.1")
    _cli(*common, "--attack", "fgsm", "--eps", "0.1")
    saved = json.loads(ckpt.with_name(ckpt.name + ".eval.json").read_text())
    results = saved["results"]
    assert set(results["fgsm"]) == {"0.05", "0.1"} and set(results["pgd-2"]) == {"0.05", "0.1"}
    assert [run["attacks"] for run in saved["runs"]] == [["fgsm"], ["pgd-2"], ["fgsm"]]


def test_threads_default_to_the_process_cores_over_the_local_ranks(tmp_path):
    """The header line shows the threads: the cores of this process's affinity mask divided
    by LOCAL_WORLD_SIZE (at least 1), or --threads."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    stability = ["stability", "--data", "moons", "--model", "mlp", "--samples", "2", "--iters",
                 "2", "--no-plot", "--out", str(tmp_path), "--no-progress"]
    for ranks, threads in ((None, cores), ("2", max(1, cores // 2)), ("64", 1)):
        done = _cli(*stability, env={"LOCAL_WORLD_SIZE": ranks} if ranks else None)
        assert done.stdout.splitlines()[0].endswith(f"| cpu, {threads} threads"), done.stdout
    done = _cli("train", "--data", "moons", "--ie-steps", "0", "--epochs", "1", "--eval-samples",
                "8", "--no-progress", env={"LOCAL_WORLD_SIZE": "2"})
    assert done.stdout.splitlines()[0].endswith(f"| cpu, {max(1, cores // 2)} threads")
    done = _cli(*stability, "--threads", "3")
    assert done.stdout.splitlines()[0].endswith("| cpu, 3 threads")
