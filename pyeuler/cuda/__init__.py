"""CUDA C++ backend of the kernel primitives (:mod:`pyeuler.ops.primitives`).

Same names, signatures and semantics as the eager reference, on CUDA tensors in float32,
float16 or bfloat16, contiguous or channels_last.  The kernels live in ``kernels/`` (plain
CUDA C++ behind a C ABI) and are exposed to torch as the ops ``torch.ops.pyeuler.cuda_*``
by ``csrc/``; see :mod:`pyeuler.cuda._build` for how the extension is found or built.

Importing this package never fails and never builds anything: :func:`is_available` says
whether the backend can run here (loading or JIT-building the extension on first call), and
every primitive raises ``RuntimeError`` with that reason when it cannot.

Inside :func:`pyeuler.backend.counting_device` the ops exist without the extension too
(:data:`SCHEMAS`, defined with :data:`_FAKES`), so :mod:`pyeuler.cost` can count this
backend's GPU path on a CPU-only machine.
"""

from __future__ import annotations

import threading
from types import ModuleType

import torch
from torch import Tensor

from pyeuler.backend import counted_device, device_type
from pyeuler.ops import norm_algebra
from pyeuler.ops.norm_algebra import (DOUBLE_BACKWARD_KEYS, VJP_KEYS, double_backward_presence,
                                      vjp_presence)

__all__ = [
    "is_available",
    "forward_coefficients",
    "backward_coefficients",
    "backward_coefficients_vjp",
    "double_backward_coefficients",
    "norm_stats",
    "norm_stats_and_coefficients",
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
    "update_running_stats",
]

_lock = threading.Lock()
_extension: ModuleType | None = None
_load_error: str | None = None
# torch.library handle of the ops defined for counting (:func:`_define_for_counting`)
_counting_library: torch.library.Library | None = None

