"""Checkpoints: save / resume training, loaded safely with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors and JSON-like values::

    {"format": "pyeuler-checkpoint", "version": 1, "pyeuler_version": str,
     "model": {"name": str, "kwargs": dict},      # enough to rebuild the model
     "state_dict": ..., "optimizer": ... | None, "grad_scaler": dict | None, "epoch": int,
     "config": dict, "metrics": dict, "rng_state": ByteTensor}

Corrupt, truncated, foreign or mismatched files raise :class:`CheckpointError` naming the
path and what is wrong; a missing file raises ``FileNotFoundError`` naming it.
"""

from __future__ import annotations

from collections.abc import Mapping

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_model_state",
           "FORMAT", "VERSION"]

FORMAT = "pyeuler-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (corrupt, not a pyeuler checkpoint, or not
    matching the model)."""


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, name: str | None = None,
                    model_kwargs: dict | None = None,
                    optimizer: torch.optim.Optimizer | None = None, epoch: int = 0,
                    config: dict | None = None, metrics: dict | None = None,
                    grad_scaler: torch.amp.GradScaler | None = None) -> Path:
    """Write a checkpoint atomically (temp file + rename; parent folders are created).

    ``name``/``model_kwargs`` describe how to rebuild the model (e.g. ``"wrn-10-1"`` and
    ``{"h": 1.0, "ie_steps": 1}``); ``config`` and ``metrics`` must be JSON-like (dicts,
    lists, str, numbers, bool, None) so that ``weights_only=True`` loading accepts them.
    ``grad_scaler``'s state (float16 mixed precision: the loss scale and its growth
    counter) is kept so that a resumed run scales as the uninterrupted one."""
    path = Path(path)
    from pyeuler._version import __version__

    ckpt = {
        "format": FORMAT, "version": VERSION, "pyeuler_version": __version__,
        "model": {"name": name, "kwargs": dict(model_kwargs or {})},
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
        "epoch": int(epoch), "config": dict(config or {}), "metrics": dict(metrics or {}),
        "rng_state": torch.get_rng_state(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Read and validate a checkpoint with ``weights_only=True`` (no code execution)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {path} is not a file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        detail = next((line.strip() for line in msg.splitlines() if "Unsupported global" in line),
                      None)
        if detail is not None:
            detail = detail.split("WeightsUnpickler error:")[-1].split(". Please use")[0].strip()
            raise CheckpointError(
                f"checkpoint: {path} holds objects that weights_only=True loading refuses "
                f"(not a pyeuler checkpoint, or not a trusted one): {detail}") from e
        raise CheckpointError(f"checkpoint: {path} is corrupt or not a torch checkpoint "
                              f"(unpickling failed)") from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
        first = str(e).splitlines()[0].split(". ")[0] if str(e) else ""
        raise CheckpointError(f"checkpoint: {path} is corrupt or truncated, or not a torch "
                              f"file ({type(e).__name__}: {first[:200]})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint: {path} is a torch file but not a pyeuler "
                              "checkpoint (no 'format': 'pyeuler-checkpoint' entry)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"checkpoint: {path} has format version {ckpt.get('version')!r}; "
                              f"this pyeuler reads version {VERSION}")
    for key in ("model", "state_dict", "epoch"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint: {path} lacks the {key!r} entry")
    for key, kind, what in (("state_dict", Mapping, "a mapping of tensors"),
                            ("model", Mapping, "a mapping (name, kwargs)"),
                            ("epoch", int, "an int")):
        if not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            raise CheckpointError(f"checkpoint: {path} has a {key!r} entry of type "
                                  f"{type(ckpt[key]).__name__}, expected {what}")
    return ckpt


def load_model_state(model: nn.Module, ckpt: dict, path: str | os.PathLike = "<checkpoint>"
                     ) -> None:
    """``model.load_state_dict(ckpt["state_dict"])`` with an error that names the path and
    lists missing / unexpected keys and shape mismatches."""
    sd = ckpt["state_dict"]
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and hasattr(sd[k], "shape") and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:

        def few(items):
            return ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {few(shapes)}")
        spec = ckpt.get("model", {})
        raise CheckpointError(
            f"checkpoint: {path} does not match the model (checkpoint was saved for "
            f"{spec.get('name')!r} with {spec.get('kwargs')}): " + "; ".join(parts))
    model.load_state_dict(sd)
