"""Each Triton kernel's declared passes (:func:`pyeuler.triton._utils.declare_passes`) against
the loads and stores it really issues.

The cost counter multiplies each operand's bytes by the passes its kernel declares, so a
declaration that says one pass where the kernel re-reads x would understate the step's HBM
traffic.  Here every kernel of :mod:`pyeuler.triton.compile_check`'s inventory runs in
Triton's CPU interpreter at small shapes, through its public wrapper, with the interpreter's
memory operations intercepted: each unmasked element access is attributed to the operand
whose address range holds it, and

- an activation-sized operand (a data or mask pointer in the inventory) must be accessed
  exactly ``declared`` times per element: every element at least that often, and no more
  than :data:`STRAY_FRACTION` of a pass beyond it (a reduction's shift row re-reads one
  element per split, a cache hit);
- any other operand (per-channel vectors, partials, scalars, which a tile re-reads from
  cache) must be touched if and only if it is declared.

The interception wraps ``InterpreterBuilder``'s load and store methods (Triton 3.x); it is
written defensively, and lives here, not in the package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import itertools

import numpy as np
import pytest
import torch

from conftest import requires_triton

pytestmark = requires_triton

STRAY_FRACTION = 0.25
_KERNEL_MODULES = ("affine_act", "coefficients", "ie", "norm_stats")


def _interpreting() -> bool:
    from pyeuler.triton._utils import interpreting

    return interpreting()


requires_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or not _interpreting(),
    reason="compares with Triton's CPU interpreter (TRITON_INTERPRET=1): compiled kernels' "
           "memory accesses cannot be intercepted")


# ----------------------------------------------------------------------------- interception


class _Accesses:
    """Unmasked element addresses of the loads and stores issued while recording."""

    def __init__(self):
        self.addresses: list[np.ndarray] = []
        self.recording = False
        self.depth = 0  # create_load may call create_masked_load: count the outer call only


@contextlib.contextmanager
def _intercepted(log: _Accesses):
    """Wrap the interpreter builder's memory operations to record into ``log``; any memory
    operation this test does not attribute (atomics, descriptors) fails loudly."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    handled = ("create_load", "create_masked_load", "create_store", "create_masked_store")
    missing = [name for name in handled if not hasattr(builder, name)]
    if missing:
        pytest.fail(f"this Triton's interpreter has no {missing}: update the interception")
    originals = {}

    def recording(name, original):
        signature = inspect.signature(original)

        def method(self, *args, **kwargs):
            if log.recording and log.depth == 0:
                bound = signature.bind(self, *args, **kwargs).arguments
                pointer = next(value for key, value in bound.items() if key.startswith("ptr"))
                addresses = np.asarray(pointer.data).astype(np.uint64, copy=False)
                mask = bound.get("mask")
                if mask is not None:
                    keep = np.broadcast_to(np.asarray(mask.data).astype(bool), addresses.shape)
                    addresses = addresses[keep]
                log.addresses.append(addresses.ravel())
            log.depth += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                log.depth -= 1

        return method

    def unattributed(name, original):
        def method(self, *args, **kwargs):
            if log.recording:
                raise AssertionError(f"the kernel issued {name}, which this test cannot attribute")
            return original(self, *args, **kwargs)

        return method

    for name in dir(builder):
        original = getattr(builder, name)
        if not callable(original) or not name.startswith("create_"):
            continue
        if name in handled:
            originals[name] = original
            setattr(builder, name, recording(name, original))
        elif any(word in name for word in ("load", "store", "atomic", "gather", "scatter")):
            originals[name] = original
            setattr(builder, name, unattributed(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(builder, name, original)


def _span(t: torch.Tensor) -> int:
    """Elements from t's first to its last addressed element."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 1)


@dataclasses.dataclass
class OperandAccess:
    argument: str
    declared: int
    elements: int  # distinct elements
    accesses: int  # element accesses, loads and stores
    fewest: int  # accesses of the least-accessed element

    @property
    def per_element(self) -> float:
        return self.accesses / max(self.elements, 1)


@dataclasses.dataclass
class Launch:
    kernel: str
    flags: dict
    operands: list[OperandAccess]


def _measure(name: str, operands, log: _Accesses) -> Launch:
    """Attribute ``log``'s addresses to ``operands`` ((argument, tensor, declared) triples)."""
    addresses = np.concatenate(log.addresses) if log.addresses else np.zeros(0, np.uint64)
    attributed = np.zeros(addresses.shape, dtype=bool)
    measured = []
    for argument, tensor, declared in operands:
        size = tensor.element_size()
        span = _span(tensor)
        base = tensor.data_ptr()
        inside = (addresses >= base) & (addresses < base + span * size)
        attributed |= inside
        counts = np.bincount(((addresses[inside] - base) // size).astype(np.int64),
                             minlength=span)
        offsets = torch.arange(span).as_strided(tensor.shape, tensor.stride()).reshape(-1)
        per_element = counts[np.unique(offsets.numpy())] if span else counts
        measured.append(OperandAccess(argument, declared, int(per_element.size),
                                      int(per_element.sum()),
                                      int(per_element.min()) if per_element.size else 0))
    if not attributed.all():
        raise AssertionError(f"{name}: {int((~attributed).sum())} accesses outside every operand")
    return Launch(name, {}, measured)


def _distinct(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Launch arguments with every tensor that shares memory with an earlier one replaced by
    a copy (the coefficient kernels pass one tensor as the placeholder of several absent
    operands), so each address belongs to one operand."""
    seen: list[tuple[int, int]] = []

    def distinct(value):
        if not isinstance(value, torch.Tensor) or value.numel() == 0:
            return value
        start = value.data_ptr()
        stop = start + _span(value) * value.element_size()
        if any(start < other_stop and other_start < stop for other_start, other_stop in seen):
            value = value.clone()
            start = value.data_ptr()
            stop = start + _span(value) * value.element_size()
        seen.append((start, stop))
        return value

    return tuple(map(distinct, args)), {key: distinct(value) for key, value in kwargs.items()}


def _kernel(name: str):
    for module in _KERNEL_MODULES:
        kernel = getattr(importlib.import_module(f"pyeuler.triton.{module}"), name, None)
        if kernel is not None:
            return kernel
    raise LookupError(f"no Triton kernel named {name}")


@contextlib.contextmanager
def recorded_launches():
    """Inside the block, every launch of pyeuler's Triton kernels runs with its accesses
    recorded; yields the list of :class:`Launch` it fills."""
    import pyeuler.triton  # noqa: F401  (routes the kernel modules' launches)
    from pyeuler.triton._utils import launch_hook, operand_passes

    launches: list[Launch] = []
    log = _Accesses()

    def hook(name, grid, args, kwargs):
        args, kwargs = _distinct(args, kwargs)
        operands = operand_passes(name, args, kwargs)
        log.addresses, log.recording = [], True
        try:
            _kernel(name).fn[grid](*args, **kwargs)
        finally:
            log.recording = False
        launch = _measure(name, operands, log)
        launch.flags = {key: value for key, value in kwargs.items() if key.isupper()}
        launches.append(launch)
        return True  # already run

    with _intercepted(log), launch_hook(hook):
        yield launches


# ----------------------------------------------------------------------------- the check


def _exact_operands() -> dict[str, set[str]]:
    """Per kernel, its activation-sized operands: the inventory's data and mask pointers."""
    from pyeuler.triton.compile_check import DATA, SPECS

    exact: dict[str, set[str]] = {}
    for spec in SPECS:
        exact.setdefault(spec.name, set()).update(
            argument for argument, kind in spec.pointers.items() if kind in (DATA, "*u1"))
    return exact


def mismatches(launch: Launch, exact: set[str]) -> list[str]:
    """Where ``launch``'s accesses contradict its declaration (empty: none)."""
    problems = []
    for op in launch.operands:
        where = (f"{launch.kernel} {op.argument} {launch.flags}: declared {op.declared}, "
                 f"measured {op.per_element:.3f} accesses per element (fewest {op.fewest})")
        if op.argument in exact:
            if op.declared == 0:
                ok = op.accesses == 0
            else:
                ok = (op.fewest == op.declared
                      and op.accesses <= (op.declared + STRAY_FRACTION) * op.elements)
        else:
            ok = (op.accesses > 0) == (op.declared > 0)
        if not ok:
            problems.append(where)
    return problems


# ----------------------------------------------------------------------------- the launches

N, C, H, W = 2, 8, 6, 6


def _activations(layout: str, dtype: torch.dtype):
    def make():
        t = torch.randn(N, C, H, W, dtype=dtype)
        return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t

    return make


def _run_affine_act(tri, make):
    x, dy, ddx, e = make(), make(), make(), make()
    scale, shift, center, a, b, c, p, q = (torch.rand(C) + 0.5 for _ in range(8))
    for shortcut, relu, save_mask in itertools.product([None, make()], *[[True, False]] * 2):
        tri.affine_act_forward(x, scale, shift, shortcut, relu, save_mask)
    _, mask = tri.affine_act_forward(x, scale, shift, None, True, True)
    for gate_mask, relu in ((mask, True), (None, True), (None, False)):
        tri.affine_act_backward_reduce(dy, x, scale, shift, center, gate_mask, relu, False)
        tri.affine_act_double_backward_reduce(ddx, dy, x, scale, shift, center, gate_mask, relu,
                                              False)
        for want_dshortcut, addends in ((True, ()), (False, ()), (False, (make(),)),
                                        (False, (make(), make()))):
            tri.affine_act_backward_apply(dy, x, scale, shift, gate_mask, relu, a, b, c, center,
                                          want_dshortcut, *addends)
        for residual_is_term in (False, True):
            tri.affine_act_backward_apply_ie_update(dy, x, scale, shift, gate_mask, relu, a, b,
                                                    c, center, e, 0.1, 1.0, residual_is_term)
        for ddshortcut, ddx_scale, addend in ((None, 1.0, None), (make(), 0.5, make())):
            tri.affine_act_double_backward_apply(ddx, dy, x, scale, shift, gate_mask, relu, a, b,
                                                 p, q, center, ddshortcut, ddx_scale, addend)
    tri.affine_act_backward_reduce(dy, x, scale, shift, center, None, True, True)  # [N, C] sums
    for relu, per_sample, y_dtype in ((True, False, torch.float32), (False, False, torch.float32),
                                      (True, True, torch.bfloat16)):
        tri.affine_act_backward_reduce_recompute(dy, x, scale, shift, center, relu, per_sample,
                                                 y_dtype)


def _run_norm_stats(tri, make):
    x = make()
    for groups in (0, 2):
        tri.norm_stats(x, groups)
        for h in (None, torch.tensor(0.7), torch.rand(C) + 0.5):
            for weight, bias in ((None, None), (torch.rand(C), torch.randn(C))):
                tri.norm_stats_and_coefficients(x, groups, weight, bias, h, 0.9, 1e-5)
    tri.merge_stats(*tri.norm_stats_partials(x, 0))


def _run_coefficients(tri):
    from pyeuler.ops import primitives as ref

    h_kinds = {"none": None, "0-dim": torch.tensor(0.7), "[C]": torch.rand(C) + 0.5}
    # (h, affine, batch statistics, statistic gradients): every flag of the kernels both ways
    cases = (("none", False, True, False), ("0-dim", True, True, True), ("[C]", True, False, False))
    for groups, (h_kind, affine, batch_stats, stat_grads) in itertools.product((0, 2), cases):
        batch_stats = batch_stats or groups > 0  # GroupNorm normalises with its own statistics
        stat_shape, sum_shape = ((N, groups), (N, C)) if groups else ((C,), (C,))
        mean, var, h = torch.randn(stat_shape), torch.rand(stat_shape) + 0.5, h_kinds[h_kind]
        weight, bias = (torch.rand(C) + 0.5, torch.randn(C)) if affine else (None, None)
        tri.forward_coefficients(mean, var, weight, bias, h, 0.9, 1e-5, groups, C)
        needs = (True, False, affine, affine, h is not None)
        dmean, dvar = ((torch.randn(stat_shape), torch.randn(stat_shape)) if stat_grads
                       else (None, None))
        args = (torch.randn(sum_shape), torch.randn(sum_shape), dmean, dvar, weight, bias, h, var,
                0.9, 1e-5, groups, batch_stats, needs, C, 7)
        tri.backward_coefficients(*args)
        cotangents = tuple(None if o is None else torch.randn_like(o)
                           for o in ref.backward_coefficients(*args))
        tri.backward_coefficients_vjp(*args, cotangents)
        tri.double_backward_coefficients(*args, cotangents,
                                         (torch.randn(sum_shape), torch.randn(sum_shape)))
        tri.double_backward_coefficients(*args, (None, None, *cotangents[2:]))
    var = torch.rand(C) + 0.5
    tri.backward_coefficients(None, None, None, None, None, None, None, var, 1.0, 1e-5, 0, True,
                              (True, False, False, False, False), C, 7)


def _run_running_stats(tri):
    mean, var = torch.randn(C), torch.rand(C) + 0.5
    for momentum, counter in ((0.1, None), (torch.tensor(0.1), torch.tensor(3)),
                              (None, torch.tensor(3))):
        tri.update_running_stats(torch.zeros(C), torch.ones(C), counter, mean, var, 37, momentum)


def _run_ie(tri, make):
    x, c, fx = make(), make(), make()
    tri.ie_residual(x, c, fx, 1.0)
    tri.ie_update(x, c, fx, 0.1, 0.5)
    tri.ie_residual_with_term(x, c, fx, 1.0, 0.1)
    for theta, addend in ((1.0, None), (0.5, None), (1.0, make())):
        tri.ie_residual_with_term_adjoint(x, c, theta, 0.1, addend)


@pytest.fixture(scope="module")
def launches():
    import pyeuler.triton as tri

    torch.manual_seed(0)
    with recorded_launches() as recorded:
        for layout in ("contiguous", "channels_last"):
            make = _activations(layout, torch.float32)
            _run_affine_act(tri, make)
            _run_norm_stats(tri, make)
            _run_ie(tri, make)
        # 2-byte elements; [N, C] coefficients
        make = _activations("channels_last", torch.bfloat16)
        _run_ie(tri, make)
        tri.affine_act_forward(make(), torch.rand(N, C), torch.rand(N, C), make(), True, True)
        _run_coefficients(tri)
        _run_running_stats(tri)
    return recorded


# ----------------------------------------------------------------------------- tests


@requires_interpreter
def test_every_inventory_kernel_declares_and_is_measured(launches):
    """No kernel of compile_check's inventory escapes: each declares its passes and runs here."""
    from pyeuler.triton._utils import declared_kernels
    from pyeuler.triton.compile_check import SPECS

    inventory = {spec.name for spec in SPECS}
    assert inventory <= set(declared_kernels()), inventory - set(declared_kernels())
    assert set(declared_kernels()) <= inventory, "a declared kernel missing from compile_check"
    assert inventory <= {launch.kernel for launch in launches}, \
        inventory - {launch.kernel for launch in launches}


@requires_interpreter
@pytest.mark.parametrize("kernel", sorted(_exact_operands()))
def test_declared_passes_match_the_accesses(launches, kernel):
    exact = _exact_operands()[kernel]
    ran = [launch for launch in launches if launch.kernel == kernel]
    assert ran, f"{kernel} never launched"
    problems = [problem for launch in ran for problem in mismatches(launch, exact)]
    assert not problems, "\n".join(problems[:20])
    # every activation-sized operand was measured streaming in some launch, not only declared
    streamed = {op.argument for launch in ran for op in launch.operands
                if op.argument in exact and op.declared}
    assert streamed == exact, f"{kernel}: never measured streaming {sorted(exact - streamed)}"


@requires_interpreter
def test_a_kernel_that_re_reads_x_is_caught():
    """The check can fail: a kernel that reads x twice, declared as one pass, is reported;
    declared as two, it passes; an operand declared but never touched is reported too."""
    import triton
    import triton.language as tl

    @triton.jit
    def _twice_kernel(x_ptr, y_ptr, unused_ptr, numel, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        ok = offsets < numel
        first = tl.load(x_ptr + offsets, mask=ok, other=0.0)
        again = tl.load(x_ptr + offsets, mask=ok, other=0.0)
        tl.store(y_ptr + offsets, first + again, mask=ok)

    x, y, unused = torch.randn(100), torch.empty(100), torch.empty(100)
    log = _Accesses()
    with _intercepted(log):
        log.recording = True
        _twice_kernel[(1,)](x, y, unused, 100, BLOCK=128)
        log.recording = False
    exact = {"x_ptr", "y_ptr", "unused_ptr"}

    def check(declared):
        operands = [(name, t, declared[name]) for name, t in
                    (("x_ptr", x), ("y_ptr", y), ("unused_ptr", unused))]
        return mismatches(_measure("_twice_kernel", operands, log), exact)

    one_pass = check({"x_ptr": 1, "y_ptr": 1, "unused_ptr": 0})
    assert len(one_pass) == 1 and "x_ptr" in one_pass[0] and "measured 2.000" in one_pass[0]
    assert check({"x_ptr": 2, "y_ptr": 1, "unused_ptr": 0}) == []
    assert len(check({"x_ptr": 2, "y_ptr": 1, "unused_ptr": 1})) == 1
    torch.testing.assert_close(y, 2 * x)


def test_an_undeclared_kernel_or_operand_is_an_error():
    from pyeuler.triton._utils import declare_passes, operand_passes

    with pytest.raises(KeyError, match="declares no passes"):
        operand_passes("_no_such_kernel", (), {})
    with pytest.raises(ValueError, match="name no argument"):
        declare_passes({"y_ptr": 1})(_kernel("_ie_residual_kernel"))
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="fx_ptr needs a declared pass count"):
        operand_passes("_affine_act_forward_kernel", (),
                       {"x_ptr": x, "y_ptr": x, "fx_ptr": x, "HAS_SHORTCUT": False,
                        "SAVE_MASK": False})
    passes = {argument: count for argument, _, count in operand_passes(
        "_ie_update_kernel", (x, x, x, x, 4, 0.2, 1.0), {})}
    assert passes == {"x_ptr": 1, "e_ptr": 1, "v_ptr": 1, "out_ptr": 1}
