"""Compile every Triton kernel of :mod:`pyeuler.triton` for an NVIDIA GPU, without one.

    python -m pyeuler.triton.compile_check [--arch 90] [--jobs 2]

CI has no GPU and tests the kernels in the CPU interpreter, which never lowers them, so a
kernel the GPU compiler rejects would pass there.  This runs the real pipeline (TTIR →
TTGIR → LLVM → PTX → cubin, ptxas included) for sm_90 for each data dtype and the
constexpr combinations that select different code, and exits non-zero on any failure.
It must run without ``TRITON_INTERPRET`` (the interpreter replaces the JIT functions).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field

DATA = "data"  # pointer to activation-like tensors: x, dy, y, the shortcut, dx
DATA_DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class KernelSpec:
    """How the host launches one kernel: argument types and constexpr values that matter."""

    module: str
    name: str
    pointers: dict[str, str]  # argument -> DATA or a Triton pointer type ("*fp32", "*u1")
    blocks: dict[str, int] = field(default_factory=dict)  # block sizes the host would pick
    flags: tuple[str, ...] = ()  # boolean constexprs
    floats: tuple[str, ...] = ()  # float scalar arguments (fp32); other scalars are ints
    outer_block: tuple[str, str] | None = None  # (heuristic block, inner block): TILE // inner


_STATS_PARTS = {"count_ptr": "*fp32", "mean_ptr": "*fp32", "m2_ptr": "*fp32"}
_GRAD_SUM_PTRS = {"dy_ptr": DATA, "x_ptr": DATA, "ddx_ptr": DATA, "scale_ptr": "*fp32",
                  "shift_ptr": "*fp32", "center_ptr": "*fp32", "mask_ptr": "*u1", "w_parts_ptr": "*fp32",
                  "wx_parts_ptr": "*fp32", "wg_parts_ptr": "*fp32", "y_ptr": DATA}
_GRAD_SUM_FLAGS = ("PER_SAMPLE", "LOAD_MASK", "RECOMPUTE_MASK", "DOUBLE_BACKWARD",
                   "ACTIVATION_OUT", "WIDE_INDEX")

# BatchNorm (channel chunks, one channel per group) and GroupNorm (a groups × channels tile)
_COEFFICIENT_BLOCKS = ({"BLOCK_G": 1024, "BLOCK_J": 1}, {"BLOCK_G": 32, "BLOCK_J": 32})
_COEFFICIENT_PTRS = dict.fromkeys(
    ("sum_g_ptr", "sum_gxc_ptr", "dmean_ptr", "dvar_ptr", "weight_ptr", "bias_ptr", "h_ptr",
     "var_ptr", "a_ptr", "b_ptr", "c_ptr", "dweight_ptr", "dbias_ptr", "dh_ptr"), "*fp32")
_COEFFICIENT_VJP_PTRS = dict.fromkeys(
    ("sum_g_ptr", "sum_gxc_ptr", "dvar_ptr", "weight_ptr", "bias_ptr", "h_ptr", "var_ptr",
     "cot_a_ptr", "cot_b_ptr", "cot_c_ptr", "cot_dweight_ptr", "cot_dbias_ptr", "cot_dh_ptr",
     "cot_sum_g_ptr", "cot_sum_gxc_ptr", "a_ptr", "b_ptr", "d_sum_g_ptr", "d_sum_gxc_ptr",
     "d_dmean_ptr", "d_dvar_ptr", "d_weight_ptr", "d_bias_ptr", "d_h_ptr", "d_var_ptr",
     "d_mean_ptr"), "*fp32")

SPECS = (
    KernelSpec("pyeuler.triton.norm_stats", "_channel_stats_partials_kernel",
               {"x_ptr": DATA, **_STATS_PARTS}, {"BLOCK_C": 32}, ("WIDE_INDEX",),
               outer_block=("BLOCK_R", "BLOCK_C")),
    KernelSpec("pyeuler.triton.norm_stats", "_segment_stats_partials_kernel",
               {"x_ptr": DATA, **_STATS_PARTS}, {"BLOCK_I": 256}, ("WIDE_INDEX",),
               outer_block=("BLOCK_O", "BLOCK_I")),
    *(KernelSpec("pyeuler.triton.norm_stats", "_merge_stats_kernel",
                 {**_STATS_PARTS, "out_count_ptr": "*fp32", "out_mean_ptr": "*fp32",
                  "out_m2_ptr": "*fp32", "out_var_ptr": "*fp32", "weight_ptr": "*fp32",
                  "bias_ptr": "*fp32", "h_ptr": "*fp32", "scale_ptr": "*fp32",
                  "shift_ptr": "*fp32"}, {"BLOCK_K": 1024, "H_MODE": h_mode},
                 ("COEFFICIENTS", "HAS_WEIGHT", "HAS_BIAS"), floats=("h_value", "eps"))
      for h_mode in (0, 1, 2)),
    KernelSpec("pyeuler.triton.affine_act", "_affine_act_forward_kernel",
               {"x_ptr": DATA, "scale_ptr": "*fp32", "shift_ptr": "*fp32", "shortcut_ptr": DATA,
                "y_ptr": DATA, "mask_ptr": "*u1"}, {"BLOCK_I": 64},
               ("CHANNELS_LAST", "PER_SAMPLE", "HAS_SHORTCUT", "RELU", "SAVE_MASK", "WIDE_INDEX"),
               outer_block=("BLOCK_O", "BLOCK_I")),
    KernelSpec("pyeuler.triton.affine_act", "_grad_sums_columns_kernel", _GRAD_SUM_PTRS,
               {"BLOCK_C": 64}, _GRAD_SUM_FLAGS, outer_block=("BLOCK_R", "BLOCK_C")),
    KernelSpec("pyeuler.triton.affine_act", "_grad_sums_planes_kernel", _GRAD_SUM_PTRS,
               {"BLOCK_S": 1024}, _GRAD_SUM_FLAGS, outer_block=("BLOCK_P", "BLOCK_S")),
    KernelSpec("pyeuler.triton.affine_act", "_sum_partials_kernel",
               dict.fromkeys(("w_parts_ptr", "wx_parts_ptr", "wg_parts_ptr", "w_sum_ptr",
                              "wx_sum_ptr", "wg_sum_ptr"), "*fp32"), {"BLOCK_K": 1024},
               ("THREE_SUMS",)),
    KernelSpec("pyeuler.triton.affine_act", "_affine_act_backward_apply_kernel",
               {"dy_ptr": DATA, "x_ptr": DATA, "scale_ptr": "*fp32", "shift_ptr": "*fp32",
                "mask_ptr": "*u1", "a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32",
                "center_ptr": "*fp32", "dx_ptr": DATA, "dshortcut_ptr": DATA, "residual_ptr": DATA,
                "dx_addend_ptr": DATA, "dx_addend2_ptr": DATA},
               {"BLOCK_I": 32},
               ("CHANNELS_LAST", "PER_SAMPLE", "LOAD_MASK", "RECOMPUTE_MASK", "WANT_DSHORTCUT",
                "IE_UPDATE", "HAS_DX_ADDEND", "HAS_DX_ADDEND2", "WIDE_INDEX"),
               floats=("residual_coef", "v_coef"), outer_block=("BLOCK_O", "BLOCK_I")),
    KernelSpec("pyeuler.triton.affine_act", "_affine_act_double_backward_apply_kernel",
               {"ddx_ptr": DATA, "dy_ptr": DATA, "x_ptr": DATA, "scale_ptr": "*fp32",
                "shift_ptr": "*fp32", "mask_ptr": "*u1", "a_ptr": "*fp32", "b_ptr": "*fp32",
                "p_ptr": "*fp32", "q_ptr": "*fp32", "center_ptr": "*fp32", "ddshortcut_ptr": DATA,
                "dxx_addend_ptr": DATA, "ddy_ptr": DATA, "dxx_ptr": DATA},
               {"BLOCK_I": 32},
               ("CHANNELS_LAST", "PER_SAMPLE", "LOAD_MASK", "RECOMPUTE_MASK", "HAS_DDSHORTCUT",
                "SCALE_DDX", "HAS_DXX_ADDEND", "WIDE_INDEX"),
               floats=("ddx_scale",), outer_block=("BLOCK_O", "BLOCK_I")),
    *(KernelSpec("pyeuler.triton.coefficients", "_forward_coefficients_kernel",
                 dict.fromkeys(("mean_ptr", "var_ptr", "weight_ptr", "bias_ptr", "h_ptr",
                                "scale_ptr", "shift_ptr"), "*fp32"),
                 {**blocks, "H_MODE": h_mode}, ("HAS_WEIGHT", "HAS_BIAS"),
                 floats=("h_value", "eps"))
      for blocks in _COEFFICIENT_BLOCKS for h_mode in (0, 1, 2)),
    *(KernelSpec("pyeuler.triton.coefficients", "_backward_coefficients_kernel",
                 _COEFFICIENT_PTRS, {**blocks, "H_MODE": h_mode},
                 ("HAS_SUMS", "HAS_DMEAN", "HAS_DVAR", "HAS_WEIGHT", "HAS_BIAS", "NEED_WEIGHT",
                  "NEED_BIAS", "NEED_H", "CENTERED", "PER_SAMPLE"),
                 floats=("h_value", "eps", "inv_count"))
      for blocks in _COEFFICIENT_BLOCKS for h_mode in (0, 1, 2)),
    *(KernelSpec("pyeuler.triton.coefficients", "_backward_coefficients_vjp_kernel",
                 _COEFFICIENT_VJP_PTRS, {**blocks, "H_MODE": h_mode},
                 ("HAS_SUMS", "HAS_DVAR", "HAS_WEIGHT", "HAS_BIAS", "LEARNABLE_STEP_W", "COT_A",
                  "COT_B", "COT_C", "COT_DWEIGHT", "COT_DBIAS", "COT_DH", "COT_SUM_G",
                  "COT_SUM_GXC", "WANT_AB", "WANT_D_SUM_G", "WANT_D_SUM_GXC", "WANT_D_DMEAN",
                  "WANT_D_DVAR", "WANT_D_WEIGHT", "WANT_D_BIAS", "WANT_D_H", "WANT_D_VAR",
                  "WANT_D_MEAN", "CENTERED"),
                 floats=("h_value", "eps", "inv_count"))
      for blocks in _COEFFICIENT_BLOCKS for h_mode in (0, 1, 2)),
    *(KernelSpec("pyeuler.triton.coefficients", "_update_running_stats_kernel",
                 {"running_mean_ptr": DATA, "running_var_ptr": DATA, "counter_ptr": "*i64",
                  "mean_ptr": "*fp32", "var_ptr": "*fp32", "momentum_ptr": "*fp32"},
                 {"BLOCK": 1024, "MOMENTUM_MODE": mode, **counter}, flags,
                 floats=("momentum", "unbiased_factor"))
      # the cumulative average (mode 2) always has the counter
      for mode, counter, flags in ((0, {}, ("HAS_COUNTER",)), (1, {}, ("HAS_COUNTER",)),
                                   (2, {"HAS_COUNTER": True}, ()))),
    KernelSpec("pyeuler.triton.ie", "_ie_residual_kernel",
               {"x_ptr": DATA, "c_ptr": DATA, "fx_ptr": DATA, "e_ptr": DATA, "term_ptr": DATA},
               flags=("WITH_TERM", "WIDE_INDEX"), floats=("theta", "two_step_size")),
    KernelSpec("pyeuler.triton.ie", "_ie_residual_adjoint_kernel",
               {"de_ptr": DATA, "dterm_ptr": DATA, "dx_addend_ptr": DATA, "dx_ptr": DATA,
                "dc_ptr": DATA, "dfx_ptr": DATA},
               flags=("WRITE_DFX", "HAS_DX_ADDEND", "WIDE_INDEX"),
               floats=("theta", "two_step_size")),
    KernelSpec("pyeuler.triton.ie", "_ie_update_kernel",
               {"x_ptr": DATA, "e_ptr": DATA, "v_ptr": DATA, "out_ptr": DATA},
               flags=("WIDE_INDEX",), floats=("two_step_size", "theta")),
)


@dataclass(frozen=True)
class Job:
    spec: KernelSpec
    dtype: str | None  # None: the kernel has no data-typed pointer
    flags: tuple[tuple[str, bool], ...]
    tile: int | None  # autotune config's TILE, None if not autotuned
    num_warps: int

    def label(self) -> str:
        on = [name for name, value in self.flags if value] or ["-"]
        tile = f" TILE={self.tile}" if self.tile else ""
        return f"{self.spec.name}[{self.dtype or 'fp32'}{tile} w{self.num_warps} {'+'.join(on)}]"


def _unwrap(kernel):
    """The JITFunction under ``triton.autotune`` / ``triton.heuristics`` wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _configs(kernel) -> list[tuple[int | None, int]]:
    """``(TILE, num_warps)`` of each autotune config, else what the host launches with."""
    from pyeuler.triton._utils import REDUCTION_TILE, REDUCTION_WARPS

    configs = getattr(kernel, "configs", None)
    if configs:
        return [(config.kwargs["TILE"], config.num_warps) for config in configs]
    if "TILE" in _unwrap(kernel).arg_names:  # reductions: one fixed tiling
        return [(REDUCTION_TILE, REDUCTION_WARPS)]
    return [(None, 4)]


