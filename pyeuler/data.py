"""Datasets for the robustness experiments, as in-memory tensors in [0, 1] — no downloads.

- ``digits``: scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes),
  pixel values 0..16 scaled to [0, 1], shape (N, 1, 8, 8).
- ``moons``: scikit-learn's two interleaving half-circles, points min-max scaled to
  [0, 1]², shape (N, 2), 2 classes.
- ``cifar10``: the standard "CIFAR-10 python version" pickle batches
  (``data_batch_1..5``, ``test_batch``) read from ``data_dir`` without torchvision; images
  kept as uint8 (N, 3, 32, 32) (scaled to [0, 1] per batch by the training loop).

Splits are deterministic given ``seed`` (digits: stratified; cifar10: the official one).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Data", "load", "load_digits", "load_moons", "load_cifar10", "DATASETS",
           "random_crop_flip", "hold_out", "validation_count"]

DATASETS = ("digits", "moons", "cifar10")


@dataclass
class Data:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    #: shape of one input, e.g. (1, 8, 8) or (2,)
    input_shape: tuple
    #: a validation split carved from the training data (:func:`hold_out`), else None
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    def __repr__(self) -> str:
        val = "" if self.x_val is None else f", val={tuple(self.x_val.shape)}"
        return (f"Data({self.name!r}, train={tuple(self.x_train.shape)}{val}, "
                f"test={tuple(self.x_test.shape)}, classes={self.num_classes})")


def _sklearn():
    """scikit-learn's datasets and splitter: an optional dependency (``pyeuler[data]``)."""
    try:
        from sklearn import datasets, model_selection
    except ImportError as e:
        raise ImportError("the digits and moons datasets need scikit-learn, which pyeuler "
                          "installs only with an extra: pip install 'pyeuler[data]' (or "
                          "'pyeuler[train]')") from e
    return datasets, model_selection


def _check_fraction(test_fraction: float) -> None:
    if not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction: expected a number in (0, 1), got {test_fraction!r}")


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> Data:
    """scikit-learn's bundled 8×8 digits (1,797 images, 10 classes), stratified split.

    Args:
        seed: the split's random state (an int).
        test_fraction: share of the samples in the test split, in (0, 1).

    Returns:
        :class:`Data` ``"digits"``: x float32 ``(N, 1, 8, 8)`` in [0, 1] (pixel / 16),
        y int64 ``(N,)`` in 0..9, ``input_shape=(1, 8, 8)``, 10 classes.

    Raises:
        ValueError: ``test_fraction`` outside (0, 1).
        ImportError: scikit-learn is not installed (``pip install 'pyeuler[data]'``).
    """
    _check_fraction(test_fraction)
    datasets, model_selection = _sklearn()
    d = datasets.load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = model_selection.train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return Data("digits", torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte),
                torch.from_numpy(yte), 10, (1, 8, 8))


def load_moons(seed: int = 0, n_samples: int = 2000, noise: float = 0.15,
               test_fraction: float = 0.25) -> Data:
    """scikit-learn's two interleaving half-circles, min-max scaled to [0, 1]² over all
    samples; stratified split.

    Args:
        seed: the random state of both the points and the split (an int).
        n_samples: points in all, an int >= 8.
        noise: std of the Gaussian noise added to the points (before scaling).
        test_fraction: share of the samples in the test split, in (0, 1).

    Returns:
        :class:`Data` ``"moons"``: x float32 ``(N, 2)`` in [0, 1], y int64 ``(N,)`` in
        {0, 1}, ``input_shape=(2,)``, 2 classes.

    Raises:
        ValueError: ``test_fraction`` outside (0, 1); ``n_samples`` not an int >= 8.
        ImportError: scikit-learn is not installed (``pip install 'pyeuler[data]'``).
    """
    _check_fraction(test_fraction)
    if not isinstance(n_samples, int) or n_samples < 8:
        raise ValueError(f"n_samples: expected an int >= 8, got {n_samples!r}")
    datasets, model_selection = _sklearn()
    x, y = datasets.make_moons(n_samples=n_samples, noise=noise, random_state=seed)
    x = (x - x.min(0)) / (x.max(0) - x.min(0))
    xtr, xte, ytr, yte = model_selection.train_test_split(
        x.astype(np.float32), y.astype(np.int64), test_size=test_fraction, random_state=seed,
        stratify=y)
    return Data("moons", torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte),
                torch.from_numpy(yte), 2, (2,))


