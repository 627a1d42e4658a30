"""What one training step launches and moves on a GPU, counted on a CPU without arithmetic.

:func:`cost` runs one full training step of a :class:`StepConfig` (forward, loss, backward,
optimizer; with ``adv`` the attack's input-gradient passes first) at its real shapes on
fake tensors (``FakeTensorMode``: shapes, dtypes and strides, no data), and records every
kernel it would launch with a ``TorchDispatchMode``.  It then times the host side of the
same step on small real CPU tensors.  ``pyeuler cost`` is its command line.

The step takes the code path CUDA tensors take, through explicit seams only:

- :func:`pyeuler.backend.counting_device`: CPU tensors stand for CUDA tensors of a
  :class:`~pyeuler.backend.DeviceModel` (backend resolution, device checks, the SM count
  that sizes split reductions, the CUDA backend's ops without the compiled extension);
- :func:`pyeuler.triton._utils.launch_hook`: every Triton launch is offered to the recorder,
  which records its tensor arguments and skips it;
- pyeuler's ``torch.library`` custom ops are expanded: the recorder re-dispatches each to
  its Python body with itself still active, so the launches inside are seen (their fake
  implementations would hide them), while their autograd formulas run unchanged;
- ``pyeuler::cuda_*`` ops are kernels: :data:`pyeuler.cuda.KERNEL_LAUNCHES` each;
- CUDA's autocast policy is emulated on CPU autocast (ops that CUDA autocast runs in
  float32 and CPU autocast does not); SGD runs fused, as ``pyeuler train`` runs it on CUDA
  (:func:`pyeuler.robust.make_optimizer`), except for ``"reference"``, plain PyTorch, whose
  SGD runs ``foreach=True``, its default on CUDA;
- host reads (``.item()``, ``bool(t)``) are counted as ``syncs`` and answered with 0/False:
  fake tensors have no values.

Classes of launches (``launches_by_class``, ``hbm_bytes_by_class``):

- ``conv``: convolutions, forward, data gradient and weight gradient (one launch each);
- ``gemm``: matrix products;
- ``fused``: a Triton launch or a ``pyeuler::cuda_*`` kernel with an operand of 64 KiB or more;
- ``tiny``: every operand under 64 KiB (per-channel vectors, scalars), whatever launched it:
  ATen, Triton or CUDA.  Such a kernel's cost is its launch, not its bytes;
- ``activation``: every other ATen kernel (elementwise, reductions, copies, native norms);
- ``optimizer``: every launch of the optimizer step.

HBM bytes of a kernel: each distinct element of each operand, read or written, once (an
in-place operand counts twice: read and write), times the passes the kernel declares over
it: :data:`_PASSES` for ATen (torch's native BatchNorm reads its input twice),
:func:`pyeuler.triton._utils.declare_passes` next to each Triton kernel (checked against
the interpreter's loads and stores by ``tests/test_kernel_passes.py``; a kernel without a
declaration is an error here), :data:`pyeuler.cuda.KERNEL_PASSES` for the CUDA extension.
An operand a launch passes but does not touch (an absent option's placeholder) is not
counted.  A lower bound: caches are ignored, and so are layout copies inside the CUDA
extension's C++ wrappers.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import pyeuler
from pyeuler.backend import H100, DeviceModel, counting_device

__all__ = ["CLASSES", "PHASES", "TINY_BYTES", "LAUNCH_GAP_US", "SKIPPED_WHEN_CAPTURED", "StepConfig", "Workload", "Kernel", "Recorder",
           "StepCount", "CostReport", "cost", "count_step", "host_ms", "build_workload",
           "run_step", "probe_step", "kernel_class", "operand_bytes", "foreach_launches",
           "source_revision"]

CLASSES = ("conv", "gemm", "fused", "tiny", "activation", "optimizer")
PHASES = ("attack", "forward", "backward", "optimizer")
TINY_BYTES = 64 * 1024

# Input shape and classes of each data set of the training CLI (pyeuler.data's loaders).
DATA_SHAPES = {"cifar10": ((3, 32, 32), 10), "digits": ((1, 8, 8), 10), "moons": ((2,), 2)}

# The host-time probe: the same model and step at these sizes (see host_ms).
PROBE_WIDTH, PROBE_BATCH, PROBE_IMAGE = 2, 4, 8

# Idle GPU time between two consecutive kernels, µs per launch (model parameters, not
# measured by pyeuler; docs/benchmarks.md §9).  Eager dispatch: 1.4, fitted by the
# project's independent cost model to the H100 anchors of docs/benchmarks.md §4.1,
# (step − profiled kernel time) / launches at K = 0 and K = 1 detached.  A CUDA graph
# replay: 0.5, that model's assumption (no measurement yet: `pyeuler bench --cuda-graph`
# on a GPU measures it).
LAUNCH_GAP_US = {"eager": 1.4, "graph": 0.5}
# Host reads of an eager step that a captured one skips (pyeuler.ops.dispatch.capture_active):
# the attacks' check that their inputs lie in [0, 1].
SKIPPED_WHEN_CAPTURED = ("robust/attacks.py:_check",)


@dataclass(frozen=True)
class StepConfig:
    """One training step, named as ``pyeuler train`` names it.

    bf16 means autocast to bfloat16 with channels_last model and input, as the headline
    workload of docs/benchmarks.md; fp32 means float32, contiguous.  ``attack_steps`` is the
    number of PGD / TRADES steps whose input-gradient passes run before the step (``adv``
    not none).
    """

    model: str = "wrn-34-10"
    data: str = "cifar10"
    batch_size: int = 128
    precision: str = "bf16"
    ie_steps: int = 1
    grad: str = "unrolled"
    norm: str = "batch"
    adv: str = "none"
    attack_steps: int = 3
    backend: str = "triton"
    h: float = 1.0
    ie_step_size: float = 0.1
    theta: float = 1.0
    eps: float = 8 / 255
    beta: float = 6.0
    recompute: str = "selective"  # what unrolled IE-Skips recompute (pyeuler.nn.IESkip)

    def __post_init__(self):
        from pyeuler.robust.training import ADV_METHODS

        checks = {"precision": ("bf16", "fp32"), "data": tuple(DATA_SHAPES),
                  "grad": ("unrolled", "detached", "implicit"), "norm": ("batch", "group"),
                  "adv": ADV_METHODS, "backend": ("reference", "eager", "triton", "cuda")}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("batch_size", "attack_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    @property
    def label(self) -> str:
        """``backend-K<k>-<grad>-<precision>`` (the cost model's names), plus ``-group`` and
        ``-<adv><attack steps>`` where they differ from the headline workload."""
        label = f"{self.backend}-K{self.ie_steps}-{self.grad}-{self.precision}"
        if self.norm != "batch":
            label += f"-{self.norm}"
        if self.adv != "none":
            label += f"-{self.adv}{self.attack_steps}"
        if self.recompute != "selective":
            label += f"-recompute-{self.recompute}"
        return label


# ----------------------------------------------------------------------------- the step


@dataclass
class Workload:
    """What a step trains: the model, one batch and the optimizer."""

    model: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    optimizer: torch.optim.Optimizer


def build_workload(config: StepConfig, input_shape: tuple[int, ...] | None = None) -> Workload:
    """Model, batch and optimizer of ``config``, on the default device, under whatever
    tensor mode is active (fake tensors when counting).  ``input_shape`` (one sample's)
    defaults to the data set's."""
    from pyeuler.robust.training import make_optimizer
    from pyeuler.robust.zoo import build_model

    data_shape, num_classes = DATA_SHAPES[config.data]
    input_shape = input_shape or data_shape
    model = build_model(config.model, input_shape, num_classes, h=config.h,
                        ie_steps=config.ie_steps, ie_step_size=config.ie_step_size,
                        theta=config.theta, grad=config.grad, norm=config.norm,
                        recompute=config.recompute, backend=config.backend)
    x = torch.rand(config.batch_size, *input_shape)
    y = torch.randint(0, num_classes, (config.batch_size,))
    if config.precision == "bf16" and x.dim() == 4:
        # Module.to(memory_format=...) would swap the parameters, which fake tensors refuse
        for p in model.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()
    if config.backend == "reference":  # plain PyTorch: SGD's default for CUDA parameters
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    else:  # as pyeuler train steps CUDA parameters
        optimizer = make_optimizer("sgd", model.parameters(), lr=0.01, momentum=0.9, fused=True)
    return Workload(model, x, y, optimizer)


def run_step(config: StepConfig, work: Workload,
             on_phase: Callable[[str], None] = lambda phase: None) -> None:
    """One training step as :func:`pyeuler.robust.train_epoch` runs it for one batch
    (without its host-side bookkeeping); ``on_phase`` is told where each phase starts.

    The ``"reference"`` backend runs with torch's native norms, as ``pyeuler bench`` times
    it: the baseline is plain PyTorch as users write it, not the oracle's decomposed norms.
    """
    from pyeuler.ops.reference_norm import native_norms
    from pyeuler.robust.attacks import default_alpha, pgd
    from pyeuler.robust.training import trades_adversarial, trades_loss

    model, x, y = work.model, work.x, work.y
    alpha = default_alpha(config.eps, config.attack_steps)
    norms = native_norms() if config.backend == "reference" else contextlib.nullcontext()
    autocast = (torch.autocast(x.device.type, dtype=torch.bfloat16)
                if config.precision == "bf16" else contextlib.nullcontext())
    with norms:
        with autocast:
            if config.adv == "none":
                on_phase("forward")
                loss = F.cross_entropy(model(x), y)
            elif config.adv == "pgd":  # pgd_at_loss, split at the phase boundary
                on_phase("attack")
                x_adv = pgd(model, x, y, config.eps, alpha, config.attack_steps,
                            random_start=True)
                on_phase("forward")
                loss = F.cross_entropy(model(x_adv), y)
            else:
                on_phase("attack")
                x_adv = trades_adversarial(model, x, config.eps, alpha, config.attack_steps)
                on_phase("forward")
                loss, _ = trades_loss(model, x, y, beta=config.beta, eps=config.eps,
                                      alpha=alpha, steps=config.attack_steps, x_adv=x_adv)
        work.optimizer.zero_grad(set_to_none=True)
        on_phase("backward")
        loss.backward()
    on_phase("optimizer")
    work.optimizer.step()


# ----------------------------------------------------------------------------- classification


def operand_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t`` a kernel touches: an expanded (stride 0)
    dimension counts once."""
    if t.numel() == 0:
        return 0
    elements = math.prod(size for size, stride in zip(t.shape, t.stride(), strict=True) if stride)
    return elements * t.element_size()


def kernel_class(kind: str, max_operand_bytes: int) -> str:
    """Class of one kernel (before the optimizer phase claims its own).

    ``kind`` is ``"conv"``, ``"gemm"``, ``"triton"``, ``"cuda"`` or ``"aten"``;
    ``max_operand_bytes`` its largest operand (:func:`operand_bytes`).
    """
    if kind in ("conv", "gemm"):
        return kind
    if max_operand_bytes < TINY_BYTES:
        return "tiny"
    return "fused" if kind in ("triton", "cuda") else "activation"


# multi_tensor_apply's limits (ATen/native/cuda/MultiTensorApply.cuh): tensors per launch by
# the number of tensor lists, blocks per launch, elements per block
_MTA_MAX_TENSORS = (110, 64, 48, 36, 30)
_MTA_MAX_BLOCKS = 320
_MTA_CHUNK = 65536


def foreach_launches(numels: list[int], depth: int) -> int:
    """Kernels one ``_foreach_*`` op launches over tensors of ``numels`` elements, with
    ``depth`` tensor lists (outputs included): multi_tensor_apply's packing, replayed."""
    max_tensors = _MTA_MAX_TENSORS[min(depth, len(_MTA_MAX_TENSORS)) - 1]
    launches = tensors = blocks = 0
    for numel in numels:
        if numel == 0:
            continue
        tensors += 1
        chunks = -(-numel // _MTA_CHUNK)
        for chunk in range(chunks):
            blocks += 1
            last_chunk = chunk == chunks - 1
            if (tensors == max_tensors and last_chunk) or blocks == _MTA_MAX_BLOCKS:
                launches += 1
                blocks = 0
                tensors = 0 if last_chunk else 1  # a split tensor carries over
    return launches + (blocks > 0)


_CONV = {"convolution", "_convolution", "cudnn_convolution", "cudnn_convolution_transpose",
         "convolution_overrideable"}
_GEMM = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "dot", "mv", "addmv"}
# no kernel: allocations from the caching allocator, views under another name, metadata
_NO_KERNEL = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided",
              "empty_permuted", "_unsafe_view", "set_", "resize_", "as_strided_", "detach_",
              "squeeze_", "unsqueeze_", "t_", "transpose_"}
# ops that overwrite their first operand without reading it
_WRITE_ONLY = {"copy_", "fill_", "zero_", "uniform_", "normal_", "random_", "bernoulli_",
               "exponential_"}
# launches per call of ATen ops that launch more than one kernel on CUDA
_LAUNCHES = {
    # statistics, running-statistics update, normalisation
    "native_batch_norm": 3, "_native_batch_norm_legit": 3, "_batch_norm_with_update": 3,
    "_native_batch_norm_legit_functional": 3, "cudnn_batch_norm": 3,
    # reduction, elementwise
    "native_batch_norm_backward": 2, "batch_norm_backward": 2, "cudnn_batch_norm_backward": 2,
    # zero fill, scatter
    "nll_loss_backward": 2, "nll_loss2d_backward": 2,
}
# declared passes of multi-pass kernels: argument index -> times it is read
_PASSES = {name: {0: 2} for name in ("native_batch_norm", "_native_batch_norm_legit",
                                     "_batch_norm_with_update", "cudnn_batch_norm",
                                     "_native_batch_norm_legit_functional")}
_PASSES |= {name: {0: 2, 1: 2} for name in ("native_batch_norm_backward", "batch_norm_backward",
                                            "cudnn_batch_norm_backward")}


@dataclass(frozen=True)
class Kernel:
    """One recorded kernel (or several: ``launches``) and where it came from."""

    name: str  # "aten.add.Tensor", "triton:_affine_act_forward_kernel", "pyeuler.cuda_..."
    cls: str  # a class of CLASSES other than "optimizer"
    launches: int
    bytes: int  # HBM bytes, passes included
    phase: str  # one of PHASES
    source: str  # innermost pyeuler "file:function < caller" (or "autograd:<node>", "torch")
    context: str  # custom op being expanded, autograd node running, or the phase

    @property
    def step_class(self) -> str:
        return "optimizer" if self.phase == "optimizer" else self.cls


# ----------------------------------------------------------------------------- recording


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


_PACKAGE_DIR = os.path.dirname(os.path.abspath(pyeuler.__file__)) + os.sep
_THIS_FILE = os.path.abspath(__file__)


def _source(frame) -> str:
    """``file:function < caller`` of the two innermost pyeuler frames of the step on the
    stack from ``frame`` (the caller names the use of small helpers such as ``_times``);
    ``autograd:<node>`` or ``torch`` when the step has no pyeuler frame there."""
    names = []
    while frame is not None and len(names) < 2:
        path = frame.f_code.co_filename
        if path == _THIS_FILE:  # the step runner: what is above it is not the step
            break
        if path.startswith(_PACKAGE_DIR):
            where = path[len(_PACKAGE_DIR):]
            same_file = names and names[0][0] == where
            names.append((where, frame.f_code.co_name if same_file
                          else f"{where}:{frame.f_code.co_name}"))
        frame = frame.f_back
    if names:
        return " < ".join(name for _, name in names)
    node = torch._C._current_autograd_node()
    return f"autograd:{_node_name(node)}" if node is not None else "torch"


_BACKWARD_OF = re.compile(r"GeneratedBackwardFor_pyeuler_(\w+?)_default(?:Backward)?$")


def _node_name(node) -> str:
    """An autograd node's name; a pyeuler custom op's backward as ``backward of <op>``."""
    match = _BACKWARD_OF.match(node.name())
    return f"backward of {match.group(1)}" if match else node.name()


_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def _cuda_operands(func, name: str, args, kwargs, out) -> list[tuple[torch.Tensor, int]]:
    """``(tensor, passes)`` of each operand of a ``pyeuler::cuda_*`` op: its arguments by
    :data:`pyeuler.cuda.KERNEL_PASSES`, its results one pass each."""
    from pyeuler.cuda import KERNEL_PASSES

    if name not in KERNEL_PASSES:
        raise KeyError(f"pyeuler::{name} declares no passes (pyeuler.cuda.KERNEL_PASSES): "
                       "the cost counter cannot count it")
    op = dict(zip((argument.name for argument in func._schema.arguments), args)) | kwargs
    passes = KERNEL_PASSES[name](op)
    return ([(t, passes.get(argument, 1)) for argument, value in op.items()
             for t in _tensors(value)] + [(t, 1) for t in _tensors(out)])


class Recorder(TorchDispatchMode):
    """Records every kernel of the ops that reach it, and the Triton launches offered to
    :meth:`triton_launch` (through :func:`pyeuler.triton._utils.launch_hook`)."""

    def __init__(self):
        super().__init__()
        from pyeuler.cuda import KERNEL_LAUNCHES

        self.kernels: list[Kernel] = []
        self.custom_op_calls: collections.Counter = collections.Counter()
        self.syncs = 0
        self.sync_sources: collections.Counter = collections.Counter()
        self.phase = "forward"
        self._cuda_launches = KERNEL_LAUNCHES
        self._expanding: list[str] = []

    # -- where
    def _context(self) -> str:
        if self._expanding:
            return f"in {self._expanding[-1]}"
        node = torch._C._current_autograd_node()
        return _node_name(node) if node is not None else self.phase

    def _add(self, name: str, cls: str, launches: int, nbytes: int, frame) -> None:
        self.kernels.append(Kernel(name, cls, launches, nbytes, self.phase, _source(frame),
                                   self._context()))

    # -- Triton: the launch hook
    def triton_launch(self, name: str, grid, args: tuple, kwargs: dict) -> bool:
        from pyeuler.triton._utils import operand_passes

        # each operand times the passes the kernel declares (KeyError if it declares none)
        touched = [(operand_bytes(t), passes) for _, t, passes in operand_passes(name, args, kwargs)
                   if passes]
        largest = max((size for size, _ in touched), default=0)
        # frames: this hook <- the Launcher <- the launch site
        self._add(f"triton:{name}", kernel_class("triton", largest), 1,
                  sum(size * passes for size, passes in touched), sys._getframe(2))
        return True  # never run: the tensors are fake

    # -- everything else: the dispatcher
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace, _, name = func._schema.name.partition("::")
        if namespace == "pyeuler":
            if name in self._cuda_launches:
                out = func(*args, **kwargs)
                touched = [(operand_bytes(t), passes)
                           for t, passes in _cuda_operands(func, name, args, kwargs, out) if passes]
                largest = max((size for size, _ in touched), default=0)
                self._add(str(func), kernel_class("cuda", largest), self._cuda_launches[name],
                          sum(size * passes for size, passes in touched), sys._getframe(1))
                return out
            # a pyeuler custom op: run its Python body (the CPU kernel of a custom_op without
            # device types) with this mode active, to see what it launches
            self.custom_op_calls[name] += 1
            self._expanding.append(name)
            try:
                with self:
                    return func.redispatch(_CPU, *args, **kwargs)
            finally:
                self._expanding.pop()
        if func is torch.ops.aten._local_scalar_dense.default:  # a host read: a sync on a GPU
            self.syncs += 1
            self.sync_sources[_source(sys._getframe(1))] += 1
            dtype = args[0].dtype
            return False if dtype == torch.bool else 0.0 if dtype.is_floating_point else 0
        if namespace == "aten" and torch._C._dispatch_has_kernel_for_dispatch_key(
                func.name(), "CompositeImplicitAutograd"):
            # reached below autograd (inside a custom op's body): decompose, as the CUDA
            # dispatcher would, so that e.g. x.to(its own dtype) launches nothing
            with self:
                return func.decompose(*args, **kwargs)
        out = func(*args, **kwargs)
        if namespace == "aten" and not func.is_view and name.split(".")[0] not in _NO_KERNEL:
            self._record_aten(func, name.split(".")[0], args, kwargs, out)
        return out

    def _record_aten(self, func, name: str, args, kwargs, out) -> None:
        frame = sys._getframe(2)
        if name in _CONV:
            nbytes = sum(operand_bytes(t) for t in _tensors((args, kwargs, out)))
            self._add(str(func), "conv", 1, nbytes, frame)
            return
        if name == "convolution_backward":
            grad_out, inp, weight = args[:3]
            grad_in, grad_weight, grad_bias = out
            if grad_in is not None:  # data gradient
                nbytes = operand_bytes(grad_out) + operand_bytes(weight) + operand_bytes(grad_in)
                self._add(f"{func} dgrad", "conv", 1, nbytes, frame)
            if grad_weight is not None:
                nbytes = operand_bytes(grad_out) + operand_bytes(inp) + operand_bytes(grad_weight)
                self._add(f"{func} wgrad", "conv", 1, nbytes, frame)
            if grad_bias is not None:  # a column sum of grad_out
                nbytes = operand_bytes(grad_out) + operand_bytes(grad_bias)
                self._add(f"{func} bias", kernel_class("aten", operand_bytes(grad_out)), 1,
                          nbytes, frame)
            return
        if name in _GEMM:
            nbytes = sum(operand_bytes(t) for t in _tensors((args, kwargs, out)))
            self._add(str(func), "gemm", 1, nbytes, frame)
            return
        outputs = _tensors(out)
        if name.startswith("_foreach_"):
            lists = [a for a in args if isinstance(a, (list, tuple)) and a
                     and isinstance(a[0], torch.Tensor)]
            in_place = name.endswith("_")
            depth = len(lists) + (0 if in_place else 1)
            written = lists[0] if in_place else outputs
            sizes = [operand_bytes(t) for t in _tensors(lists) + list(written)]
            launches = foreach_launches([t.numel() for t in lists[0]], depth)
            self._add(str(func), kernel_class("aten", max(sizes, default=0)), launches,
                      sum(sizes), frame)
            return
        if name.startswith("_fused_") and name.endswith("_"):  # _fused_sgd_, _fused_adam_, …
            self._record_fused_optimizer(func, args, kwargs, frame)
            return
        inputs = list(_tensors((args, kwargs)))
        if name in _WRITE_ONLY:
            inputs = inputs[1:]
        passes = _PASSES.get(name, {})
        sizes = [operand_bytes(t) * passes.get(i, 1) for i, t in enumerate(inputs)]
        sizes += [operand_bytes(t) for t in outputs]
        largest = max([operand_bytes(t) for t in inputs + outputs], default=0)
        self._add(str(func), kernel_class("aten", largest), _LAUNCHES.get(name, 1), sum(sizes),
                  frame)


    def _record_fused_optimizer(self, func, args, kwargs, frame) -> None:
        """A fused optimizer step, one multi-tensor kernel: each tensor list is read once
        and, where the kernel writes it, once more: parameters and state; gradients only
        when it unscales them in place (a ``grad_scale`` is given), though the schema marks
        them mutable either way.  Parameter-sized lists set multi_tensor_apply's depth."""
        unscales = kwargs.get("grad_scale") is not None

        def written(arg) -> bool:
            mutable = arg.alias_info is not None and arg.alias_info.is_write
            return mutable and (arg.name != "grads" or unscales)

        lists = [(value, written(arg)) for arg, value in zip(func._schema.arguments, args)
                 if isinstance(value, (list, tuple)) and value
                 and isinstance(value[0], torch.Tensor)]
        params = lists[0][0]
        depth = sum(len(values) == len(params)
                    and all(t.numel() == p.numel() for t, p in zip(values, params))
                    for values, _ in lists)
        nbytes = sum(operand_bytes(t) * (2 if written else 1) for values, written in lists
                     for t in values)
        launches = foreach_launches([p.numel() for p in params], depth)
        self._add(str(func), kernel_class("aten", max(operand_bytes(p) for p in params)),
                  launches, nbytes, frame)


# ----------------------------------------------------------------------------- emulation


# CUDA autocast's float32 policy (aten/src/ATen/autocast_mode.cpp) for ops that CPU
# autocast leaves in lower precision and that a training step can reach.
_CUDA_FP32 = ("pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "rsqrt", "exp", "log",
              "log2", "log10", "log1p", "expm1", "reciprocal", "acos", "asin", "cosh", "sinh",
              "tan", "erfinv", "softplus", "layer_norm", "native_layer_norm", "group_norm",
              "nll_loss", "nll_loss2d", "mse_loss", "l1_loss", "smooth_l1_loss", "kl_div",
              "binary_cross_entropy_with_logits", "cosine_similarity", "cdist", "dist",
              "renorm", "logsumexp")
# ... and its "fp32_set_opt_dtype" policy: float32 accumulation unless a dtype is given
_CUDA_FP32_OPT_DTYPE = ("sum", "sum.dim_IntList", "prod", "prod.dim_int", "cumsum", "cumprod",
                        "softmax.int", "log_softmax.int", "linalg_vector_norm")


def _op(qualified: str):
    packet, _, overload = qualified.partition(".")
    return getattr(getattr(torch.ops.aten, packet), overload or "default")


@contextlib.contextmanager
def _cuda_autocast_policy() -> Iterator[None]:
    """Inside the block, CPU autocast casts as CUDA autocast does (registered on the
    AutocastCPU key; removed on exit)."""
    library = torch.library.Library("aten", "IMPL")
    below = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def low(t) -> bool:
        return isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16, torch.float16)

    def to_float32(op):
        def kernel(*args, **kwargs):
            args = [a.float() if low(a) else a for a in args]
            kwargs = {k: v.float() if low(v) else v for k, v in kwargs.items()}
            with torch._C._ExcludeDispatchKeyGuard(below):
                return op(*args, **kwargs)
        return kernel

    def accumulate_in_float32(op):
        position = [a.name for a in op._schema.arguments].index("dtype")
        keyword_only = op._schema.arguments[position].kwarg_only

        def kernel(*args, **kwargs):
            given = kwargs.get("dtype") if keyword_only or len(args) <= position else args[position]
            if given is None and args and isinstance(args[0], torch.Tensor) \
                    and args[0].is_floating_point():
                if keyword_only or len(args) <= position:
                    kwargs = dict(kwargs, dtype=torch.float32)
                else:
                    args = (*args[:position], torch.float32, *args[position + 1:])
            with torch._C._ExcludeDispatchKeyGuard(below):
                return op(*args, **kwargs)
        return kernel

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        for name in _CUDA_FP32:
            library.impl(name, to_float32(_op(name)), "AutocastCPU")
        for name in _CUDA_FP32_OPT_DTYPE:
            library.impl(name, accumulate_in_float32(_op(name)), "AutocastCPU")
    try:
        yield
    finally:
        library._destroy()


