"""norm_act (bn_relu, group_norm_relu, bn_add_relu): eager vs the torch.nn.functional reference."""

import pytest
import torch

from pyeuler import functional as PF
from pyeuler.ops.norm_act import norm_act, norm_act_module
from helpers import F32, assert_tensors_close, grads

SHAPES = [(4, 3), (3, 5, 7), (2, 3, 5, 4), (2, 4, 3, 2, 3), (5, 17, 1, 1)]


def _inputs(shape, dtype, channels_last=False, requires_grad=True):
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    if channels_last and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    elif channels_last and x.dim() == 5:
        x = x.to(memory_format=torch.channels_last_3d)
    c = shape[1]
    w = (torch.rand(c, dtype=dtype) + 0.5)
    b = torch.randn(c, dtype=dtype)
    for t in (x, w, b):
        t.requires_grad_(requires_grad)
    return x, w, b


def _h(kind, c, dtype):
    if kind == "float":
        return 0.3
    h = torch.tensor(0.7, dtype=dtype) if kind == "scalar" else torch.rand(c, dtype=dtype) + 0.1
    return h.requires_grad_()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_bn_relu_matches_reference(shape, channels_last, training):
    x, w, b = _inputs(shape, torch.float32, channels_last)
    rm, rv = torch.randn(shape[1]), torch.rand(shape[1]) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    y = PF.bn_relu(x, w, b, rm, rv, training=training, backend="eager")
    y_ref = PF.bn_relu(x, w, b, rm2, rv2, training=training, backend="reference")
    torch.testing.assert_close(y, y_ref, **F32)
    dy = torch.randn_like(y)
    assert_tensors_close(grads((y * dy).sum(), (x, w, b)), grads((y_ref * dy).sum(), (x, w, b)), **F32)
    torch.testing.assert_close(rm, rm2, **F32)
    torch.testing.assert_close(rv, rv2, **F32)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d) or x.dim() < 4


