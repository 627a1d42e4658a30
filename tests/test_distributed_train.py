"""Data-parallel training (pyeuler.robust.distributed, ``torchrun -m pyeuler train``) and the
training loop's options for real runs (--amp, --channels-last, --val-split, CSV, plot).

Two gloo processes on the CPU.  The library test compares in float64, where 2 ranks equal
one process to rounding (1e-10).  The CLI runs in float32, where convolutions of half
batches round differently (~1e-7) and a ReLU input that changes sign on the way amplifies
that (up to ~2e-5 seen after 3 to 6 SGD steps): its tolerance is 1e-4, still far below
what a wrong split, a missing gradient average or another batch order moves (~1e-2).
"""

import csv
import os
import re
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pyeuler.checkpoint import load_checkpoint
from pyeuler.data import hold_out, load, validation_count
from pyeuler.robust import build_model
from pyeuler.robust.distributed import (
    DistributedRun, derive_seed, loss_scale, shard_bounds, wrap_model,
)
from pyeuler.robust.training import batches, train_epoch

WORLD = 2
needs_gloo = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32",
                                reason="needs torch.distributed with gloo")


def test_shards_cover_each_batch_once_in_order():
    for count in range(2, 12):
        for world in (2, 3):
            if count < world:
                continue
            parts = [shard_bounds(count, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            sizes = [stop - start for start, stop in parts]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
            # DDP's average of the scaled local means weighs every sample 1/count
            for n in sizes:
                assert loss_scale(n, count, world) / (world * n) == pytest.approx(1 / count)


def test_sharded_batches_are_the_global_batches_cut_up():
    x, y = torch.arange(23.0)[:, None], torch.arange(23)
    whole = list(batches(x, y, 8, shuffle=True, generator=torch.Generator().manual_seed(1)))
    parts = [list(batches(x, y, 8, shuffle=True, generator=torch.Generator().manual_seed(1),
                          shard=(r, 2))) for r in range(2)]
    for (xb, _), mine, theirs in zip(whole, *parts):
        torch.testing.assert_close(torch.cat([mine[0], theirs[0]]), xb)
    one = list(batches(x[:17], y[:17], 8, shard=(2, 3)))  # the last batch (1 sample) skipped
    assert [len(yb) for _, yb in one] == [2, 2]
    with pytest.raises(ValueError, match="shard"):
        next(batches(x, y, 8, shard=(2, 2)))


def test_derived_seeds_differ_by_every_part():
    seeds = {derive_seed(0, epoch, step, rank) for epoch in range(3) for step in range(3)
             for rank in range(3)}
    assert len(seeds) == 27 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(1, 2) == derive_seed(1, 2)


def test_validation_split_is_carved_from_training_data_only():
    data = load("digits", seed=0)
    split = hold_out(data, 0.1, seed=3)
    assert len(split.x_val) == validation_count(0.1, len(data.x_train)) == 135
    assert len(split.x_train) + len(split.x_val) == len(data.x_train)
    assert split.x_test is data.x_test
    train_rows = {tuple(r.flatten().tolist()) for r in split.x_train}
    assert not any(tuple(r.flatten().tolist()) in train_rows for r in split.x_val[:20])
    again = hold_out(data, 0.1, seed=3)
    assert torch.equal(again.x_val, split.x_val)
    assert not torch.equal(hold_out(data, 0.1, seed=4).x_val, split.x_val)
    assert len(hold_out(data, 100, seed=0).x_val) == 100
    for bad in (0, 1.5, len(data.x_train), -0.1):
        with pytest.raises(ValueError, match="val_split"):
            validation_count(bad, len(data.x_train))


# ----------------------------------------------------------------------------------------
# Library: 2 ranks, float64, an epoch with an uneven last batch (101 = 2·40 + 21: 11/10).

def _model(norm):
    torch.manual_seed(0)
    return build_model("wrn-10-1", (1, 8, 8), 10, ie_steps=1, norm=norm, backend="eager").double()


def _epoch(model, rank=0, world=1):
    data = load("digits", seed=0)
    x, y = data.x_train[:101].double(), data.y_train[:101]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    stats = train_epoch(model, x, y, opt, batch_size=40, shard=(rank, world), seed=7,
                        generator=torch.Generator().manual_seed(5), progress=False)
    return stats


def _library_worker(rank, init_file, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=90))
    try:
        for norm in ("group", "batch"):
            model = _model(norm)
            wrapped = wrap_model(model, DistributedRun(rank, WORLD, rank, "gloo"),
                                 torch.device("cpu"), sync_bn=norm == "batch")
            assert (norm == "batch") == any(isinstance(m, nn.SyncBatchNorm)
                                            for m in model.modules())
            stats = _epoch(wrapped, rank, WORLD)
            if rank == 0:  # a file: tensors sent through a queue die with their process
                torch.save((model.state_dict(), stats.loss, stats.accuracy, stats.samples),
                           os.path.join(folder, f"{norm}.pt"))
    finally:
        dist.destroy_process_group()


@needs_gloo
def test_two_ranks_train_an_epoch_as_one_process_in_float64(tmp_path):
    """DDP over sharded global batches (the loss scaled for the uneven last batch), with
    GroupNorm and with synchronised BatchNorm: the parameters, running statistics and the
    epoch's reduced loss and accuracy equal one process's epoch on the whole batches."""
    mp.spawn(_library_worker, args=(os.fspath(tmp_path / "init"), os.fspath(tmp_path)),
             nprocs=WORLD)
    for norm in ("group", "batch"):
        state, loss, acc, samples = torch.load(tmp_path / f"{norm}.pt")
        single = _model(norm)
        stats = _epoch(single)
        assert samples == stats.samples == 101
        assert loss == pytest.approx(stats.loss, rel=1e-12) and acc == stats.accuracy
        for name, value in single.state_dict().items():
            torch.testing.assert_close(state[name], value, rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"{norm}: {name}: {m}")


# ----------------------------------------------------------------------------------------
# The CLI under torchrun

def _env():
    return {k: v for k, v in os.environ.items()
            if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "RANK")}


