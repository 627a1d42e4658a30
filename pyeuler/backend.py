"""Backend selection (docs/semantics.md §7).

- ``"reference"``: the literal eager algorithm (IE-Skip through ``torch.autograd.grad``),
  the oracle every other backend is tested against;
- ``"eager"``: pyeuler's explicit formulas in plain PyTorch ops (CPU fallback, float64);
- ``"triton"``, ``"cuda"``: fused kernels;
- ``"auto"``: the fused kernels for CUDA tensors (``"triton"``, else ``"cuda"``), else
  ``CPU_AUTO`` (``"eager"``, chosen by a recorded CPU benchmark, see below).

The process-wide default comes from ``PYEULER_BACKEND`` (default ``"auto"``) and can be
changed with :func:`set_backend`.

Counting seam: inside :func:`counting_device`, CPU tensors stand for CUDA tensors of a
:class:`DeviceModel`, so :mod:`pyeuler.cost` can run the fused backends' GPU code path on
fake CPU tensors (a CPU-only torch build cannot give even fake tensors a CUDA device through
the autograd engine).  Every device test on that path asks :func:`device_type`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch

BACKENDS = ("reference", "eager", "triton", "cuda", "auto")
_CONCRETE = ("reference", "eager", "triton", "cuda")


def _check_name(name: str, argument: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS}, got {name!r}")
    return name


def check_backend_name(name: str) -> str:
    """``name`` if it names a backend (:data:`BACKENDS`), else ValueError; availability is
    :func:`resolve_backend`'s question."""
    return _check_name(name, "backend")


# set_backend's choice; None: PYEULER_BACKEND's, read (and checked) where it is first needed,
# so that a bad value is an error of the code that uses it, not of `import pyeuler`
_default_backend: str | None = None


def set_backend(name: str) -> None:
    """Set the process-wide default backend used when ``backend=None``.

    Args:
        name: one of :data:`BACKENDS` (``"reference"``, ``"eager"``, ``"triton"``,
            ``"cuda"``, ``"auto"``).  Availability is checked when an op resolves it
            (:func:`resolve_backend`), not here.

    Returns:
        None.

    Raises:
        ValueError: ``name`` is not one of :data:`BACKENDS`.
    """
    global _default_backend
    _default_backend = _check_name(name, "backend")


def get_backend() -> str:
    """The process-wide default backend.

    Returns:
        The name set by :func:`set_backend`, else ``PYEULER_BACKEND``'s, else ``"auto"``.

    Raises:
        ValueError: ``PYEULER_BACKEND`` is set to a name not in :data:`BACKENDS` (and no
            :func:`set_backend` call overrides it).
    """
    if _default_backend is not None:
        return _default_backend
    return _check_name(os.environ.get("PYEULER_BACKEND", "auto"), "PYEULER_BACKEND")


def kernel_module(name: str):
    """The module implementing :mod:`pyeuler.ops.primitives` for backend ``name``: the
    primitives themselves for ``"eager"``, ``pyeuler.triton`` or ``pyeuler.cuda``."""
    if name == "eager":
        from pyeuler.ops import primitives as module
    elif name == "triton":
        from pyeuler import triton as module
    elif name == "cuda":
        from pyeuler import cuda as module
    else:
        raise ValueError(f"backend must be 'eager', 'triton' or 'cuda' here, got {name!r}")
    return module


def available_backends() -> dict[str, tuple[bool, str]]:
    """Every concrete backend with ``(available, reason)``; the reason says why not.

    Returns:
        ``{"reference": (True, ...), "eager": (True, ...), "triton": (bool, str),
        "cuda": (bool, str)}``: whether each can run in this process (Triton: installed,
        and a GPU or ``TRITON_INTERPRET=1``; CUDA: a GPU and the extension), with the
        reason when not (or a note, e.g. that Triton runs in the CPU interpreter).

    Raises:
        Nothing: a backend that cannot load is reported, not raised.
    """
    report = {
        "reference": (True, "plain PyTorch autograd"),
        "eager": (True, "plain PyTorch ops"),
    }
    for name in ("triton", "cuda"):
        report[name] = kernel_module(name).is_available()
    return report


