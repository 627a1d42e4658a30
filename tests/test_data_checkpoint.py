"""Data loaders (digits, moons, CIFAR-10 pickle reader) and checkpoints."""

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn

from pyeuler.checkpoint import (CheckpointError, load_checkpoint, load_model_state,
                                save_checkpoint)
from pyeuler.data import load, load_cifar10, load_digits, load_moons, random_crop_flip


def test_digits_shape_range_and_deterministic_stratified_split():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert a.x_train.shape[1:] == (1, 8, 8) and a.x_train.dtype == torch.float32
    assert len(a.x_train) + len(a.x_test) == 1797
    assert a.x_train.min() == 0 and a.x_train.max() == 1
    assert torch.equal(a.x_test, b.x_test) and not torch.equal(a.x_test, c.x_test)
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 40 and counts.max() <= 50  # stratified: ~45 per class
    assert a.num_classes == 10 and a.in_channels == 1


def test_moons_scaled_to_unit_square():
    d = load_moons(seed=3, n_samples=400)
    x = torch.cat([d.x_train, d.x_test])
    assert d.x_train.shape[1:] == (2,) and len(x) == 400
    assert x.min() == 0 and x.max() == 1 and set(d.y_train.tolist()) == {0, 1}


def test_load_by_name_errors():
    with pytest.raises(ValueError, match="data: unknown dataset 'mnist'"):
        load("mnist")
    with pytest.raises(ValueError, match="data_dir"):
        load("cifar10")
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.5)


def _fake_cifar(root, n=6, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [b"x.png"] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
        batches[name] = d
    return folder, batches


def test_cifar10_reader(tmp_path):
    folder, batches = _fake_cifar(tmp_path)
    for where in (tmp_path, folder):  # the extracted folder or its parent
        d = load_cifar10(where)
        assert d.x_train.shape == (30, 3, 32, 32) and d.x_train.dtype == torch.uint8
        assert d.x_test.shape == (6, 3, 32, 32)
        first = batches["data_batch_1"]
        assert torch.equal(d.x_train[0].flatten(), torch.from_numpy(first[b"data"][0]))
        assert d.y_train[:6].tolist() == first[b"labels"]


def test_cifar10_missing_and_malicious_files(tmp_path):
    folder, _ = _fake_cifar(tmp_path)
    os.remove(folder / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_dir: .* data_batch_3"):
        load_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="data_batch_3: not a CIFAR-10 python batch"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize("entry,value,match", [
    (b"labels", [0, 1, 2, 3, 4, 10], r"labels range over 0\.\.10"),
    (b"labels", [0, 1, 2, 3, 4, 255], r"labels range over 0\.\.255"),
    (b"labels", [-1, 1, 2, 3, 4, 5], r"labels range over -1\.\.5"),
    (b"labels", [0.5] * 6, "labels are float64"),
    (b"data", np.full((6, 3072), 300, dtype=np.int64), "pixels are int64, expected uint8"),
])
def test_cifar10_values_are_checked_naming_the_file(tmp_path, entry, value, match):
    """Out-of-range labels and non-uint8 pixels are refused when loading, naming the file,
    not wrapped (pixel 300 -> 44) or left for training to die on."""
    folder, batches = _fake_cifar(tmp_path)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({**batches["data_batch_2"], entry: value}, f)
    with pytest.raises(ValueError, match=f"data_batch_2: not a CIFAR-10 python batch .*{match}"):
        load_cifar10(tmp_path)


def test_random_crop_flip():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    y = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    y0 = random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(0))
    for i in range(2):
        assert torch.equal(y0[i], x[i]) or torch.equal(y0[i], x[i].flip(-1))


# ----------------------------------------------------------------------- checkpoints

def net(width=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, width), nn.BatchNorm1d(width), nn.ReLU(),
                         nn.Linear(width, 2))


def test_checkpoint_roundtrip(tmp_path):
    m = net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.rand(4, 2)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "sub" / "a.pt", m, name="mlp", model_kwargs={"h": 0.5},
                           optimizer=opt, epoch=3, config={"data": "moons", "eps": [0.1]},
                           metrics={"acc": 0.9})
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 3 and ckpt["model"] == {"name": "mlp", "kwargs": {"h": 0.5}}
    assert ckpt["config"]["eps"] == [0.1] and ckpt["metrics"]["acc"] == 0.9
    m2 = net(8)
    with torch.no_grad():
        for p in m2.parameters():
            p.zero_()
    load_model_state(m2, ckpt, path)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ckpt["optimizer"])
    assert not list(tmp_path.glob("sub/*.tmp"))  # atomic write leaves no temp files


def test_checkpoint_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        load_checkpoint(missing)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="garbage.pt is corrupt"):
        load_checkpoint(garbage)

    good = save_checkpoint(tmp_path / "good.pt", net(), name="mlp")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt is corrupt"):
        load_checkpoint(truncated)

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt is a torch file but not a pyeuler"):
        load_checkpoint(foreign)

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "pyeuler-checkpoint", "obj": CheckpointError("x")}, unsafe)
    with pytest.raises(CheckpointError, match="unsafe.pt holds objects that weights_only"):
        load_checkpoint(unsafe)

    ckpt = load_checkpoint(good)
    ckpt["version"] = 99
    future = tmp_path / "future.pt"
    torch.save(ckpt, future)
    with pytest.raises(CheckpointError, match="future.pt has format version 99"):
        load_checkpoint(future)

    for key, value, kind in (("state_dict", [1, 2], "list"), ("model", "wrn", "str"),
                             ("epoch", 1.5, "float")):
        ckpt = {**load_checkpoint(good), key: value}
        odd = tmp_path / f"odd_{key}.pt"
        torch.save(ckpt, odd)
        with pytest.raises(CheckpointError, match=f"odd_{key}.pt has a '{key}' entry of type {kind}"):
            load_checkpoint(odd)


def test_mismatched_checkpoint_lists_keys_and_shapes(tmp_path):
    path = save_checkpoint(tmp_path / "w8.pt", net(8), name="mlp", model_kwargs={"width": 8})
    ckpt = load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"w8.pt does not match the model.*shape mismatches: "
                                              r"0.weight: checkpoint \(8, 2\) vs model \(16, 2\)"):
        load_model_state(net(16), ckpt, path)
    other = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(CheckpointError, match="unexpected keys: 1.weight"):
        load_model_state(other, ckpt, path)