@pytest.mark.parametrize("shape", [(2, 6, 5), (3, 4, 3, 3), (1, 8, 2, 2, 2), (3, 6)])
@pytest.mark.parametrize("groups", [1, 2])
def test_group_norm_relu_matches_reference(shape, groups):
    x, w, b = _inputs(shape, torch.float32)
    y = PF.group_norm_relu(x, groups, w, b, backend="eager")
    y_ref = PF.group_norm_relu(x, groups, w, b, backend="reference")
    torch.testing.assert_close(y, y_ref, **F32)
    dy = torch.randn_like(y)
    assert_tensors_close(grads((y * dy).sum(), (x, w, b)), grads((y_ref * dy).sum(), (x, w, b)), **F32)


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("h_kind", ["float", "scalar", "channel"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_bn_add_relu_matches_reference(shape, h_kind, relu, training):
    x, w, b = _inputs(shape, torch.float32)
    s = torch.randn(shape, requires_grad=True)
    h = _h(h_kind, shape[1], torch.float32)
    rm, rv = torch.randn(shape[1]), torch.rand(shape[1]) + 0.5
    kw = dict(training=training, relu=relu)
    y = PF.bn_add_relu(x, s, h, w, b, rm.clone(), rv.clone(), backend="eager", **kw)
    y_ref = PF.bn_add_relu(x, s, h, w, b, rm.clone(), rv.clone(), backend="reference", **kw)
    torch.testing.assert_close(y, y_ref, **F32)
    inputs = [x, w, b, s] + ([h] if isinstance(h, torch.Tensor) else [])
    dy = torch.randn_like(y)
    assert_tensors_close(grads((y * dy).sum(), inputs), grads((y_ref * dy).sum(), inputs), **F32)


@pytest.mark.parametrize("groups", [0, 2])
@pytest.mark.parametrize("h_kind", ["float", "scalar", "channel"])
@pytest.mark.parametrize("with_shortcut", [False, True])
def test_eager_gradcheck_and_gradgradcheck(groups, h_kind, with_shortcut):
    x, w, b = _inputs((3, 4, 5), torch.float64)
    s = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True) if with_shortcut else None
    h = _h(h_kind, 4, torch.float64)
    args = [x, w, b] + ([s] if s is not None else []) + ([h] if isinstance(h, torch.Tensor) else [])

    def f(*a):
        it = iter(a)
        xx, ww, bb = next(it), next(it), next(it)
        ss = next(it) if s is not None else None
        hh = next(it) if isinstance(h, torch.Tensor) else h
        return norm_act(xx, ww, bb, groups=groups, shortcut=ss, h=hh, backend="eager")

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_eval_mode_gradcheck():
    x, w, b = _inputs((3, 4, 2, 2), torch.float64)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    f = lambda xx, ww, bb: norm_act(xx, ww, bb, rm, rv, training=False, backend="eager")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_running_stats_and_counter_match_batchnorm(momentum):
    bn = torch.nn.BatchNorm2d(5, momentum=momentum)
    bn_ref = torch.nn.BatchNorm2d(5, momentum=momentum)
    for _ in range(3):
        x = torch.randn(4, 5, 3, 3) * 3 + 1
        y = norm_act_module(bn, x, relu=False, backend="eager")
        torch.testing.assert_close(y, bn_ref(x), **F32)
    for key, value in bn_ref.state_dict().items():
        torch.testing.assert_close(bn.state_dict()[key], value, **F32)
    bn.eval(), bn_ref.eval()
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(norm_act_module(bn, x, relu=False, backend="eager"), bn_ref(x), **F32)


def test_no_grad_and_inference():
    x, w, b = _inputs((4, 3, 5, 5), torch.float32, requires_grad=False)
    with torch.no_grad():
        y = PF.bn_relu(x, w, b, backend="eager")
    torch.testing.assert_close(y, PF.bn_relu(x, w, b, backend="reference"), **F32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_bounded_by_eager_low_precision(dtype):
    from helpers import assert_close_low_precision

    x, w, b = _inputs((8, 6, 7, 7), torch.float64, requires_grad=False)
    s = torch.randn_like(x)
    y64 = PF.bn_add_relu(x, s, 0.5, w, b, backend="reference")
    y_ref = PF.bn_add_relu(x.to(dtype), s.to(dtype), 0.5, w.float(), b.float(), backend="reference")
    y = PF.bn_add_relu(x.to(dtype), s.to(dtype), 0.5, w.float(), b.float(), backend="eager")
    assert y.dtype == dtype
    assert_close_low_precision(y, y_ref, y64, floor=1e-3)


def test_large_mean_statistics_are_stable():
    x = (torch.randn(16, 4, 8, 8, dtype=torch.float64) * 0.1 + 1e3)
    y64 = PF.bn_relu(x, backend="reference")
    y32 = PF.bn_relu(x.float(), backend="eager")
    assert (y32.double() - y64).abs().max() < 5e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.randn(4)), "x must have shape"),
        (dict(x=torch.ones(2, 3, dtype=torch.int64)), "floating-point"),
        (dict(weight=torch.ones(4)), "weight must have shape"),
        (dict(shortcut=torch.ones(2, 3, 5)), "shortcut must have"),
        (dict(x=torch.randn(1, 3)), "one value per channel"),
        (dict(h=torch.ones(2)), "h must be"),
        (dict(groups=2), "groups must"),
        (dict(training=False), "eval mode"),
        (dict(backend="nope"), "backend must be one of"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(x=torch.randn(2, 3, 4))
    args.update(kwargs)
    x = args.pop("x")
    with pytest.raises((ValueError, TypeError), match=match):
        norm_act(x, **args)


def test_scaled_residual_add():
    x, f = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    torch.testing.assert_close(PF.scaled_residual_add(x, f, 0.1), x + 0.1 * f)
    h = torch.rand(3)
    torch.testing.assert_close(PF.scaled_residual_add(x, f, h), x + h.view(1, 3, 1) * f)
    with pytest.raises(ValueError, match="same shape"):
        PF.scaled_residual_add(x, f[:1])


@pytest.mark.parametrize("groups, batch_stats", [(0, True), (0, False), (2, True)])
def test_coefficients_vjp_equals_functorch(groups, batch_stats):
    """The hand-written derivative of the backward's per-channel algebra against
    torch.func.vjp, over every combination of needed gradients, learnable h, affine
    parameters and statistic gradients (float64)."""
    import itertools

    from pyeuler.ops import norm_act_ops
    from pyeuler.ops import norm_algebra as algebra

    dt, n, c, count = torch.float64, 3, 4, 7
    sum_shape, stat_shape = ((n, c), (n, groups)) if groups else ((c,), (c,))
    for bits, h_kind, has_w, has_b, has_dm, has_dv in itertools.product(
            range(16), ["none", "scalar", "channel"], *[[True, False]] * 4):
        needs = (bool(bits & 1), False, bool(bits & 2), bool(bits & 4), bool(bits & 8))
        if needs[4] and h_kind == "none":
            continue
        sums = (torch.randn(sum_shape, dtype=dt), torch.randn(sum_shape, dtype=dt))
        if not norm_act_ops.sums_needed(needs, batch_stats):
            sums = (None, None)
        h = {"none": None, "scalar": torch.tensor(0.7, dtype=dt),
             "channel": torch.rand(c, dtype=dt) + 0.3}[h_kind]
        primals = dict(sum_g=sums[0], sum_gxc=sums[1],
                       dmean=torch.randn(stat_shape, dtype=dt) if has_dm else None,
                       dvar=torch.randn(stat_shape, dtype=dt) if has_dv else None,
                       weight=torch.rand(c, dtype=dt) + 0.5 if has_w else None,
                       bias=torch.randn(c, dtype=dt) if has_b else None, h=h,
                       var=torch.rand(stat_shape, dtype=dt) + 0.5)
        varying = [k for k, v in primals.items() if v is not None]

        def coefficients(*values):
            v = dict(primals, **dict(zip(varying, values)))
            return algebra.backward_coefficients(v["sum_g"], v["sum_gxc"], v["dmean"], v["dvar"],
                                                 v["weight"], v["bias"], v["h"], v["var"], 0.9,
                                                 1e-5, groups, batch_stats, needs, c, count)

        outs = coefficients(*[primals[k] for k in varying])
        cotangents = [None if o is None else torch.randn_like(o) for o in outs]
        _, vjp = torch.func.vjp(lambda *v: tuple(o for o in coefficients(*v) if o is not None),
                                *[primals[k] for k in varying])
        expected = dict(zip(varying, vjp(tuple(t for t in cotangents if t is not None))))
        got = algebra.backward_coefficients_vjp(*(primals[k] for k in ("sum_g", "sum_gxc", "dmean", "dvar",
                                                          "weight", "bias", "h", "var")),
                                   0.9, 1e-5, groups, batch_stats, needs, c, count, cotangents)
        for k in varying:
            actual = got[k] if got[k] is not None else torch.zeros_like(expected[k])
            torch.testing.assert_close(actual.expand_as(expected[k]), expected[k],
                                       msg=lambda m: f"{k} {needs} h={h_kind}: {m}")
