"""Validation, memory-layout and launch-size helpers shared by the Triton kernels.

Every kernel works on one of two dense layouts of an ``(N, C, *spatial)`` tensor, with
``S = prod(spatial)``:

- *planar* (contiguous NCHW): element ``(n, c, s)`` at ``(n·C + c)·S + s``; the kernels tile
  ``[planes, S]`` so loads are contiguous along ``s``;
- *channels-last* (``stride(1) == 1``): element at ``(n·S + s)·C + c``; the kernels tile
  ``[rows = N·S, C]`` so loads are contiguous along ``c``.

Because both are dense, every tensor of the same shape and layout shares one offset
formula, so a kernel computes offsets once for x, dy, y, the shortcut, the mask and dx.
Any other layout is copied into one of these two first.

Launch seam: every kernel of this package launches through :class:`Launcher`
(:func:`route_launches`, applied by ``pyeuler/triton/__init__.py``), which offers each
launch to the hook installed with :func:`launch_hook` before running it.  The cost counter
(:mod:`pyeuler.cost`) records launches there, and skips them on fake tensors; it counts
each operand's bytes times the passes the kernel declares over it (:func:`declare_passes`,
above each kernel).
"""

from __future__ import annotations

import contextlib
import functools
import math
from types import ModuleType
from typing import Any, Callable, Iterator

import torch
import triton
from triton.runtime.jit import KernelInterface

# One parser of TRITON_INTERPRET for the whole package: the backend's availability check
# and the kernels' device checks must never disagree about it.
from pyeuler.backend import counted_device, device_type
from pyeuler.backend import triton_interpreted as interpreting

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Offsets are int32 unless a tensor could index past 2**31 (tile padding included).
_INT32_SAFE_NUMEL = 2**31 - 2**20

# ----------------------------------------------------------------------------- launch seam

# hook(kernel name, grid, positional args, keyword args) -> True to skip the launch
LaunchHook = Callable[[str, Any, tuple, dict], bool]
_launch_hook: LaunchHook | None = None


@contextlib.contextmanager
def launch_hook(hook: LaunchHook) -> Iterator[None]:
    """Offer every kernel launch of this package to ``hook`` inside the block.

    ``hook(name, grid, args, kwargs)`` sees the kernel's name and the launch's arguments
    before the launch; if it returns True the kernel is not run (its outputs stay as they
    were allocated).  One hook at a time, process-wide; blocks nest.
    """
    global _launch_hook
    previous, _launch_hook = _launch_hook, hook
    try:
        yield
    finally:
        _launch_hook = previous


def _kernel_name(kernel: KernelInterface) -> str:
    # autotune / heuristics wrappers hold the JIT function as .fn
    while not hasattr(kernel, "__name__") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel.__name__


class Launcher:
    """``kernel[grid](*args)`` through the launch seam; any other attribute is the kernel's.

    ``fn`` is the wrapped kernel, as Triton's own wrappers name theirs, so code that walks
    ``.fn`` down to the ``JITFunction`` (:mod:`pyeuler.triton.compile_check`) still works.
    """

    def __init__(self, kernel: KernelInterface):
        self.fn = kernel
        self.__name__ = _kernel_name(kernel)

    def __getitem__(self, grid):
        launch = self.fn[grid]
        hook = _launch_hook
        if hook is None:  # the hot path: one extra call per launch
            return launch

        def offered(*args, **kwargs):
            if not hook(self.__name__, grid, args, kwargs):
                launch(*args, **kwargs)

        return offered

    def __getattr__(self, name: str):
        if name == "fn":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __repr__(self) -> str:
        return f"Launcher({self.fn!r})"


def route_launches(module: ModuleType) -> None:
    """Wrap each kernel defined at ``module``'s top level in a :class:`Launcher`.

    Launch sites look kernels up as module globals at call time, so wrapping the globals
    once, at import, routes every launch of the module through :func:`launch_hook`.
    """
    for name, value in list(vars(module).items()):
        if isinstance(value, KernelInterface) and name.endswith("_kernel"):
            setattr(module, name, Launcher(value))


# ----------------------------------------------------------------------------- declared passes

# A kernel's passes over its pointer operands, {argument name: passes}, or a function of the
# launch's named arguments (scalars and host-given constexprs) returning that dict.
PassDeclaration = dict[str, int] | Callable[[dict[str, Any]], dict[str, int]]
# kernel name -> (argument names, declaration)
_DECLARED_PASSES: dict[str, tuple[tuple[str, ...], PassDeclaration]] = {}