def _launcher(ranks=1):
    return ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
             "--standalone", "-m", "pyeuler"] if ranks > 1 else [sys.executable, "-m", "pyeuler"])


def _train(out, *argv, ranks=1):
    done = subprocess.run([*_launcher(ranks), "train", *argv, "--out", str(out), "--no-progress",
                           "--eval-samples", "8"],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stdout + done.stderr
    return done


# 147 training samples (1,347 less 1,200 held out): batches of 50, 50, 47 (24/23 per rank)
SMALL = ["--batch-size", "50", "--optimizer", "sgd", "--lr", "0.05", "--val-split", "1200",
         "--val-samples", "8", "--threads", "1"]
F32 = dict(rtol=1e-4, atol=1e-4)  # see the module docstring


def _states(out):
    found = sorted(p for p in out.glob("*.pt") if not p.name.endswith(".best.pt"))
    return {p.name: load_checkpoint(p) for p in found}


def _assert_same_weights(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        for key, value in a[name]["state_dict"].items():
            torch.testing.assert_close(b[name]["state_dict"][key], value, **F32,
                                       msg=lambda m: f"{name} {key}: {m}")


@needs_gloo
def test_a_torchrun_epoch_equals_one_process_and_writes_one_checkpoint_per_model(tmp_path):
    argv = ["--epochs", "1", "--ie-steps", "0", "1", *SMALL]
    two = _train(tmp_path / "two", *argv, ranks=2)
    assert "2 ranks (gloo), 25 samples per rank and step" in two.stdout.splitlines()[0]
    assert two.stdout.count("IE-ResNet (K=1): clean") == 1  # rank 0 alone prints
    one = _train(tmp_path / "one", *argv)
    states = _states(tmp_path / "two")
    _assert_same_weights(_states(tmp_path / "one"), states)
    files = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert len(files) == 2 * 4, files  # per model: .pt, .best.pt, .csv, .png
    for ckpt in states.values():
        assert ckpt["config"]["world_size"] == 2 and len(ckpt["metrics"]["history"]) == 1
    one_row = [line for line in one.stdout.splitlines() if "ResNet (K=0) epoch 1/1" in line]
    two_row = [line for line in two.stdout.splitlines() if "ResNet (K=0) epoch 1/1" in line]
    assert one_row == two_row  # reduced metrics: the same loss and accuracies, 4 digits


@needs_gloo
def test_resume_on_another_number_of_ranks(tmp_path):
    """1 epoch on 2 ranks, resumed for a second on 1 process == 2 epochs on 1 process:
    the global batches do not depend on the number of ranks."""
    argv = ["--ie-steps", "0", *SMALL]
    _train(tmp_path / "resumed", "--epochs", "1", *argv, ranks=2)
    done = _train(tmp_path / "resumed", "--epochs", "2", "--resume", *argv)
    assert "resumed" in done.stdout and "(trained on 2 ranks so far, 1 now)" in done.stdout
    _train(tmp_path / "straight", "--epochs", "2", *argv)
    resumed, straight = _states(tmp_path / "resumed"), _states(tmp_path / "straight")
    _assert_same_weights(straight, resumed)
    history = next(iter(resumed.values()))["metrics"]["history"]
    assert [row["epoch"] for row in history] == [1, 2]


@needs_gloo
def test_batch_size_must_split_evenly_among_the_ranks(tmp_path):
    env = dict(_env(), WORLD_SIZE="3", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="3")
    done = subprocess.run([sys.executable, "-m", "pyeuler", "train", "--batch-size", "64",
                           "--epochs", "1"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert "--batch-size: 64 is the global batch and must split evenly among the 3 ranks" \
        in done.stderr


@needs_gloo
def test_a_bad_argument_under_torchrun_is_printed_once_and_every_rank_fails():
    done = subprocess.run([*_launcher(2), "train", "--epochs", "-1"], capture_output=True,
                          text=True, timeout=300, env=_env())
    assert done.returncode != 0
    assert done.stderr.count("pyeuler train: error: argument --epochs:") == 1, done.stderr
    # torchrun's failure report: rank 1 exited 2 by itself, or was ended once rank 0 had
    exits = dict(re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*exitcode\s*: (-?\d+)",
                            done.stderr))
    assert exits.keys() == {"0", "1"} and "0" not in exits.values(), done.stderr


@pytest.mark.parametrize("argv, printed", [
    # the same mistake on every rank: said by the first one, not by rank 1
    (["--theta", "2"], ""),
    # about rank 1's own start (torchrun's variables missing): rank 1 says it
    (["--epochs", "1"], "pyeuler: error: WORLD_SIZE is 2 but MASTER_ADDR, MASTER_PORT are not "
                        "set"),
])
def test_rank_one_exits_2_and_prints_only_errors_of_its_own(argv, printed):
    env = {k: v for k, v in _env().items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")
    done = subprocess.run([sys.executable, "-m", "pyeuler", "train", *argv], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(printed) and done.stderr.count("\n") == bool(printed), \
        done.stderr


def test_amp_channels_last_validation_csv_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    argv = ["--epochs", "2", "--ie-steps", "1", "--batch-size", "64", "--val-split", "0.1",
            "--val-samples", "16", "--threads", "1"]
    done = _train(tmp_path, *argv, "--amp", "bf16", "--channels-last")
    assert "epoch 2/2: loss" in done.stdout and "validation clean" in done.stdout
    (ckpt_path,) = [p for p in tmp_path.glob("*.pt") if not p.name.endswith(".best.pt")]
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["config"]["amp"] == "bf16" and ckpt["config"]["channels_last"]
    assert ckpt["grad_scaler"] is None
    with open(ckpt_path.with_name(ckpt_path.stem + ".csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0 <= float(r["val_robust"]) <= float(r["val_clean"]) + 0.2 for r in rows)
    assert ckpt_path.with_name(ckpt_path.stem + ".png").stat().st_size > 1000
    best = load_checkpoint(ckpt_path.with_name(ckpt_path.stem + ".best.pt"))
    assert best["metrics"]["best_robust"]["val_robust"] == max(float(r["val_robust"])
                                                              for r in rows)
    # float16 adds a GradScaler, checkpointed; it is another configuration (another file)
    _train(tmp_path, *argv, "--amp", "fp16", "--epochs", "1")
    scaled = [load_checkpoint(p) for p in tmp_path.glob("*.pt")
              if not p.name.endswith(".best.pt") and p != ckpt_path]
    assert len(scaled) == 1 and scaled[0]["grad_scaler"]["scale"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--data", "moons", "--channels-last"], "--channels-last: needs image data"),
    (["--val-split", "2000"], "--val-split: 2000 validation samples leave none"),
    (["--val-split", "1.5"], "--val-split: expected a fraction in (0, 1) or a count"),
])
def test_bad_training_loop_options_are_refused(argv, message):
    done = subprocess.run([sys.executable, "-m", "pyeuler", "train", "--epochs", "1", *argv],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr
