"""Training steps with no host work: the whole step recorded once and replayed.

One step — the attack's input-gradient passes (adversarial training), forward, loss,
backward and the optimizer — runs as

- ``mode="cuda-graph"``: one ``torch.cuda.CUDAGraph``, PyTorch's whole-network capture
  recipe (CUDA semantics notes, "Whole-network capture"): static input buffers, warm-up
  steps on a side stream, then ``graph.replay()`` per batch.  SGD captures as it is; Adam
  and AdamW run with ``capturable=True`` (their step counter stays on the device);
- ``mode="compile"``: ``torch.compile(mode="reduce-overhead")`` of forward, loss and
  backward as one graph (``fullgraph=True``, ``torch._dynamo.config.trace_autograd_ops``:
  ``backward()`` is traced into the graph), and of the optimizer step apart (dynamo breaks
  the graph inside ``Optimizer.step`` on purpose), with the learning rate held in a device
  tensor so that a schedule does not recompile it.

What capture needs from the step, and what pyeuler guarantees (tests/test_capture.py):
no host synchronisation (no ``.item()``, no ``bool(tensor)``, no ``nonzero``) and no
data-dependent shapes, in every backend and gradient mode except ``grad="implicit"`` with
a ``tol``, whose early stop reads the residual on the host and which therefore refuses
capture with a ``RuntimeError``.  Shapes must not change between replays, so
:class:`CapturedTraining` drops the last partial batch of an epoch.  The attacks' check
that inputs lie in [0, 1] cannot read values inside the graph; :class:`CapturedTraining`
checks the whole training set instead, on the host, once per epoch.

:class:`CapturedStep` is the step; :class:`CapturedTraining` is a drop-in for
:func:`pyeuler.robust.training.train_epoch` (``pyeuler train --cuda-graph`` / ``--compile``).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyeuler.robust.attacks import default_alpha
from pyeuler.robust.distributed import all_sum, derive_seed
from pyeuler.robust.training import (
    ADV_METHODS, EpochStats, _check_shard, _progress, autocast, batches, pgd_at_loss,
    trades_loss,
)

__all__ = ["MODES", "CapturedStep", "CapturedTraining", "step_loss", "prepare_optimizer"]

MODES = ("cuda-graph", "compile")
_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
_HYPERPARAMETERS = ("lr", "momentum", "dampening", "weight_decay", "betas", "eps")


def step_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, adv: str = "none", *,
              eps: float = 8 / 255, alpha: float | None = None, steps: int = 10,
              beta: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss :func:`~pyeuler.robust.training.train_epoch` trains on for one batch:
    cross-entropy (``adv="none"``), PGD-AT or TRADES, the attack included.  Returns
    (loss, logits); ``alpha`` defaults to ``default_alpha(eps, steps)``."""
    if adv not in ADV_METHODS:
        raise ValueError(f"adv: expected one of {ADV_METHODS}, got {adv!r}")
    if adv == "none":
        logits = model(x)
        return F.cross_entropy(logits, y), logits
    alpha = default_alpha(eps, steps) if alpha is None else alpha
    if adv == "pgd":
        return pgd_at_loss(model, x, y, eps, alpha, steps)
    return trades_loss(model, x, y, beta=beta, eps=eps, alpha=alpha, steps=steps)


def prepare_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer``'s step capturable, in place: Adam / AdamW get ``capturable=True``
    and their step counters move to their parameters' device (a counter on the host is
    read there every step); SGD needs nothing.  Raises ``TypeError`` for other optimizers
    (their steps are not known to be free of host reads)."""
    if not isinstance(optimizer, _OPTIMIZERS):
        raise TypeError(f"optimizer: capture supports {', '.join(o.__name__ for o in _OPTIMIZERS)}"
                        f", got {type(optimizer).__name__}")
    if isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        group["capturable"] = True
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(p.device, torch.float32)


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[tuple]:
    return [tuple(float(v) if isinstance(v, torch.Tensor) else v
                  for v in (group.get(k) for k in _HYPERPARAMETERS))
            for group in optimizer.param_groups]


def _state_tensors(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Every tensor a training step changes: parameters, buffers, optimizer state."""
    tensors = {("module", name): t for name, t in module.state_dict(keep_vars=True).items()}
    for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[("optimizer", i, key)] = value
    return tensors