# ----------------------------------------------------------------------------- counting


@dataclass
class StepCount:
    """The kernels of one recorded step."""

    kernels: list[Kernel]
    custom_op_calls: dict[str, int]
    syncs: int
    sync_sources: dict[str, int] = field(default_factory=dict)  # pyeuler function: syncs

    @property
    def capturable(self) -> bool:
        """Whether a CUDA graph could capture the step: every host read it makes is one
        that a capture skips (:data:`SKIPPED_WHEN_CAPTURED`)."""
        return all(source.split(" < ")[0] in SKIPPED_WHEN_CAPTURED
                   for source in self.sync_sources)

    @property
    def launches(self) -> int:
        return sum(k.launches for k in self.kernels)

    @property
    def hbm_bytes(self) -> int:
        return sum(k.bytes for k in self.kernels)

    def by_class(self, what: str) -> dict[str, int]:
        """``launches`` or ``bytes`` per class of :data:`CLASSES`."""
        totals = dict.fromkeys(CLASSES, 0)
        for k in self.kernels:
            totals[k.step_class] += getattr(k, what)
        return totals

    def by_phase(self) -> dict[str, int]:
        totals = dict.fromkeys(PHASES, 0)
        for k in self.kernels:
            totals[k.phase] += k.launches
        return totals

    def top_sources(self, n: int = 15) -> list[dict]:
        """The ``n`` pyeuler functions (in their custom op / autograd context) with the most
        launches: launches, tiny launches, bytes and the kernels they launch."""
        groups: dict[tuple[str, str], list[Kernel]] = collections.defaultdict(list)
        for k in self.kernels:
            groups[k.source, k.context].append(k)
        rows = []
        for (source, context), kernels in groups.items():
            names = collections.Counter()
            for k in kernels:
                names[k.name] += k.launches
            rows.append({"source": source, "context": context,
                         "launches": sum(k.launches for k in kernels),
                         "tiny": sum(k.launches for k in kernels if k.step_class == "tiny"),
                         "hbm_bytes": sum(k.bytes for k in kernels),
                         "kernels": dict(names.most_common(4))})
        rows.sort(key=lambda row: (-row["launches"], -row["hbm_bytes"], row["source"]))
        return rows[:n]


