"""Which implementation a call runs, given how it is being differentiated and what it holds.

The fused backends (``"triton"``, ``"cuda"``) run ``torch.library`` custom ops whose autograd
is a reverse-mode formula (``register_autograd``).  PyTorch gives such ops **zero tangents**
under forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``, ``jacfwd``) and
refuses them inside ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``).  So a call
that carries a tangent, or runs inside a ``torch.func`` transform, takes the ``"eager"``
backend instead: the same formulas in plain torch ops (:mod:`pyeuler.ops.primitives`, the
contract the kernels are tested against), which every mode of PyTorch differentiates.
Empty tensors take it too: there is nothing for a kernel to do, and a launch over zero
elements is not worth a special case in every kernel.

The checks read metadata only (the functorch interpreter stack, the forward-AD level and
each tensor's tangent slot): no host synchronisation.  Dynamo cannot trace them, so under
``torch.compile`` they are skipped.  Known limitation: ``torch.compile`` *around*
``torch.func.jvp``/``jacfwd`` of a fused backend therefore still gives the custom ops zero
tangents (PyTorch's behaviour for custom ops without a forward-mode formula); compiled
forward-mode code must use ``backend="eager"``.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

__all__ = ["FUSED_BACKENDS", "capture_active", "dual_level_open", "forward_mode_active",
           "func_transform_active", "kernel_backend"]

FUSED_BACKENDS = ("triton", "cuda")


def func_transform_active() -> bool:
    """Whether this call runs inside a ``torch.func`` transform (vmap, grad, jvp, …)."""
    return torch._C._functorch.maybe_current_level() is not None


def capture_active() -> bool:
    """Whether device values cannot be read on the host here: ``torch.compile`` is tracing,
    or the current CUDA stream is capturing a graph (``torch.cuda.graph``).  Code that
    would read one (an early stop, a value check) must refuse or skip it."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def dual_level_open() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level()`` is open (tensors may be dual)."""
    return fwAD._current_level >= 0


def _carries_tangent(tensors) -> bool:
    if not dual_level_open():
        return False
    return any(isinstance(t, Tensor) and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def forward_mode_active(*tensors) -> bool:
    """Whether a forward-mode derivative flows through ``tensors``: a ``torch.func.jvp`` /
    ``jacfwd`` transform is active, or one of them is a ``forward_ad`` dual tensor."""
    if torch.compiler.is_compiling():
        return False
    if func_transform_active() and any(
            i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters()):
        return True
    return _carries_tangent(tensors)


def kernel_backend(name: str, *tensors) -> str:
    """``name``, or ``"eager"`` where a fused backend's custom ops cannot serve the call:
    inside a ``torch.func`` transform, with a forward-mode tangent on any of ``tensors``, or
    when the first tensor (the activation) is empty."""
    if name not in FUSED_BACKENDS:
        return name
    if tensors[0].numel() == 0:
        return "eager"
    if torch.compiler.is_compiling():
        return name
    return "eager" if func_transform_active() or _carries_tangent(tensors) else name
