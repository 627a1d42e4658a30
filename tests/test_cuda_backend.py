"""The CUDA C++ backend (:mod:`pyeuler.cuda`) against the eager contract.

On a GPU: parity of every primitive with :mod:`pyeuler.ops.primitives` (and with the Triton
backend when it runs), every dtype, contiguous / channels_last / strided inputs, odd shapes.
Tolerances (docs/semantics.md §6): float32 close to the eager float32 result;
float16/bfloat16 at most 2× the eager low-precision error against a float64 reference, plus
a small floor; sums against float64 relative to the sum of the terms' magnitudes.

Everywhere (CPU too): is_available() fails cleanly, the fake implementations used by
torch.compile agree with the reference's output shapes and layouts, and the Python wrapper,
the torch op schemas and the C ABI agree with each other.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from helpers import layout_cases, make_input, nan_inf_inputs, random_coef

import pyeuler.cuda as cuda_backend
from pyeuler.ops import norm_algebra
from pyeuler.ops import primitives as ref

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; none on this machine")
DEVICE = "cuda" if HAS_CUDA else "cpu"

# (N, C, *spatial): 0-3 spatial dims, odd sizes, N = 1, spatial 1x1, vector-friendly sizes.
SHAPES = [(4, 5, 7, 5), (3, 3), (2, 17, 9), (2, 6, 3, 4, 5), (1, 6, 1, 1), (8, 16, 8, 8),
          (4, 40, 12, 12)]
LAYOUTS = ["contiguous", "channels_last", "strided"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(shape, layout="contiguous", dtype=torch.float32, device=DEVICE, mean=0.0, std=1.0):
    return make_input(shape, layout, dtype, device, mean, std)


def cases(shapes=SHAPES, layouts=LAYOUTS):
    return layout_cases(shapes, layouts)


coef = random_coef


def other_layout(layout):
    """A layout other than ``layout`` for an operand the op copies into x's (strided: not
    dense in either)."""
    return "contiguous" if layout == "strided" else "strided"


def broadcast(v, x):
    spatial = (1,) * (x.dim() - 2)
    return v.view(1, -1, *spatial) if v.dim() == 1 else v.view(*v.shape, *spatial)


def relu_gate32(x, scale, shift):
    """The ReLU gate as float32 kernels compute it (a float64 recomputation may differ at 0)."""
    return broadcast(scale, x) * x.float() + broadcast(shift, x) > 0


def assert_lowp(actual, eager, exact, floor=1e-6):
    """Error vs a float64 reference <= 2x the eager low-precision error + a floor."""
    scale = exact.abs().max().item() + 1e-30
    err = (actual.double() - exact).abs().max().item()
    eager_err = (eager.double() - exact).abs().max().item()
    assert err <= 2 * eager_err + floor * scale, (err, eager_err, scale)


def assert_output(actual, eager, exact):
    """float32 (TF32 off): rtol 1e-4, atol 1e-5; low precision: the 2x rule."""
    assert actual.dtype == eager.dtype and actual.shape == eager.shape
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, eager, rtol=1e-4, atol=1e-5)
    else:
        assert_lowp(actual, eager, exact)


def assert_sums_close(actual, expected_64, magnitude_64):
    tol = 1e-5 * magnitude_64 + 1e-6
    assert ((actual.double() - expected_64).abs() <= tol).all(), (actual, expected_64)


def doubles(*tensors):
    return [None if t is None else t.double() for t in tensors]


def assert_first_order_sums(sums, dy, x, scale, shift, center, mask, relu, per_sample):
    """(Σg, Σg·(x − center)) against float64 sums of the float32 gate's g."""
    gate64 = mask if mask is not None else (relu_gate32(x, scale, shift) if relu else None)
    expected = ref.affine_act_backward_reduce(*doubles(dy, x, scale, shift, center), gate64,
                                              relu, per_sample)
    g = dy.double() * (gate64 if gate64 is not None else 1)
    g_xc = g * (x.double() - broadcast(center.double(), x))
    dims = list(range(2, x.dim())) if per_sample else [0, *range(2, x.dim())]
    magnitudes = [t.abs().sum(dims) if dims else t.abs() for t in (g, g_xc)]
    assert len(sums) == 2
    for actual, exact, magnitude in zip(sums, expected, magnitudes):
        assert actual.dtype == torch.float32 and actual.shape == exact.shape
        assert_sums_close(actual, exact, magnitude)


# ---------------------------------------------------------------------------------------
# CPU-runnable: availability, fakes, consistency of the layers


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only answer")
def test_is_available_says_why_not():
    ok, reason = cuda_backend.is_available()
    assert ok is False
    assert isinstance(reason, str) and reason


def test_primitives_reject_cpu_tensors_by_name():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        cuda_backend.norm_stats(x, 0)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        cuda_backend.norm_stats_and_coefficients(x, 0, None, None, None, 1.0, 1e-5)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        cuda_backend.ie_update(x, x, x, 0.1, 1.0)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        cuda_backend.ie_residual_with_term(x, x, x, 1.0, 0.1)
    with pytest.raises(ValueError, match="de must be a CUDA tensor"):
        cuda_backend.ie_residual_with_term_adjoint(x, x, 1.0, 0.1)
    s = torch.ones(3)
    with pytest.raises(ValueError, match="dy must be a CUDA tensor"):
        cuda_backend.affine_act_backward_apply_ie_update(x, x, s, s, None, True, s, s, s, s, x,
                                                         0.1, 1.0, True)
    with pytest.raises(ValueError, match="dy must be a CUDA tensor"):
        cuda_backend.affine_act_backward_reduce_recompute(x, x, s, s, s, True, False,
                                                          torch.bfloat16)
    with pytest.raises(ValueError, match="ddx must be a CUDA tensor"):
        cuda_backend.affine_act_double_backward_reduce(x, x, x, s, s, s, None, True, False)
    with pytest.raises(ValueError, match="ddx must be a CUDA tensor"):
        cuda_backend.affine_act_double_backward_apply(x, x, x, s, s, None, True, s, s, s, s, s,
                                                      None)


@pytest.mark.parametrize("shape,layout", cases(SHAPES[:5]))
def test_fakes_match_reference_outputs(shape, layout):
    """The meta implementations give the eager outputs' shapes, dtypes and layouts."""
    x = make(shape, layout, device="cpu")
    scale, shift = coef(x, False), coef(x, False)
    fake_y, fake_mask = cuda_backend._fake_affine_act_forward(x, scale, shift, x, True, True)
    y, mask = ref.affine_act_forward(x, scale, shift, x, True, True)
    for fake, real in ((fake_y, y), (fake_mask, mask)):
        assert (fake.shape, fake.dtype) == (real.shape, real.dtype)
        if x.is_contiguous() or x.movedim(1, -1).is_contiguous():
            assert fake.stride() == real.stride()
    for groups in (0, 1):
        mean, var = ref.norm_stats(x, groups)
        for fake, real in zip(cuda_backend._fake_norm_stats(x, groups), (mean, var)):
            assert (fake.shape, fake.dtype) == (real.shape, real.dtype)
    for per_sample in (False, True):
        sums = ref.affine_act_backward_reduce(x, x, scale, shift, scale, None, True, per_sample)
        fakes = cuda_backend._fake_affine_act_backward_reduce(x, x, scale, shift, scale, None,
                                                              True, per_sample)
        assert [(f.shape, f.dtype) for f in fakes] == [(s.shape, s.dtype) for s in sums]
        for y_dtype in (torch.float32, torch.bfloat16):
            recompute_args = (x, x, scale, shift, scale, True, per_sample, y_dtype)
            outputs = ref.affine_act_backward_reduce_recompute(*recompute_args)
            fakes = cuda_backend._fake_affine_act_backward_reduce_recompute(*recompute_args)
            assert [(f.shape, f.dtype) for f in fakes] == [(o.shape, o.dtype) for o in outputs]
            if x.is_contiguous() or x.movedim(1, -1).is_contiguous():
                assert fakes[2].stride() == outputs[2].stride()
    for addends in ((None, None), (x.half(), None), (None, x.half()), (x.half(), x.bfloat16())):
        apply_args = (x, x, scale, shift, None, True, scale, scale, scale, scale, True, *addends)
        fake_dx, fake_ds = cuda_backend._fake_affine_act_backward_apply(*apply_args)
        dx, ds = ref.affine_act_backward_apply(*apply_args)
        assert (fake_dx.shape, fake_dx.dtype, fake_ds.shape) == (dx.shape, dx.dtype, ds.shape)
        if x.is_contiguous() or x.movedim(1, -1).is_contiguous():
            assert fake_dx.stride() == dx.stride()
    for residual_is_term in (False, True):
        ie_args = (x, x, scale, shift, None, True, scale, scale, scale, scale, x, 0.1, 1.0,
                   residual_is_term)
        fake_new = cuda_backend._fake_affine_act_backward_apply_ie_update(*ie_args)
        x_new = ref.affine_act_backward_apply_ie_update(*ie_args)
        assert (fake_new.shape, fake_new.dtype) == (x_new.shape, x_new.dtype)
        if x.is_contiguous() or x.movedim(1, -1).is_contiguous():
            assert fake_new.stride() == x_new.stride()
    for per_sample in (False, True):
        reduce_args = (x, x, x, scale, shift, scale, None, True, per_sample)
        sums = ref.affine_act_double_backward_reduce(*reduce_args)
        fakes = cuda_backend._fake_affine_act_double_backward_reduce(*reduce_args)
        assert [(f.shape, f.dtype) for f in fakes] == [(s.shape, s.dtype) for s in sums]
    dd_args = (x, x.half(), x, scale, shift, None, True, scale, scale, scale, scale, scale, x,
               0.5, x)
    for fake, real in zip(cuda_backend._fake_affine_act_double_backward_apply(*dd_args),
                          ref.affine_act_double_backward_apply(*dd_args)):
        assert (fake.shape, fake.dtype) == (real.shape, real.dtype)
        if x.is_contiguous() or x.movedim(1, -1).is_contiguous():
            assert fake.stride() == real.stride()
    assert cuda_backend._fake_ie_update(x, x, x, 0.1, 1.0).shape == x.shape
    dense = x.is_contiguous() or x.movedim(1, -1).is_contiguous()
    for theta, dx_addend in ((0.5, None), (1.0, None), (0.5, x.half())):
        outputs = ref.ie_residual_with_term(x, x, x, theta, 0.1)
        fakes = cuda_backend._fake_ie_residual_with_term(x, x, x, theta, 0.1)
        # the adjoint's dfx: written only at θ ≠ 1 (at θ = 1 it is dc), else an empty result
        adjoint_args = (x, x, theta, 0.1, dx_addend)
        outputs += ref.ie_residual_with_term_adjoint(*adjoint_args)[:2 if theta == 1.0 else 3]
        fakes += cuda_backend._fake_ie_residual_with_term_adjoint(*adjoint_args)
        if theta == 1.0:
            assert fakes[-1].numel() == 0
            fakes = fakes[:-1]
        assert [(f.shape, f.dtype) for f in fakes] == [(o.shape, o.dtype) for o in outputs]
        if dense:
            assert [f.stride() for f in fakes] == [o.stride() for o in outputs]


def _device_kernels(call) -> list[str]:
    """The CUDA kernels ``call()`` launches (after a synchronisation), by the profiler."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _schema_arguments(reference) -> list[str]:
    """The op schema's argument names for a contract function's: the same, except that an
    argument of several kinds (``momentum: float | Tensor | None``), which no schema type
    holds, is two: ``Tensor? momentum`` and ``float? momentum_value``."""
    names = []
    for p in inspect.signature(reference).parameters.values():
        names.append(p.name)
        if {"float", "Tensor"} <= set(re.findall(r"\w+", str(p.annotation))):
            names.append(f"{p.name}_value")
    return names


def test_wrappers_schemas_and_c_abi_agree():
    """Python wrappers <-> op schemas in csrc/ <-> fakes <-> the C ABI's definitions."""
    ops_cpp = (ROOT / "csrc" / "ops.cpp").read_text()
    # joined string pieces, alias annotations (Tensor(a!): written in place) dropped
    joined = re.sub(r"Tensor\(\w!?\)", "Tensor", ops_cpp.replace('"\n      "', ""))
    schemas = dict(re.findall(r'"cuda_(\w+)\(([^)]*)\)', joined))
    assert set(schemas) == set(ref.__all__)
    for name, arguments in schemas.items():
        reference_params = list(inspect.signature(getattr(ref, name)).parameters)
        assert list(inspect.signature(getattr(cuda_backend, name)).parameters) == reference_params
        schema_params = [a.split()[-1] for a in arguments.replace('" "', "").split(",")]
        assert schema_params == _schema_arguments(getattr(ref, name)), name
        assert f"pyeuler::cuda_{name}" in cuda_backend._FAKES
        assert f'm.impl("cuda_{name}"' in ops_cpp
    header = (ROOT / "kernels" / "pyeuler_kernels.h").read_text()
    declared = set(re.findall(r"^(?:cudaError_t|int) (pyeuler_\w+)\(", header, re.M))
    defined = set()
    for source in (ROOT / "kernels").glob("*.cu"):
        defined |= set(re.findall(r'extern "C" (?:cudaError_t|int) (pyeuler_\w+)\(',
                                  source.read_text()))
    assert declared and declared == defined