def _arg_names(kernel) -> tuple[str, ...]:
    # autotune / heuristics wrappers and the JIT (or interpreted) function all carry them
    while not hasattr(kernel, "arg_names") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return tuple(kernel.arg_names)


def declare_passes(passes: PassDeclaration):
    """Decorator: declare how many times a kernel moves each pointer operand through HBM.

    One pass is one read, or one write, of each of the operand's elements; an operand read
    and written in place makes 2, a two-pass kernel that re-reads x declares 2 for x, an
    operand passed but not touched (an absent option's placeholder) 0.  Re-reads of a few
    elements (a reduction's shift row) and of per-channel vectors that stay in cache are not
    passes.  ``passes`` is ``{argument name: passes}`` or, where a constexpr flag decides,
    a function of the launch's named arguments returning it.  :mod:`pyeuler.cost` multiplies
    each operand's bytes by it; ``tests/test_kernel_passes.py`` checks each declaration
    against the loads and stores the kernel issues in the interpreter.

    Raises ValueError at import if a static declaration names an argument the kernel lacks.
    """
    def register(kernel):
        name = _kernel_name(kernel)
        arg_names = _arg_names(kernel)
        if not callable(passes):
            unknown = set(passes) - set(arg_names)
            if unknown:
                raise ValueError(f"{name}: declared passes name no argument of it: "
                                 f"{sorted(unknown)}")
        _DECLARED_PASSES[name] = (arg_names, passes)
        return kernel

    return register


def declared_kernels() -> tuple[str, ...]:
    """Names of the kernels with declared passes."""
    return tuple(_DECLARED_PASSES)


def operand_passes(name: str, args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor, int]]:
    """``(argument, tensor, passes)`` of each tensor operand of one launch of kernel ``name``
    (positional ``args`` and keyword ``kwargs`` as given at the launch site).

    Raises KeyError if the kernel declares no passes, ValueError if a tensor operand is
    missing from its declaration or a pass count is not an int >= 0.
    """
    if name not in _DECLARED_PASSES:
        raise KeyError(f"Triton kernel {name} declares no passes over its operands "
                       "(pyeuler.triton._utils.declare_passes): the cost counter cannot count it")
    arg_names, declaration = _DECLARED_PASSES[name]
    launch = {**dict(zip(arg_names, args)), **kwargs}
    passes = declaration(launch) if callable(declaration) else declaration
    operands = []
    for argument, value in launch.items():
        if not isinstance(value, torch.Tensor):
            continue
        count = passes.get(argument)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{name}: tensor operand {argument} needs a declared pass count "
                             f"(an int >= 0), got {count!r}")
        operands.append((argument, value, count))
    return operands


def autotune_configs(tiles_and_warps: list[tuple[int, int]], interpreter_tile: int) -> list:
    """``triton.Config`` list over a ``TILE`` (elements per program tile) and ``num_warps``.

    The interpreter gets a single config: there is nothing to tune on the CPU, and with one
    config the autotuner never benchmarks.
    """
    if interpreting():
        return [triton.Config({"TILE": interpreter_tile}, num_warps=4)]
    return [triton.Config({"TILE": tile}, num_warps=warps) for tile, warps in tiles_and_warps]


# Reductions use one fixed tiling instead of autotuning: the tiling fixes the summation order,
# and an autotuner's timing-dependent pick would make results differ bitwise between runs.
# 4096-element tiles over 8 warps keep 16 loads per thread in flight per tensor.
REDUCTION_TILE = 4096
REDUCTION_WARPS = 8


