"""Backend selection (SPEC §7).

- ``"reference"``: the literal eager algorithm (IE-Skip through ``torch.autograd.grad``),
  the oracle every other backend is tested against;
- ``"eager"``: pyeuler's explicit formulas in plain PyTorch ops (CPU fallback, float64);
- ``"triton"``, ``"cuda"``: fused kernels;
- ``"auto"``: the fastest available backend for the tensors' device.

The process-wide default comes from ``PYEULER_BACKEND`` (default ``"auto"``) and can be
changed with :func:`set_backend`.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("reference", "eager", "triton", "cuda", "auto")
_CONCRETE = ("reference", "eager", "triton", "cuda")


def _check_name(name: str, argument: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS}, got {name!r}")
    return name


_default_backend = _check_name(os.environ.get("PYEULER_BACKEND", "auto"), "PYEULER_BACKEND")


def set_backend(name: str) -> None:
    """Set the process-wide default backend used when ``backend=None``."""
    global _default_backend
    _default_backend = _check_name(name, "backend")


def get_backend() -> str:
    """The process-wide default backend."""
    return _default_backend


def _kernel_module(name: str):
    if name == "triton":
        from pyeuler import triton as module
    else:
        from pyeuler import cuda as module
    return module


def available_backends() -> dict[str, tuple[bool, str]]:
    """Every concrete backend with ``(available, reason)``; the reason says why not."""
    report = {
        "reference": (True, "plain PyTorch autograd"),
        "eager": (True, "plain PyTorch ops"),
    }
    for name in ("triton", "cuda"):
        report[name] = _kernel_module(name).is_available()
    return report


def triton_interpreted() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _device_ok(name: str, device: torch.device) -> tuple[bool, str]:
    if name in ("reference", "eager"):
        return True, ""
    if name == "cuda" and device.type != "cuda":
        return False, f"the 'cuda' backend needs CUDA tensors, got {device.type} tensors"
    if name == "triton" and device.type != "cuda" and not triton_interpreted():
        return False, (
            f"the 'triton' backend needs CUDA tensors, got {device.type} tensors "
            "(set TRITON_INTERPRET=1 before importing triton to run it on the CPU)"
        )
    return True, ""


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The concrete backend to use for tensors on ``device``.

    ``None`` means the process-wide default.  Raises ``RuntimeError`` naming the backends
    that are available, and why the requested one is not, instead of silently falling back.
    """
    name = _check_name(get_backend() if backend is None else backend, "backend")
    if name == "auto":
        if device.type == "cuda":
            for candidate in ("triton", "cuda"):
                ok, _ = _kernel_module(candidate).is_available()
                if ok:
                    return candidate
        return "eager"
    if name in ("reference", "eager"):
        return name
    ok, why = _kernel_module(name).is_available()
    if ok:
        ok, why = _device_ok(name, device)
    if not ok:
        usable = [n for n, (a, _) in available_backends().items() if a and _device_ok(n, device)[0]]
        raise RuntimeError(
            f"backend={name!r} is not available: {why}. "
            f"Available for {device.type} tensors: {usable}."
        )
    return name