_COMPILE_WITH_STAND_INS = r"""
import re, sys, torch
from pyeuler.ops import primitives as ref
import pyeuler.cuda as cuda_backend

# The schemas exactly as csrc/ops.cpp defines them, with the reference as CPU kernels.
source = open(sys.argv[1]).read()
lib = torch.library.Library("pyeuler", "FRAGMENT")
for pieces in re.findall(r'm\.def\(\s*((?:"[^"]*"\s*)+)\)', source):
    lib.define("".join(re.findall(r'"([^"]*)"', pieces)))


def forward(x, scale, shift, shortcut, relu, save_mask):
    y, mask = ref.affine_act_forward(x, scale, shift, shortcut, relu, save_mask)
    return y, x.new_empty((0,), dtype=torch.bool) if mask is None else mask


def apply(dy, *args):
    dx, g = ref.affine_act_backward_apply(dy, *args)
    return dx, dy.new_empty((0,)) if g is None else g


lib.impl("cuda_norm_stats", ref.norm_stats, "CPU")
lib.impl("cuda_affine_act_forward", forward, "CPU")
lib.impl("cuda_affine_act_backward_reduce", ref.affine_act_backward_reduce, "CPU")
lib.impl("cuda_affine_act_backward_reduce_recompute", ref.affine_act_backward_reduce_recompute,
         "CPU")
lib.impl("cuda_affine_act_backward_apply", apply, "CPU")
lib.impl("cuda_affine_act_backward_apply_ie_update", ref.affine_act_backward_apply_ie_update,
         "CPU")
lib.impl("cuda_affine_act_double_backward_reduce", ref.affine_act_double_backward_reduce, "CPU")
lib.impl("cuda_affine_act_double_backward_apply", ref.affine_act_double_backward_apply, "CPU")
def adjoint(de, dterm, theta, step_size, dx_addend):
    dx, dc, dfx = ref.ie_residual_with_term_adjoint(de, dterm, theta, step_size, dx_addend)
    return dx, dc, de.new_empty((0,)) if theta == 1.0 else dfx


lib.impl("cuda_ie_residual", ref.ie_residual, "CPU")
lib.impl("cuda_ie_residual_with_term", ref.ie_residual_with_term, "CPU")
lib.impl("cuda_ie_residual_with_term_adjoint", adjoint, "CPU")
lib.impl("cuda_ie_update", ref.ie_update, "CPU")
cuda_backend._register_fakes()

ops = torch.ops.pyeuler
def step(x, dy, scale, shift):
    mean, var = ops.cuda_norm_stats(x, 0)
    y, mask = ops.cuda_affine_act_forward(x, scale, shift, dy, True, True)
    sum_g, sum_gx = ops.cuda_affine_act_backward_reduce(dy, x, scale, shift, mean, mask, True,
                                                        False)
    _, recomputed_sum_gx, y_low = ops.cuda_affine_act_backward_reduce_recompute(
        dy, x, scale, shift, mean, True, False, torch.bfloat16)
    dx, g = ops.cuda_affine_act_backward_apply(dy, x, scale, shift, mask, True, sum_g, sum_gx,
                                               var, mean, True, None, None)
    dx_relayed, _ = ops.cuda_affine_act_backward_apply(dy, x, scale, shift, mask, True, sum_g,
                                                       sum_gx, var, mean, False, dy, None)
    dx_relayed_twice, _ = ops.cuda_affine_act_backward_apply(dy, x, scale, shift, mask, True,
                                                             sum_g, sum_gx, var, mean, False, dy,
                                                             y)
    e = ops.cuda_ie_residual(x, y, dx, 1.0)
    e_again, term = ops.cuda_ie_residual_with_term(x, y, dx, 1.0, 0.1)
    x_new = ops.cuda_affine_act_backward_apply_ie_update(dy, x, scale, shift, mask, True, sum_g,
                                                         sum_gx, var, mean, term, 0.1, 1.0, True)
    x_new_from_e = ops.cuda_affine_act_backward_apply_ie_update(
        dy, x, scale, shift, mask, True, sum_g, sum_gx, var, mean, e, 0.1, 1.0, False)
    dx_e, dc, dfx = ops.cuda_ie_residual_with_term_adjoint(e_again, g, 0.5, 0.1, None)
    _, dc_at_one, no_dfx = ops.cuda_ie_residual_with_term_adjoint(e_again, g, 1.0, 0.1, None)
    dx_e_relayed, _, _ = ops.cuda_ie_residual_with_term_adjoint(e_again, g, 0.5, 0.1, dx)
    sum_dd, sum_dd_xc, sum_dd_g = ops.cuda_affine_act_double_backward_reduce(
        dx, dy, x, scale, shift, mean, mask, True, False)
    ddy, dxx = ops.cuda_affine_act_double_backward_apply(dx, dy, x, scale, shift, mask, True,
                                                         sum_g, sum_gx, sum_dd, sum_dd_xc, mean,
                                                         g, 0.5, dx)
    return (ops.cuda_ie_update(x, e, g, 0.1, 1.0), x_new, mean, var, sum_g, sum_dd_g, ddy, dxx,
            recomputed_sum_gx, y_low, term, x_new_from_e, dx_e, dc, dfx, dc_at_one, no_dfx,
            dx_relayed, dx_e_relayed, dx_relayed_twice)
x = torch.randn(4, 6, 5, 5).to(memory_format=torch.channels_last)
args = (x, torch.randn_like(x), torch.randn(6), torch.randn(6))
compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(*args)
for got, want in zip(compiled, step(*args)):
    torch.testing.assert_close(got, want)
    assert got.stride() == want.stride()
print("traced")
"""


@pytest.mark.skipif(HAS_CUDA, reason="CPU stand-ins for the ops; a GPU run has the real ones")
def test_schemas_and_fakes_trace_under_torch_compile():
    """csrc/'s schemas parse, the fakes register on them, and aot_eager traces a fullgraph."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _COMPILE_WITH_STAND_INS,
                             str(ROOT / "csrc" / "ops.cpp")], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0 and "traced" in result.stdout, result.stderr[-3000:]


def test_ie_residual_with_term_ops_count_each_operand_once():
    """pyeuler.cost's view (KERNEL_LAUNCHES, KERNEL_PASSES) of the wrappers, on CPU inside
    counting_device: one launch each; the residual reads x, c, fx and writes e and the term;
    the adjoint reads de, dterm and (when given) dx_addend and writes dx, dc and, only at
    θ ≠ 1, dfx: at θ = 1 the op's dfx is empty and the wrapper returns dc in its place.
    Shapes, dtypes and layouts are the contract's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pyeuler import backend
    from pyeuler.cost import Recorder

    recorder = Recorder()
    with backend.counting_device(backend.H100):
        assert cuda_backend.is_available()[0]  # defines the ops for counting
        with FakeTensorMode():
            x = make((16, 32, 8, 8), "channels_last", torch.bfloat16, device="cpu")
            with recorder:
                got = [cuda_backend.ie_residual_with_term(x, x, x, 0.5, 0.1)]
                got += [cuda_backend.ie_residual_with_term_adjoint(x, x, theta, 0.1, addend)
                        for theta, addend in ((0.5, None), (1.0, None), (0.5, x))]
            want = [ref.ie_residual_with_term(x, x, x, 0.5, 0.1)]
            want += [ref.ie_residual_with_term_adjoint(x, x, theta, 0.1, addend)
                     for theta, addend in ((0.5, None), (1.0, None), (0.5, x))]
    for outputs, expected in zip(got, want):
        assert ([(t.shape, t.dtype, t.stride()) for t in outputs]
                == [(t.shape, t.dtype, t.stride()) for t in expected])
    assert got[1][2] is not got[1][1] and got[2][2] is got[2][1]
    act = x.numel() * x.element_size()
    assert [(k.name, k.launches, k.bytes) for k in recorder.kernels] == [
        ("pyeuler.cuda_ie_residual_with_term.default", 1, 5 * act),
        ("pyeuler.cuda_ie_residual_with_term_adjoint.default", 1, 5 * act),
        ("pyeuler.cuda_ie_residual_with_term_adjoint.default", 1, 4 * act),
        ("pyeuler.cuda_ie_residual_with_term_adjoint.default", 1, 6 * act)]


