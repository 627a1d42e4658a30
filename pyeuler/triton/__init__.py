"""Triton backend of the kernel primitives (:mod:`pyeuler.ops.primitives`).

Same names, signatures and semantics as the eager reference; tensors on a CUDA device, or
on the CPU when ``TRITON_INTERPRET=1`` was set before triton was imported.  Importing this
package never fails: without triton, :func:`is_available` says why and every primitive
raises ``RuntimeError``.

Every kernel launches through :func:`pyeuler.triton._utils.launch_hook`'s seam (the kernel
modules are routed once, below), which is how :mod:`pyeuler.cost` sees launches.
"""

from __future__ import annotations

import importlib

import torch

from pyeuler.backend import counted_device

__all__ = [
    "is_available",
    "forward_coefficients",
    "backward_coefficients",
    "backward_coefficients_vjp",
    "double_backward_coefficients",
    "update_running_stats",
    "norm_stats",
    "norm_stats_and_coefficients",
    "norm_stats_partials",
    "merge_stats",
    "affine_act_forward",
    "affine_act_backward_reduce",
    "affine_act_backward_reduce_recompute",
    "affine_act_backward_apply",
    "affine_act_backward_apply_ie_update",
    "affine_act_double_backward_reduce",
    "affine_act_double_backward_apply",
    "ie_residual",
    "ie_residual_with_term",
    "ie_residual_with_term_adjoint",
    "ie_update",
]

try:
    import triton  # noqa: F401
except ImportError as exc:  # the whole backend is optional (pip extra "triton")
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None


def is_available() -> tuple[bool, str]:
    """``(True, "")`` when the kernels can run here, else ``(False, reason)``."""
    if _IMPORT_ERROR is not None:
        return False, f"triton is not installed ({_IMPORT_ERROR})"
    if torch.cuda.is_available() or counted_device() is not None:
        return True, ""
    from pyeuler.triton._utils import interpreting

    if interpreting():
        return True, "running in the Triton CPU interpreter (TRITON_INTERPRET=1)"
    return False, "no CUDA device and TRITON_INTERPRET is not set"


if _IMPORT_ERROR is None:
    from pyeuler.triton._utils import route_launches
    from pyeuler.triton.affine_act import (
        affine_act_backward_apply,
        affine_act_backward_apply_ie_update,
        affine_act_backward_reduce,
        affine_act_backward_reduce_recompute,
        affine_act_double_backward_apply,
        affine_act_double_backward_reduce,
        affine_act_forward,
    )
    from pyeuler.triton.coefficients import (backward_coefficients, backward_coefficients_vjp,
                                             double_backward_coefficients, forward_coefficients,
                                             update_running_stats)
    from pyeuler.triton.ie import (ie_residual, ie_residual_with_term,
                                   ie_residual_with_term_adjoint, ie_update)
    from pyeuler.triton.norm_stats import (merge_stats, norm_stats, norm_stats_and_coefficients,
                                           norm_stats_partials)

    # by module name: the attribute pyeuler.triton.norm_stats is the function imported above
    for _module in ("affine_act", "coefficients", "ie", "norm_stats"):
        route_launches(importlib.import_module(f"pyeuler.triton.{_module}"))
    del _module
else:

    def _unavailable(name: str):
        def primitive(*args, **kwargs):
            raise RuntimeError(f"pyeuler.triton.{name} needs triton, which is not installed "
                               f"({_IMPORT_ERROR}); install pyeuler[triton]")

        primitive.__name__ = primitive.__qualname__ = name
        return primitive

    for _name in __all__[1:]:
        globals()[_name] = _unavailable(_name)
    del _name
