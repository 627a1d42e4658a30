"""The Triton primitives against the eager contract :mod:`pyeuler.ops.primitives`.

Without a GPU they run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton
is imported), so shapes are small; tests marked ``gpu`` use real sizes and need CUDA.
Tolerances (docs/semantics.md §6): float32 close to the eager float32 result;
float16/bfloat16 at most 2× the eager low-precision error against a float64 reference, plus
a small floor.
"""

import os
import subprocess
import sys

import pytest
import torch

from helpers import layout_cases, make_input, nan_inf_inputs, random_coef

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import pyeuler.triton as tri  # noqa: E402
from pyeuler.ops import primitives as ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")

# (N, C, *spatial): 0-3 spatial dims, odd sizes, N = 1, spatial 1×1.
SHAPES = [(4, 5, 7, 5), (3, 3), (2, 17, 9), (2, 6, 3, 4, 5), (1, 6, 1, 1)]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def make(shape, layout="contiguous", dtype=torch.float32, device=DEVICE, mean=0.0, std=1.0):
    return make_input(shape, layout, dtype, device, mean, std)


def cases(shapes=SHAPES, layouts=LAYOUTS):
    return layout_cases(shapes, layouts)


coef = random_coef


def assert_close32(actual, expected, *, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# Triton 3.9's interpreter truncates float32 -> bfloat16 (GPUs round to nearest even), so its
# bfloat16 outputs may be one ulp further off than the GPU's: 2**-7 of the largest value.
INTERPRETED_BF16_FLOOR = 2.0**-7 if not torch.cuda.is_available() else 0.0


def assert_lowp(actual, eager, exact, floor=1e-6):
    """Error vs a float64 reference ≤ 2× the eager low-precision error + a floor."""
    if actual.dtype == torch.bfloat16:
        floor = max(floor, INTERPRETED_BF16_FLOOR)
    scale = exact.abs().max().item() + 1e-30
    err = (actual.double() - exact).abs().max().item()
    eager_err = (eager.double() - exact).abs().max().item()
    assert err <= 2 * eager_err + floor * scale, (err, eager_err, scale)


def assert_sums_close(actual, expected_64, magnitude_64):
    """Sums in float32 vs float64: error relative to the sum of |terms| (cancellation-safe)."""
    tol = 1e-5 * magnitude_64 + 1e-6
    assert ((actual.double() - expected_64).abs() <= tol).all(), (actual, expected_64)


def assert_mask_close(actual, expected, pre_activation):
    """Masks agree except where the pre-activation is ~0 (FMA vs mul+add may round apart)."""
    differ = actual != expected
    assert (pre_activation.abs()[differ] < 1e-5).all()


def to64(*tensors):
    return [None if t is None else t.double() for t in tensors]


# ----------------------------------------------------------------------------- norm_stats


@pytest.mark.parametrize("shape,layout", cases() + cases([(8, 3, 32, 32)], ["contiguous", "channels_last"]))
def test_norm_stats_fp32(shape, layout):
    x = make(shape, layout, mean=1.5, std=2.0)
    for groups in sorted({0, 1, 3 if shape[1] % 3 == 0 else 1}):
        mean, var = tri.norm_stats(x, groups)
        mean64, var64 = ref.norm_stats(x.double(), groups)
        assert mean.dtype == var.dtype == torch.float32
        assert mean.shape == mean64.shape and var.shape == var64.shape
        assert_close32(mean, mean64.float())
        assert_close32(var, var64.float())


@pytest.mark.parametrize("shape,layout", cases([(4, 6, 7, 5), (3, 6), (2, 12, 3, 4, 5)]))
def test_norm_stats_and_coefficients_equal_the_two_passes(shape, layout):
    """The merge stage's coefficients are bit for bit those of forward_coefficients on the
    same statistics (one shared definition), and close to the contract's."""
    x = make(shape, layout, mean=0.5, std=1.5)
    c = shape[1]
    for groups in (0, 1, 3):
        for h_kind, has_w, has_b in (("none", True, True), ("scalar", False, True),
                                     ("channel", True, False)):
            h = {"none": None, "scalar": torch.tensor(0.7), "channel": torch.rand(c) + 0.3}[h_kind]
            h = None if h is None else h.to(DEVICE)
            weight = (torch.rand(c, device=DEVICE) + 0.5) if has_w else None
            bias = torch.randn(c, device=DEVICE) if has_b else None
            args = (weight, bias, h, 0.9, 1e-5)
            mean, var, scale, shift = tri.norm_stats_and_coefficients(x, groups, *args)
            two_pass = tri.forward_coefficients(*tri.norm_stats(x, groups), weight, bias, h, 0.9,
                                                1e-5, groups, c)
            assert torch.equal(scale, two_pass[0]) and torch.equal(shift, two_pass[1])
            expected = ref.norm_stats_and_coefficients(x, groups, *args)
            for got, want in zip((mean, var, scale, shift), expected):
                assert got.shape == want.shape
                assert_close32(got, want.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("groups", [0, 2])
def test_norm_stats_large_mean_is_robust(layout, groups):
    """mean 1e3, std 1e-1: E[x²]−E[x]² in float32 loses the variance entirely; Welford keeps it."""
    x = make((16, 4, 16, 16), layout, mean=1e3, std=1e-1)
    mean, var = tri.norm_stats(x, groups)
    mean64, var64 = ref.norm_stats(x.double(), groups)
    rel = ((var.double() - var64) / var64).abs().max().item()
    assert rel < 1e-4, rel
    assert ((mean.double() - mean64).abs() / mean64.abs()).max().item() < 1e-6

    xf = x.float().transpose(0, 1).reshape(4, -1) if groups == 0 else x.float().reshape(16, groups, -1)
    naive = (xf * xf).mean(-1) - xf.mean(-1) ** 2
    naive_rel = ((naive.double().reshape(var64.shape) - var64) / var64).abs().max().item()
    assert naive_rel > 100 * rel  # the test would catch the naive formula


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_norm_stats_low_precision(dtype, layout):
    x = make((4, 6, 7, 5), layout, dtype, mean=0.5)
    for groups in (0, 3):
        mean, var = tri.norm_stats(x, groups)
        eager_mean, eager_var = ref.norm_stats(x, groups)
        mean64, var64 = ref.norm_stats(x.double(), groups)
        assert mean.dtype == torch.float32
        assert_lowp(mean, eager_mean, mean64)
        assert_lowp(var, eager_var, var64)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_norm_stats_partials_merge_like_sync_batchnorm(layout):
    """Per-rank partials, gathered and merged, give the statistics of the whole batch."""
    x = make((6, 5, 9, 7), layout, mean=3.0)
    ranks = [x[:2], x[2:]]
    gathered = [torch.cat(parts) for parts in zip(*(tri.norm_stats_partials(r, 0) for r in ranks))]
    count, mean, m2 = tri.merge_stats(*gathered)
    mean64, var64 = ref.norm_stats(x.double(), 0)
    assert_close32(count, torch.full_like(count, 6 * 9 * 7))
    assert_close32(mean, mean64.float())
    assert_close32(m2 / count, var64.float())


def test_norm_stats_is_deterministic():
    x = make((8, 3, 32, 32), "channels_last")
    first = tri.norm_stats(x, 0)
    again = tri.norm_stats(x, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# ----------------------------------------------------------------------------- affine_act


@pytest.mark.parametrize("shape,layout", cases())
@pytest.mark.parametrize("per_sample", [False, True], ids=["per_channel", "per_sample"])
def test_affine_act_forward_fp32(shape, layout, per_sample):
    x = make(shape, layout)
    scale, shift = coef(x, per_sample), coef(x, per_sample)
    for shortcut, relu, save_mask in [(None, True, True), (make(shape, "contiguous"), True, False),
                                      (make(shape, layout), False, True)]:
        y, mask = tri.affine_act_forward(x, scale, shift, shortcut, relu, save_mask)
        y_ref, mask_ref = ref.affine_act_forward(x, scale, shift, shortcut, relu, save_mask)
        assert y.dtype == x.dtype
        assert_close32(y, y_ref)
        if layout != "strided":
            assert y.stride() == x.stride()  # keeps the memory format
        if save_mask:
            assert mask.dtype == torch.bool
            pre = ref.affine_act_forward(x, scale, shift, shortcut, False, False)[0]
            assert_mask_close(mask, mask_ref, pre)
        else:
            assert mask is None


def _reduce_inputs(shape, layout, per_sample_coef):
    x = make(shape, layout)
    dy = make(shape, "contiguous")
    scale, shift, center = coef(x, per_sample_coef), coef(x, per_sample_coef), coef(x, per_sample_coef)
    return dy, x, scale, shift, center


def _expected_sums(dy, x, scale, shift, center, mask, relu, per_sample):
    sums64 = ref.affine_act_backward_reduce(*to64(dy, x, scale, shift, center), mask, relu, per_sample)
    abs64 = ref.affine_act_backward_reduce(*to64(dy.abs(), x, scale, shift, center), mask, relu, per_sample)
    gx_abs = ref.affine_act_backward_reduce(*to64(dy.abs(), (x - ref._coef(center, x)).abs(), scale, shift,
                                                  torch.zeros_like(center)), mask, False, per_sample)[1]
    return sums64, (abs64[0], gx_abs)


# (per-sample coefficients, (saved mask?, relu, per-sample sums) variants): BN-like first,
# GroupNorm-like second, then the other combinations.
REDUCE_VARIANTS = {
    "coef_C": (False, [(False, True, False), (True, False, True)]),
    "coef_NC": (True, [(True, True, True), (False, False, False)]),
}


@pytest.mark.parametrize("shape,layout", cases())
@pytest.mark.parametrize("variants", REDUCE_VARIANTS)
def test_affine_act_backward_reduce_fp32(shape, layout, variants):
    per_sample_coef, flag_sets = REDUCE_VARIANTS[variants]
    dy, x, scale, shift, center = _reduce_inputs(shape, layout, per_sample_coef)
    saved = ref.affine_act_forward(x, scale, shift, None, True, True)[1]
    for use_saved, relu, per_sample in flag_sets:
        mask = saved if use_saved else None
        sum_g, sum_gx = tri.affine_act_backward_reduce(dy, x, scale, shift, center, mask, relu, per_sample)
        (g64, gx64), (g_abs, gx_abs) = _expected_sums(dy, x, scale, shift, center, mask, relu, per_sample)
        assert sum_g.dtype == sum_gx.dtype == torch.float32
        assert sum_g.shape == g64.shape and sum_gx.shape == gx64.shape
        assert_sums_close(sum_g, g64, g_abs)
        assert_sums_close(sum_gx, gx64, gx_abs)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_affine_act_backward_reduce_many_splits(layout, per_sample):
    """Big enough to split each sum into several partials (second-stage reduce)."""
    dy, x, scale, shift, center = _reduce_inputs((8, 3, 32, 32), layout, False)
    sum_g, sum_gx = tri.affine_act_backward_reduce(dy, x, scale, shift, center, None, True, per_sample)
    (g64, gx64), (g_abs, gx_abs) = _expected_sums(dy, x, scale, shift, center, None, True, per_sample)
    assert_sums_close(sum_g, g64, g_abs)
    assert_sums_close(sum_gx, gx64, gx_abs)


@pytest.mark.parametrize("shape,layout", cases())
@pytest.mark.parametrize("variants", REDUCE_VARIANTS)
def test_affine_act_backward_reduce_recompute_fp32(shape, layout, variants):
    """The reduce pass that also writes the forward's activation: its sums are the plain
    reduce's with the gate recomputed, its y the forward's, in x's memory format."""
    per_sample_coef, flag_sets = REDUCE_VARIANTS[variants]
    dy, x, scale, shift, center = _reduce_inputs(shape, layout, per_sample_coef)
    for _, relu, per_sample in flag_sets:
        sum_g, sum_gx, y = tri.affine_act_backward_reduce_recompute(
            dy, x, scale, shift, center, relu, per_sample, torch.float32)
        (g64, gx64), (g_abs, gx_abs) = _expected_sums(dy, x, scale, shift, center, None, relu,
                                                      per_sample)
        assert_sums_close(sum_g, g64, g_abs)
        assert_sums_close(sum_gx, gx64, gx_abs)
        assert y.dtype == torch.float32
        assert_close32(y, ref.affine_act_forward(x, scale, shift, None, relu, False)[0])
        if layout != "strided":
            assert y.stride() == x.stride()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_affine_act_backward_reduce_recompute_rounds_y_once(layout):
    """y in another dtype than x (a float32 x feeding a bfloat16 convolution under autocast)
    is rounded once from the float32 pre-activation, as the contract says; the sums are the
    float32 ones.  Also split into several partials (second-stage reduce)."""
    dy, x, scale, shift, center = _reduce_inputs((8, 3, 32, 32), layout, False)
    sum_g, sum_gx, y = tri.affine_act_backward_reduce_recompute(
        dy, x, scale, shift, center, True, False, torch.bfloat16)
    (g64, gx64), (g_abs, gx_abs) = _expected_sums(dy, x, scale, shift, center, None, True, False)
    assert_sums_close(sum_g, g64, g_abs)
    assert_sums_close(sum_gx, gx64, gx_abs)
    y_ref = ref.affine_act_backward_reduce_recompute(dy, x, scale, shift, center, True, False,
                                                     torch.bfloat16)[2]
    exact = ref.affine_act_forward(*to64(x, scale, shift), None, True, False)[0]
    assert y.dtype == torch.bfloat16 and y.stride() == x.stride()
    assert_lowp(y, y_ref, exact)


def test_affine_act_backward_reduce_recompute_nan_and_bad_dtype():
    """A NaN pre-activation stays NaN in y and opens the gate (torch's relu and
    threshold_backward), as in the plain passes; y_dtype must be a kernel dtype."""
    dy, x, scale, shift, center = _reduce_inputs((2, 3, 4, 4), "contiguous", False)
    x[0, 1, 2, 3] = float("nan")
    sum_g, sum_gx, y = tri.affine_act_backward_reduce_recompute(
        dy, x, scale, shift, center, True, False, torch.float32)
    sums_ref = ref.affine_act_backward_reduce(dy, x, scale, shift, center, None, True, False)
    torch.testing.assert_close((sum_g, sum_gx), sums_ref, equal_nan=True, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, ref.affine_act_forward(x, scale, shift, None, True, False)[0],
                               equal_nan=True)
    assert torch.isnan(y[0, 1, 2, 3])
    with pytest.raises(TypeError, match="y_dtype"):
        tri.affine_act_backward_reduce_recompute(dy, x, scale, shift, center, True, False,
                                                 torch.int32)


@pytest.mark.parametrize("shape,layout", cases())
@pytest.mark.parametrize("per_sample", [False, True], ids=["per_channel", "per_sample"])
def test_affine_act_backward_apply_fp32(shape, layout, per_sample):
    dy, x, scale, shift, center = _reduce_inputs(shape, layout, per_sample)
    a, b, c = coef(x, per_sample), coef(x, per_sample), coef(x, per_sample)
    saved = ref.affine_act_forward(x, scale, shift, make(shape), True, True)[1]
    for mask, relu, want_dshortcut in [(None, True, True), (saved, True, False), (None, False, True)]:
        dx, dshortcut = tri.affine_act_backward_apply(dy, x, scale, shift, mask, relu, a, b, c, center,
                                                      want_dshortcut)
        dx_ref, ds_ref = ref.affine_act_backward_apply(dy, x, scale, shift, mask, relu, a, b, c, center,
                                                       want_dshortcut)
        assert_close32(dx, dx_ref)
        if layout != "strided":
            assert dx.stride() == x.stride()
        if want_dshortcut:
            assert dshortcut.dtype == dy.dtype
            assert_close32(dshortcut, ds_ref)
        else:
            assert dshortcut is None


@pytest.mark.parametrize("shape,layout", cases([(4, 5, 7, 5), (3, 3), (2, 6, 3, 4, 5)]))
@pytest.mark.parametrize("addend_layout", ["contiguous", "strided"])
def test_affine_act_backward_apply_adds_the_addend(shape, layout, addend_layout):
    """dx = a·g + b·(x − center) + c + dx_addend, the addend in any layout; the shortcut's
    gradient g does not see it."""
    dy, x, scale, shift, center = _reduce_inputs(shape, layout, False)
    a, b, c = coef(x, False), coef(x, False), coef(x, False)
    addend = make(shape, addend_layout)
    dx, g = tri.affine_act_backward_apply(dy, x, scale, shift, None, True, a, b, c, center, True,
                                          addend)
    dx_ref, g_ref = ref.affine_act_backward_apply(dy, x, scale, shift, None, True, a, b, c, center,
                                                  True, addend)
    assert_close32(dx, dx_ref)
    assert_close32(g, g_ref)
    without, _ = ref.affine_act_backward_apply(dy, x, scale, shift, None, True, a, b, c, center,
                                               False)
    assert_close32(dx_ref, without + addend)  # the contract itself: one more share, no more
    if layout != "strided":
        assert dx.stride() == x.stride()


@pytest.mark.parametrize("shape,layout", cases([(4, 5, 7, 5), (2, 6, 3, 4, 5)]))
def test_affine_act_backward_apply_adds_two_addends(shape, layout):
    """dx = ((a·g + b·(x − center) + c) + dx_addend) + dx_addend2, each addend optional; the
    second alone is added as the first would be."""
    dy, x, scale, shift, center = _reduce_inputs(shape, layout, False)
    a, b, c = coef(x, False), coef(x, False), coef(x, False)
    first, second = make(shape, "strided"), make(shape, "contiguous")
    args = (dy, x, scale, shift, None, True, a, b, c, center, False)
    without, _ = ref.affine_act_backward_apply(*args)
    for addends in ((first, second), (None, second)):
        dx, _ = tri.affine_act_backward_apply(*args, *addends)
        dx_ref, _ = ref.affine_act_backward_apply(*args, *addends)
        assert_close32(dx, dx_ref)
        assert_close32(dx_ref, sum((t for t in addends if t is not None), without))
    with pytest.raises(ValueError, match="dx_addend2"):
        tri.affine_act_backward_apply(*args, None, second[:1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_apply_and_adjoint_addends_low_precision(dtype):
    """The addend is summed in float32 before dx is rounded once: within the low-precision
    tolerance of the float64 result, whatever the addend's own dtype."""
    shape = (3, 6, 5, 7)
    dy, x = (make(shape, "channels_last", dtype) for _ in range(2))
    scale, shift, center = (torch.rand(6, device=DEVICE) + 0.5 for _ in range(3))
    a, b, c = (torch.randn(6, device=DEVICE) for _ in range(3))
    for addend in (make(shape, "contiguous", dtype), make(shape, "channels_last")):
        args = (dy, x, scale, shift, None, True, a, b, c, center, False, addend)
        dx, _ = tri.affine_act_backward_apply(*args)
        assert dx.dtype == dtype
        exact, _ = ref.affine_act_backward_apply(*to64(dy, x), scale, shift, None, True, a, b, c,
                                                 center, False, addend.double())
        assert_lowp(dx, ref.affine_act_backward_apply(*args)[0], exact)
        de, dterm = make(shape, "channels_last", dtype), make(shape, "channels_last", dtype)
        grads = tri.ie_residual_with_term_adjoint(de, dterm, 0.5, 0.1, addend)
        eager = ref.ie_residual_with_term_adjoint(de, dterm, 0.5, 0.1, addend)
        exact = ref.ie_residual_with_term_adjoint(*to64(de, dterm), 0.5, 0.1, addend.double())
        for got, lowp, want in zip(grads, eager, exact):
            assert got.dtype == dtype
            assert_lowp(got, lowp, want)


@pytest.mark.parametrize("shape,layout", cases([(4, 5, 7, 5), (3, 3), (2, 6, 3, 4, 5), (1, 6, 1, 1)]))
@pytest.mark.parametrize("per_sample", [False, True], ids=["per_channel", "per_sample"])
def test_affine_act_backward_apply_ie_update_fp32(shape, layout, per_sample):
    dy, x, scale, shift, center = _reduce_inputs(shape, layout, per_sample)
    a, b, c = coef(x, per_sample), coef(x, per_sample), coef(x, per_sample)
    saved = ref.affine_act_forward(x, scale, shift, None, True, True)[1]
    for mask, relu, e_layout, is_term in [(None, True, layout, True), (saved, True, "contiguous", False),
                                          (None, False, "strided", True)]:
        e = make(shape, e_layout)
        args = (dy, x, scale, shift, mask, relu, a, b, c, center, e, 0.1, 0.7, is_term)
        out = tri.affine_act_backward_apply_ie_update(*args)
        assert out.dtype == x.dtype
        assert_close32(out, ref.affine_act_backward_apply_ie_update(*args))
        if layout != "strided":
            assert out.stride() == x.stride()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_affine_act_backward_apply_ie_update_low_precision(dtype, layout):
    shape = (3, 6, 5, 7)
    x, dy, e = (make(shape, layout, dtype) for _ in range(3))
    scale, shift, center = coef(x, False), coef(x, False), coef(x, False)
    a, b, c = coef(x, True), coef(x, True), coef(x, True)  # GroupNorm-like [N, C]
    out = tri.affine_act_backward_apply_ie_update(dy, x, scale, shift, None, True, a, b, c, center, e, 0.1, 1.0,
                                                  True)
    eager = ref.affine_act_backward_apply_ie_update(dy, x, scale, shift, None, True, a, b, c, center, e, 0.1, 1.0,
                                                    True)
    # the float64 reference with the gate as float32 computes it (recomputed at ~0 it may flip)
    gate = ref._coef(scale, x) * x.float() + ref._coef(shift, x) > 0
    exact = ref.affine_act_backward_apply_ie_update(*to64(dy, x, scale, shift), gate, True,
                                                    *to64(a, b, c, center, e), 0.1, 1.0, True)
    assert out.dtype == dtype
    assert_lowp(out, eager, exact)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_affine_act_low_precision(dtype, layout):
    shape = (3, 6, 5, 7)
    x, shortcut, dy = make(shape, layout, dtype), make(shape, layout, dtype), make(shape, layout, dtype)
    scale, shift, center = coef(x, False), coef(x, False), coef(x, False)
    a, b, c = coef(x, False), coef(x, False), coef(x, False)

    y, mask = tri.affine_act_forward(x, scale, shift, shortcut, True, True)
    y_eager, mask_eager = ref.affine_act_forward(x, scale, shift, shortcut, True, True)
    y64, _ = ref.affine_act_forward(*to64(x, scale, shift, shortcut), True, False)
    assert y.dtype == dtype
    assert_lowp(y, y_eager, y64)
    assert torch.equal(mask, mask_eager)

    sums = tri.affine_act_backward_reduce(dy, x, scale, shift, center, mask, True, False)
    sums_eager = ref.affine_act_backward_reduce(dy, x, scale, shift, center, mask, True, False)
    sums64 = ref.affine_act_backward_reduce(*to64(dy, x, scale, shift, center), mask, True, False)
    for got, eager, exact in zip(sums, sums_eager, sums64):
        assert_lowp(got, eager, exact, floor=1e-5)

    dx, dshortcut = tri.affine_act_backward_apply(dy, x, scale, shift, None, True, a, b, c, center, True)
    dx_eager, ds_eager = ref.affine_act_backward_apply(dy, x, scale, shift, None, True, a, b, c, center, True)
    dx64, ds64 = ref.affine_act_backward_apply(*to64(dy, x, scale, shift), None, True,
                                               *to64(a, b, c, center), True)
    assert dx.dtype == dshortcut.dtype == dtype
    assert_lowp(dx, dx_eager, dx64)
    assert_lowp(dshortcut, ds_eager, ds64)



# ----------------------------------------------------------------------------- double backward


def _expected_double_sums(ddx, dy, x, scale, shift, center, mask, relu, per_sample):
    """float64 sums, and the sums of |terms| that bound their float32 rounding."""
    sums64 = ref.affine_act_double_backward_reduce(*to64(ddx, dy, x, scale, shift, center), mask, relu,
                                                   per_sample)
    abs_dd, _, abs_ddg = ref.affine_act_double_backward_reduce(
        *to64(ddx.abs(), dy.abs(), x, scale, shift, center), mask, relu, per_sample)
    abs_ddxc = ref.affine_act_double_backward_reduce(
        *to64(ddx.abs(), dy, (x - ref._coef(center, x)).abs(), scale, shift, torch.zeros_like(center)),
        None, False, per_sample)[1]
    return sums64, (abs_dd, abs_ddxc, abs_ddg)


def _check_double_sums(ddx, dy, x, scale, shift, center, mask, relu, per_sample):
    sums = tri.affine_act_double_backward_reduce(ddx, dy, x, scale, shift, center, mask, relu, per_sample)
    sums64, magnitudes = _expected_double_sums(ddx, dy, x, scale, shift, center, mask, relu, per_sample)
    assert len(sums) == 3
    for got, want, magnitude in zip(sums, sums64, magnitudes):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert_sums_close(got, want, magnitude)


@pytest.mark.parametrize("shape,layout", cases())
@pytest.mark.parametrize("variants", REDUCE_VARIANTS)
def test_affine_act_double_backward_reduce_fp32(shape, layout, variants):
    per_sample_coef, flag_sets = REDUCE_VARIANTS[variants]
    dy, x, scale, shift, center = _reduce_inputs(shape, layout, per_sample_coef)
    ddx = make(shape, "strided")
    saved = ref.affine_act_forward(x, scale, shift, None, True, True)[1]
    for use_saved, relu, per_sample in flag_sets:
        _check_double_sums(ddx, dy, x, scale, shift, center, saved if use_saved else None, relu, per_sample)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_affine_act_double_backward_reduce_many_splits(layout):
    """Several partials per sum, merged by the second stage (three sums at once)."""
    dy, x, scale, shift, center = _reduce_inputs((8, 3, 16, 16), layout, False)
    _check_double_sums(make((8, 3, 16, 16), layout), dy, x, scale, shift, center, None, True, False)


@pytest.mark.parametrize("shape,layout", cases())
@pytest.mark.parametrize("per_sample", [False, True], ids=["per_channel", "per_sample"])
def test_affine_act_double_backward_apply_fp32(shape, layout, per_sample):
    dy, x, scale, shift, center = _reduce_inputs(shape, layout, per_sample)
    a, b, p, q = (coef(x, per_sample) for _ in range(4))
    saved = ref.affine_act_forward(x, scale, shift, make(shape), True, True)[1]
    ddx_shared = make(shape, layout)  # the IE update's backward passes one tensor as both
    for mask, relu, ddx, ddshortcut, ddx_scale, dxx_addend in [
            (None, True, make(shape, layout), make(shape, "strided"), 1.0, None),
            (saved, True, make(shape, "contiguous"), None, 1.0, None),
            (None, False, make(shape, "strided"), make(shape, layout), 1.0, None),
            (None, True, ddx_shared, None, 0.25, ddx_shared),
            (saved, True, make(shape, layout), make(shape, layout), -3.0, make(shape, "strided"))]:
        args = (ddx, dy, x, scale, shift, mask, relu, a, b, p, q, center, ddshortcut, ddx_scale,
                dxx_addend)
        ddy, dxx = tri.affine_act_double_backward_apply(*args)
        ddy_ref, dxx_ref = ref.affine_act_double_backward_apply(*args)
        assert ddy.dtype == dy.dtype and dxx.dtype == x.dtype
        assert_close32(ddy, ddy_ref)
        assert_close32(dxx, dxx_ref)
        if layout != "strided":
            assert ddy.stride() == dxx.stride() == x.stride()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_affine_act_double_backward_low_precision(dtype, layout):
    shape = (3, 6, 5, 7)
    x, dy, ddshortcut = (make(shape, layout, dtype) for _ in range(3))
    ddx = make(shape, layout)  # float32 ddx with low-precision activations: dtypes may differ
    scale, shift, center = coef(x, False), coef(x, False), coef(x, False)
    a, b, p, q = (coef(x, True) for _ in range(4))  # GroupNorm-like [N, C]
    # the float64 references with the gate as float32 computes it (recomputed at ~0 it may flip)
    gate = ref._coef(scale, x) * x.float() + ref._coef(shift, x) > 0

    sums = tri.affine_act_double_backward_reduce(ddx, dy, x, scale, shift, center, None, True, False)
    eager = ref.affine_act_double_backward_reduce(ddx, dy, x, scale, shift, center, None, True, False)
    exact = ref.affine_act_double_backward_reduce(*to64(ddx, dy, x, scale, shift, center), gate, True, False)
    for got, e, ex in zip(sums, eager, exact):
        assert_lowp(got, e, ex, floor=1e-5)

    for ddx_scale, dxx_addend in ((1.0, None), (0.5, make(shape, layout, dtype))):
        args = (ddx, dy, x, scale, shift, None, True, a, b, p, q, center, ddshortcut, ddx_scale,
                dxx_addend)
        ddy, dxx = tri.affine_act_double_backward_apply(*args)
        eager = ref.affine_act_double_backward_apply(*args)
        exact = ref.affine_act_double_backward_apply(
            *to64(ddx, dy, x, scale, shift), gate, True, *to64(a, b, p, q, center, ddshortcut),
            ddx_scale, None if dxx_addend is None else dxx_addend.double())
        assert ddy.dtype == dxx.dtype == dtype
        assert_lowp(ddy, eager[0], exact[0])
        assert_lowp(dxx, eager[1], exact[1])

# ----------------------------------------------------------------------------- IE-Skip


@pytest.mark.parametrize("shape,layout", cases([(4, 5, 7, 5), (3, 3), (2, 6, 3, 4, 5)]))
def test_ie_fp32(shape, layout):
    x, c, fx = make(shape, layout), make(shape, "contiguous"), make(shape, layout)
    e = tri.ie_residual(x, c, fx, 0.7)
    assert_close32(e, ref.ie_residual(x, c, fx, 0.7))
    v = make(shape, "strided")
    out = tri.ie_update(x, e, v, 0.1, 0.7)
    assert_close32(out, ref.ie_update(x, e, v, 0.1, 0.7))
    if layout != "strided":
        assert e.stride() == out.stride() == x.stride()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ie_low_precision(dtype):
    x, c, fx, v = (make((3, 6, 5, 7), "channels_last", dtype) for _ in range(4))
    e = tri.ie_residual(x, c, fx, 1.0)
    assert e.dtype == dtype
    assert_lowp(e, ref.ie_residual(x, c, fx, 1.0), ref.ie_residual(*to64(x, c, fx), 1.0))
    out = tri.ie_update(x, e, v, 0.1, 1.0)
    assert_lowp(out, ref.ie_update(x, e, v, 0.1, 1.0), ref.ie_update(*to64(x, e, v), 0.1, 1.0))


@pytest.mark.parametrize("shape,layout", cases([(4, 5, 7, 5), (3, 3), (2, 6, 3, 4, 5)]))
@pytest.mark.parametrize("theta", [1.0, 0.4])
def test_ie_residual_with_term_and_adjoint_fp32(shape, layout, theta):
    """(e, −2γ·e) from one pass, and the adjoint (dx, dc, dfx) = (u, −u, −θ·u) with
    u = de − 2γ·dterm; at θ = 1 dfx is dc itself (one tensor written)."""
    x, c, fx = make(shape, layout), make(shape, "contiguous"), make(shape, layout)
    e, term = tri.ie_residual_with_term(x, c, fx, theta, 0.15)
    e_ref, term_ref = ref.ie_residual_with_term(x, c, fx, theta, 0.15)
    assert_close32(e, e_ref)
    assert_close32(term, term_ref)
    assert_close32(e, tri.ie_residual(x, c, fx, theta))
    de, dterm = make(shape, layout), make(shape, "strided")
    grads = tri.ie_residual_with_term_adjoint(de, dterm, theta, 0.15)
    for got, want in zip(grads, ref.ie_residual_with_term_adjoint(de, dterm, theta, 0.15)):
        assert_close32(got, want)
    assert (grads[2] is grads[1]) == (theta == 1.0)
    if layout != "strided":
        assert e.stride() == term.stride() == grads[0].stride() == x.stride()
    # a share of x's gradient handed on (pyeuler.ops.gradient_relay) lands in dx only
    addend = make(shape, "strided")
    with_addend = tri.ie_residual_with_term_adjoint(de, dterm, theta, 0.15, addend)
    want = ref.ie_residual_with_term_adjoint(de, dterm, theta, 0.15, addend)
    for got, expected in zip(with_addend, want):
        assert_close32(got, expected)
    assert_close32(want[0], grads[0] + addend)
    assert_close32(with_addend[1], grads[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ie_residual_with_term_and_adjoint_low_precision(dtype):
    x, c, fx, de, dterm = (make((3, 6, 5, 7), "channels_last", dtype) for _ in range(5))
    e, term = tri.ie_residual_with_term(x, c, fx, 0.5, 0.1)
    eager = ref.ie_residual_with_term(x, c, fx, 0.5, 0.1)
    exact = ref.ie_residual_with_term(*to64(x, c, fx), 0.5, 0.1)
    assert e.dtype == term.dtype == dtype
    assert_lowp(e, eager[0], exact[0])
    assert_lowp(term, eager[1], exact[1])
    grads = tri.ie_residual_with_term_adjoint(de, dterm, 0.5, 0.1)
    eager = ref.ie_residual_with_term_adjoint(de, dterm, 0.5, 0.1)
    exact = ref.ie_residual_with_term_adjoint(*to64(de, dterm), 0.5, 0.1)
    for got, lowp, want in zip(grads, eager, exact):
        assert got.dtype == dtype
        assert_lowp(got, lowp, want)


def test_ie_residual_with_term_adjoint_bad_arguments():
    de = make((2, 3, 4), "contiguous")
    with pytest.raises(ValueError, match="dterm must have x's shape"):
        tri.ie_residual_with_term_adjoint(de, de[:1], 1.0, 0.1)
    with pytest.raises(TypeError, match="de must be float32, float16 or bfloat16"):
        tri.ie_residual_with_term_adjoint(de.double(), de, 1.0, 0.1)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_int64_offset_kernels_agree(layout, monkeypatch):
    """The int64-offset variants (chosen for ≥ 2**31 elements), forced on a small tensor."""
    import pyeuler.triton._utils as utils

    monkeypatch.setattr(utils, "_INT32_SAFE_NUMEL", 0)
    x, dy, shortcut = make((3, 5, 4, 3), layout), make((3, 5, 4, 3), layout), make((3, 5, 4, 3), layout)
    scale, shift, center = coef(x, False), coef(x, False), coef(x, False)
    for groups in (0, 5):
        for got, want in zip(tri.norm_stats(x, groups), ref.norm_stats(x.double(), groups)):
            assert_close32(got, want.float())
    y, mask = tri.affine_act_forward(x, scale, shift, shortcut, True, True)
    assert_close32(y, ref.affine_act_forward(x, scale, shift, shortcut, True, True)[0])
    for per_sample in (False, True):
        got = tri.affine_act_backward_reduce(dy, x, scale, shift, center, mask, True, per_sample)
        want = ref.affine_act_backward_reduce(dy, x, scale, shift, center, mask, True, per_sample)
        for g, w in zip(got, want):
            assert_close32(g, w)
    dx, ds = tri.affine_act_backward_apply(dy, x, scale, shift, mask, True, scale, shift, center, center, True)
    dx_ref, ds_ref = ref.affine_act_backward_apply(dy, x, scale, shift, mask, True, scale, shift, center, center,
                                                   True)
    assert_close32(dx, dx_ref)
    assert_close32(ds, ds_ref)
    assert_close32(tri.ie_update(x, dy, shortcut, 0.1, 1.0), ref.ie_update(x, dy, shortcut, 0.1, 1.0))
    args = (dy, x, scale, shift, mask, True, scale, shift, center, center, shortcut, 0.1, 1.0, False)
    assert_close32(tri.affine_act_backward_apply_ie_update(*args), ref.affine_act_backward_apply_ie_update(*args))
    ddx = shortcut
    for per_sample in (False, True):
        args = (ddx, dy, x, scale, shift, center, mask, True, per_sample)
        got = tri.affine_act_double_backward_reduce(*args)
        for g, w in zip(got, ref.affine_act_double_backward_reduce(*args)):
            assert_close32(g, w)
    args = (ddx, dy, x, scale, shift, mask, True, scale, shift, center, center, center, shortcut)
    for g, w in zip(tri.affine_act_double_backward_apply(*args), ref.affine_act_double_backward_apply(*args)):
        assert_close32(g, w)


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_argument():
    x = make((2, 4, 3, 3))
    s = torch.ones(4, device=DEVICE)
    with pytest.raises(TypeError, match="x must be float32"):
        tri.norm_stats(x.double(), 0)
    with pytest.raises(ValueError, match="groups=3"):
        tri.norm_stats(x, 3)
    with pytest.raises(ValueError, match=r"scale must have shape \[C\]"):
        tri.affine_act_forward(x, torch.ones(3, device=DEVICE), s, None, True, False)
    with pytest.raises(TypeError, match="shift must be float32"):
        tri.affine_act_forward(x, s, s.half(), None, True, False)
    with pytest.raises(ValueError, match="shortcut must have x's shape"):
        tri.affine_act_forward(x, s, s, x[:1], True, False)
    with pytest.raises(TypeError, match="mask must be bool"):
        tri.affine_act_backward_reduce(x, x, s, s, s, x, True, False)
    with pytest.raises(TypeError, match="dy must be"):
        tri.affine_act_backward_apply(x.to(torch.int32), x, s, s, None, True, s, s, s, s, False)
    with pytest.raises(ValueError, match=r"center must have shape"):
        tri.affine_act_backward_apply(x, x, s, s, None, True, s, s, s, torch.ones(2, 2, device=DEVICE), False)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        tri.affine_act_backward_apply_ie_update(x, x, s, s, None, True, s, s, s, s, x[:1], 0.1, 1.0, True)
    with pytest.raises(TypeError, match="theta must be a Python float"):
        tri.affine_act_backward_apply_ie_update(x, x, s, s, None, True, s, s, s, s, x, 0.1, None, True)
    with pytest.raises(ValueError, match="fx must have x's shape"):
        tri.ie_residual(x, x, x[0], 1.0)
    with pytest.raises(TypeError, match="step_size must be a Python float"):
        tri.ie_update(x, x, x, torch.tensor(0.1), 1.0)


def test_double_backward_errors_name_the_argument():
    x = make((2, 4, 3, 3))
    s = torch.ones(4, device=DEVICE)
    with pytest.raises(ValueError, match="ddx must have x's shape"):
        tri.affine_act_double_backward_reduce(x[:1], x, x, s, s, s, None, True, False)
    with pytest.raises(TypeError, match="dy must be"):
        tri.affine_act_double_backward_reduce(x, x.double(), x, s, s, s, None, True, False)
    with pytest.raises(TypeError, match="mask must be bool"):
        tri.affine_act_double_backward_reduce(x, x, x, s, s, s, x, True, False)
    with pytest.raises(TypeError, match="ddx must be"):
        tri.affine_act_double_backward_apply(x.to(torch.int32), x, x, s, s, None, True, s, s, s, s, s, None)
    with pytest.raises(ValueError, match=r"q must have shape"):
        tri.affine_act_double_backward_apply(x, x, x, s, s, None, True, s, s, s, s[:2], s, None)
    with pytest.raises(TypeError, match="p must be float32"):
        tri.affine_act_double_backward_apply(x, x, x, s, s, None, True, s, s, s.double(), s, s, None)
    with pytest.raises(ValueError, match="ddshortcut must have x's shape"):
        tri.affine_act_double_backward_apply(x, x, x, s, s, None, True, s, s, s, s, s, x[:, :2])
    with pytest.raises(ValueError, match="dxx_addend"):
        tri.affine_act_double_backward_apply(x, x, x, s, s, None, True, s, s, s, s, s, None, 1.0,
                                             x[:, :2])
    with pytest.raises(TypeError, match="ddx_scale"):
        tri.affine_act_double_backward_apply(x, x, x, s, s, None, True, s, s, s, s, s, None,
                                             torch.tensor(2.0))


def test_import_without_triton_gives_a_clear_error():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, pyeuler.triton as t\n"
        "ok, why = t.is_available(); assert not ok and 'triton is not installed' in why, why\n"
        "try:\n    t.norm_stats(torch.ones(2, 3), 0)\n"
        "except RuntimeError as e:\n    assert 'norm_stats needs triton' in str(e), e\n"
        "else:\n    raise AssertionError('no error')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_is_available_reports_why():
    ok, why = tri.is_available()
    assert ok, why
    if not torch.cuda.is_available():
        assert "interpreter" in why


# ----------------------------------------------------------------------------- GPU sizes


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(128, 160, 32, 32), (128, 640, 8, 8)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_wrn_shapes_bf16_on_gpu(shape, layout):
    x, dy, shortcut = (make(shape, layout, torch.bfloat16, mean=0.3) for _ in range(3))
    for groups in (0, 1):
        mean, var = tri.norm_stats(x, groups)
        eager = ref.norm_stats(x, groups)
        exact = ref.norm_stats(x.double(), groups)
        assert_lowp(mean, eager[0], exact[0])
        assert_lowp(var, eager[1], exact[1])
    scale, shift, center = coef(x, False), coef(x, False), coef(x, False)
    y, mask = tri.affine_act_forward(x, scale, shift, shortcut, True, True)
    y_eager, _ = ref.affine_act_forward(x, scale, shift, shortcut, True, True)
    assert_lowp(y, y_eager, ref.affine_act_forward(*to64(x, scale, shift, shortcut), True, False)[0])
    first = tri.affine_act_backward_reduce(dy, x, scale, shift, center, mask, True, False)
    again = tri.affine_act_backward_reduce(dy, x, scale, shift, center, mask, True, False)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # no atomics: bitwise repeatable
    exact = ref.affine_act_backward_reduce(*to64(dy, x, scale, shift, center), mask, True, False)
    eager = ref.affine_act_backward_reduce(dy, x, scale, shift, center, mask, True, False)
    for got, e, ex in zip(first, eager, exact):
        assert_lowp(got, e, ex, floor=1e-5)
    ddx = make(shape, layout, torch.bfloat16)
    first = tri.affine_act_double_backward_reduce(ddx, dy, x, scale, shift, center, mask, True, False)
    again = tri.affine_act_double_backward_reduce(ddx, dy, x, scale, shift, center, mask, True, False)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    exact = ref.affine_act_double_backward_reduce(*to64(ddx, dy, x, scale, shift, center), mask, True, False)
    eager = ref.affine_act_double_backward_reduce(ddx, dy, x, scale, shift, center, mask, True, False)
    for got, e, ex in zip(first, eager, exact):
        assert_lowp(got, e, ex, floor=1e-5)


@gpu
@pytest.mark.gpu
@pytest.mark.slow
def test_int64_offsets_on_gpu():
    """More than 2**31 elements: offsets must not wrap."""
    n = 2**31 // (64 * 1024) + 1
    try:
        x = torch.randn(n, 64, 32, 32, device="cuda", dtype=torch.bfloat16)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 2**31-element tensor")
    scale = torch.full((64,), 2.0, device="cuda")
    y, _ = tri.affine_act_forward(x, scale, torch.zeros_like(scale), None, False, False)
    assert torch.equal(y[-1], (x[-1].float() * 2).bfloat16())
    del y
    mean, _ = tri.norm_stats(x, 0)
    torch.testing.assert_close(mean, x.float().mean((0, 2, 3)), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- NaN and inf
# The eager contract keeps NaN and ±inf as torch does (a NaN ReLU output, a gate open at NaN,
# a closed gate giving exactly 0 for any dy); the kernels must agree value for value.

NAN_TOL = dict(rtol=1e-4, atol=1e-4, equal_nan=True)
# the interpreter computes with numpy, which warns on the inf / NaN arithmetic tested here
numpy_nan_warnings = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")


def _nan_inf_inputs(layout, per_sample):
    return nan_inf_inputs(layout, per_sample, DEVICE, width=2)


@numpy_nan_warnings
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["per_channel", "per_sample"])
def test_nan_and_inf_propagate_like_the_eager_contract(layout, per_sample):
    x, dy, ddx, e, shortcut, scale, shift, a, b, c, center = _nan_inf_inputs(layout, per_sample)
    y, mask = tri.affine_act_forward(x, scale, shift, shortcut, True, True)
    y_ref, mask_ref = ref.affine_act_forward(x, scale, shift, shortcut, True, True)
    assert y.isnan().any() and mask[y.isnan()].all()  # NaN passes its gradient
    torch.testing.assert_close(y, y_ref, **NAN_TOL)
    assert torch.equal(mask, mask_ref)
    for m in (mask, None):  # saved, or recomputed from x
        for got, want in zip(tri.affine_act_backward_reduce(dy, x, scale, shift, center, m, True, per_sample),
                             ref.affine_act_backward_reduce(dy, x, scale, shift, center, m, True, per_sample)):
            torch.testing.assert_close(got, want, **NAN_TOL)
        apply_args = (dy, x, scale, shift, m, True, a, b, c, center)
        for got, want in zip(tri.affine_act_backward_apply(*apply_args, True),
                             ref.affine_act_backward_apply(*apply_args, True)):
            torch.testing.assert_close(got, want, **NAN_TOL)
        for is_term in (False, True):
            torch.testing.assert_close(
                tri.affine_act_backward_apply_ie_update(*apply_args, e, 0.1, 0.9, is_term),
                ref.affine_act_backward_apply_ie_update(*apply_args, e, 0.1, 0.9, is_term), **NAN_TOL)
        reduce_args = (ddx, dy, x, scale, shift, center, m, True, per_sample)
        for got, want in zip(tri.affine_act_double_backward_reduce(*reduce_args),
                             ref.affine_act_double_backward_reduce(*reduce_args)):
            torch.testing.assert_close(got, want, **NAN_TOL)
        dd_args = (ddx, dy, x, scale, shift, m, True, a, b, c, shift, center, shortcut)
        for got, want in zip(tri.affine_act_double_backward_apply(*dd_args),
                             ref.affine_act_double_backward_apply(*dd_args)):
            torch.testing.assert_close(got, want, **NAN_TOL)


@numpy_nan_warnings
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("groups", [0, 2])
def test_norm_stats_nan_inf_and_overflow(layout, groups):
    """NaN / inf poison their statistic, across split partials; an overflowed variance is
    NaN (deliberately unlike torch's inf); a huge but constant channel is not an overflow."""
    x = make((4, 4, 8, 8), layout, torch.bfloat16)
    x[2, 0, 5, 5] = float("nan")
    x[3, 1, 7, 0] = float("inf")
    x[:, 2] = (torch.randn(4, 8, 8) * 1e30).to(x)
    x[:, 3] = 1e20
    mean, var = tri.norm_stats(x, groups)
    mean_ref, var_ref = ref.norm_stats(x, groups)
    assert var_ref.isnan().sum() == (3 if groups == 0 else 6)  # GN: samples 2, 3 and group 1
    torch.testing.assert_close(var, var_ref, rtol=1e-4, atol=1e-5, equal_nan=True)
    sane = var_ref.isfinite()  # the overflowing means cancel: no rtol to hold them to
    torch.testing.assert_close(mean[sane], mean_ref[sane], rtol=1e-4, atol=1e-5)
    assert not mean[~mean_ref.isfinite()].isfinite().any()


# ---------------------------------------------------------------------------------------
# The per-channel passes: one launch each, every flag combination against the algebra.


@pytest.fixture
def on_device():
    """Factory functions allocate on the device the kernels run on."""
    with torch.device(DEVICE):
        yield


def _coefficient_cases(groups, n=3, c=8):
    import itertools

    sum_shape, stat_shape = ((n, c), (n, groups)) if groups else ((c,), (c,))
    for h_kind, has_w, has_b in itertools.product(["none", "scalar", "channel"], *[[True, False]] * 2):
        h = {"none": None, "scalar": torch.tensor(0.7), "channel": torch.rand(c) + 0.3}[h_kind]
        weight = torch.rand(c) + 0.5 if has_w else None
        bias = torch.randn(c) if has_b else None
        yield h, weight, bias, stat_shape, sum_shape, c


@pytest.mark.parametrize("groups", [0, 1, 2, 8])
def test_forward_coefficients_match_the_algebra(groups, on_device):
    for h, weight, bias, stat_shape, _, c in _coefficient_cases(groups):
        mean, var = torch.randn(stat_shape), torch.rand(stat_shape) + 0.5
        args = (mean, var, weight, bias, h, 0.9, 1e-5, groups, c)
        for got, expected in zip(tri.forward_coefficients(*args), ref.forward_coefficients(*args)):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups", [0, 2])
def test_backward_coefficients_match_the_algebra(groups, on_device):
    import itertools

    for h, weight, bias, stat_shape, sum_shape, c in _coefficient_cases(groups):
        var = torch.rand(stat_shape) + 0.5
        for bits, has_stat_grads, batch_stats in itertools.product(range(16), *[[True, False]] * 2):
            has_dmean, has_dvar = has_stat_grads, has_stat_grads and bits % 2 == 0
            if groups and not batch_stats:
                continue  # GroupNorm always normalises with its own statistics
            needs = (bool(bits & 1), False, bool(bits & 2) and weight is not None,
                     bool(bits & 4) and bias is not None, bool(bits & 8) and h is not None)
            sums_needed = any(needs[2:]) or (needs[0] and batch_stats)
            sums = (torch.randn(sum_shape), torch.randn(sum_shape)) if sums_needed else (None, None)
            args = (*sums, torch.randn(stat_shape) if has_dmean else None,
                    torch.randn(stat_shape) if has_dvar else None, weight, bias, h, var, 0.9, 1e-5,
                    groups, batch_stats, needs, c, 7)
            got, expected = tri.backward_coefficients(*args), ref.backward_coefficients(*args)
            for name, g, e in zip(("a", "b", "c", "dweight", "dbias", "dh"), got, expected):
                assert (g is None) == (e is None), (name, needs)
                if e is not None:
                    torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6,
                                               msg=lambda m: f"{name} {needs}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("channels", [1, 7, 1030])
def test_update_running_stats_matches_the_algebra(dtype, channels, on_device):
    """One launch updates running mean, unbiased variance and num_batches_tracked as the
    contract's lerp_ does: float, tensor and cumulative (None) momentum; float64 buffers take
    the torch-op version.  Within one ulp of the buffer dtype (torch's lerp may fuse)."""
    ulp = {torch.float32: 2.0**-23, torch.float64: 0.0}.get(dtype, torch.finfo(dtype).eps)
    for momentum in (0.1, 0.8, 1.0, torch.tensor(0.3, device=DEVICE), None):
        mean, var = torch.randn(channels, device=DEVICE), torch.rand(channels, device=DEVICE)
        running = (torch.randn(channels, device=DEVICE).to(dtype),
                   (torch.rand(channels, device=DEVICE) + 0.5).to(dtype),
                   torch.tensor(4, device=DEVICE))
        got, expected = [t.clone() for t in running], [t.clone() for t in running]
        tri.update_running_stats(*got, mean, var, 37, momentum)
        ref.update_running_stats(*expected, mean, var, 37, momentum)
        assert got[2].item() == expected[2].item() == 5
        for g, e in zip(got[:2], expected[:2]):
            assert g.dtype == dtype
            torch.testing.assert_close(g, e, rtol=2 * ulp, atol=2 * ulp, msg=str(momentum))
        if momentum == 1.0 and dtype in (torch.float32, torch.float64):
            # the nearer end: exactly the batch values (the interpreter's float32 -> bfloat16
            # truncates, so low precision is left to the tolerance above)
            assert torch.equal(got[0], mean.to(dtype))


def test_update_running_stats_refuses_what_the_contract_refuses(on_device):
    buffers = (torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE))
    stats = (torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="more than one value"):
        tri.update_running_stats(*buffers, None, *stats, 1, 0.1)
    with pytest.raises(ValueError, match="needs num_batches_tracked"):
        tri.update_running_stats(*buffers, None, *stats, 4, None)


def test_coefficient_kernels_fall_back_beyond_one_tile(on_device):
    """GroupNorm with more channels per sample than one tile holds: the torch-op algebra."""
    from pyeuler.triton import coefficients

    c = 2 * coefficients._MAX_TILE
    mean, var = torch.randn(2, 1), torch.rand(2, 1) + 0.5
    args = (mean, var, None, None, None, 1.0, 1e-5, 1, c)
    for got, expected in zip(tri.forward_coefficients(*args), ref.forward_coefficients(*args)):
        torch.testing.assert_close(got, expected)


def _second_order_cases(groups, need_bits, dropped_cotangents):
    """(args, cotangents, needs, sum_shape) of the per-channel VJPs over needed gradients
    (``need_bits``: flags x, weight, bias, h as bits), learnable h, affine parameters,
    statistic gradients, batch statistics and absent cotangents of a, b, c
    (``dropped_cotangents``: bit k drops the k-th)."""
    import itertools

    for h, weight, bias, stat_shape, sum_shape, c in _coefficient_cases(groups):
        var = torch.rand(stat_shape) + 0.5
        for bits, has_stat_grads, batch_stats, dropped in itertools.product(
                need_bits, [True, False], [True, False], dropped_cotangents):
            if groups and not batch_stats:
                continue  # GroupNorm always normalises with its own statistics
            needs = (bool(bits & 1), False, bool(bits & 2) and weight is not None,
                     bool(bits & 4) and bias is not None, bool(bits & 8) and h is not None)
            sums_needed = any(needs[2:]) or (needs[0] and batch_stats)
            sums = (torch.randn(sum_shape), torch.randn(sum_shape)) if sums_needed else (None, None)
            stat_grads = (torch.randn(stat_shape) if has_stat_grads else None,
                          torch.randn(stat_shape) if has_stat_grads and bits % 2 == 0 else None)
            args = (*sums, *stat_grads, weight, bias, h, var, 0.9, 1e-5, groups, batch_stats, needs,
                    c, 7)
            cotangents = [None if o is None else torch.randn_like(o)
                          for o in ref.backward_coefficients(*args)]
            for k in range(3):
                if dropped >> k & 1:
                    cotangents[k] = None
            yield args, tuple(cotangents), needs, sum_shape


def _assert_same_entries(got, expected, needs):
    """None exactly where the algebra has none; values close (the algebra may leave a [C]
    where the kernel writes [N, C])."""
    assert set(got) == set(expected)
    for name, e in expected.items():
        assert (got[name] is None) == (e is None), (name, needs)
        if e is not None:
            torch.testing.assert_close(got[name], e.expand_as(got[name]), rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{name} {needs}: {m}")


@pytest.mark.parametrize("groups", [0, 2])
def test_double_backward_coefficients_match_the_algebra(groups, on_device):
    """The second order's one per-channel pass: a, b, the VJP with the sums' own cotangents
    added, and the centre's gradient."""
    for args, cotangents, needs, sum_shape in _second_order_cases(groups, (1, 3, 14, 15),
                                                                  (0, 4, 5)):
        for sum_cotangents in ((None, None),
                               (torch.randn(sum_shape), torch.randn(sum_shape)),
                               (torch.randn(sum_shape), None)):
            _assert_same_entries(tri.double_backward_coefficients(*args, cotangents, sum_cotangents),
                                 ref.double_backward_coefficients(*args, cotangents, sum_cotangents),
                                 needs)


@pytest.mark.parametrize("groups", [0, 2])
def test_backward_coefficients_vjp_matches_the_algebra(groups, on_device):
    """Every combination of needed gradients, learnable h, affine parameters, statistic
    gradients and given cotangents (need flags each alone, pairs, all: the full product
    runs minutes in the interpreter)."""
    for args, cotangents, needs, _ in _second_order_cases(groups, (1, 2, 4, 8, 3, 9, 14, 15),
                                                          (0, 5)):
        _assert_same_entries(tri.backward_coefficients_vjp(*args, cotangents),
                             ref.backward_coefficients_vjp(*args, cotangents), needs)