def triton_interpreted() -> bool:
    """Whether Triton kernels run in the CPU interpreter: ``TRITON_INTERPRET`` parsed as
    Triton parses it (``triton.knobs``: on for 1, true, yes, on or y in any case; off for
    anything else, ``0``, ``false`` and the empty string included)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on", "y")


@dataclass(frozen=True)
class DeviceModel:
    """The GPU a counting run stands for: what its code path depends on.

    ``sm_count`` sizes the fused backends' split reductions (how many partial sums, and
    whether a second pass merges them), as the SM count of a real device does.
    """

    name: str = "H100 SXM5"
    sm_count: int = 132


H100 = DeviceModel()

_counting: DeviceModel | None = None


@contextlib.contextmanager
def counting_device(model: DeviceModel = H100) -> Iterator[DeviceModel]:
    """Inside the block, CPU tensors stand for CUDA tensors of ``model``.

    :func:`device_type` then calls them ``"cuda"``, so backend resolution and the kernel
    backends' device checks take the GPU path, split reductions are sized for ``model``,
    and the CUDA backend's ops exist without the compiled extension (they return
    uninitialised outputs on CPU tensors).  Kernels must not actually run on such tensors:
    :mod:`pyeuler.cost` skips every Triton launch through
    :func:`pyeuler.triton._utils.launch_hook` and uses fake tensors or tiny shapes.
    Process-wide, not thread-local; blocks nest.
    """
    global _counting
    if not isinstance(model, DeviceModel):
        raise TypeError(f"model must be a DeviceModel, got {type(model).__name__}")
    previous, _counting = _counting, model
    try:
        yield model
    finally:
        _counting = previous


def counted_device() -> DeviceModel | None:
    """The :class:`DeviceModel` of the enclosing :func:`counting_device` block, or None."""
    return _counting


def device_type(device: torch.device) -> str:
    """``device.type``, except that CPU tensors are ``"cuda"`` inside :func:`counting_device`."""
    if _counting is not None and device.type == "cpu":
        return "cuda"
    return device.type


def _device_ok(name: str, device: torch.device) -> tuple[bool, str]:
    if name in ("reference", "eager"):
        return True, ""
    kind = device_type(device)
    if name == "cuda" and kind != "cuda":
        return False, f"the 'cuda' backend needs CUDA tensors, got {device.type} tensors"
    if name == "triton" and kind != "cuda" and not triton_interpreted():
        return False, (
            f"the 'triton' backend needs CUDA tensors, got {device.type} tensors "
            "(set TRITON_INTERPRET=1 before importing triton to run it on the CPU)"
        )
    return True, ""


# What "auto" runs off the GPU, by measurement (benchmarks/results/cpu-2026-11-29.md and
# cpu-2026-11-30.md: OMP_NUM_THREADS=1 pyeuler bench --backends reference eager --steps 0 1
# --grads unrolled detached --depth 16 --widen-factor 4 --batch-size 8 --image-size 32):
# "eager" takes 218.7 / 220.0 ms per K = 0 step against plain PyTorch's 227.4 / 212.2
# (native BatchNorm, autograd), 486.0 / 469.0 against 479.7 / 485.9 at K = 1 unrolled and
# 302.2 / 327.0 against 290.4 / 286.3 detached.  The "reference" backend, the other exact
# one, runs the oracle's arithmetic norms, not the native ones.
CPU_AUTO = "eager"


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The concrete backend to use for tensors on ``device`` (docs/semantics.md §7).

    Args:
        backend: one of :data:`BACKENDS`, or None for the process-wide default
            (:func:`get_backend`).  ``"auto"`` picks ``"triton"`` (else ``"cuda"``) for
            CUDA tensors and ``CPU_AUTO`` (``"eager"``) otherwise.
        device: the ``torch.device`` of the tensors the op will run on.

    Returns:
        ``"reference"``, ``"eager"``, ``"triton"`` or ``"cuda"``.

    Raises:
        ValueError: ``backend`` is not one of :data:`BACKENDS`.
        RuntimeError: the requested backend cannot run here or on ``device``; the message
            says why and lists the backends that can, instead of silently falling back.
    """
    name = _check_name(get_backend() if backend is None else backend, "backend")
    if name == "auto":
        if device_type(device) == "cuda":
            for candidate in ("triton", "cuda"):
                ok, _ = kernel_module(candidate).is_available()
                if ok:
                    return candidate
        return CPU_AUTO
    if name in ("reference", "eager"):
        return name
    ok, why = kernel_module(name).is_available()
    if ok:
        ok, why = _device_ok(name, device)
    if not ok:
        usable = [n for n, (a, _) in available_backends().items() if a and _device_ok(n, device)[0]]
        raise RuntimeError(
            f"backend={name!r} is not available: {why}. "
            f"Available for {device.type} tensors: {usable}."
        )
    return name