def _check_path(config: StepConfig, count: StepCount) -> None:
    """The fused backends really took the GPU path: the counts describe it, not another."""
    kinds = {"triton": "triton:", "cuda": "pyeuler.cuda_"}
    prefix = kinds.get(config.backend)
    if prefix is None:
        return
    if not any(k.name.startswith(prefix) for k in count.kernels) or not count.custom_op_calls:
        raise RuntimeError(f"backend={config.backend!r}: the step launched no {prefix}* kernel "
                           "or called no pyeuler custom op; it did not take the GPU path")


def count_step(config: StepConfig, device: DeviceModel = H100) -> StepCount:
    """Record one training step of ``config`` at its real shapes, as on ``device``.

    A first step runs unrecorded (it creates the optimizer's momentum buffers); the second
    is recorded.  Nothing is computed or allocated: the tensors are fake.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(counting_device(device))
        stack.enter_context(_cuda_autocast_policy())
        stack.enter_context(FakeTensorMode())
        from pyeuler.triton._utils import launch_hook

        work = build_workload(config)
        for _ in range(2):  # the first step is not the one recorded
            recorder = Recorder()
            with recorder, launch_hook(recorder.triton_launch):
                run_step(config, work, on_phase=functools.partial(setattr, recorder, "phase"))
    count = StepCount(recorder.kernels, dict(recorder.custom_op_calls), recorder.syncs,
                      dict(recorder.sync_sources))
    _check_path(config, count)
    return count


# ----------------------------------------------------------------------------- host time


@contextlib.contextmanager
def _convolutions_without_arithmetic() -> Iterator[None]:
    """Inside the block, CPU convolutions (forward and backward) return uninitialised
    outputs of the right shape and strides: on a GPU they are device work, and the host
    pays a dispatch for them, about this Python kernel's."""
    library = torch.library.Library("aten", "IMPL")

    def like(meta):
        if meta is None:
            return None
        return torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype)

    def on_meta(op):
        def kernel(*args):
            out = op(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
            return tuple(map(like, out)) if isinstance(out, tuple) else like(out)
        return kernel

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        library.impl("convolution", on_meta(torch.ops.aten.convolution.default), "CPU")
        library.impl("convolution_backward", on_meta(torch.ops.aten.convolution_backward.default),
                     "CPU")
    try:
        yield
    finally:
        library._destroy()


def probe_step(config: StepConfig) -> tuple[StepConfig, tuple[int, ...]]:
    """The step :func:`host_ms` times for ``config``, and one sample's input shape: a
    ``wrn-D-W`` model at width :data:`PROBE_WIDTH` or W if narrower (same depth, so the
    same op sequence), batch :data:`PROBE_BATCH`, images :data:`PROBE_IMAGE` pixels wide."""
    model = config.model
    match = re.fullmatch(r"wrn-(\d+)-(\d+)", model.lower())
    if match:  # never wider than the model counted
        model = f"wrn-{match.group(1)}-{min(int(match.group(2)), PROBE_WIDTH)}"
    input_shape = DATA_SHAPES[config.data][0]
    if len(input_shape) == 3:
        input_shape = (input_shape[0], PROBE_IMAGE, PROBE_IMAGE)
    return dataclasses.replace(config, model=model, batch_size=PROBE_BATCH), input_shape


def host_ms(config: StepConfig, *, repeats: int = 5, warmup: int = 2,
            device: DeviceModel = H100) -> float:
    """Host CPU time (ms, median of ``repeats`` steps) to issue one step of ``config``.

    The same step at a size where arithmetic is negligible (:func:`probe_step`), on real
    CPU tensors, with CPU autocast for bf16.  Triton launches are skipped at the launch
    hook, the CUDA backend's ops return uninitialised outputs, convolutions too
    (:func:`_convolutions_without_arithmetic`).  What is left is the Python, dispatcher and
    autograd cost of issuing the step; a GPU host also pays the driver's launch cost, which
    this does not see.  Process CPU time on one intra-op thread, so other load on the
    machine does not count.
    """
    from pyeuler.triton._utils import launch_hook

    probe, input_shape = probe_step(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with counting_device(device), _convolutions_without_arithmetic(), \
                launch_hook(lambda *launch: True):
            torch.manual_seed(0)
            work = build_workload(probe, input_shape)
            for _ in range(warmup):
                run_step(probe, work)
            times = []
            for _ in range(repeats):
                start = time.process_time()
                run_step(probe, work)
                times.append(time.process_time() - start)
    finally:
        torch.set_num_threads(threads)
    return 1e3 * statistics.median(times)


# ----------------------------------------------------------------------------- report


def source_revision() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the checkout pyeuler is imported from; ``(None, None)``
    outside a git checkout.  Dirty: any tracked change or untracked file."""
    root = Path(_PACKAGE_DIR).parent
    if not (root / ".git").exists():
        return None, None
    # GIT_OPTIONAL_LOCKS=0: read only, never refresh the index of a shared working tree
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              env=env, check=True).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain"))
    except (OSError, subprocess.CalledProcessError):
        return None, None


@dataclass
class CostReport:
    """What one training step costs: ``launches`` and HBM bytes per class, custom-op calls,
    host syncs, host time (ms, this CPU) and the top sources by pyeuler function.

    And what it would cost captured (``pyeuler train --cuda-graph``): ``capturable`` (no
    host syncs but those a capture skips, :data:`SKIPPED_WHEN_CAPTURED`; ``sync_sources``
    names the pyeuler function of each), ``captured_host_ms`` (0: a replay issues nothing
    from the host; None when not capturable) and ``launch_gaps_ms``, the GPU's idle time
    between kernels, launches × :data:`LAUNCH_GAP_US`, for ``"eager"`` dispatch and a
    ``"graph"`` replay."""

    config: StepConfig
    device: DeviceModel
    launches: int
    launches_by_class: dict[str, int]
    launches_by_phase: dict[str, int]
    hbm_bytes: int
    hbm_bytes_by_class: dict[str, int]
    custom_op_calls: dict[str, int]
    syncs: int
    host_ms: float | None
    host_ms_reference: float | None
    top_sources: list[dict] = field(default_factory=list)
    commit: str | None = None
    dirty: bool | None = None
    capturable: bool | None = None
    sync_sources: dict[str, int] = field(default_factory=dict)
    captured_host_ms: float | None = None
    launch_gap_us: dict[str, float] = field(default_factory=lambda: dict(LAUNCH_GAP_US))
    launch_gaps_ms: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["config"] = dict(data["config"], label=self.config.label)
        return data


def cost(config: StepConfig, *, device: DeviceModel = H100, host_time: bool = True,
         host_ms_reference: float | None = None) -> CostReport:
    """Count one training step of ``config`` (:func:`count_step`) and, with ``host_time``,
    measure its host time and the reference backend's (:func:`host_ms`; pass
    ``host_ms_reference`` to reuse a measurement of the same run)."""
    count = count_step(config, device)
    host = reference = None
    if host_time:
        reference = host_ms_reference
        if reference is None:
            reference = host_ms(dataclasses.replace(config, backend="reference"), device=device)
        host = reference if config.backend == "reference" else host_ms(config, device=device)
    commit, dirty = source_revision()
    capturable = count.capturable
    return CostReport(config, device, count.launches, count.by_class("launches"),
                      count.by_phase(), count.hbm_bytes, count.by_class("bytes"),
                      count.custom_op_calls, count.syncs, host, reference, count.top_sources(),
                      commit, dirty, capturable, count.sync_sources,
                      0.0 if capturable else None,
                      dict(LAUNCH_GAP_US),
                      {kind: count.launches * gap / 1e3 for kind, gap in LAUNCH_GAP_US.items()})