class CapturedStep:
    """``step(x, y)``: one training step of ``model`` replayed from a CUDA graph or run as
    compiled code.

    ``forward_backward(x, y)`` computes the loss, calls ``backward()`` on it and returns a
    tensor of whatever the caller wants to read (detached); the optimizer step follows.
    The returned tensor is a static output: the next call overwrites it, so consume it
    (e.g. add it to a running total) first.  ``x`` and ``y`` must keep the shapes, dtypes
    and device of the first call (``ValueError`` otherwise).

    ``cuda-graph``: the first call copies the batch into static buffers, runs ``warmup``
    steps on a side stream (the recipe's warm-up: Triton compilation, cuDNN autotuning,
    optimizer state) and captures one; the warm-up leaves no trace — parameters, buffers,
    optimizer state and random-number generators are put back as they were (optimizer
    state that did not exist yet is zeroed: SGD's, Adam's and AdamW's initial value) — and
    then every call replays the graph, the first one included.  A change of the
    optimizer's hyperparameters (a learning-rate schedule) re-captures the graph, without
    warm-up.

    ``compile``: ``forward_backward`` is compiled with ``fullgraph=True`` and
    ``compile_mode`` (default ``"reduce-overhead"``: CUDA graphs under inductor), the
    optimizer step apart, both with ``compile_backend``; no warm-up (the first call
    compiles, and trains).

    Raises ``ValueError`` for an unknown mode, ``RuntimeError`` for ``"cuda-graph"``
    without CUDA tensors, ``TypeError`` for an optimizer other than SGD, Adam or AdamW.
    """

    def __init__(self, forward_backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 model: nn.Module, optimizer: torch.optim.Optimizer, *, mode: str = "cuda-graph",
                 warmup: int = 3, compile_mode: str | None = "reduce-overhead",
                 compile_backend: str = "inductor"):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup: expected an int >= 1, got {warmup!r}")
        prepare_optimizer(optimizer)
        self.forward_backward, self.model, self.optimizer = forward_backward, model, optimizer
        self.mode, self.warmup = mode, warmup
        self.compile_mode, self.compile_backend = compile_mode, compile_backend
        self.captures = 0  # graphs captured (cuda-graph) so far
        self._static: tuple[torch.Tensor, torch.Tensor] | None = None
        self._graph = self._outputs = self._captured_with = None
        self._compiled = self._compiled_optimizer_step = None
        self._lr_tensors: list[torch.Tensor] = []

    # ------------------------------------------------------------------ the step itself

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        outputs = self.forward_backward(x, y)
        self.optimizer.step()
        return outputs

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._static is None:
            self._static = (torch.empty_like(x), torch.empty_like(y))
        static_x, static_y = self._static
        for name, given, static in (("x", x, static_x), ("y", y, static_y)):
            if (given.shape, given.dtype, given.device) != (static.shape, static.dtype,
                                                            static.device):
                raise ValueError(
                    f"{name}: a captured step replays fixed shapes: expected "
                    f"{tuple(static.shape)} {static.dtype} on {static.device}, got "
                    f"{tuple(given.shape)} {given.dtype} on {given.device} (drop the last "
                    f"partial batch)")
        static_x.copy_(x)
        static_y.copy_(y)
        if self.mode == "compile":
            return self._compiled_call(static_x, static_y)
        if self._graph is None:
            self._capture(static_x, static_y, warmup=self.warmup)
        elif self._captured_with != _hyperparameters(self.optimizer):
            self._capture(static_x, static_y, warmup=0)
        self._graph.replay()
        return self._outputs

    # ------------------------------------------------------------------ CUDA graph

    def _capture(self, static_x: torch.Tensor, static_y: torch.Tensor, warmup: int) -> None:
        device = static_x.device
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(f"mode='cuda-graph' needs CUDA tensors, got a batch on {device}")
        self._graph = self._outputs = None
        if warmup:
            # the warm-up trains for real: remember everything it changes, and put it back
            before = {key: t.detach().clone()
                      for key, t in _state_tensors(self.model, self.optimizer).items()}
            rng = torch.get_rng_state(), torch.cuda.get_rng_state(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self.optimizer.zero_grad(set_to_none=True)
                    self._train_step(static_x, static_y)
            torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # grads are None at capture, so the graph writes them afresh every replay
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            outputs = self._train_step(static_x, static_y)
        if warmup:
            with torch.no_grad():
                for key, t in _state_tensors(self.model, self.optimizer).items():
                    if key in before:
                        t.copy_(before[key])
                    else:
                        t.zero_()
            torch.set_rng_state(rng[0])
            torch.cuda.set_rng_state(rng[1], device)
        self._graph, self._outputs = graph, outputs
        self._captured_with = _hyperparameters(self.optimizer)
        self.captures += 1

    # ------------------------------------------------------------------ torch.compile

    @contextlib.contextmanager
    def _compile_config(self):
        # backward() inside the compiled graph; autograd.grad(create_graph=True) inside the
        # reference backend's forward needs buffers that are not donated (docs/benchmarks.md)
        with torch._dynamo.config.patch(trace_autograd_ops=True), \
                torch._functorch.config.patch(donated_buffer=False):
            yield

    def _compiled_call(self, static_x: torch.Tensor, static_y: torch.Tensor) -> torch.Tensor:
        if self._compiled is None:
            self._compiled = torch.compile(self.forward_backward, fullgraph=True, dynamic=False,
                                           mode=self.compile_mode, backend=self.compile_backend)
            optimizer = self.optimizer

            def optimizer_step():  # PyTorch's compiled-optimizer recipe
                optimizer.step()

            self._compiled_optimizer_step = torch.compile(optimizer_step, dynamic=False,
                                                          backend=self.compile_backend)
            self._lr_tensors = [torch.tensor(float(group["lr"]), device=static_x.device)
                                for group in self.optimizer.param_groups]
        groups = self.optimizer.param_groups
        schedule = [group["lr"] for group in groups]
        self.optimizer.zero_grad(set_to_none=True)
        with self._compile_config():
            outputs = self._compiled(static_x, static_y)
            # a tensor learning rate: a schedule changes its value, not the compiled code
            for group, lr, tensor in zip(groups, schedule, self._lr_tensors):
                tensor.fill_(float(lr))
                group["lr"] = tensor
            try:
                self._compiled_optimizer_step()
            finally:
                for group, lr in zip(groups, schedule):
                    group["lr"] = lr
        return outputs


class CapturedTraining:
    """A drop-in for :func:`pyeuler.robust.training.train_epoch` whose steps are one
    :class:`CapturedStep` (``mode`` ``"cuda-graph"`` or ``"compile"``), kept across epochs.

    Differences from ``train_epoch``, all for the graph's sake: the last partial batch of
    each epoch is dropped (a graph replays fixed shapes); the loss and accuracy are summed
    on the device and read once per epoch, so a non-finite loss raises
    ``FloatingPointError`` at the end of the epoch, not at its step; the progress bar shows
    no running loss; ``scheduler_step`` (a per-step schedule) is refused — set the
    learning rate per epoch, as ``pyeuler train`` does.  For adversarial training the
    inputs' range [0, 1] is checked on the whole training set, on the host, once per epoch.

    Data-parallel (``shard``, the model a ``DistributedDataParallel`` wrapper): ``batch_size``
    must divide evenly among the ranks (every part is a full, fixed-shape batch, so DDP's
    gradient average is the global batch's mean as it is).  ``seed`` and ``amp`` as in
    ``train_epoch`` (``torch.manual_seed`` between replays reaches the graph's random
    draws through PyTorch's graph-safe generator state); ``grad_scaler`` is refused: its
    step reads the found-inf flag on the host (use ``amp=torch.bfloat16``).  Under DDP,
    ``"cuda-graph"`` follows PyTorch's recipe (CUDA semantics notes, "Usage with
    DistributedDataParallel"): NCCL >= 2.9.6, ``TORCH_NCCL_ASYNC_ERROR_HANDLING=0`` before
    the process group starts, and 11 eager warm-up steps (``warmup`` is raised to 11).
    """

    def __init__(self, mode: str, *, warmup: int = 3, compile_mode: str | None = "reduce-overhead",
                 compile_backend: str = "inductor"):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.mode, self.warmup = mode, warmup
        self.compile_mode, self.compile_backend = compile_mode, compile_backend
        self.step: CapturedStep | None = None
        self._key: tuple | None = None

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 optimizer: torch.optim.Optimizer, *, batch_size: int = 128, adv: str = "none",
                 eps: float = 8 / 255, alpha: float | None = None, steps: int = 10,
                 beta: float = 6.0, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 scheduler_step: Callable[[], None] | None = None,
                 progress: bool | None = None, desc: str = "train",
                 shard: tuple[int, int] = (0, 1), seed: int | None = None,
                 amp: torch.dtype | None = None,
                 grad_scaler: torch.amp.GradScaler | None = None) -> EpochStats:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if adv not in ADV_METHODS:
            raise ValueError(f"adv: expected one of {ADV_METHODS}, got {adv!r}")
        if scheduler_step is not None:
            raise ValueError("scheduler_step: a per-step schedule changes the optimizer every "
                             "step, which a captured step cannot follow; set the learning "
                             "rate per epoch")
        if len(x) != len(y):
            raise ValueError(f"y: {len(y)} labels for {len(x)} inputs")
        _, world_size = _check_shard(shard)
        if batch_size % world_size:
            raise ValueError(f"batch_size: {batch_size} does not split evenly among "
                             f"{world_size} ranks; a captured step replays one fixed shape")
        if amp not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"amp: expected torch.bfloat16, torch.float16 or None, got {amp!r}")
        if grad_scaler is not None:
            raise ValueError("grad_scaler: GradScaler's step reads the found-inf flag on the "
                             "host, which a captured step cannot; train with "
                             "amp=torch.bfloat16, which needs no scaler")
        full_batches = len(x) // batch_size
        if full_batches == 0:
            raise ValueError(f"batch_size: {batch_size} is more than the {len(x)} training "
                             "samples; a captured step drops the last partial batch, so "
                             "nothing would be trained")
        if adv != "none":
            alpha = default_alpha(eps, steps) if alpha is None else alpha
            if eps < 0 or alpha < 0:
                raise ValueError(f"eps/alpha: must be >= 0, got eps={eps!r}, alpha={alpha!r}")
            if x.dtype != torch.uint8 and x.numel() and (x.min() < 0 or x.max() > 1):
                raise ValueError("x: adversarial training expects inputs in [0, 1]; got "
                                 f"values in [{x.min().item():.4g}, {x.max().item():.4g}]")
        key = (id(model), id(optimizer), batch_size, adv, eps, alpha, steps, beta, amp)
        if self.step is None or key != self._key:
            def forward_backward(xb, yb):
                with autocast(xb.device.type, amp):
                    loss, logits = step_loss(model, xb, yb, adv, eps=eps, alpha=alpha,
                                             steps=steps, beta=beta)
                loss.backward()
                correct = (logits.detach().argmax(1) == yb).sum()
                return torch.stack([loss.detach().float() * yb.shape[0], correct.float()])

            # DDP's buckets settle in the first eager steps: PyTorch's recipe warms up 11
            warmup = max(self.warmup, 11) if world_size > 1 else self.warmup
            self.step = CapturedStep(forward_backward, model, optimizer, mode=self.mode,
                                     warmup=warmup, compile_mode=self.compile_mode,
                                     compile_backend=self.compile_backend)
            self._key = key
        model.train()
        t0 = time.perf_counter()
        totals = None
        # zip stops at the last full batch before the partial one is even assembled
        bar = _progress(range(full_batches), full_batches, desc, progress)
        stream = batches(x, y, batch_size, shuffle=True, generator=generator, shard=shard)
        for step, (_, (xb, yb)) in enumerate(zip(bar, stream)):
            if seed is not None:
                torch.manual_seed(derive_seed(seed, step))  # before the step's first draw
            if transform is not None:
                xb = transform(xb)
            if device is not None:
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            out = self.step(xb, yb)
            totals = out.double() if totals is None else totals.add_(out)
        loss_sum, correct = totals.tolist()  # the epoch's one host read
        if world_size > 1:
            loss_sum, correct = all_sum([loss_sum, correct], totals.device)
        seen = full_batches * batch_size
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"training loss became {loss_sum / seen} in this epoch "
                                     "(lower --lr?)")
        return EpochStats(loss_sum / seen, correct / seen, time.perf_counter() - t0, seen)