def _flag_combos(flags: tuple[str, ...], first_dtype: bool) -> list[dict[str, bool]]:
    """Flag settings to compile for one dtype.

    First dtype: all off, all on (every ``if FLAG`` branch) and each flag alone.  Other
    dtypes only change the data loads and stores: every optional one on, with the int32
    offsets that real sizes use.
    """
    if not first_dtype:
        return [{**dict.fromkeys(flags, True), **({"WIDE_INDEX": False} if "WIDE_INDEX" in flags else {})}]
    combos = [dict.fromkeys(flags, False), dict.fromkeys(flags, True)]
    if len(flags) > 1:
        combos += [{**dict.fromkeys(flags, False), flag: True} for flag in flags]
    return combos


def jobs() -> list[Job]:
    out = []
    for spec in SPECS:
        kernel = getattr(importlib.import_module(spec.module), spec.name)
        configs = _configs(kernel)
        has_data = DATA in spec.pointers.values()
        for dtype in DATA_DTYPES if has_data else (None,):
            first_dtype = dtype in ("fp32", None)
            for combo in _flag_combos(spec.flags, first_dtype):
                out.append(Job(spec, dtype, tuple(combo.items()), *configs[0]))
            if first_dtype:  # other tuning configs: different tiles and warp counts
                for tile, warps in configs[1:]:
                    out.append(Job(spec, dtype, tuple(dict.fromkeys(spec.flags, False).items()), tile, warps))
    return out