class _CifarUnpickler(pickle.Unpickler):
    """Only what the CIFAR python batches contain (numpy arrays, dicts, lists, bytes): a
    pickle from elsewhere cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
        data = d.get(b"data", d.get("data")) if isinstance(d, dict) else None
        labels = d.get(b"labels", d.get("labels")) if isinstance(d, dict) else None
        if data is None or labels is None:
            raise ValueError("no 'data'/'labels' entries")
        data, labels = np.asarray(data), np.asarray(labels)
        if data.dtype != np.uint8:  # a cast would wrap pixel 300 to 44
            raise ValueError(f"pixels are {data.dtype}, expected uint8")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels are {labels.dtype} of shape {labels.shape}, expected "
                             "integers of shape (n,)")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"labels range over {labels.min()}..{labels.max()}, expected 0..9")
        labels = labels.astype(np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise ValueError(f"data has shape {data.shape}, labels {labels.shape}; "
                             "expected (n, 3072) and (n,)")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError,
            AttributeError, KeyError) as e:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({e})") from e
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str | os.PathLike) -> Data:
    """CIFAR-10 from the python pickle batches in ``data_dir``, read without torchvision
    and without running code from the files; the official split (50,000 / 10,000).

    Args:
        data_dir: the extracted ``cifar-10-batches-py`` folder, or its parent.

    Returns:
        :class:`Data` ``"cifar10"``: x uint8 ``(N, 3, 32, 32)`` (the training loop scales
        batches to [0, 1]), y int64 ``(N,)`` in 0..9, ``input_shape=(3, 32, 32)``, 10
        classes.

    Raises:
        ValueError: ``data_dir`` is None; a batch that is not a CIFAR-10 python batch
            (unpickling refused, missing entries, pixels not uint8, labels outside 0..9,
            wrong shapes), naming the file.
        FileNotFoundError: batches missing from ``data_dir``, naming them and where to get
            them.
    """
    if data_dir is None:
        raise ValueError("data_dir: cifar10 needs --data-dir pointing at the extracted "
                         "'cifar-10-batches-py' folder (no downloads are made)")
    root = Path(data_dir).expanduser()
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"data_dir: {root} lacks the CIFAR-10 python batches "
                                f"{', '.join(missing)} (get cifar-10-python.tar.gz from "
                                "https://www.cs.toronto.edu/~kriz/cifar.html and extract it)")
    train = [_read_batch(root / n) for n in names[:5]]
    xte, yte = _read_batch(root / "test_batch")
    xtr = np.concatenate([t[0] for t in train])
    ytr = np.concatenate([t[1] for t in train])
    return Data("cifar10", torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte),
                torch.from_numpy(yte), 10, (3, 32, 32))


def load(name: str, seed: int = 0, data_dir: str | os.PathLike | None = None, **kw) -> Data:
    """Load a dataset by name.

    Args:
        name: ``"digits"``, ``"moons"`` or ``"cifar10"`` (also ``"cifar-10"``), any case.
        seed: the split's random state (digits, moons; CIFAR-10's split is fixed).
        data_dir: the CIFAR-10 folder (:func:`load_cifar10`); ignored otherwise.
        **kw: passed to :func:`load_digits` / :func:`load_moons` (``test_fraction``,
            ``n_samples``, ``noise``).

    Returns:
        :class:`Data` (see :func:`load_digits`, :func:`load_moons`, :func:`load_cifar10`).

    Raises:
        ValueError: an unknown ``name``; else as the loader it calls.
        FileNotFoundError, ImportError: as the loader it calls.
    """
    key = str(name).lower()
    if key == "digits":
        return load_digits(seed=seed, **kw)
    if key == "moons":
        return load_moons(seed=seed, **kw)
    if key in ("cifar10", "cifar-10"):
        return load_cifar10(data_dir)
    raise ValueError(f"data: unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def validation_count(size: float, n_train: int) -> int:
    """The number of samples a validation split of ``size`` takes from ``n_train``.

    Args:
        size: a fraction of the training samples in (0, 1) (rounded, at least 1) or a
            count (an int >= 1).
        n_train: the number of training samples.

    Returns:
        The validation split's size, an int in [1, n_train).

    Raises:
        ValueError: ``size`` neither a fraction in (0, 1) nor an int >= 1, or leaving no
            training sample.
    """
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not size > 0 or (
            size >= 1 and size != int(size)):
        raise ValueError(f"val_split: expected a fraction in (0, 1) or a count >= 1, got "
                         f"{size!r}")
    count = max(1, round(size * n_train)) if size < 1 else int(size)
    if count >= n_train:
        raise ValueError(f"val_split: {count} validation samples leave none of the "
                         f"{n_train} training samples to train on")
    return count


def hold_out(data: Data, size: float, seed: int = 0) -> Data:
    """``data`` with a validation split carved from its training samples (never from the
    test split): a random subset, the same for the same ``seed``, kept in
    ``x_val``/``y_val``, the rest in ``x_train``/``y_train`` (in their stored order).

    Args:
        data: the data set; its test split is left as it is.
        size: a fraction of the training samples in (0, 1), or a count (an int >= 1).
        seed: the draw's seed (an int).

    Returns:
        A new :class:`Data` (tensors shared with ``data`` where unchanged).

    Raises:
        ValueError: as :func:`validation_count`.
    """
    n = len(data.x_train)
    count = validation_count(size, n)
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]
    keep = torch.ones(n, dtype=torch.bool)
    keep[chosen] = False
    chosen = chosen.sort().values
    return dataclasses.replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep],
                               x_val=data.x_train[chosen], y_val=data.y_train[chosen])


def random_crop_flip(x: torch.Tensor, padding: int = 4,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard CIFAR augmentation: zero-pad by ``padding``, random crop back to H×W,
    random horizontal flip; one draw per image.

    Args:
        x: a batch ``(N, C, H, W)``, any dtype.
        padding: pixels of zeros added on each side, an int >= 0.
        generator: the crop offsets' and flips' generator (None: the global RNG).

    Returns:
        x's shape and dtype.

    Raises:
        ValueError: x not 4-D (unpacking its shape).
    """
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, padded.shape[3])
    out = torch.gather(padded, 2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    out = torch.gather(out, 3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)