# The extension's op schemas, as csrc/ops.cpp's TORCH_LIBRARY_FRAGMENT(pyeuler, m) defines
# them (tests/test_cost.py checks that the two agree).
SCHEMAS = (
    "cuda_norm_stats(Tensor x, int groups) -> (Tensor, Tensor)",
    "cuda_norm_stats_and_coefficients(Tensor x, int groups, Tensor? weight, Tensor? bias, "
    "Tensor? h, float h_value, float eps) -> (Tensor, Tensor, Tensor, Tensor)",
    "cuda_affine_act_forward(Tensor x, Tensor scale, Tensor shift, Tensor? shortcut, "
    "bool relu, bool save_mask) -> (Tensor, Tensor)",
    "cuda_affine_act_backward_reduce(Tensor dy, Tensor x, Tensor scale, Tensor shift, "
    "Tensor center, Tensor? mask, bool relu, bool per_sample) -> (Tensor, Tensor)",
    "cuda_affine_act_backward_reduce_recompute(Tensor dy, Tensor x, Tensor scale, "
    "Tensor shift, Tensor center, bool relu, bool per_sample, ScalarType y_dtype) "
    "-> (Tensor, Tensor, Tensor)",
    "cuda_affine_act_backward_apply(Tensor dy, Tensor x, Tensor scale, Tensor shift, "
    "Tensor? mask, bool relu, Tensor a, Tensor b, Tensor c, Tensor center, "
    "bool want_dshortcut, Tensor? dx_addend, Tensor? dx_addend2) -> (Tensor, Tensor)",
    "cuda_affine_act_backward_apply_ie_update(Tensor dy, Tensor x, Tensor scale, "
    "Tensor shift, Tensor? mask, bool relu, Tensor a, Tensor b, Tensor c, Tensor center, "
    "Tensor residual, float step_size, float theta, bool residual_is_term) -> Tensor",
    "cuda_affine_act_double_backward_reduce(Tensor ddx, Tensor dy, Tensor x, Tensor scale, "
    "Tensor shift, Tensor center, Tensor? mask, bool relu, bool per_sample) "
    "-> (Tensor, Tensor, Tensor)",
    "cuda_affine_act_double_backward_apply(Tensor ddx, Tensor dy, Tensor x, Tensor scale, "
    "Tensor shift, Tensor? mask, bool relu, Tensor a, Tensor b, Tensor p, Tensor q, "
    "Tensor center, Tensor? ddshortcut, float ddx_scale, Tensor? dxx_addend) "
    "-> (Tensor, Tensor)",
    "cuda_ie_residual(Tensor x, Tensor c, Tensor fx, float theta) -> Tensor",
    "cuda_ie_residual_with_term(Tensor x, Tensor c, Tensor fx, float theta, float step_size) "
    "-> (Tensor, Tensor)",
    "cuda_ie_residual_with_term_adjoint(Tensor de, Tensor dterm, float theta, "
    "float step_size, Tensor? dx_addend) -> (Tensor, Tensor, Tensor)",
    "cuda_ie_update(Tensor x, Tensor e, Tensor v, float step_size, float theta) -> Tensor",
    "cuda_forward_coefficients(Tensor mean, Tensor var, Tensor? weight, Tensor? bias, "
    "Tensor? h, float h_value, float eps, int groups, int channels) -> (Tensor, Tensor)",
    "cuda_backward_coefficients(Tensor? sum_g, Tensor? sum_gxc, Tensor? dmean, Tensor? dvar, "
    "Tensor? weight, Tensor? bias, Tensor? h, Tensor var, float h_value, float eps, "
    "int groups, bool batch_stats, bool[5] needs, int channels, int count) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "cuda_backward_coefficients_vjp(Tensor? sum_g, Tensor? sum_gxc, Tensor? dmean, "
    "Tensor? dvar, Tensor? weight, Tensor? bias, Tensor? h, Tensor var, float h_value, "
    "float eps, int groups, bool batch_stats, bool[5] needs, int channels, int count, "
    "Tensor?[] cotangents) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "cuda_double_backward_coefficients(Tensor? sum_g, Tensor? sum_gxc, Tensor? dmean, "
    "Tensor? dvar, Tensor? weight, Tensor? bias, Tensor? h, Tensor var, float h_value, "
    "float eps, int groups, bool batch_stats, bool[5] needs, int channels, int count, "
    "Tensor?[] cotangents, Tensor?[] sum_cotangents) -> (Tensor, Tensor, Tensor, Tensor, "
    "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "cuda_update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, "
    "Tensor(c!)? num_batches_tracked, Tensor mean, Tensor var, int count, Tensor? momentum, "
    "float? momentum_value) -> ()",
)

# Kernel launches per op call: a reduction is a partials pass and a finalize pass
# (kernels/reduce.cuh, launched even when there is one partial; the statistics' finalize
# also writes the forward coefficients for norm_stats_and_coefficients); every other op is
# one kernel: elementwise, or the per-channel algebra (kernels/norm_coefficients.cu), the
# double backward's and the running-statistics update included (one block; none only for
# C = 0 without a counter).
KERNEL_LAUNCHES = {schema.split("(")[0]: 1 for schema in SCHEMAS} | {
    "cuda_norm_stats": 2,
    "cuda_norm_stats_and_coefficients": 2,
    "cuda_affine_act_backward_reduce": 2,
    "cuda_affine_act_backward_reduce_recompute": 2,  # y is written by the partials pass
    "cuda_affine_act_double_backward_reduce": 2,
}


def _gate_passes(op: dict) -> dict[str, int]:
    # scale and shift are read only to recompute the ReLU gate (kernels/affine_act.cu:
    # gate_from_affine), never when the mask is loaded
    recompute = int(op["mask"] is None and bool(op["relu"]))
    return {"scale": recompute, "shift": recompute}


# HBM passes of each op's kernels, for pyeuler.cost: a function of the op's arguments (by
# schema name) giving the passes over those that differ from one; every other tensor
# argument and every result is one pass.  kernels/*.cu run the Triton kernels' algorithms,
# whose declarations tests/test_kernel_passes.py checks against the interpreter's accesses:
# one pass over each activation-sized operand; running statistics are read and written in
# place.  The recomputing reduce (cuda_affine_act_backward_reduce_recompute) reads scale and
# shift always (y needs them even without the ReLU), so all its passes are one: dy, x, the
# coefficients, and y written.  cuda_ie_residual_with_term_adjoint writes dfx only at θ ≠ 1
# (at θ = 1, dfx = dc): its dfx result is then empty, so it counts no bytes.  (Not checked on
# a GPU here: nothing counts a CUDA kernel's loads.)
KERNEL_PASSES = {name: lambda op: {} for name in KERNEL_LAUNCHES} | {
    name: _gate_passes for name in (
        "cuda_affine_act_backward_reduce", "cuda_affine_act_backward_apply",
        "cuda_affine_act_backward_apply_ie_update", "cuda_affine_act_double_backward_reduce",
        "cuda_affine_act_double_backward_apply")
} | {
    "cuda_update_running_stats": lambda op: {"running_mean": 2, "running_var": 2,
                                             "num_batches_tracked": 2},
}


def _load() -> ModuleType:
    """The extension module, loaded (or built) once; RuntimeError with the reason if not."""
    global _extension, _load_error
    with _lock:
        if _extension is None and _load_error is None:
            if torch.version.cuda is None:
                _load_error = f"torch {torch.__version__} was built without CUDA"
            else:
                from pyeuler.cuda._build import load_extension

                try:
                    _extension = load_extension()
                except Exception as exc:  # a failed build must not break the import
                    _load_error = f"the CUDA extension could not be loaded or built: {exc}"
                else:
                    _register_fakes()
        if _extension is None:
            raise RuntimeError(f"pyeuler.cuda is not available: {_load_error}")
        return _extension


def _require_extension() -> None:
    # Plain global checks, so torch.compile traces the wrappers without graph breaks.
    if _extension is None and _counting_library is None:
        _load()


def _define_for_counting() -> None:
    """CPU kernels for the CPU tensors that stand for CUDA tensors while counting: the
    fakes' uninitialised outputs, no arithmetic.  Without the extension, also the ops
    themselves (:data:`SCHEMAS`) with :data:`_FAKES` as their fake implementations.
    Once per process."""
    global _counting_library
    with _lock:
        if _counting_library is not None:
            return
        library = torch.library.Library("pyeuler", "FRAGMENT" if _extension is None else "IMPL")
        if _extension is None:
            for schema in SCHEMAS:
                library.define(schema)
        for name, fake in _FAKES.items():
            library.impl(name.split("::")[1], _counting_only(name, fake), "CPU")
        if _extension is None:
            _register_fakes()
        _counting_library = library


def _counting_only(name: str, fake):
    def kernel(*args):
        if counted_device() is None:
            raise RuntimeError(f"{name} has no CPU kernel: it exists without the CUDA "
                               "extension only inside pyeuler.backend.counting_device()")
        return fake(*args)

    return kernel


def is_available() -> tuple[bool, str]:
    """``(True, "")`` when the kernels can run on the current device, else ``(False, reason)``.

    Inside :func:`pyeuler.backend.counting_device` the answer is yes wherever the ops can
    be defined: by the extension on a GPU, else for counting (:func:`_define_for_counting`).
    """
    if counted_device() is not None:
        if torch.cuda.is_available() and _extension is None:
            try:
                _load()
            except RuntimeError as exc:
                return False, str(exc)
        _define_for_counting()
        return True, ""
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} was built without CUDA"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    try:
        extension = _load()
    except RuntimeError as exc:
        return False, str(exc)
    major, minor = torch.cuda.get_device_capability()
    archs = extension.compiled_archs()
    # SASS for sm_XY runs on sm_XZ with Z >= Y (same major); there is no PTX to JIT.
    if not any(a // 10 == major and a % 10 <= minor for a in archs):
        return False, (f"the CUDA extension was compiled for sm_{archs} but the device is "
                       f"sm_{major}{minor}; rebuild with TORCH_CUDA_ARCH_LIST including "
                       f"{major}.{minor}")
    return True, ""


# ---------------------------------------------------------------------------------------
# The primitives (signatures of pyeuler.ops.primitives)


def _check_cuda(**tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and device_type(t.device) != "cuda":
            raise ValueError(f"pyeuler.cuda: {name} must be a CUDA tensor, got one on {t.device}")


def _like_x(x: Tensor, t: Tensor | None) -> Tensor | None:
    """The kernels take one activation dtype per call (x's).  Other operands may differ
    (autocast adds bfloat16 convolution outputs to float32 block inputs): they are converted
    to x's dtype, as the contract's float32 arithmetic would read them."""
    return t if t is None or t.dtype == x.dtype else t.to(x.dtype)


_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _param(t: Tensor | None) -> Tensor | None:
    """A weight, bias or h as the kernels read it: float32, float16 and bfloat16 as they
    are; another floating dtype (float64) converted to float32, as the contract's float32
    arithmetic reads it anyway."""
    return t if t is None or t.dtype in _PARAM_DTYPES else t.float()


def norm_stats(x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    _check_cuda(x=x)
    _require_extension()
    mean, var = torch.ops.pyeuler.cuda_norm_stats(x, groups)
    return mean, var


def norm_stats_and_coefficients(
    x: Tensor,
    groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    h: Tensor | None,
    h_value: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Two launches (kernels/norm_stats.cu), as :func:`norm_stats` alone: the statistics'
    second stage also writes ``scale``/``shift``, bitwise :func:`forward_coefficients` of
    the same statistics (one device function).  Parameters as forward_coefficients takes
    them; mean, var, scale and shift are float32."""
    _check_cuda(x=x, weight=weight, bias=bias, h=h)
    _require_extension()
    mean, var, scale, shift = torch.ops.pyeuler.cuda_norm_stats_and_coefficients(
        x, int(groups), _param(weight), _param(bias), _param(h), float(h_value), float(eps))
    return mean, var, scale, shift


def affine_act_forward(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    shortcut: Tensor | None,
    relu: bool,
    save_mask: bool,
) -> tuple[Tensor, Tensor | None]:
    _check_cuda(x=x, scale=scale, shift=shift, shortcut=shortcut)
    _require_extension()
    y, mask = torch.ops.pyeuler.cuda_affine_act_forward(x, scale, shift, _like_x(x, shortcut), relu,
                                                        save_mask)
    return y, (mask if save_mask else None)


def affine_act_backward_reduce(
    dy: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    center: Tensor,
    mask: Tensor | None,
    relu: bool,
    per_sample: bool,
) -> tuple[Tensor, Tensor]:
    _check_cuda(dy=dy, x=x, scale=scale, shift=shift, center=center, mask=mask)
    _require_extension()
    sum_g, sum_g_xc = torch.ops.pyeuler.cuda_affine_act_backward_reduce(
        _like_x(x, dy), x, scale, shift, center, mask, relu, per_sample)
    return sum_g, sum_g_xc


def affine_act_backward_reduce_recompute(
    dy: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    center: Tensor,
    relu: bool,
    per_sample: bool,
    y_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Two launches (kernels/affine_act.cu), as :func:`affine_act_backward_reduce`: its
    partials pass recomputes the gate from x and also writes ``y = act(scale·x + shift)``,
    computed in float32 and rounded once to ``y_dtype`` (float32, float16 or bfloat16, else
    TypeError), in x's layout (channels_last stays channels_last).  Sums float32, [C] or
    [N, C] per sample."""
    _check_cuda(dy=dy, x=x, scale=scale, shift=shift, center=center)
    _require_extension()
    sum_g, sum_g_xc, y = torch.ops.pyeuler.cuda_affine_act_backward_reduce_recompute(
        _like_x(x, dy), x, scale, shift, center, relu, per_sample, y_dtype)
    return sum_g, sum_g_xc, y


def affine_act_backward_apply(
    dy: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    mask: Tensor | None,
    relu: bool,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    center: Tensor,
    want_dshortcut: bool,
    dx_addend: Tensor | None = None,
    dx_addend2: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One launch (kernels/affine_act.cu): ``dx = ((a·g + b·(x − center) + c) + dx_addend)
    + dx_addend2`` in x's dtype and layout, each addend (optional, independently; x's shape,
    another share of x's gradient) read as x's dtype, in any layout (copied into x's), and
    added in float32 in that order before dx is rounded; ``g`` (dy's dtype, without the
    addends) iff ``want_dshortcut``.  A CPU operand raises ValueError, an addend of another
    shape or device RuntimeError, naming it."""
    _check_cuda(dy=dy, x=x, scale=scale, shift=shift, mask=mask, a=a, b=b, c=c, center=center,
                dx_addend=dx_addend, dx_addend2=dx_addend2)
    _require_extension()
    dx, dshortcut = torch.ops.pyeuler.cuda_affine_act_backward_apply(
        _like_x(x, dy), x, scale, shift, mask, relu, a, b, c, center, want_dshortcut,
        _like_x(x, dx_addend), _like_x(x, dx_addend2))
    return dx, (dshortcut.to(dy.dtype) if want_dshortcut else None)


def affine_act_backward_apply_ie_update(
    dy: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    mask: Tensor | None,
    relu: bool,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    center: Tensor,
    residual: Tensor,
    step_size: float,
    theta: float,
    residual_is_term: bool,
) -> Tensor:
    """One launch (kernels/affine_act.cu): the IE step ``x − 2γ·(e − θ·v)`` with v the
    apply's dx, never written, in x's dtype and layout, from ``residual`` = e or, with
    ``residual_is_term``, its term ``−2γ·e`` (:func:`ie_residual_with_term`)."""
    _check_cuda(dy=dy, x=x, scale=scale, shift=shift, mask=mask, a=a, b=b, c=c, center=center,
                residual=residual)
    _require_extension()
    return torch.ops.pyeuler.cuda_affine_act_backward_apply_ie_update(
        _like_x(x, dy), x, scale, shift, mask, relu, a, b, c, center, _like_x(x, residual),
        float(step_size), float(theta), bool(residual_is_term))


def affine_act_double_backward_reduce(
    ddx: Tensor,
    dy: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    center: Tensor,
    mask: Tensor | None,
    relu: bool,
    per_sample: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_cuda(ddx=ddx, dy=dy, x=x, scale=scale, shift=shift, center=center, mask=mask)
    _require_extension()
    sum_ddx, sum_ddx_xc, sum_ddx_g = torch.ops.pyeuler.cuda_affine_act_double_backward_reduce(
        _like_x(x, ddx), _like_x(x, dy), x, scale, shift, center, mask, relu, per_sample)
    return sum_ddx, sum_ddx_xc, sum_ddx_g


def affine_act_double_backward_apply(
    ddx: Tensor,
    dy: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    mask: Tensor | None,
    relu: bool,
    a: Tensor,
    b: Tensor,
    p: Tensor,
    q: Tensor,
    center: Tensor,
    ddshortcut: Tensor | None,
    ddx_scale: float = 1.0,
    dxx_addend: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    _check_cuda(ddx=ddx, dy=dy, x=x, scale=scale, shift=shift, mask=mask, a=a, b=b, p=p, q=q,
                center=center, ddshortcut=ddshortcut, dxx_addend=dxx_addend)
    _require_extension()
    ddy, dxx = torch.ops.pyeuler.cuda_affine_act_double_backward_apply(
        _like_x(x, ddx), _like_x(x, dy), x, scale, shift, mask, relu, a, b, p, q, center,
        _like_x(x, ddshortcut), float(ddx_scale), _like_x(x, dxx_addend))
    return ddy.to(dy.dtype), dxx


def ie_residual(x: Tensor, c: Tensor, fx: Tensor, theta: float) -> Tensor:
    _check_cuda(x=x, c=c, fx=fx)
    _require_extension()
    return torch.ops.pyeuler.cuda_ie_residual(x, _like_x(x, c), _like_x(x, fx), float(theta))


def ie_residual_with_term(x: Tensor, c: Tensor, fx: Tensor, theta: float,
                          step_size: float) -> tuple[Tensor, Tensor]:
    """One launch (kernels/ie_update.cu): ``(e, −2γ·e)`` in x's dtype and layout, the term
    formed from e in float32 before either is rounded."""
    _check_cuda(x=x, c=c, fx=fx)
    _require_extension()
    e, term = torch.ops.pyeuler.cuda_ie_residual_with_term(x, _like_x(x, c), _like_x(x, fx),
                                                           float(theta), float(step_size))
    return e, term


def ie_residual_with_term_adjoint(de: Tensor, dterm: Tensor, theta: float, step_size: float,
                                  dx_addend: Tensor | None = None
                                  ) -> tuple[Tensor, Tensor, Tensor]:
    """One launch (kernels/ie_update.cu): with ``u = de − 2γ·dterm``, ``(u + dx_addend, −u,
    −θ·u)`` in de's dtype and layout (dterm and the optional addend, de's shape, are read as
    de's dtype; the addend is added in float32 before dx is rounded and enters dx alone).
    At θ = 1 the third is the second, the same tensor: the kernel writes it once (the op's
    own third result is then empty).  A CPU operand raises ValueError, an addend of another
    shape or device RuntimeError, naming it."""
    _check_cuda(de=de, dterm=dterm, dx_addend=dx_addend)
    _require_extension()
    theta = float(theta)
    dx, dc, dfx = torch.ops.pyeuler.cuda_ie_residual_with_term_adjoint(
        de, _like_x(de, dterm), theta, float(step_size), _like_x(de, dx_addend))
    return dx, dc, (dc if theta == 1.0 else dfx)


def ie_update(x: Tensor, e: Tensor, v: Tensor, step_size: float, theta: float) -> Tensor:
    _check_cuda(x=x, e=e, v=v)
    _require_extension()
    return torch.ops.pyeuler.cuda_ie_update(x, _like_x(x, e), _like_x(x, v), float(step_size),
                                            float(theta))


def forward_coefficients(
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    h: Tensor | None,
    h_value: float,
    eps: float,
    groups: int,
    channels: int,
) -> tuple[Tensor, Tensor]:
    """One launch (kernels/norm_coefficients.cu).  mean, var: float32 statistics; weight,
    bias and h may be float32, float16 or bfloat16; scale and shift are float32."""
    _check_cuda(mean=mean, var=var, weight=weight, bias=bias, h=h)
    _require_extension()
    scale, shift = torch.ops.pyeuler.cuda_forward_coefficients(
        mean, var, _param(weight), _param(bias), _param(h), float(h_value), float(eps),
        int(groups), int(channels))
    return scale, shift


def backward_coefficients(
    sum_g: Tensor | None,
    sum_gxc: Tensor | None,
    dmean: Tensor | None,
    dvar: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    h: Tensor | None,
    var: Tensor,
    h_value: float,
    eps: float,
    groups: int,
    batch_stats: bool,
    needs,
    channels: int,
    count: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """One launch (kernels/norm_coefficients.cu); float32 sums and statistics in, float32
    out.  The parameter gradients are None where the contract's are: without the sums, or
    not in ``needs``."""
    _check_cuda(sum_g=sum_g, sum_gxc=sum_gxc, dmean=dmean, dvar=dvar, weight=weight, bias=bias,
                h=h, var=var)
    _require_extension()
    needs = [bool(n) for n in needs]
    a, b, c, dweight, dbias, dh = torch.ops.pyeuler.cuda_backward_coefficients(
        sum_g, sum_gxc, dmean, dvar, _param(weight), _param(bias), _param(h), var,
        float(h_value), float(eps), int(groups), bool(batch_stats), needs, int(channels),
        int(count))
    sums = sum_g is not None
    return (a, b, c, dweight if sums and needs[2] else None, dbias if sums and needs[3] else None,
            dh if sums and needs[4] else None)


def backward_coefficients_vjp(
    sum_g: Tensor | None,
    sum_gxc: Tensor | None,
    dmean: Tensor | None,
    dvar: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    h: Tensor | None,
    var: Tensor,
    h_value: float,
    eps: float,
    groups: int,
    batch_stats: bool,
    needs,
    channels: int,
    count: int,
    cotangents,
) -> dict[str, Tensor | None]:
    """One launch (kernels/norm_coefficients.cu); float32 sums, statistics and cotangents
    of a, b, c in, the cotangents of dweight, dbias, dh in any parameter dtype.  The
    gradients of weight, bias and h come in their dtype, the others float32; None exactly
    where the contract's are.  Sums-shaped gradients are [N, C] for GroupNorm where the
    contract may leave a broadcastable [C].  Not differentiable (no graph is built)."""
    return _second_order(sum_g, sum_gxc, dmean, dvar, weight, bias, h, var, h_value, eps, groups,
                         batch_stats, needs, channels, count, cotangents, None)


def double_backward_coefficients(
    sum_g: Tensor | None,
    sum_gxc: Tensor | None,
    dmean: Tensor | None,
    dvar: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    h: Tensor | None,
    var: Tensor,
    h_value: float,
    eps: float,
    groups: int,
    batch_stats: bool,
    needs,
    channels: int,
    count: int,
    cotangents,
    sum_cotangents=(None, None),
) -> dict[str, Tensor | None]:
    """One launch (kernels/norm_coefficients.cu, the VJP's kernel with its extras): the
    backward's a and b, :func:`backward_coefficients_vjp`'s gradients with the sums' own
    cotangents (float32, sums-shaped) added, and the centre's gradient ``"mean"``
    (statistic-shaped).  Dtypes, shapes and None entries as for backward_coefficients_vjp
    (``double_backward_presence``).  Not differentiable (no graph is built)."""
    return _second_order(sum_g, sum_gxc, dmean, dvar, weight, bias, h, var, h_value, eps, groups,
                         batch_stats, needs, channels, count, cotangents, tuple(sum_cotangents))


def _second_order(sum_g, sum_gxc, dmean, dvar, weight, bias, h, var, h_value, eps, groups,
                  batch_stats, needs, channels, count, cotangents, sum_cotangents):
    """backward_coefficients_vjp (``sum_cotangents`` None) or double_backward_coefficients:
    the op's outputs, None where the contract's presence rules say so."""
    cotangents = tuple(cotangents)
    double = sum_cotangents is not None
    _check_cuda(sum_g=sum_g, sum_gxc=sum_gxc, dmean=dmean, dvar=dvar, weight=weight, bias=bias,
                h=h, var=var, **{f"cotangent {k}": t for k, t in enumerate(cotangents)},
                **{f"sum cotangent {k}": t for k, t in enumerate(sum_cotangents or ())})
    _require_extension()
    needs = [bool(n) for n in needs]
    if double:
        present, cotangents = double_backward_presence(sum_g, dmean, dvar, weight, bias, h,
                                                       batch_stats, needs, cotangents,
                                                       sum_cotangents)
    else:
        present, cotangents = vjp_presence(sum_g, dmean, dvar, weight, bias, h, batch_stats, needs,
                                           cotangents)
    cotangents = [*cotangents[:3], *(_param(t) for t in cotangents[3:])]
    args = (sum_g, sum_gxc, dmean, dvar, _param(weight), _param(bias), _param(h), var,
            float(h_value), float(eps), int(groups), bool(batch_stats), needs, int(channels),
            int(count), cotangents)
    if double:
        outputs = torch.ops.pyeuler.cuda_double_backward_coefficients(*args, list(sum_cotangents))
    else:
        outputs = torch.ops.pyeuler.cuda_backward_coefficients_vjp(*args)
    keys = DOUBLE_BACKWARD_KEYS if double else VJP_KEYS
    grads = {k: o if p else None for k, o, p in zip(keys, outputs, present)}
    for name, param in (("weight", weight), ("bias", bias), ("h", h)):
        # a float64 parameter was read as float32 (_param); its gradient is in its dtype
        if grads[name] is not None and grads[name].dtype != param.dtype:
            grads[name] = grads[name].to(param.dtype)
    return grads


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | Tensor | None,
) -> None:
    """One launch of one block (kernels/norm_coefficients.cu), no host synchronisation: the
    counter is read and incremented once on the device.  Running buffers in float32, float16
    or bfloat16 (one dtype, contiguous [C]) with float32 statistics; a momentum tensor in
    its dtype, float64 converted to float32 (which lerp_ reads it through anyway).  Anything
    else (float64 buffers or statistics, an int32 counter) takes the torch-op version,
    :func:`pyeuler.ops.norm_algebra.update_running_stats`."""
    if count < 2 or (momentum is None and num_batches_tracked is None):
        # the contract's ValueError, raised before anything is written
        return norm_algebra.update_running_stats(running_mean, running_var, num_batches_tracked,
                                                 mean, var, count, momentum)
    tensor_momentum = isinstance(momentum, Tensor)
    _check_cuda(running_mean=running_mean, running_var=running_var,
                num_batches_tracked=num_batches_tracked, mean=mean, var=var,
                momentum=momentum if tensor_momentum else None)
    if not _running_stats_kernel_takes(running_mean, running_var, num_batches_tracked, mean, var,
                                       momentum if tensor_momentum else None):
        return norm_algebra.update_running_stats(running_mean, running_var, num_batches_tracked,
                                                 mean, var, count, momentum)
    _require_extension()
    torch.ops.pyeuler.cuda_update_running_stats(
        running_mean, running_var, num_batches_tracked, mean.detach(), var.detach(), int(count),
        _param(momentum.detach()) if tensor_momentum else None,
        None if momentum is None or tensor_momentum else float(momentum))
    return None


def _running_stats_kernel_takes(running_mean: Tensor, running_var: Tensor,
                                num_batches_tracked: Tensor | None, mean: Tensor, var: Tensor,
                                momentum: Tensor | None) -> bool:
    """Whether the kernel can update these buffers in place: it writes dense [C] buffers of
    one kernel dtype and an int64 counter, and reads float32 [C] statistics."""
    return (running_mean.dtype in _PARAM_DTYPES and running_var.dtype == running_mean.dtype
            and running_mean.dim() == 1 and running_var.shape == running_mean.shape
            and running_mean.is_contiguous() and running_var.is_contiguous()
            and mean.dtype == torch.float32 and var.dtype == torch.float32
            and (num_batches_tracked is None or (num_batches_tracked.dtype == torch.int64
                                                 and _one_value(num_batches_tracked)))
            and (momentum is None or (momentum.is_floating_point() and _one_value(momentum))))


def _one_value(t: Tensor) -> bool:
    return t.dim() <= 1 and t.numel() == 1


# ---------------------------------------------------------------------------------------
# Fake (meta) implementations, so torch.compile can trace the ops.  Output layouts follow
# csrc/ops.cpp: channels_last when x is densely channels_last (and not also contiguous),
# else contiguous; optional outputs that were not requested are empty tensors.


def _is_channels_last(x: Tensor) -> bool:
    return not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def _empty_in_layout_of(x: Tensor, dtype: torch.dtype) -> Tensor:
    if not _is_channels_last(x):
        return x.new_empty(x.shape, dtype=dtype)
    nsc = (x.shape[0], *x.shape[2:], x.shape[1])
    return x.new_empty(nsc, dtype=dtype).movedim(-1, 1)


def _fake_norm_stats(x, groups):
    shape = (x.shape[1],) if groups == 0 else (x.shape[0], groups)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)


def _fake_affine_act_forward(x, scale, shift, shortcut, relu, save_mask):
    mask = (_empty_in_layout_of(x, torch.bool) if save_mask
            else x.new_empty((0,), dtype=torch.bool))
    return _empty_in_layout_of(x, x.dtype), mask


def _fake_affine_act_backward_reduce(dy, x, scale, shift, center, mask, relu, per_sample):
    shape = tuple(x.shape[:2]) if per_sample else (x.shape[1],)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)


def _fake_affine_act_backward_reduce_recompute(dy, x, scale, shift, center, relu, per_sample,
                                               y_dtype):
    return (*_fake_affine_act_backward_reduce(dy, x, scale, shift, center, None, relu,
                                              per_sample),
            _empty_in_layout_of(x, y_dtype))


def _fake_affine_act_backward_apply(dy, x, scale, shift, mask, relu, a, b, c, center,
                                    want_dshortcut, dx_addend, dx_addend2):
    dshortcut = (_empty_in_layout_of(x, dy.dtype) if want_dshortcut
                 else dy.new_empty((0,)))
    return _empty_in_layout_of(x, x.dtype), dshortcut


def _fake_affine_act_backward_apply_ie_update(dy, x, scale, shift, mask, relu, a, b, c, center,
                                              residual, step_size, theta, residual_is_term):
    return _empty_in_layout_of(x, x.dtype)


def _fake_affine_act_double_backward_reduce(ddx, dy, x, scale, shift, center, mask, relu,
                                            per_sample):
    shape = tuple(x.shape[:2]) if per_sample else (x.shape[1],)
    return tuple(x.new_empty(shape, dtype=torch.float32) for _ in range(3))


def _fake_affine_act_double_backward_apply(ddx, dy, x, scale, shift, mask, relu, a, b, p, q,
                                           center, ddshortcut, ddx_scale, dxx_addend):
    return _empty_in_layout_of(x, dy.dtype), _empty_in_layout_of(x, x.dtype)


def _fake_ie_residual(x, c, fx, theta):
    return _empty_in_layout_of(x, x.dtype)


def _fake_ie_residual_with_term(x, c, fx, theta, step_size):
    return _empty_in_layout_of(x, x.dtype), _empty_in_layout_of(x, x.dtype)


def _fake_ie_residual_with_term_adjoint(de, dterm, theta, step_size, dx_addend):
    dfx = de.new_empty((0,)) if theta == 1.0 else _empty_in_layout_of(de, de.dtype)
    return _empty_in_layout_of(de, de.dtype), _empty_in_layout_of(de, de.dtype), dfx


def _fake_ie_update(x, e, v, step_size, theta):
    return _empty_in_layout_of(x, x.dtype)


def _coefficient_shape(var, groups, channels):
    return (channels,) if groups == 0 else (var.shape[0], channels)


def _fake_forward_coefficients(mean, var, weight, bias, h, h_value, eps, groups, channels):
    shape = _coefficient_shape(var, groups, channels)
    return var.new_empty(shape, dtype=torch.float32), var.new_empty(shape, dtype=torch.float32)


def _fake_backward_coefficients(sum_g, sum_gxc, dmean, dvar, weight, bias, h, var, h_value, eps,
                                groups, batch_stats, needs, channels, count):
    shape = _coefficient_shape(var, groups, channels)
    a, b, c = (var.new_empty(shape, dtype=torch.float32) for _ in range(3))
    sums = sum_g is not None
    dweight = var.new_empty((channels if sums and needs[2] else 0,), dtype=torch.float32)
    dbias = var.new_empty((channels if sums and needs[3] else 0,), dtype=torch.float32)
    dh = var.new_empty(h.shape if sums and needs[4] and h is not None else (0,),
                       dtype=torch.float32)
    return a, b, c, dweight, dbias, dh


def _fake_backward_coefficients_vjp(sum_g, sum_gxc, dmean, dvar, weight, bias, h, var, h_value,
                                    eps, groups, batch_stats, needs, channels, count, cotangents):
    present, _ = vjp_presence(sum_g, dmean, dvar, weight, bias, h, batch_stats, needs,
                               cotangents)
    coefficients = _coefficient_shape(var, groups, channels)
    shapes = (coefficients, coefficients, var.shape, var.shape, (channels,), (channels,),
              None if h is None else h.shape, var.shape)
    dtypes = (torch.float32,) * 4 + tuple(torch.float32 if p is None else p.dtype
                                          for p in (weight, bias, h)) + (torch.float32,)
    return tuple(var.new_empty(shape, dtype=dtype) if want
                 else var.new_empty((0,), dtype=torch.float32)
                 for want, shape, dtype in zip(present, shapes, dtypes))


def _fake_norm_stats_and_coefficients(x, groups, weight, bias, h, h_value, eps):
    coefficients = (x.shape[1],) if groups == 0 else tuple(x.shape[:2])
    return (*_fake_norm_stats(x, groups), x.new_empty(coefficients, dtype=torch.float32),
            x.new_empty(coefficients, dtype=torch.float32))


def _fake_double_backward_coefficients(sum_g, sum_gxc, dmean, dvar, weight, bias, h, var,
                                       h_value, eps, groups, batch_stats, needs, channels, count,
                                       cotangents, sum_cotangents):
    present, _ = double_backward_presence(sum_g, dmean, dvar, weight, bias, h, batch_stats, needs,
                                          cotangents, sum_cotangents)
    coefficients = _coefficient_shape(var, groups, channels)
    shapes = (coefficients,) * 4 + (var.shape, var.shape, (channels,), (channels,),
                                    None if h is None else h.shape, var.shape, var.shape)
    dtypes = (torch.float32,) * 6 + tuple(torch.float32 if p is None else p.dtype
                                          for p in (weight, bias, h)) + (torch.float32,) * 2
    return tuple(var.new_empty(shape, dtype=dtype) if want
                 else var.new_empty((0,), dtype=torch.float32)
                 for want, shape, dtype in zip(present, shapes, dtypes))


def _fake_update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count,
                               momentum, momentum_value):
    return None  # in place: no outputs


_FAKES = {
    "pyeuler::cuda_norm_stats": _fake_norm_stats,
    "pyeuler::cuda_norm_stats_and_coefficients": _fake_norm_stats_and_coefficients,
    "pyeuler::cuda_affine_act_forward": _fake_affine_act_forward,
    "pyeuler::cuda_affine_act_backward_reduce": _fake_affine_act_backward_reduce,
    "pyeuler::cuda_affine_act_backward_reduce_recompute":
        _fake_affine_act_backward_reduce_recompute,
    "pyeuler::cuda_affine_act_backward_apply": _fake_affine_act_backward_apply,
    "pyeuler::cuda_affine_act_backward_apply_ie_update": _fake_affine_act_backward_apply_ie_update,
    "pyeuler::cuda_affine_act_double_backward_reduce": _fake_affine_act_double_backward_reduce,
    "pyeuler::cuda_affine_act_double_backward_apply": _fake_affine_act_double_backward_apply,
    "pyeuler::cuda_ie_residual": _fake_ie_residual,
    "pyeuler::cuda_ie_residual_with_term": _fake_ie_residual_with_term,
    "pyeuler::cuda_ie_residual_with_term_adjoint": _fake_ie_residual_with_term_adjoint,
    "pyeuler::cuda_ie_update": _fake_ie_update,
    "pyeuler::cuda_forward_coefficients": _fake_forward_coefficients,
    "pyeuler::cuda_backward_coefficients": _fake_backward_coefficients,
    "pyeuler::cuda_backward_coefficients_vjp": _fake_backward_coefficients_vjp,
    "pyeuler::cuda_double_backward_coefficients": _fake_double_backward_coefficients,
    "pyeuler::cuda_update_running_stats": _fake_update_running_stats,
}


def _register_fakes() -> None:
    """Called once, right after the extension defined the ops."""
    for name, fake in _FAKES.items():
        torch.library.register_fake(name, fake)