def test_backward_apply_counts_each_addend_once():
    """pyeuler.cost's view of the backward apply, on CPU inside counting_device: one launch
    whatever the addends; it reads dy, x, a, b, c, center (the gate from the mask, so not
    scale or shift) and each addend given, once, and writes dx (and g when asked).  The
    fake's outputs are the contract's; an addend off the GPU is named."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pyeuler import backend
    from pyeuler.cost import Recorder

    recorder = Recorder()
    with backend.counting_device(backend.H100):
        assert cuda_backend.is_available()[0]  # defines the ops for counting
        with FakeTensorMode():
            x = make((16, 32, 8, 8), "channels_last", torch.bfloat16, device="cpu")
            mask, v = x.gt(0), coef(x, False)
            apply_args = (x, x, v, v, mask, True, v, v, v, v)
            cases = [(False, None, None), (False, x, None), (False, None, x), (False, x, x),
                     (True, x, x)]
            with recorder:
                got = [cuda_backend.affine_act_backward_apply(*apply_args, want_dshortcut,
                                                              *addends)
                       for want_dshortcut, *addends in cases]
            want = [ref.affine_act_backward_apply(*apply_args, want_dshortcut, *addends)
                    for want_dshortcut, *addends in cases]
            # an addend off the GPU (a meta tensor here) is refused by its name
            with pytest.raises(ValueError, match="dx_addend2 must be a CUDA tensor"):
                cuda_backend.affine_act_backward_apply(*apply_args, False, None,
                                                       torch.empty_like(x, device="meta"))
    for outputs, expected in zip(got, want):
        assert ((outputs[1] is None) == (expected[1] is None)
                and (outputs[0].shape, outputs[0].dtype, outputs[0].stride())
                == (expected[0].shape, expected[0].dtype, expected[0].stride()))
    act, mask_bytes, vec = x.numel() * x.element_size(), x.numel(), v.numel() * v.element_size()
    inputs = 2 * act + mask_bytes + 4 * vec  # dy, x, the mask, a, b, c, center
    name = "pyeuler.cuda_affine_act_backward_apply.default"
    assert [(k.name, k.launches, k.bytes) for k in recorder.kernels] == [
        (name, 1, inputs + act), (name, 1, inputs + 2 * act), (name, 1, inputs + 2 * act),
        (name, 1, inputs + 3 * act), (name, 1, inputs + 4 * act)]


def test_jit_build_compiles_what_setup_py_compiles():
    from pyeuler.cuda import _build

    expected = sorted((ROOT / "csrc").glob("*.cpp")) + sorted((ROOT / "kernels").glob("*.cu"))
    assert _build.compiled_sources() == expected
    assert _build.SOURCE_ROOT == ROOT
    assert _build.build_directory().name.startswith("cuda-ext-")


# ---------------------------------------------------------------------------------------
# GPU: parity with the eager reference


@pytest.fixture(scope="module")
def cuda_ready():
    ok, reason = cuda_backend.is_available()
    if not ok:
        pytest.fail(f"a GPU is present but pyeuler.cuda is unavailable: {reason}")


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", cases())
def test_norm_stats(shape, layout, dtype):
    x = make(shape, layout, dtype, mean=3.0, std=2.0)  # offset mean: E[x^2]-E[x]^2 would fail
    c = shape[1]
    for groups in sorted({0, 1, next(g for g in (3, 2, 1) if c % g == 0)}):
        mean, var = cuda_backend.norm_stats(x, groups)
        mean64, var64 = ref.norm_stats(x.double(), groups)
        assert mean.dtype == var.dtype == torch.float32
        torch.testing.assert_close(mean.double(), mean64, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(var.double(), var64, rtol=1e-4, atol=1e-5)


@gpu
@pytest.mark.usefixtures("cuda_ready")
def test_norm_stats_is_deterministic_with_many_splits():
    x = make((64, 40, 32, 32), "channels_last", torch.bfloat16)
    first = cuda_backend.norm_stats(x, 0)
    for _ in range(3):
        again = cuda_backend.norm_stats(x, 0)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    mean64, var64 = ref.norm_stats(x.double(), 0)
    torch.testing.assert_close(first[0].double(), mean64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first[1].double(), var64, rtol=1e-4, atol=1e-5)


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", cases())
@pytest.mark.parametrize("variant", ["shortcut_relu", "relu_per_sample", "plain"])
def test_affine_act_forward(shape, layout, dtype, variant):
    x = make(shape, layout, dtype)
    per_sample = variant == "relu_per_sample"
    scale, shift = coef(x, per_sample), coef(x, per_sample)
    shortcut = make(shape, layout, dtype) if variant == "shortcut_relu" else None
    relu = variant != "plain"
    y, mask = cuda_backend.affine_act_forward(x, scale, shift, shortcut, relu, True)
    y_eager, mask_eager = ref.affine_act_forward(x, scale, shift, shortcut, relu, True)
    y_exact, _ = ref.affine_act_forward(*doubles(x, scale, shift, shortcut), relu, False)
    assert_output(y, y_eager, y_exact)
    assert torch.equal(mask, mask_eager)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last) or y.dim() != 4
    _, no_mask = cuda_backend.affine_act_forward(x, scale, shift, shortcut, relu, False)
    assert no_mask is None


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", cases())
@pytest.mark.parametrize("gate", ["mask", "relu", "none"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["per_channel", "per_sample"])
def test_affine_act_backward_reduce(shape, layout, dtype, gate, per_sample):
    dy, x = make(shape, layout, dtype), make(shape, layout, dtype, mean=0.5)
    scale, shift, center = coef(x, per_sample), coef(x, per_sample), coef(x, per_sample)
    mask = make(shape, layout).gt(0) if gate == "mask" else None
    relu = gate != "none"
    sums = cuda_backend.affine_act_backward_reduce(dy, x, scale, shift, center, mask, relu,
                                                   per_sample)
    assert_first_order_sums(sums, dy, x, scale, shift, center, mask, relu, per_sample)


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("y_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", cases())
@pytest.mark.parametrize("relu,per_sample", [(True, False), (True, True), (False, True)],
                         ids=["relu-per_channel", "relu-per_sample", "none-per_sample"])
def test_affine_act_backward_reduce_recompute(shape, layout, dtype, relu, per_sample, y_dtype):
    """The sums are the plain reduce's with the recomputed gate, bit for bit (the same plan and
    partials kernel) and close to float64; y is the contract's bit for bit (float32 arithmetic
    rounded once to y_dtype, whatever x's dtype), in x's layout, and the forward kernel's."""
    dy, x = make(shape, layout, dtype), make(shape, layout, dtype, mean=0.5)
    scale, shift, center = (coef(x, per_sample) for _ in range(3))
    args = (dy, x, scale, shift, center, relu, per_sample, y_dtype)
    sum_g, sum_g_xc, y = cuda_backend.affine_act_backward_reduce_recompute(*args)
    assert_first_order_sums((sum_g, sum_g_xc), dy, x, scale, shift, center, None, relu,
                            per_sample)
    plain = cuda_backend.affine_act_backward_reduce(dy, x, scale, shift, center, None, relu,
                                                    per_sample)
    assert torch.equal(sum_g, plain[0]) and torch.equal(sum_g_xc, plain[1])
    y_eager = ref.affine_act_backward_reduce_recompute(*args)[2]
    assert y.dtype == y_dtype and y.shape == x.shape and torch.equal(y, y_eager)
    if layout == "channels_last" and x.dim() == 4:
        assert y.is_contiguous(memory_format=torch.channels_last)
    if y_dtype == dtype:
        assert torch.equal(y, cuda_backend.affine_act_forward(x, scale, shift, None, relu,
                                                              False)[0])


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("per_sample", [False, True], ids=["per_channel", "per_sample"])
def test_backward_reduce_recompute_is_two_launches_and_deterministic(per_sample):
    """The partials pass, which also writes y, and the finalize: nothing else (outputs and
    workspace are torch.empty), with many splits per unit; bitwise equal on repeats."""
    x, dy = (make((64, 40, 32, 32), "channels_last", torch.bfloat16) for _ in range(2))
    scale, shift, center = (coef(x, per_sample) for _ in range(3))
    args = (dy, x, scale, shift, center, True, per_sample, torch.float32)
    first = cuda_backend.affine_act_backward_reduce_recompute(*args)
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in
                   zip(cuda_backend.affine_act_backward_reduce_recompute(*args), first))
    device_events = _device_kernels(
        lambda: cuda_backend.affine_act_backward_reduce_recompute(*args))
    assert len(device_events) == cuda_backend.KERNEL_LAUNCHES[
        "cuda_affine_act_backward_reduce_recompute"] == 2, device_events


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", cases())
@pytest.mark.parametrize("gate", ["mask", "relu", "none"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["per_channel", "per_sample"])
def test_affine_act_backward_apply(shape, layout, dtype, gate, per_sample):
    dy, x = make(shape, layout, dtype), make(shape, layout, dtype)
    scale, shift = coef(x, per_sample), coef(x, per_sample)
    a, b, c, center = (coef(x, per_sample) for _ in range(4))
    mask = make(shape, layout).gt(0) if gate == "mask" else None
    relu = gate != "none"
    dx, dshortcut = cuda_backend.affine_act_backward_apply(dy, x, scale, shift, mask, relu, a, b,
                                                           c, center, True)
    dx_eager, g_eager = ref.affine_act_backward_apply(dy, x, scale, shift, mask, relu, a, b, c,
                                                      center, True)
    gate64 = mask if mask is not None else (relu_gate32(x, scale, shift) if relu else None)
    dx_exact, _ = ref.affine_act_backward_apply(*doubles(dy, x, scale, shift), gate64, relu,
                                                *doubles(a, b, c, center), False)
    assert_output(dx, dx_eager, dx_exact)
    assert torch.equal(dshortcut, g_eager)
    _, none = cuda_backend.affine_act_backward_apply(dy, x, scale, shift, mask, relu, a, b, c,
                                                     center, False)
    assert none is None


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", cases())
@pytest.mark.parametrize("gate,per_sample", [("mask", False), ("relu", True), ("none", False)],
                         ids=["mask-per_channel", "relu-per_sample", "none-per_channel"])
@pytest.mark.parametrize("given", ["first", "second", "both"])
def test_affine_act_backward_apply_with_dx_addends(shape, layout, dtype, gate, per_sample,
                                                   given):
    """dx = ((a·g + b·(x − center) + c) + dx_addend) + dx_addend2, each addend optional, in
    another layout than x (the op copies it into x's), summed in float32 in that order before
    dx is rounded; dx stays in x's layout and the shortcut's gradient g is the one without
    the addends."""
    dy, x = make(shape, layout, dtype), make(shape, layout, dtype)
    addends = tuple(make(shape, other_layout(layout), dtype) if given in (which, "both")
                    else None for which in ("first", "second"))
    scale, shift = coef(x, per_sample), coef(x, per_sample)
    a, b, c, center = (coef(x, per_sample) for _ in range(4))
    mask = make(shape, layout).gt(0) if gate == "mask" else None
    relu = gate != "none"
    apply_args = (dy, x, scale, shift, mask, relu, a, b, c, center, True)
    dx, dshortcut = cuda_backend.affine_act_backward_apply(*apply_args, *addends)
    dx_eager, g_eager = ref.affine_act_backward_apply(*apply_args, *addends)
    gate64 = mask if mask is not None else (relu_gate32(x, scale, shift) if relu else None)
    dx_exact, _ = ref.affine_act_backward_apply(*doubles(dy, x, scale, shift), gate64, relu,
                                                *doubles(a, b, c, center), False,
                                                *doubles(*addends))
    assert_output(dx, dx_eager, dx_exact)
    assert torch.equal(dshortcut, g_eager)
    _, g_without = cuda_backend.affine_act_backward_apply(*apply_args)
    assert torch.equal(dshortcut, g_without)
    if layout == "channels_last" and x.dim() == 4:
        assert dx.is_contiguous(memory_format=torch.channels_last)
    # the keyword form, as the contract names them
    dx_keyword, _ = cuda_backend.affine_act_backward_apply(
        *apply_args, **{name: t for name, t in zip(("dx_addend", "dx_addend2"), addends)
                        if t is not None})
    assert torch.equal(dx_keyword, dx)
    if given == "second":
        # the second alone is summed as the first alone is: the same kernel path
        dx_as_first, _ = cuda_backend.affine_act_backward_apply(*apply_args, addends[1])
        assert torch.equal(dx_as_first, dx)


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", cases())
@pytest.mark.parametrize("gate,per_sample", [("mask", False), ("relu", True), ("none", False)],
                         ids=["mask-per_channel", "relu-per_sample", "none-per_channel"])
@pytest.mark.parametrize("residual_is_term", [False, True], ids=["e", "term"])
def test_affine_act_backward_apply_ie_update(shape, layout, dtype, gate, per_sample,
                                             residual_is_term):
    """The step x − 2γ·(e − θ·v) from e, or from its term −2γ·e (the residual in another
    layout than x where there is one: the op copies it into x's)."""
    dy, x = make(shape, layout, dtype), make(shape, layout, dtype)
    e = make(shape, "contiguous" if layout == "channels_last" else layout, dtype)
    scale, shift = coef(x, per_sample), coef(x, per_sample)
    a, b, c, center = (coef(x, per_sample) for _ in range(4))
    mask = make(shape, layout).gt(0) if gate == "mask" else None
    relu = gate != "none"
    step_size, theta = 0.1, 0.75
    # the term as ie_residual_with_term writes it: from e in float32, rounded once
    residual = (-2.0 * step_size * e.float()).to(dtype) if residual_is_term else e
    apply_args = (dy, x, scale, shift, mask, relu, a, b, c, center)
    ie_args = (residual, step_size, theta, residual_is_term)
    x_new = cuda_backend.affine_act_backward_apply_ie_update(*apply_args, *ie_args)
    eager = ref.affine_act_backward_apply_ie_update(*apply_args, *ie_args)
    gate64 = mask if mask is not None else (relu_gate32(x, scale, shift) if relu else None)
    exact = ref.affine_act_backward_apply_ie_update(*doubles(dy, x, scale, shift), gate64, relu,
                                                    *doubles(a, b, c, center, residual),
                                                    *ie_args[1:])
    assert_output(x_new, eager, exact)
    if layout == "channels_last" and x.dim() == 4:
        assert x_new.is_contiguous(memory_format=torch.channels_last)
    # the fused pass equals the two-pass apply + ie_update from e
    v, _ = cuda_backend.affine_act_backward_apply(*apply_args, False)
    if dtype == torch.float32:
        torch.testing.assert_close(x_new, cuda_backend.ie_update(x, e, v, step_size, theta),
                                   rtol=1e-5, atol=1e-6)


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", cases())
@pytest.mark.parametrize("gate", ["mask", "relu", "none"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["per_channel", "per_sample"])
def test_affine_act_double_backward_reduce(shape, layout, dtype, gate, per_sample):
    ddx, dy = make(shape, layout, dtype), make(shape, layout, dtype)
    x = make(shape, layout, dtype, mean=0.5)
    scale, shift, center = coef(x, per_sample), coef(x, per_sample), coef(x, per_sample)
    mask = make(shape, layout).gt(0) if gate == "mask" else None
    relu = gate != "none"
    sums = cuda_backend.affine_act_double_backward_reduce(ddx, dy, x, scale, shift, center, mask,
                                                          relu, per_sample)
    gate64 = mask if mask is not None else (relu_gate32(x, scale, shift) if relu else None)
    expected = ref.affine_act_double_backward_reduce(*doubles(ddx, dy, x, scale, shift, center),
                                                     gate64, relu, per_sample)
    dd = ddx.double()
    g = dy.double() * (gate64 if gate64 is not None else 1)
    terms = (dd, dd * (x.double() - broadcast(center.double(), x)), dd * g)
    dims = list(range(2, x.dim())) if per_sample else [0, *range(2, x.dim())]
    magnitudes = [t.abs().sum(dims) if dims else t.abs() for t in terms]
    assert len(sums) == 3
    for actual, exact, magnitude in zip(sums, expected, magnitudes):
        assert actual.dtype == torch.float32 and actual.shape == exact.shape
        assert_sums_close(actual, exact, magnitude)


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("shape,layout", cases([(4, 5, 7, 5), (64, 40, 16, 16)],
                                               ["contiguous", "channels_last"]))
@pytest.mark.parametrize("per_sample", [False, True], ids=["per_channel", "per_sample"])
def test_double_backward_reduce_is_the_first_order_reduction(shape, layout, per_sample):
    """With ddx = dy and no gate, the first two sums are the first-order reduce's bit for bit
    (same plan, same combine order), and repeated calls agree bitwise (no atomics)."""
    ddx, x = make(shape, layout, torch.bfloat16), make(shape, layout, torch.bfloat16)
    scale, shift, center = (coef(x, per_sample) for _ in range(3))
    args = (ddx, x, x, scale, shift, center, None, False, per_sample)
    sums = cuda_backend.affine_act_double_backward_reduce(*args)
    sum_g, sum_g_xc = cuda_backend.affine_act_backward_reduce(ddx, x, scale, shift, center, None,
                                                              False, per_sample)
    assert torch.equal(sums[0], sum_g) and torch.equal(sums[1], sum_g_xc)
    again = cuda_backend.affine_act_double_backward_reduce(*args)
    assert all(torch.equal(a, b) for a, b in zip(sums, again))


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", cases())
@pytest.mark.parametrize("gate,per_sample,with_ddshortcut",
                         [("mask", False, True), ("relu", True, True), ("relu", False, False),
                          ("none", True, False)],
                         ids=["mask-per_channel-ddshortcut", "relu-per_sample-ddshortcut",
                              "relu-per_channel", "none-per_sample"])
def test_affine_act_double_backward_apply(shape, layout, dtype, gate, per_sample,
                                          with_ddshortcut):
    ddx, dy, x = (make(shape, layout, dtype) for _ in range(3))
    # in another layout than x where there is one: the op copies it into x's
    ddshortcut = (make(shape, "contiguous" if layout == "channels_last" else layout, dtype)
                  if with_ddshortcut else None)
    scale, shift = coef(x, per_sample), coef(x, per_sample)
    a, b, p, q, center = (coef(x, per_sample) for _ in range(5))
    mask = make(shape, layout).gt(0) if gate == "mask" else None
    relu = gate != "none"
    # with a ddshortcut also the IE update's terms: ddx scaled, and summed into dxx itself
    ddx_scale, dxx_addend = (0.5, ddx) if with_ddshortcut else (1.0, None)
    args = (ddx, dy, x, scale, shift, mask, relu, a, b, p, q, center, ddshortcut, ddx_scale,
            dxx_addend)
    ddy, dxx = cuda_backend.affine_act_double_backward_apply(*args)
    ddy_eager, dxx_eager = ref.affine_act_double_backward_apply(*args)
    gate64 = mask if mask is not None else (relu_gate32(x, scale, shift) if relu else None)
    ddy_exact, dxx_exact = ref.affine_act_double_backward_apply(
        *doubles(ddx, dy, x, scale, shift), gate64, relu, *doubles(a, b, p, q, center, ddshortcut),
        ddx_scale, *doubles(dxx_addend))
    assert_output(ddy, ddy_eager, ddy_exact)
    assert_output(dxx, dxx_eager, dxx_exact)
    if layout == "channels_last" and x.dim() == 4:
        assert ddy.is_contiguous(memory_format=torch.channels_last)
        assert dxx.is_contiguous(memory_format=torch.channels_last)


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", cases())
def test_ie_residual_and_update(shape, layout, dtype):
    x, c, fx = (make(shape, layout, dtype) for _ in range(3))
    theta, step_size = 0.75, 0.1
    e = cuda_backend.ie_residual(x, c, fx, theta)
    assert_output(e, ref.ie_residual(x, c, fx, theta), ref.ie_residual(*doubles(x, c, fx), theta))
    x_next = cuda_backend.ie_update(x, e, fx, step_size, theta)
    assert_output(x_next, ref.ie_update(x, e, fx, step_size, theta),
                  ref.ie_update(*doubles(x, e, fx), step_size, theta))


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", cases())
def test_ie_residual_with_term_and_adjoint(shape, layout, dtype):
    """e is ie_residual's and the term the contract's (−2γ·e from e in float32, rounded once),
    bit for bit, in x's layout; the adjoint's (u, −u, −θ·u), u = de − 2γ·dterm, are the
    contract's bit for bit, in de's layout (dterm in another layout where there is one), and
    at θ = 1 its dfx is its dc, the same tensor."""
    x, c, fx = (make(shape, layout, dtype) for _ in range(3))
    theta, step_size = 0.75, 0.1
    e, term = cuda_backend.ie_residual_with_term(x, c, fx, theta, step_size)
    e_eager, term_eager = ref.ie_residual_with_term(x, c, fx, theta, step_size)
    assert e.dtype == term.dtype == dtype
    assert torch.equal(e, cuda_backend.ie_residual(x, c, fx, theta))
    assert torch.equal(e, e_eager) and torch.equal(term, term_eager)
    de = make(shape, layout, dtype)
    dterm = make(shape, "contiguous" if layout == "channels_last" else layout, dtype)
    dx_addend = make(shape, other_layout(layout), dtype)
    for adjoint_theta in (theta, 1.0):
        grads = cuda_backend.ie_residual_with_term_adjoint(de, dterm, adjoint_theta, step_size)
        eager = ref.ie_residual_with_term_adjoint(de, dterm, adjoint_theta, step_size)
        for got, want in zip(grads, eager):
            assert got.dtype == dtype and torch.equal(got, want)
        assert (grads[2] is grads[1]) == (adjoint_theta == 1.0)
        # the addend (in another layout) enters dx alone, summed before dx is rounded
        relayed = cuda_backend.ie_residual_with_term_adjoint(de, dterm, adjoint_theta,
                                                             step_size, dx_addend)
        relayed_eager = ref.ie_residual_with_term_adjoint(de, dterm, adjoint_theta, step_size,
                                                          dx_addend)
        for got, want in zip(relayed, relayed_eager):
            assert got.dtype == dtype and torch.equal(got, want)
        assert torch.equal(relayed[1], grads[1]) and torch.equal(relayed[2], grads[2])
        assert (relayed[2] is relayed[1]) == (adjoint_theta == 1.0)
        if layout == "channels_last" and x.dim() == 4:
            assert all(t.is_contiguous(memory_format=torch.channels_last)
                       for t in (e, term, *grads, *relayed))


@gpu
@pytest.mark.usefixtures("cuda_ready")
def test_ie_residual_with_term_ops_are_one_launch_each():
    """One kernel each, the adjoint at θ = 1 too (where it writes dfx = dc once); addends
    of x's layout and dtype (one, or the backward apply's two) are summed in the same kernel
    (no copy, no extra pass)."""
    x = make((8, 16, 8, 8), "channels_last", torch.bfloat16)
    scale = coef(x, False)
    calls = {"cuda_ie_residual_with_term":
             [lambda: cuda_backend.ie_residual_with_term(x, x, x, 0.5, 0.1)],
             "cuda_ie_residual_with_term_adjoint":
             [lambda theta=theta, addend=addend:
              cuda_backend.ie_residual_with_term_adjoint(x, x, theta, 0.1, addend)
              for theta, addend in ((0.5, None), (1.0, None), (0.5, x))],
             "cuda_affine_act_backward_apply":
             [lambda addends=addends: cuda_backend.affine_act_backward_apply(
                 x, x, scale, scale, None, True, scale, scale, scale, scale, True, *addends)
              for addends in ((None, None), (x, None), (None, x), (x, x))]}
    for name, name_calls in calls.items():
        for call in name_calls:
            device_events = _device_kernels(call)
            assert len(device_events) == cuda_backend.KERNEL_LAUNCHES[name] == 1, device_events


@gpu
@pytest.mark.usefixtures("cuda_ready")
def test_bad_arguments_are_named():
    x = make((2, 4, 3, 3))
    scale = coef(x, False)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        cuda_backend.norm_stats(x.double(), 0)
    with pytest.raises(RuntimeError, match="shortcut has shape"):
        cuda_backend.affine_act_forward(x, scale, scale, x[:1], True, False)
    with pytest.raises(TypeError, match="shortcut must be"):
        cuda_backend.affine_act_forward(x, scale, scale, x.half(), True, False)
    with pytest.raises(RuntimeError, match=r"scale must be \[C\]"):
        cuda_backend.affine_act_forward(x, scale[:3], scale, None, True, False)
    with pytest.raises(RuntimeError, match="groups must be 0"):
        cuda_backend.norm_stats(x, 3)
    with pytest.raises(TypeError, match="ddx must be"):
        cuda_backend.affine_act_double_backward_reduce(x.half(), x, x, scale, scale, scale, None,
                                                       True, False)
    with pytest.raises(RuntimeError, match=r"center must be \[C\] when per_sample is False"):
        cuda_backend.affine_act_double_backward_reduce(x, x, x, scale, scale, coef(x, True), None,
                                                       True, False)
    with pytest.raises(RuntimeError, match=r"center must be \[C\] when per_sample is False"):
        cuda_backend.affine_act_backward_reduce_recompute(x, x, scale, scale, coef(x, True), True,
                                                          False, torch.float32)
    with pytest.raises(TypeError, match="y_dtype must be float32, float16 or bfloat16"):
        cuda_backend.affine_act_backward_reduce_recompute(x, x, scale, scale, scale, True, False,
                                                          torch.float64)
    with pytest.raises(RuntimeError, match="ddshortcut has shape"):
        cuda_backend.affine_act_double_backward_apply(x, x, x, scale, scale, None, True, scale,
                                                      scale, scale, scale, scale, x[:1])
    with pytest.raises(RuntimeError, match=r"q must be \[C\]"):
        cuda_backend.affine_act_double_backward_apply(x, x, x, scale, scale, None, True, scale,
                                                      scale, scale, scale[:3], scale, None)
    with pytest.raises(RuntimeError, match="residual has shape"):
        cuda_backend.affine_act_backward_apply_ie_update(x, x, scale, scale, None, True, scale,
                                                         scale, scale, scale, x[:1], 0.1, 0.5,
                                                         True)
    with pytest.raises(RuntimeError, match="fx has shape"):
        cuda_backend.ie_residual_with_term(x, x, x[:1], 0.5, 0.1)
    with pytest.raises(RuntimeError, match=r"dterm has shape .* but de has shape"):
        cuda_backend.ie_residual_with_term_adjoint(x, x[:1], 0.5, 0.1)
    with pytest.raises(TypeError, match="de must be float32, float16 or bfloat16"):
        cuda_backend.ie_residual_with_term_adjoint(x.double(), x.double(), 0.5, 0.1)
    with pytest.raises(RuntimeError, match=r"dx_addend has shape .* but de has shape"):
        cuda_backend.ie_residual_with_term_adjoint(x, x, 0.5, 0.1, x[:1])
    with pytest.raises(ValueError, match="dx_addend must be a CUDA tensor"):
        cuda_backend.ie_residual_with_term_adjoint(x, x, 0.5, 0.1, x.cpu())
    apply_args = (x, x, scale, scale, None, True, scale, scale, scale, scale, True)
    with pytest.raises(RuntimeError, match=r"dx_addend has shape .* but x has shape"):
        cuda_backend.affine_act_backward_apply(*apply_args, x[:1])
    with pytest.raises(ValueError, match="dx_addend must be a CUDA tensor"):
        cuda_backend.affine_act_backward_apply(*apply_args, x.cpu())
    with pytest.raises(RuntimeError, match=r"dx_addend2 has shape .* but x has shape"):
        cuda_backend.affine_act_backward_apply(*apply_args, x, x[:1])
    with pytest.raises(RuntimeError, match=r"dx_addend2 has shape .* but x has shape"):
        cuda_backend.affine_act_backward_apply(*apply_args, None, x[:1])
    with pytest.raises(ValueError, match="dx_addend2 must be a CUDA tensor"):
        cuda_backend.affine_act_backward_apply(*apply_args, x, x.cpu())


@gpu
@pytest.mark.usefixtures("cuda_ready")
def test_ops_trace_under_torch_compile():
    x = make((4, 8, 6, 6), "channels_last", torch.bfloat16)
    scale, shift = coef(x, False), coef(x, False)

    def step(x):
        mean, var = cuda_backend.norm_stats(x, 0)
        y, _ = cuda_backend.affine_act_forward(x, scale / (var + 1e-5).sqrt(), shift - mean,
                                               None, True, False)
        return y

    torch.testing.assert_close(torch.compile(step, fullgraph=True)(x), step(x))


# ---------------------------------------------------------------------------------------
# GPU: parity with the Triton backend


def _triton_on_gpu() -> bool:
    if not HAS_CUDA:
        return False
    from pyeuler import triton as triton_backend

    return triton_backend.is_available()[0]


@pytest.mark.skipif(not _triton_on_gpu(), reason="needs a CUDA GPU with triton")
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("shape,layout", cases([(4, 5, 7, 5), (8, 16, 8, 8)]))
def test_matches_triton(shape, layout):
    from pyeuler import triton as tri

    x, dy = make(shape, layout), make(shape, layout)
    scale, shift, center = coef(x, False), coef(x, False), coef(x, False)
    for cu, tr in zip(cuda_backend.norm_stats(x, 0), tri.norm_stats(x, 0)):
        torch.testing.assert_close(cu, tr, rtol=1e-4, atol=1e-5)
    weight, bias, h, h_value = list(_stats_params(shape[1], torch.float32))[-1]
    for groups in (0, 1):
        for cu, tr in zip(
                cuda_backend.norm_stats_and_coefficients(x, groups, weight, bias, h, h_value, 1e-5),
                tri.norm_stats_and_coefficients(x, groups, weight, bias, h, h_value, 1e-5)):
            torch.testing.assert_close(cu, tr, rtol=1e-4, atol=1e-4)
    y_cu, m_cu = cuda_backend.affine_act_forward(x, scale, shift, dy, True, True)
    y_tr, m_tr = tri.affine_act_forward(x, scale, shift, dy, True, True)
    torch.testing.assert_close(y_cu, y_tr, rtol=1e-4, atol=1e-5)
    assert (m_cu != m_tr).float().mean() < 1e-3  # may differ only where y rounds to ~0
    for cu, tr in zip(
            cuda_backend.affine_act_backward_reduce(dy, x, scale, shift, center, None, True, False),
            tri.affine_act_backward_reduce(dy, x, scale, shift, center, None, True, False)):
        torch.testing.assert_close(cu, tr, rtol=1e-4, atol=1e-4)
    recompute_args = (dy, x, scale, shift, center, True, False, torch.bfloat16)
    cu = cuda_backend.affine_act_backward_reduce_recompute(*recompute_args)
    tr = tri.affine_act_backward_reduce_recompute(*recompute_args)
    for cu_sum, tr_sum in zip(cu[:2], tr[:2]):
        torch.testing.assert_close(cu_sum, tr_sum, rtol=1e-4, atol=1e-4)
    assert cu[2].dtype == tr[2].dtype == torch.bfloat16
    torch.testing.assert_close(cu[2], tr[2], rtol=2**-7, atol=1e-5)
    torch.testing.assert_close(cuda_backend.ie_update(x, dy, y_cu, 0.1, 1.0),
                               tri.ie_update(x, dy, y_cu, 0.1, 1.0), rtol=1e-4, atol=1e-5)
    for residual_is_term in (False, True):
        ie_args = (dy, x, scale, shift, m_cu, True, scale, shift, center, center, y_cu, 0.1, 1.0,
                   residual_is_term)
        torch.testing.assert_close(cuda_backend.affine_act_backward_apply_ie_update(*ie_args),
                                   tri.affine_act_backward_apply_ie_update(*ie_args), rtol=1e-4,
                                   atol=1e-5)
    for cu, tr in zip(cuda_backend.ie_residual_with_term(x, dy, y_cu, 0.75, 0.1),
                      tri.ie_residual_with_term(x, dy, y_cu, 0.75, 0.1)):
        torch.testing.assert_close(cu, tr, rtol=1e-5, atol=1e-6)
    for theta, dx_addend in ((0.75, None), (1.0, None), (0.75, y_cu)):
        cu = cuda_backend.ie_residual_with_term_adjoint(x, dy, theta, 0.1, dx_addend)
        tr = tri.ie_residual_with_term_adjoint(x, dy, theta, 0.1, dx_addend)
        for cu_grad, tr_grad in zip(cu, tr):
            torch.testing.assert_close(cu_grad, tr_grad, rtol=1e-5, atol=1e-6)
        assert (cu[2] is cu[1]) == (tr[2] is tr[1]) == (theta == 1.0)
    apply_args = (dy, x, scale, shift, m_cu, True, scale, shift, center, center, True)
    second_addend = make(shape, layout)
    for addends in ((y_cu,), (None, y_cu), (y_cu, second_addend)):
        for cu, tr in zip(cuda_backend.affine_act_backward_apply(*apply_args, *addends),
                          tri.affine_act_backward_apply(*apply_args, *addends)):
            torch.testing.assert_close(cu, tr, rtol=1e-4, atol=1e-5)
    ddx = make(shape, layout)
    reduce_args = (ddx, dy, x, scale, shift, center, None, True, False)
    for cu, tr in zip(cuda_backend.affine_act_double_backward_reduce(*reduce_args),
                      tri.affine_act_double_backward_reduce(*reduce_args)):
        torch.testing.assert_close(cu, tr, rtol=1e-4, atol=1e-4)
    apply_args = (ddx, dy, x, scale, shift, None, True, scale, shift, center, scale, center, y_cu)
    for cu, tr in zip(cuda_backend.affine_act_double_backward_apply(*apply_args),
                      tri.affine_act_double_backward_apply(*apply_args)):
        torch.testing.assert_close(cu, tr, rtol=1e-4, atol=1e-5)
    for n, c, groups in ((4, 5, 0), (3, 6, 2)):
        inputs = _algebra_inputs(n, c, groups, "cuda")
        params = _algebra_params(inputs, True, True, "channel")
        args = _backward_args(inputs, groups, params, True, True, True, (True,) * 5)
        cotangents = tuple(torch.randn_like(o) for o in norm_algebra.backward_coefficients(*args))
        sum_cotangents = (torch.randn_like(inputs["sum_g"]), None)
        cu = cuda_backend.double_backward_coefficients(*args, cotangents, sum_cotangents)
        tr = tri.double_backward_coefficients(*args, cotangents, sum_cotangents)
        _assert_vjp_close(cu, {k: v for k, v in tr.items()})


@gpu
@pytest.mark.usefixtures("cuda_ready")
def test_mixed_dtypes_follow_the_contract():
    """Autocast mixes float32 block inputs with bfloat16 convolution outputs: operands in
    another dtype than x are read as the eager contract reads them."""
    x = make((4, 6, 5, 5), "channels_last")
    low = make((4, 6, 5, 5), "channels_last", torch.bfloat16)
    scale, shift = coef(x, False), coef(x, False)
    torch.testing.assert_close(cuda_backend.ie_residual(x, x, low, 0.5),
                               ref.ie_residual(x, x, low, 0.5))
    torch.testing.assert_close(cuda_backend.ie_update(x, low, low, 0.1, 0.5),
                               ref.ie_update(x, low, low, 0.1, 0.5))
    for got, want in zip(cuda_backend.ie_residual_with_term(x, x, low, 0.5, 0.1),
                         ref.ie_residual_with_term(x, x, low, 0.5, 0.1)):
        torch.testing.assert_close(got, want)
    # a float32 de with a bfloat16 dterm (its term's gradient): de's dtype; likewise a
    # bfloat16 share of x's gradient added to dx
    for dx_addend in (None, low):
        for got, want in zip(cuda_backend.ie_residual_with_term_adjoint(x, low, 0.5, 0.1,
                                                                        dx_addend),
                             ref.ie_residual_with_term_adjoint(x, low, 0.5, 0.1, dx_addend)):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want)
    apply_args = (x, x, scale, shift, None, True, scale, shift, shift, scale, True)
    for addends in ((low,), (None, low), (low, low.half())):
        for got, want in zip(cuda_backend.affine_act_backward_apply(*apply_args, *addends),
                             ref.affine_act_backward_apply(*apply_args, *addends)):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want)
    for got, want in zip(cuda_backend.affine_act_forward(low, scale, shift, x, True, True),
                         ref.affine_act_forward(low, scale, shift, x, True, True)):
        torch.testing.assert_close(got, want, atol=2**-7, rtol=2**-7)
    # a float32 block input, its bfloat16 gradient, y for a bfloat16 convolution
    recompute_args = (low, x, scale, shift, shift, True, False, torch.bfloat16)
    got = cuda_backend.affine_act_backward_reduce_recompute(*recompute_args)
    want = ref.affine_act_backward_reduce_recompute(*recompute_args)
    for got_sum, want_sum in zip(got[:2], want[:2]):
        torch.testing.assert_close(got_sum, want_sum, rtol=1e-4, atol=1e-4)
    assert got[2].dtype == torch.bfloat16 and torch.equal(got[2], want[2])