def compile_job(job: Job, arch: int) -> tuple[str, float, str | None]:
    """Compile one job to cubin; returns ``(label, seconds, error or None)``."""
    import triton
    from triton.backends.compiler import GPUTarget

    spec = job.spec
    fn = _unwrap(getattr(importlib.import_module(spec.module), spec.name))
    flags = dict(job.flags)
    wide = flags.get("WIDE_INDEX", False)
    constexprs: dict[str, object] = {**spec.blocks, **flags}
    if job.tile is not None:
        constexprs["TILE"] = job.tile
    if spec.outer_block is not None:
        derived, inner = spec.outer_block
        constexprs[derived] = max(1, job.tile // spec.blocks[inner])
    signature, attrs = {}, {}
    for index, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
            if name not in constexprs:
                return job.label(), 0.0, f"no value for constexpr {name}"
        elif name in spec.pointers:
            kind = spec.pointers[name]
            signature[name] = f"*{job.dtype}" if kind == DATA else kind
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-B aligned
        elif name in spec.floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if wide else "i32"
    start = time.perf_counter()
    try:
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": job.num_warps, "enable_fp_fusion": True})
        if not compiled.asm.get("cubin"):
            raise RuntimeError("no cubin produced")
    except Exception as exc:  # report every failure, not only the first
        return job.label(), time.perf_counter() - start, f"{type(exc).__name__}: {exc}"
    return job.label(), time.perf_counter() - start, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--list", action="store_true", help="print the compile jobs and exit")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "no", "off", "n"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter replaces JIT functions)",
              file=sys.stderr)
        return 2

    todo = jobs()
    if args.list:
        print("\n".join(job.label() for job in todo))
        return 0
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # no fork after torch/triton threads start
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        results = list(pool.map(compile_job, todo, [args.arch] * len(todo)))
    failures = [(label, error) for label, _, error in results if error]
    for label, error in failures:
        print(f"FAILED {label}: {error}", file=sys.stderr)
    print(f"compile_check: {len(todo) - len(failures)}/{len(todo)} kernels compiled for sm_{args.arch} "
          f"in {time.perf_counter() - start:.1f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