def outer_block(tile: int, inner_block: int, n_outer: int) -> int:
    """Rows of a ``[outer, inner]`` tile: fill ``tile`` elements, but no more rows than exist."""
    return max(1, min(tile // inner_block, triton.next_power_of_2(max(n_outer, 1))))


@functools.lru_cache(maxsize=None)
def inner_block(n: int, max_block: int) -> int:
    """Power-of-two block along a contiguous dim of size ``n`` that wastes few lanes.

    C = 160 gets 32 (5 full blocks) rather than 256 (37 % of the lanes masked off).
    Cached: a network has a handful of sizes, and the search costs ~30 µs of host time per
    launch.
    """
    largest = min(triton.next_power_of_2(n), max_block)
    candidates = [b for b in (largest >> i for i in range(6)) if b >= min(16, largest)]
    waste = {b: (triton.cdiv(n, b) * b - n) / (triton.cdiv(n, b) * b) for b in candidates}
    good = [b for b in candidates if waste[b] <= 0.125]
    return good[0] if good else min(candidates, key=lambda b: (waste[b], -b))


def needs_wide_index(*tensors: torch.Tensor) -> bool:
    return any(t.numel() >= _INT32_SAFE_NUMEL for t in tensors)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_targets(device: torch.device) -> tuple[int, int]:
    """``(programs to launch, fewest elements per program)`` for a split reduction.

    On a GPU: 4 programs per SM, each streaming at least 16K elements so the second stage
    stays negligible; inside :func:`pyeuler.backend.counting_device`, the same rule for the
    modelled GPU's SM count.  The interpreter uses tiny values so that the split + merge
    path runs on small test tensors too.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 4 * _sm_count(index), 16384
    counted = counted_device()
    if counted is not None:
        return 4 * counted.sm_count, 16384
    return 8, 64


def num_splits(n_outer: int, elements_per_outer: int, parallel_programs: int,
               device: torch.device) -> tuple[int, int]:
    """Split a reduction's ``n_outer`` rows into chunks, one program (and one partial) each.

    ``parallel_programs`` programs already run side by side (channel blocks, segments);
    returns ``(n_splits, rows_per_split)``.
    """
    target, min_elements = _split_targets(device)
    by_occupancy = max(1, target // max(parallel_programs, 1))
    by_work = max(1, (n_outer * elements_per_outer) // min_elements)
    wanted = max(1, min(by_occupancy, by_work, n_outer))
    rows_per_split = triton.cdiv(n_outer, wanted)
    return triton.cdiv(n_outer, rows_per_split), rows_per_split


# ----------------------------------------------------------------------------- validation


def check_device(t: torch.Tensor, name: str) -> None:
    if device_type(t.device) != "cuda" and not interpreting():
        raise ValueError(
            f"{name} is on {t.device}; the Triton backend needs CUDA tensors "
            "(or TRITON_INTERPRET=1 set before importing triton, to run on the CPU)"
        )


def check_activation(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not 2 <= x.dim() <= 5:
        raise ValueError(f"{name} must be (N, C, *spatial) with 0-3 spatial dims, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 for the Triton backend, got {x.dtype}")
    check_device(x, name)


def check_like(t: torch.Tensor, name: str, x: torch.Tensor, dtypes=SUPPORTED_DTYPES) -> None:
    """``t`` must have x's shape and device and one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != x.shape:
        raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be {names}, got {t.dtype}")


def check_float(value: float, name: str) -> float:
    """A Python number passed as a kernel's float scalar (a tensor would force a sync)."""
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    return float(value)


def check_coefficient(v: torch.Tensor, name: str, x: torch.Tensor) -> None:
    """A per-channel ``[C]`` or per-(sample, channel) ``[N, C]`` float32 coefficient."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    n, c = x.shape[0], x.shape[1]
    if tuple(v.shape) not in ((c,), (n, c)):
        raise ValueError(f"{name} must have shape [C] = [{c}] or [N, C] = [{n}, {c}], got {list(v.shape)}")
    if v.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {v.dtype}")
    if v.device != x.device:
        raise ValueError(f"{name} is on {v.device} but x is on {x.device}")


def coefficients(x: torch.Tensor, **named: torch.Tensor) -> tuple[bool, list[torch.Tensor]]:
    """Validate coefficients and give them one indexing scheme for the kernel.

    Returns ``(per_sample, tensors)``: all ``[C]`` (per_sample False), or all ``[N, C]``
    when any is; a ``[C]`` one is then expanded (N·C floats, negligible next to x).
    """
    for name, v in named.items():
        check_coefficient(v, name, x)
    per_sample = any(v.dim() == 2 for v in named.values())
    n, c = x.shape[0], x.shape[1]
    out = [(v.expand(n, c) if per_sample else v).contiguous() for v in named.values()]
    return per_sample, out


# ----------------------------------------------------------------------------- layouts


def spatial_size(x: torch.Tensor) -> int:
    return math.prod(x.shape[2:])


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.movedim(1, -1).is_contiguous()


def dense_layout(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(x or a contiguous copy, channels_last)`` for the kernels' two layouts.

    With ``S == 1`` or ``C == 1`` both layouts have the same offsets; channels-last tiling
    is then chosen for ``S == 1`` (rows of C contiguous channels) and planar otherwise.
    """
    if x.is_contiguous():
        return x, spatial_size(x) == 1
    if _is_channels_last(x):
        return x, True
    x = x.contiguous()
    return x, spatial_size(x) == 1


def same_layout(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` with ``ref``'s (dense) strides, copying only if they differ."""
    if all(a == b for size, a, b in zip(ref.shape, t.stride(), ref.stride()) if size > 1):
        return t
    out = torch.empty_like(ref, dtype=t.dtype)
    out.copy_(t)
    return out