# ---------------------------------------------------------------------------------------
# GPU: NaN and inf follow the eager contract (torch's ReLU and its threshold_backward gate;
# an overflowed variance is NaN)

NAN_TOL = dict(rtol=1e-4, atol=1e-4, equal_nan=True)


def _nan_inf_inputs(layout, per_sample):
    return nan_inf_inputs(layout, per_sample, DEVICE, width=8)


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("per_sample", [False, True], ids=["per_channel", "per_sample"])
def test_nan_and_inf_propagate_like_the_eager_contract(layout, per_sample):
    x, dy, ddx, e, shortcut, scale, shift, a, b, c, center = _nan_inf_inputs(layout, per_sample)
    for got, want in zip((*cuda_backend.ie_residual_with_term(x, shortcut, dy, 0.9, 0.1),
                          *cuda_backend.ie_residual_with_term_adjoint(x, e, 0.9, 0.1)),
                         (*ref.ie_residual_with_term(x, shortcut, dy, 0.9, 0.1),
                          *ref.ie_residual_with_term_adjoint(x, e, 0.9, 0.1))):
        torch.testing.assert_close(got, want, **NAN_TOL)
    y, mask = cuda_backend.affine_act_forward(x, scale, shift, shortcut, True, True)
    y_ref, mask_ref = ref.affine_act_forward(x, scale, shift, shortcut, True, True)
    assert y.isnan().any() and mask[y.isnan()].all()  # NaN passes its gradient
    torch.testing.assert_close(y, y_ref, **NAN_TOL)
    assert torch.equal(mask, mask_ref)
    for m in (mask, None):  # saved, or recomputed from x
        reduce_args = (dy, x, scale, shift, center, m, True, per_sample)
        for got, want in zip(cuda_backend.affine_act_backward_reduce(*reduce_args),
                             ref.affine_act_backward_reduce(*reduce_args)):
            torch.testing.assert_close(got, want, **NAN_TOL)
        if m is None:  # the reduce that recomputes the gate also writes y (NaN kept)
            recompute_args = (dy, x, scale, shift, center, True, per_sample, torch.bfloat16)
            got = cuda_backend.affine_act_backward_reduce_recompute(*recompute_args)
            want = ref.affine_act_backward_reduce_recompute(*recompute_args)
            assert got[2].isnan().any()
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, **NAN_TOL)
        apply_args = (dy, x, scale, shift, m, True, a, b, c, center)
        for got, want in zip(cuda_backend.affine_act_backward_apply(*apply_args, True),
                             ref.affine_act_backward_apply(*apply_args, True)):
            torch.testing.assert_close(got, want, **NAN_TOL)
        for residual_is_term in (False, True):  # e, or e standing for the residual's term
            ie_args = (*apply_args, e, 0.1, 0.9, residual_is_term)
            torch.testing.assert_close(cuda_backend.affine_act_backward_apply_ie_update(*ie_args),
                                       ref.affine_act_backward_apply_ie_update(*ie_args),
                                       **NAN_TOL)
        reduce_args = (ddx, dy, x, scale, shift, center, m, True, per_sample)
        for got, want in zip(cuda_backend.affine_act_double_backward_reduce(*reduce_args),
                             ref.affine_act_double_backward_reduce(*reduce_args)):
            torch.testing.assert_close(got, want, **NAN_TOL)
        dd_args = (ddx, dy, x, scale, shift, m, True, a, b, c, shift, center, shortcut)
        for got, want in zip(cuda_backend.affine_act_double_backward_apply(*dd_args),
                             ref.affine_act_double_backward_apply(*dd_args)):
            torch.testing.assert_close(got, want, **NAN_TOL)


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("groups", [0, 2])
def test_norm_stats_nan_inf_and_overflow(layout, groups):
    """NaN / inf poison their statistic, across split partials; an overflowed variance is
    NaN (deliberately unlike torch's inf); a huge but constant channel is not an overflow."""
    x = make((8, 4, 32, 32), layout, torch.bfloat16)
    x[2, 0, 5, 5] = float("nan")
    x[3, 1, 7, 0] = float("inf")
    x[:, 2] = (torch.randn(8, 32, 32, device=x.device) * 1e30).to(x)
    x[:, 3] = 1e20
    mean, var = cuda_backend.norm_stats(x, groups)
    mean_ref, var_ref = ref.norm_stats(x, groups)
    assert var_ref.isnan().sum() == (3 if groups == 0 else 10)  # GN: samples 2, 3 and group 1
    torch.testing.assert_close(var, var_ref, rtol=1e-4, atol=1e-5, equal_nan=True)
    sane = var_ref.isfinite()  # the overflowing means cancel: no rtol to hold them to
    torch.testing.assert_close(mean[sane], mean_ref[sane], rtol=1e-4, atol=1e-5)
    assert not mean[~mean_ref.isfinite()].isfinite().any()


def _assert_bitwise(got, want):
    """Equal bits, NaN where the other has NaN."""
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def _stats_params(c, dtype, seed=0):
    """(weight, bias, h, h_value) variants for norm_stats_and_coefficients: absent or present
    in ``dtype``, h absent (h_value 1 or 0.3), 0-dim or [C]."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape, lo, hi):
        return (torch.rand(shape, generator=gen) * (hi - lo) + lo).to("cuda", dtype)

    weight, bias = uniform((c,), 0.5, 1.5), uniform((c,), -0.5, 0.5)
    h_scalar, h_channel = uniform((), 0.05, 0.5), uniform((c,), 0.05, 0.5)
    for with_weight in (False, True):
        for with_bias in (False, True):
            for h, h_value in ((None, 1.0), (None, 0.3), (h_scalar, 1.0), (h_channel, 1.0)):
                yield (weight if with_weight else None, bias if with_bias else None, h, h_value)


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", cases(SHAPES + [(3, 600, 5), (2, 96, 3, 3)]))
def test_norm_stats_and_coefficients(shape, layout, dtype):
    """The statistics are bitwise norm_stats', the coefficients bitwise forward_coefficients'
    of them (one device function, now in the statistics' finalize), both as the contract
    (float64 statistics; norm_algebra's coefficients of the kernel's statistics): BatchNorm
    and GroupNorm (groups of one to 600 channels, units spanning finalize blocks), every
    weight / bias / h variant, parameters in x's dtype."""
    x = make(shape, layout, dtype, mean=3.0, std=2.0)
    c = shape[1]
    for groups in sorted({0, 1, next(g for g in (3, 2, 1) if c % g == 0)}):
        stats = cuda_backend.norm_stats(x, groups)
        mean64, var64 = ref.norm_stats(x.double(), groups)
        for weight, bias, h, h_value in _stats_params(c, dtype):
            got = cuda_backend.norm_stats_and_coefficients(x, groups, weight, bias, h, h_value,
                                                           1e-5)
            _assert_bitwise(got[:2], stats)
            coefficients = cuda_backend.forward_coefficients(*stats, weight, bias, h, h_value,
                                                             1e-5, groups, c)
            _assert_bitwise(got[2:], coefficients)
            torch.testing.assert_close(got[0].double(), mean64, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got[1].double(), var64, rtol=1e-4, atol=1e-5)
            assert_algebra_close(got[2:], norm_algebra.forward_coefficients(
                *stats, weight, bias, h, h_value, 1e-5, groups, c))


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("groups", [0, 2])
def test_norm_stats_and_coefficients_nan_inf_and_overflow(layout, groups):
    """The coefficients read the variance as written: an overflow's NaN (and NaN / inf
    inputs) give NaN coefficients exactly where forward_coefficients of the statistics has."""
    x = make((8, 4, 32, 32), layout, torch.bfloat16)
    x[2, 0, 5, 5] = float("nan")
    x[3, 1, 7, 0] = float("inf")
    x[:, 2] = (torch.randn(8, 32, 32, device=x.device) * 1e30).to(x)
    x[:, 3] = 1e20
    stats = cuda_backend.norm_stats(x, groups)
    for weight, bias, h, h_value in _stats_params(4, torch.float32):
        got = cuda_backend.norm_stats_and_coefficients(x, groups, weight, bias, h, h_value, 1e-5)
        _assert_bitwise(got[:2], stats)
        _assert_bitwise(got[2:], cuda_backend.forward_coefficients(
            *stats, weight, bias, h, h_value, 1e-5, groups, 4))
        assert got[2].isnan().any()


@gpu
@pytest.mark.usefixtures("cuda_ready")
def test_norm_stats_and_coefficients_is_two_launches_and_deterministic():
    """The partials pass and the finalize, which writes the coefficients: nothing else (the
    outputs and workspace are torch.empty); bitwise equal on repeats."""
    x = make((64, 40, 32, 32), "channels_last", torch.bfloat16)
    weight, bias, h, h_value = list(_stats_params(40, torch.bfloat16))[-1]
    for groups in (0, 8):
        first = cuda_backend.norm_stats_and_coefficients(x, groups, weight, bias, h, h_value, 1e-5)
        for _ in range(2):
            _assert_bitwise(cuda_backend.norm_stats_and_coefficients(x, groups, weight, bias, h,
                                                                     h_value, 1e-5), first)
        device_events = _device_kernels(lambda: cuda_backend.norm_stats_and_coefficients(
            x, groups, weight, bias, h, h_value, 1e-5))
        assert len(device_events) == cuda_backend.KERNEL_LAUNCHES[
            "cuda_norm_stats_and_coefficients"] == 2, device_events


# ---------------------------------------------------------------------------------------
# The per-channel algebra (kernels/norm_coefficients.cu) against pyeuler.ops.norm_algebra

# (N, C, groups): BatchNorm (one block; several); GroupNorm with groups of 3 channels, of
# 80 (more than a warp), of 1, and of 4 over 40 samples (32 sample lanes).
ALGEBRA_SHAPES = [(4, 5, 0), (2, 300, 0), (3, 6, 2), (2, 80, 1), (5, 8, 8), (40, 12, 3)]
H_KINDS = ["one", "float", "scalar", "channel"]  # h_value 1.0, h_value 0.3, 0-dim, [C]
# needs = (x, shortcut, weight, bias, h)
NEEDS = [(x, s, w, b, h) for x in (False, True) for s in (False, True) for w in (False, True)
         for b in (False, True) for h in (False, True)]


def _algebra_inputs(n, c, groups, device, param_dtype=torch.float32, seed=0):
    """Statistics, sums, dmean / dvar and parameters of one shape (float32 vectors; the
    parameters in ``param_dtype``)."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape, lo, hi, dtype=torch.float32):
        return (torch.rand(shape, generator=gen) * (hi - lo) + lo).to(device=device, dtype=dtype)

    stat_shape = (c,) if groups == 0 else (n, groups)
    coef_shape = (c,) if groups == 0 else (n, c)
    return dict(
        mean=uniform(stat_shape, -1, 1), var=uniform(stat_shape, 0.2, 2),
        sum_g=uniform(coef_shape, -3, 3), sum_gxc=uniform(coef_shape, -3, 3),
        dmean=uniform(stat_shape, -1, 1), dvar=uniform(stat_shape, -1, 1),
        weight=uniform((c,), 0.5, 1.5, param_dtype), bias=uniform((c,), -0.5, 0.5, param_dtype),
        h_scalar=uniform((), 0.05, 0.5, param_dtype),
        h_channel=uniform((c,), 0.05, 0.5, param_dtype))


def _algebra_params(inputs, with_weight, with_bias, h_kind):
    """(weight, bias, h, h_value)"""
    h = {"scalar": inputs["h_scalar"], "channel": inputs["h_channel"]}.get(h_kind)
    return (inputs["weight"] if with_weight else None, inputs["bias"] if with_bias else None, h,
            0.3 if h_kind == "float" else 1.0)


def _forward_args(inputs, groups, params):
    weight, bias, h, h_value = params
    return (inputs["mean"], inputs["var"], weight, bias, h, h_value, 1e-5, groups,
            inputs["weight"].shape[0])


def _backward_args(inputs, groups, params, sums, dstats, batch_stats, needs, count=7):
    weight, bias, h, h_value = params
    return ((inputs["sum_g"], inputs["sum_gxc"]) if sums else (None, None)) + (
        (inputs["dmean"], inputs["dvar"]) if dstats else (None, None)) + (
        weight, bias, h, inputs["var"], h_value, 1e-5, groups, batch_stats, needs,
        inputs["weight"].shape[0], count)


def _backward_magnitudes(args):
    """Σ|term| behind every backward output: the contract on the sums' and parameters'
    magnitudes, without dmean / dvar (each one term, no sum), so every term has one sign.
    Float32 sums in another order differ from the contract's by a few ulps of this."""
    a, b = list(args[:7]), list(args[7:])
    a = [None if t is None else t.abs() for t in a]
    a[2] = a[3] = None
    b[1] = abs(b[1])  # h_value
    return [None if t is None else t.abs() for t in norm_algebra.backward_coefficients(*a, *b)]


def assert_algebra_close(got, want, magnitudes=None, rtol=1e-5):
    """Same None entries, dtypes, shapes and devices; NaN where the contract has NaN; values
    within rtol, plus 1e-5 of the summed terms' magnitudes where the output is a sum."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), f"output {i}: {g} vs {w}"
        if w is None:
            continue
        assert (g.dtype, g.shape, g.device) == (w.dtype, w.shape, w.device), f"output {i}"
        slack = 1e-7 if magnitudes is None else 1e-5 * magnitudes[i].to(w.device) + 1e-7
        nan = w.isnan()
        assert torch.equal(g.isnan(), nan), f"output {i}: NaN at other places"
        close = (g - w).abs() <= rtol * w.abs() + slack
        close |= g == w  # infinities
        assert (close | nan).all(), f"output {i}:\n{g}\n{w}"


def test_coefficient_wrappers_return_the_contracts_outputs_when_counting():
    """On CPU, inside counting_device (the ops' CPU kernels are the fakes): the wrappers give
    the contract's None entries, dtypes and shapes for every flag combination."""
    from pyeuler.backend import counting_device
    from pyeuler.ops import norm_algebra as eager

    with counting_device():
        assert cuda_backend.is_available()[0]
        for n, c, groups in ALGEBRA_SHAPES[:4]:
            inputs = _algebra_inputs(n, c, groups, "cpu", torch.bfloat16)
            for h_kind in H_KINDS:
                params = _algebra_params(inputs, True, h_kind != "one", h_kind)
                args = _forward_args(inputs, groups, params)
                for g, w in zip(cuda_backend.forward_coefficients(*args),
                                eager.forward_coefficients(*args)):
                    assert (g.dtype, g.shape) == (w.dtype, w.shape)
                for needs in NEEDS:
                    if needs[4] and params[2] is None:
                        continue  # the contract has no gradient of a float h
                    for sums in (False, True):
                        args = _backward_args(inputs, groups, params, sums, True, True, needs)
                        got = cuda_backend.backward_coefficients(*args)
                        want = eager.backward_coefficients(*args)
                        assert [None if t is None else (t.dtype, t.shape) for t in got] == [
                            None if t is None else (t.dtype, t.shape) for t in want]


def _vjp_cases(inputs, groups, params, seed=0):
    """(args, cotangents) of backward_coefficients_vjp over needs, sums, dmean / dvar, batch
    statistics and which cotangents are given (those of a, b, c each dropped in turn; those
    of the parameter gradients wherever the gradient exists)."""
    gen = torch.Generator().manual_seed(seed)
    for needs in NEEDS:
        if needs[1] or (needs[4] and params[2] is None):
            continue  # the shortcut's need changes nothing here; no gradient of a float h
        for sums in (False, True):
            for dstats in (False, True):
                for batch_stats in (False, True):
                    args = _backward_args(inputs, groups, params, sums, dstats, batch_stats, needs)
                    outputs = norm_algebra.backward_coefficients(*args)
                    for dropped in (0, 1, 2, 4, 6):
                        cotangents = [
                            None if o is None or (k < 3 and dropped >> k & 1)
                            else (torch.randn(o.shape, generator=gen) * 2).to(o)
                            for k, o in enumerate(outputs)]
                        yield args, tuple(cotangents)


def test_vjp_wrapper_returns_the_contracts_outputs_when_counting():
    """On CPU, inside counting_device: backward_coefficients_vjp's None entries, dtypes and
    shapes are the contract's (up to GroupNorm's broadcastable [C]) for every flag
    combination."""
    from pyeuler.backend import counting_device

    with counting_device():
        assert cuda_backend.is_available()[0]
        for n, c, groups in ALGEBRA_SHAPES[:4]:
            inputs = _algebra_inputs(n, c, groups, "cpu", torch.bfloat16)
            for with_weight in (False, True):
                for with_bias in (False, True):
                    for h_kind in H_KINDS:
                        params = _algebra_params(inputs, with_weight, with_bias, h_kind)
                        for args, cotangents in _vjp_cases(inputs, groups, params):
                            got = cuda_backend.backward_coefficients_vjp(*args, cotangents)
                            want = norm_algebra.backward_coefficients_vjp(*args, cotangents)
                            assert list(got) == list(want)
                            for name, w in want.items():
                                g = got[name]
                                assert (g is None) == (w is None), (name, args[-3], cotangents)
                                if w is not None:
                                    assert g.dtype == w.dtype, name
                                    assert w.expand_as(g).shape == g.shape, name


def _assert_vjp_close(got, want, rtol=1e-4, atol=1e-5):
    assert list(got) == list(want)
    for name, w in want.items():
        g = got[name]
        assert (g is None) == (w is None), name
        if w is not None:  # the algebra may leave a [C] where the kernel gives [N, C]
            assert (g.dtype, g.device) == (w.dtype, w.device), name
            torch.testing.assert_close(g, w.expand_as(g), rtol=rtol, atol=atol,
                                       msg=lambda m: f"{name}: {m}")


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("n,c,groups", ALGEBRA_SHAPES + [(3, 600, 1), (0, 4, 2)])
def test_backward_coefficients_vjp_matches_norm_algebra(n, c, groups):
    """Every flag combination: weight, bias, h (float 1, float 0.3, 0-dim, [C]), sums,
    dmean / dvar, batch statistics, needs and which cotangents are given; float32
    parameters, and float16 / bfloat16 ones (gradients in that dtype) for all parameters
    present.  Groups wider than a block (600 channels) and an empty batch included."""
    for param_dtype in DTYPES:
        inputs = _algebra_inputs(n, c, groups, "cuda", param_dtype)
        for with_weight in (False, True):
            for with_bias in (False, True):
                for h_kind in H_KINDS:
                    if param_dtype != torch.float32 and not (with_weight and with_bias):
                        continue
                    params = _algebra_params(inputs, with_weight, with_bias, h_kind)
                    for args, cotangents in _vjp_cases(inputs, groups, params):
                        got = cuda_backend.backward_coefficients_vjp(*args, cotangents)
                        want = norm_algebra.backward_coefficients_vjp(*args, cotangents)
                        _assert_vjp_close(got, want)


@gpu
@pytest.mark.usefixtures("cuda_ready")
def test_backward_coefficients_vjp_is_one_launch_and_deterministic():
    inputs = _algebra_inputs(64, 512, 32, "cuda", torch.bfloat16)
    for h_kind in ("scalar", "channel"):
        params = _algebra_params(inputs, True, True, h_kind)
        args = _backward_args(inputs, 32, params, True, True, True, (True,) * 5, count=49)
        cotangents = tuple(torch.randn_like(o) for o in norm_algebra.backward_coefficients(*args))
        first = cuda_backend.backward_coefficients_vjp(*args, cotangents)
        assert all(v is not None for v in first.values())
        for _ in range(2):
            again = cuda_backend.backward_coefficients_vjp(*args, cotangents)
            assert all(torch.equal(first[k], again[k]) for k in first)
        device_events = _device_kernels(
            lambda: cuda_backend.backward_coefficients_vjp(*args, cotangents))
        assert len(device_events) == 1, device_events


def _double_cases(inputs, groups, params, seed=0):
    """(args, cotangents, sum_cotangents) of double_backward_coefficients: the VJP's cases,
    each with the sums' own cotangents both absent, one of them or both (in turn)."""
    gen = torch.Generator().manual_seed(seed + 1)
    sums_like = inputs["sum_g"]
    for k, (args, cotangents) in enumerate(_vjp_cases(inputs, groups, params, seed)):
        sum_cotangents = tuple((torch.randn(sums_like.shape, generator=gen) * 2).to(sums_like)
                               if k % 4 >> j & 1 else None for j in range(2))
        yield args, cotangents, sum_cotangents


def test_double_backward_wrapper_returns_the_contracts_outputs_when_counting():
    """On CPU, inside counting_device: double_backward_coefficients returns exactly the keys
    DOUBLE_BACKWARD_KEYS, None exactly where the contract's are (double_backward_presence),
    with its dtypes and shapes (up to GroupNorm's broadcastable [C]), for every flag
    combination and every presence of the sums' own cotangents."""
    from pyeuler.backend import counting_device

    with counting_device():
        assert cuda_backend.is_available()[0]
        for n, c, groups in ALGEBRA_SHAPES[:4]:
            inputs = _algebra_inputs(n, c, groups, "cpu", torch.bfloat16)
            for with_weight in (False, True):
                for with_bias in (False, True):
                    for h_kind in H_KINDS:
                        params = _algebra_params(inputs, with_weight, with_bias, h_kind)
                        for args, cots, sum_cots in _double_cases(inputs, groups, params):
                            got = cuda_backend.double_backward_coefficients(*args, cots, sum_cots)
                            want = norm_algebra.double_backward_coefficients(*args, cots,
                                                                             sum_cots)
                            assert list(got) == list(want) == list(
                                norm_algebra.DOUBLE_BACKWARD_KEYS)
                            for name, w in want.items():
                                g = got[name]
                                assert (g is None) == (w is None), (name, args[-3], cots,
                                                                    sum_cots)
                                if w is not None:
                                    assert g.dtype == w.dtype, name
                                    assert w.expand_as(g).shape == g.shape, name


def test_new_ops_are_counted_launches_when_counting():
    """On CPU, inside counting_device and FakeTensorMode (the ops' fake implementations):
    norm_stats_and_coefficients is one op call of two launches (as norm_stats alone),
    double_backward_coefficients one call of one launch; the fakes' shapes are the
    contract's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pyeuler.backend import counting_device
    from pyeuler.cost import Recorder

    with counting_device():
        assert cuda_backend.is_available()[0]
        for groups in (0, 3):
            for layout in ("contiguous", "channels_last"):
                recorder = Recorder()
                with FakeTensorMode():
                    x = make((4, 6, 5, 5), layout, torch.bfloat16, device="cpu")
                    weight, bias, h = torch.ones(6), torch.zeros(6), torch.tensor(0.5)
                    with recorder:
                        got = cuda_backend.norm_stats_and_coefficients(x, groups, weight, bias, h,
                                                                       1.0, 1e-5)
                    want = ref.norm_stats_and_coefficients(x, groups, weight, bias, h, 1.0, 1e-5)
                    assert [(t.dtype, t.shape) for t in got] == [(t.dtype, t.shape) for t in want]
                assert [(k.name, k.launches) for k in recorder.kernels] == [
                    ("pyeuler.cuda_norm_stats_and_coefficients.default", 2)], (groups, layout)
        for n, c, groups in ALGEBRA_SHAPES[:4]:
            recorder = Recorder()
            with FakeTensorMode():
                inputs = _algebra_inputs(n, c, groups, "cpu")
                params = _algebra_params(inputs, True, True, "channel")
                args, cotangents, _ = next(_double_cases(inputs, groups, params))
                sum_cotangents = (inputs["sum_g"], None)
                with recorder:
                    cuda_backend.double_backward_coefficients(*args, cotangents, sum_cotangents)
            assert [(k.name, k.launches) for k in recorder.kernels] == [
                ("pyeuler.cuda_double_backward_coefficients.default", 1)], (n, c, groups)


def _center_magnitude(args, cotangents, want):
    """Σ|term| behind the contract's "mean" per statistic: |b·cot_c| + |q·Σg| over the
    statistic's channels (float32 sums in another order differ by ulps of this)."""
    sum_g, groups, needs, batch_stats = args[0], args[10], args[12], args[11]
    cot_c = cotangents[2] if needs[0] and batch_stats else None
    terms = torch.zeros_like(want["b"], dtype=torch.float64)
    if cot_c is not None:
        terms = terms + (want["b"].double() * cot_c.double()).abs()
    if want["sum_gxc"] is not None:
        terms = terms + (want["sum_gxc"].double() * sum_g.double()).abs()
    if groups:
        terms = terms.reshape(terms.shape[0], groups, -1).sum(2)
    return terms


def _assert_double_close(got, want, args, cotangents):
    """a and b as backward_coefficients' (rtol 1e-5 plus 1e-5 of their terms' magnitudes),
    the VJP's entries as in _assert_vjp_close, the centre's gradient within 1e-4 of its
    terms' magnitudes."""
    assert list(got) == list(want) == list(norm_algebra.DOUBLE_BACKWARD_KEYS)
    assert_algebra_close([got["a"], got["b"]], [want["a"], want["b"]],
                         _backward_magnitudes(args)[:2])
    _assert_vjp_close({k: got[k] for k in norm_algebra.VJP_KEYS},
                      {k: want[k] for k in norm_algebra.VJP_KEYS})
    g, w = got["mean"], want["mean"]
    assert (g is None) == (w is None), "mean"
    if w is not None:
        assert (g.dtype, g.shape, g.device) == (w.dtype, w.shape, w.device)
        slack = 1e-4 * _center_magnitude(args, cotangents, want) + 1e-6
        assert ((g.double() - w.double()).abs() <= slack).all(), f"mean:\n{g}\n{w}"


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("n,c,groups", ALGEBRA_SHAPES + [(3, 600, 1), (0, 4, 2)])
def test_double_backward_coefficients_matches_norm_algebra(n, c, groups):
    """Every flag combination of the VJP test (weight, bias, h kinds, sums, dmean / dvar,
    batch statistics, needs, which cotangents), each with the sums' own cotangents absent,
    one or both: a, b, the VJP's gradients plus those cotangents, and the centre's gradient,
    None exactly where the contract's are.  Without the sums' cotangents the VJP's entries
    are bitwise backward_coefficients_vjp's (one kernel), and a is bitwise
    backward_coefficients' (one formula)."""
    for param_dtype in DTYPES:
        inputs = _algebra_inputs(n, c, groups, "cuda", param_dtype)
        for with_weight in (False, True):
            for with_bias in (False, True):
                for h_kind in H_KINDS:
                    if param_dtype != torch.float32 and not (with_weight and with_bias):
                        continue
                    params = _algebra_params(inputs, with_weight, with_bias, h_kind)
                    for args, cotangents, sum_cotangents in _double_cases(inputs, groups, params):
                        got = cuda_backend.double_backward_coefficients(*args, cotangents,
                                                                        sum_cotangents)
                        want = norm_algebra.double_backward_coefficients(*args, cotangents,
                                                                         sum_cotangents)
                        _assert_double_close(got, want, args, cotangents)
                        if sum_cotangents == (None, None):
                            vjp = cuda_backend.backward_coefficients_vjp(*args, cotangents)
                            for name, v in vjp.items():
                                assert (v is None) == (got[name] is None), name
                                assert v is None or torch.equal(v, got[name]), name
                            a = cuda_backend.backward_coefficients(*args)[0]
                            assert torch.equal(a, got["a"])


@gpu
@pytest.mark.usefixtures("cuda_ready")
def test_double_backward_coefficients_is_one_launch_and_deterministic():
    inputs = _algebra_inputs(64, 512, 32, "cuda", torch.bfloat16)
    for h_kind in ("scalar", "channel"):
        params = _algebra_params(inputs, True, True, h_kind)
        args = _backward_args(inputs, 32, params, True, True, True, (True,) * 5, count=49)
        cotangents = tuple(torch.randn_like(o) for o in norm_algebra.backward_coefficients(*args))
        sum_cotangents = (torch.randn_like(inputs["sum_g"]), torch.randn_like(inputs["sum_g"]))
        first = cuda_backend.double_backward_coefficients(*args, cotangents, sum_cotangents)
        assert all(v is not None for v in first.values())
        for _ in range(2):
            again = cuda_backend.double_backward_coefficients(*args, cotangents, sum_cotangents)
            assert all(torch.equal(first[k], again[k]) for k in first)
        device_events = _device_kernels(
            lambda: cuda_backend.double_backward_coefficients(*args, cotangents, sum_cotangents))
        assert len(device_events) == 1, device_events


@gpu
@pytest.mark.usefixtures("cuda_ready")
def test_double_backward_arguments_are_named():
    inputs = _algebra_inputs(2, 6, 2, "cuda")
    params = _algebra_params(inputs, True, True, "channel")
    args = _backward_args(inputs, 2, params, True, True, True, (True,) * 5)
    cotangents = tuple(torch.randn_like(o) for o in norm_algebra.backward_coefficients(*args))
    with pytest.raises(RuntimeError, match="the cotangent of sum_gxc must have shape"):
        cuda_backend.double_backward_coefficients(*args, cotangents,
                                                  (None, inputs["sum_g"][:1]))
    with pytest.raises(ValueError, match="sum cotangent 0 must be a CUDA tensor"):
        cuda_backend.double_backward_coefficients(*args, cotangents,
                                                  (inputs["sum_g"].cpu(), None))


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("param_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c,groups", ALGEBRA_SHAPES)
def test_forward_coefficients_match_norm_algebra(n, c, groups, param_dtype):
    inputs = _algebra_inputs(n, c, groups, "cuda", param_dtype)
    for with_weight in (False, True):
        for with_bias in (False, True):
            for h_kind in H_KINDS:
                args = _forward_args(inputs, groups,
                                     _algebra_params(inputs, with_weight, with_bias, h_kind))
                assert_algebra_close(cuda_backend.forward_coefficients(*args),
                                     norm_algebra.forward_coefficients(*args))


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("n,c,groups", ALGEBRA_SHAPES)
def test_backward_coefficients_match_norm_algebra(n, c, groups):
    """Every flag combination: weight, bias, h (float 1, float 0.3, 0-dim, [C]), sums,
    dmean / dvar, batch statistics, needs; float32 parameters, and float16 / bfloat16 ones
    over the combinations that differ in what the kernel reads."""
    for param_dtype in DTYPES:
        inputs = _algebra_inputs(n, c, groups, "cuda", param_dtype)
        for with_weight in (False, True):
            for with_bias in (False, True):
                for h_kind in H_KINDS:
                    params = _algebra_params(inputs, with_weight, with_bias, h_kind)
                    for needs in NEEDS:
                        if needs[4] and params[2] is None:
                            continue  # the contract has no gradient of a float h
                        for sums in (False, True):
                            for dstats in (False, True):
                                if param_dtype != torch.float32 and (dstats or needs[1]):
                                    continue  # the parameters' dtype matters only on loads
                                for batch_stats in (False, True):
                                    args = _backward_args(inputs, groups, params, sums, dstats,
                                                          batch_stats, needs)
                                    assert_algebra_close(
                                        cuda_backend.backward_coefficients(*args),
                                        norm_algebra.backward_coefficients(*args),
                                        _backward_magnitudes(args))


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("groups", [0, 2])
def test_coefficients_nan_and_inf_follow_the_contract(groups):
    """A zero variance with eps cancelled (invstd = inf), a zero weight (inf·0 = NaN), NaN
    and inf sums and statistics: the kernels' NaN / inf are the contract's; b and c are
    exactly 0 without the batch-statistics terms whatever the sums hold."""
    n, c = 3, 6
    inputs = _algebra_inputs(n, c, groups, "cuda")
    var = inputs["var"].view(-1)
    var[0] = -1e-5  # var + eps == 0 in float32: invstd = inf
    var[1] = float("nan")
    inputs["mean"].view(-1)[2] = float("inf")
    inputs["weight"][1] = 0.0
    sum_g = inputs["sum_g"].view(-1)
    sum_g[3], sum_g[4] = float("nan"), float("inf")
    inputs["sum_gxc"].view(-1)[5] = float("-inf")
    inputs["dmean"].view(-1)[-1] = float("nan")
    for h_kind in H_KINDS:
        params = _algebra_params(inputs, True, True, h_kind)
        args = _forward_args(inputs, groups, params)
        assert_algebra_close(cuda_backend.forward_coefficients(*args),
                             norm_algebra.forward_coefficients(*args))
        for needs in [(True, False, True, True, params[2] is not None),
                      (False, True, True, False, False)]:
            for batch_stats in (False, True):
                args = _backward_args(inputs, groups, params, True, True, batch_stats, needs)
                got = cuda_backend.backward_coefficients(*args)
                want = norm_algebra.backward_coefficients(*args)
                assert_algebra_close(got, want, _backward_magnitudes(args))
                if not (needs[0] and batch_stats):
                    assert not got[1].any() and not got[2].any()


@gpu
@pytest.mark.usefixtures("cuda_ready")
def test_coefficients_are_one_launch_each_and_deterministic():
    """One kernel and nothing else per call (the outputs are torch.empty), every path of the
    backward kernel at once (0-dim dh, dweight, dbias, a/b/c), bitwise equal on repeats."""
    inputs = _algebra_inputs(64, 512, 32, "cuda", torch.bfloat16)
    params = _algebra_params(inputs, True, True, "scalar")
    calls = [(cuda_backend.forward_coefficients, _forward_args(inputs, 32, params)),
             (cuda_backend.backward_coefficients,
              _backward_args(inputs, 32, params, True, True, True, (True,) * 5, count=49))]
    for fn, args in calls:
        first = fn(*args)  # also warms up the caching allocator
        for _ in range(2):
            assert all(torch.equal(a, b) for a, b in zip(first, fn(*args)))
        device_events = _device_kernels(lambda: fn(*args))
        assert len(device_events) == 1, device_events


@gpu
@pytest.mark.usefixtures("cuda_ready")
def test_coefficient_arguments_are_named():
    inputs = _algebra_inputs(2, 6, 2, "cuda")
    params = _algebra_params(inputs, True, True, "channel")
    args = list(_forward_args(inputs, 2, params))
    with pytest.raises(TypeError, match="var must be float32"):
        cuda_backend.forward_coefficients(*args[:1], args[1].half(), *args[2:])
    with pytest.raises(RuntimeError, match=r"weight must be \[C\]"):
        cuda_backend.forward_coefficients(*args[:2], args[2][:3], *args[3:])
    with pytest.raises(RuntimeError, match="groups must be 0"):
        cuda_backend.forward_coefficients(*args[:7], 4, *args[8:])
    with pytest.raises(RuntimeError, match=r"var must be \[N, groups\]"):
        cuda_backend.forward_coefficients(*args[:7], 3, *args[8:])
    backward = list(_backward_args(inputs, 2, params, True, False, True, (True,) * 5))
    with pytest.raises(RuntimeError, match="sum_g and sum_gxc must be given together"):
        cuda_backend.backward_coefficients(backward[0], None, *backward[2:])
    with pytest.raises(RuntimeError, match="sum_g must have shape"):
        cuda_backend.backward_coefficients(backward[0][:1], *backward[1:])
    with pytest.raises(ValueError, match="h must be a CUDA tensor"):
        cuda_backend.backward_coefficients(*backward[:6], backward[6].cpu(), *backward[7:])


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("case", ["bn_relu", "bn_relu_eval", "group_norm_relu",
                                  "bn_add_relu_scalar_h", "bn_add_relu_channel_h",
                                  "group_norm_channel_h"])
def test_norm_act_on_the_coefficient_kernels_matches_eager(case):
    """A whole norm + ReLU forward and backward on the CUDA backend (whose per-channel
    algebra is now the two kernels) against the eager backend: outputs, every gradient
    (input, shortcut, weight, bias, learnable h) and the running statistics."""
    from pyeuler import functional as PF
    from pyeuler.ops.norm_act import norm_act

    torch.manual_seed(0)
    c = 8
    x = make((4, c, 6, 6), "channels_last")
    shortcut = make((4, c, 6, 6), "channels_last")
    weight, bias = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
    h = {"bn_add_relu_scalar_h": torch.tensor(0.3, device="cuda"),
         "bn_add_relu_channel_h": torch.rand(c, device="cuda") * 0.5 + 0.1,
         "group_norm_channel_h": torch.rand(c, device="cuda") * 0.5 + 0.1}.get(case)
    leaves = [t for t in (x, shortcut, weight, bias, h) if t is not None]
    running = (torch.randn(c, device="cuda"), torch.rand(c, device="cuda") + 0.5)
    dy = make((4, c, 6, 6), "channels_last")

    def run(backend):
        inputs = [t.detach().clone().requires_grad_() for t in leaves]
        named = dict(zip(("x", "shortcut", "weight", "bias", "h"), inputs))
        stats = tuple(t.clone() for t in running)
        if case == "bn_relu":
            y = PF.bn_relu(named["x"], named["weight"], named["bias"], *stats, backend=backend)
        elif case == "bn_relu_eval":
            y = PF.bn_relu(named["x"], named["weight"], named["bias"], *stats, training=False,
                           backend=backend)
        elif case == "group_norm_relu":
            y = PF.group_norm_relu(named["x"], 2, named["weight"], named["bias"],
                                   backend=backend)
        elif case == "group_norm_channel_h":
            y = norm_act(named["x"], named["weight"], named["bias"], groups=2,
                         shortcut=named["shortcut"], h=named["h"], backend=backend)
        else:
            y = PF.bn_add_relu(named["x"], named["shortcut"], named["h"], named["weight"],
                               named["bias"], *stats, backend=backend)
        used = [t for name, t in named.items()
                if name != "shortcut" or case.startswith(("bn_add", "group_norm_channel"))]
        grads = torch.autograd.grad((y * dy).sum(), used)
        return [y, *grads, *stats]

    got, want = run("cuda"), run("eager")
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# BatchNorm's running-statistics update (update_running_stats)

RUNNING_CHANNELS = [1, 7, 640, 2049]  # one channel, odd, several per thread, past a block


def _running_stats_case(c, dtype, device, counter=None, seed=0):
    """Running buffers in `dtype`, float32 batch statistics and an int64 counter (None: no
    counter), each freshly made so that one copy goes to each implementation."""
    gen = torch.Generator().manual_seed(seed)
    running_mean = torch.randn(c, generator=gen).to(device, dtype)
    running_var = (torch.rand(c, generator=gen) + 0.5).to(device, dtype)
    mean = (torch.randn(c, generator=gen) * 3).to(device)
    var = (torch.rand(c, generator=gen) * 4).to(device)
    batches = None if counter is None else torch.tensor(counter, device=device)
    return running_mean, running_var, batches, mean, var


def _clone_running(case):
    return tuple(None if t is None else t.clone() for t in case)


@pytest.mark.parametrize("count,momentum,counter,match", [
    (1, 0.1, 0, "more than one value"),
    (0, None, 0, "more than one value"),
    (8, None, None, "needs num_batches_tracked"),
])
def test_update_running_stats_raises_the_contracts_errors(count, momentum, counter, match):
    """Checked before anything else (on any device), nothing written."""
    case = _running_stats_case(5, torch.float32, "cpu", counter)
    before = _clone_running(case)
    with pytest.raises(ValueError, match=match):
        cuda_backend.update_running_stats(*case[:3], *case[3:], count, momentum)
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(case, before))


def test_update_running_stats_is_one_counted_launch_when_counting():
    """On CPU, inside counting_device and FakeTensorMode (the op's fake implementation): one
    pyeuler::cuda_update_running_stats call, one launch, for every momentum kind; float64
    buffers take the torch ops instead."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pyeuler.backend import counting_device
    from pyeuler.cost import Recorder

    with counting_device():
        assert cuda_backend.is_available()[0]
        for dtype, momentum, counter in [(torch.bfloat16, 0.1, None), (torch.float32, 0.1, 3),
                                         (torch.float16, "tensor", 3), (torch.float32, None, 0)]:
            recorder = Recorder()
            with FakeTensorMode():
                case = _running_stats_case(640, dtype, "cpu", counter)
                if momentum == "tensor":
                    momentum = torch.tensor(0.2)
                with recorder:
                    assert cuda_backend.update_running_stats(*case, 64, momentum) is None
            assert [(k.name, k.launches) for k in recorder.kernels] == [
                ("pyeuler.cuda_update_running_stats.default", 1)], (dtype, momentum)
        recorder = Recorder()
        with FakeTensorMode():
            case = _running_stats_case(640, torch.float64, "cpu", 0)
            with recorder:
                cuda_backend.update_running_stats(*case, 64, 0.1)
        assert recorder.kernels and not any(k.name.startswith("pyeuler.cuda_")
                                            for k in recorder.kernels)


@gpu
@pytest.mark.usefixtures("cuda_ready")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", RUNNING_CHANNELS)
@pytest.mark.parametrize("momentum_kind", ["float", "float_no_counter", "float_one",
                                           "tensor", "tensor_float16", "cumulative"])
def test_update_running_stats_matches_norm_algebra(dtype, c, momentum_kind):
    """Bitwise the contract's buffers and counter over three consecutive updates: the kernel
    rounds as the torch ops do (batch values and a tensor or cumulative rate in the buffers'
    dtype, torch's lerp in float32 with its fused multiply-add)."""
    counter = None if momentum_kind == "float_no_counter" else 5
    momentum = {"float": 0.1, "float_no_counter": 0.1, "float_one": 1.0, "cumulative": None,
                "tensor": torch.tensor(0.3, device="cuda"),
                "tensor_float16": torch.tensor(0.7, device="cuda", dtype=torch.float16)
                }[momentum_kind]
    got = _running_stats_case(c, dtype, "cuda", counter)
    want = _clone_running(got)
    for step, count in enumerate((2, 49, 1024)):
        batch = _running_stats_case(c, dtype, "cuda", seed=step + 1)[3:5]
        assert cuda_backend.update_running_stats(*got[:3], *batch, count, momentum) is None
        norm_algebra.update_running_stats(*want[:3], *batch, count, momentum)
        for g, w, name in zip(got, want, ("running_mean", "running_var", "num_batches_tracked")):
            if w is not None:
                assert g.dtype == w.dtype and torch.equal(g, w), (name, step, g, w)


@gpu
@pytest.mark.usefixtures("cuda_ready")
def test_update_running_stats_is_one_launch_without_host_sync():
    """One kernel per call, no synchronisation (sync debug mode 'error'), for every momentum
    kind; an empty C with a counter still increments it."""
    for momentum in (0.1, torch.tensor(0.1, device="cuda"), None):
        case = _running_stats_case(2049, torch.bfloat16, "cuda", 0)
        cuda_backend.update_running_stats(*case, 64, momentum)  # warm-up

        def update_without_syncs():
            torch.cuda.set_sync_debug_mode("error")
            try:
                cuda_backend.update_running_stats(*case, 64, momentum)
            finally:
                torch.cuda.set_sync_debug_mode(0)

        device_events = _device_kernels(update_without_syncs)
        assert len(device_events) == 1, device_events
        assert case[2].item() == 2
    empty = _running_stats_case(0, torch.float32, "cuda", 7)
    cuda_backend.update_running_stats(*empty, 8, None)
    assert empty[2].item() == 8


@gpu
@pytest.mark.usefixtures("cuda_ready")
def test_update_running_stats_falls_back_where_the_kernel_cannot_serve():
    """The contract's results, bitwise, where the kernel cannot serve (float64 buffers and
    statistics, mixed buffer dtypes, a strided buffer: the torch ops) and in the forms it
    takes besides the usual (a float64 momentum tensor read as float32, a [1] counter)."""
    cases = [
        (torch.float64, torch.float64, 0.1, None),
        (torch.float32, torch.float32, torch.tensor(0.3, device="cuda", dtype=torch.float64),
         None),
        (torch.bfloat16, torch.float32, 0.1, None),
        (torch.float32, torch.float32, None, "strided"),
        (torch.float16, torch.float16, None, "counter[1]"),
    ]
    for mean_dtype, var_dtype, momentum, variant in cases:
        got = list(_running_stats_case(7, mean_dtype, "cuda", 3))
        got[1] = got[1].to(var_dtype)
        if mean_dtype == torch.float64:
            got[3], got[4] = got[3].double(), got[4].double()
        if variant == "strided":
            got[0] = torch.randn(14, device="cuda")[::2]
        if variant == "counter[1]":
            got[2] = got[2].view(1)
        want = _clone_running(got)
        cuda_backend.update_running_stats(*got, 16, momentum)
        norm_algebra.update_running_stats(*want, 16, momentum)
        for g, w in zip(got[:3], want[:3]):
            assert g.dtype == w.dtype and torch.equal(g, w), (mean_dtype, var_dtype, variant)
