"""Data-parallel training under ``torchrun``: PyTorch's own ``torch.distributed`` and
``DistributedDataParallel``, with the conventions that make R processes train like one.

- **Process group** from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``/``MASTER_PORT``): gloo on the CPU, NCCL on GPUs, where rank r drives
  ``cuda:LOCAL_RANK`` (:func:`from_environment`).
- **Batches**: the global order of an epoch is one permutation drawn from (seed, epoch),
  the same on every rank and for every number of ranks; each global batch is cut into R
  contiguous parts of near-equal size and rank r trains on part r (:func:`shard_bounds`),
  so the sequence of global batches does not depend on R.
- **Loss**: the mean over the global batch.  DDP averages the ranks' gradients, so rank r
  scales its local mean by ``R·n_r/n`` (:func:`loss_scale`): exactly the global mean's
  gradient also when the last batch splits unevenly.
- **Random draws** (augmentation, attack starts, TRADES noise, dropout) come from the global
  generators reseeded before every step with :func:`derive_seed` of (seed, epoch, step,
  rank): a run resumed at an epoch boundary repeats the uninterrupted one bit for bit,
  without saving any rank's generator state.
- **Metrics**: sums (loss, correct, samples) all-reduced over the ranks (:func:`all_sum`).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["DistributedRun", "from_environment", "reports_errors", "shard_bounds", "loss_scale",
           "derive_seed", "all_sum", "broadcast_object", "wrap_model", "has_batch_norm"]

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedRun:
    """This process's place in a data-parallel run: ``rank`` of ``world_size`` processes,
    ``local_rank`` on its machine, ``backend`` ``"gloo"`` or ``"nccl"``."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, logs and writes checkpoints."""
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ[name]
    if not value.strip().isdigit():
        raise ValueError(f"{name}: expected an int >= 0 from torchrun, got {value!r}")
    return int(value)


def from_environment(device_type: str, timeout: timedelta = timedelta(minutes=30)
                     ) -> DistributedRun | None:
    """Join the process group torchrun describes in the environment, or None when this
    process runs alone (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``: nothing to synchronise).

    Args:
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL; the process's device becomes
            ``cuda:LOCAL_RANK``).
        timeout: how long a collective waits for the other ranks.

    Returns:
        :class:`DistributedRun` after ``torch.distributed.init_process_group``.

    Raises:
        ValueError: torchrun's variables missing or not ints, ``RANK`` >= ``WORLD_SIZE``,
            or ``LOCAL_RANK`` naming a GPU this machine lacks.
        RuntimeError: torch.distributed is not available in this build of torch.
    """
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    missing = [name for name in _TORCHRUN_VARIABLES if not os.environ.get(name)]
    if missing:
        raise ValueError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} "
                         "are not set: start the ranks with torchrun (python -m "
                         "torch.distributed.run), which sets them")
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if rank >= world:
        raise ValueError(f"RANK: {rank} is not below WORLD_SIZE {world}")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK: rank {rank} would drive cuda:{local}, but this "
                             f"machine has {torch.cuda.device_count()} GPUs (--nproc_per_node "
                             "at most the GPU count)")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    return DistributedRun(rank, world, local, backend)


def reports_errors() -> bool:
    """Whether this process prints a command's one-line error: a process running alone, and
    under torchrun the first rank of each machine (``LOCAL_RANK`` 0).  Every rank parses
    the same command line and loads the same files, so a mistake is hit by all of them;
    printed by one per machine it shows once in each torchrun's output (once, by rank 0, on
    a single machine), while every rank still exits non-zero.

    Read from torchrun's environment (``WORLD_SIZE``, ``LOCAL_RANK``), not the process
    group: a refused command line never joins it.  A ``LOCAL_RANK`` that is not an int
    reports too, so that no error goes unsaid.

    Returns:
        True for the process that prints errors, False for the other ranks.
    """
    world = os.environ.get("WORLD_SIZE", "1").strip()
    local = os.environ.get("LOCAL_RANK", "0").strip()
    return not (world.isdigit() and int(world) > 1) or not local.isdigit() or int(local) == 0


def shard_bounds(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``rank`` when ``count`` samples are cut into
    ``world_size`` contiguous parts whose sizes differ by at most one (the larger first),
    as ``numpy.array_split``."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def loss_scale(local_count: int, global_count: int, world_size: int) -> float:
    """The factor on a rank's mean loss that makes DDP's average of the ranks' gradients
    the gradient of the mean over the global batch: ``world_size·local/global`` (1 for
    equal parts)."""
    return world_size * local_count / global_count


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from ints (numpy's ``SeedSequence``): distinct tuples give
    unrelated streams, e.g. ``derive_seed(seed, epoch, rank)`` then ``(that, step)``."""
    state = np.random.SeedSequence([int(p) & 0xFFFF_FFFF_FFFF_FFFF for p in parts])
    return int(state.generate_state(1, np.uint64)[0] >> np.uint64(1))


def all_sum(values, device: torch.device | str = "cpu") -> list[float]:
    """``values`` (floats) summed over all ranks in float64 (one all-reduce); returned as
    given when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    device = torch.device(device)
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_object(obj, run: DistributedRun | None):
    """Rank 0's ``obj`` (picklable: e.g. a checkpoint loaded on the CPU) on every rank, so
    that only rank 0 reads ``--out``; ``obj`` itself when ``run`` is None."""
    if run is None:
        return obj
    holder = [obj if run.is_main else None]
    device = torch.device("cuda", run.local_rank) if run.backend == "nccl" else None
    dist.broadcast_object_list(holder, src=0, device=device)
    return holder[0]


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm layer (what ``--sync-bn`` converts)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def wrap_model(model: nn.Module, run: DistributedRun | None, device: torch.device,
               sync_bn: bool = False, cuda_graph: bool = False) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` (rank 0's parameters and buffers
    are broadcast to every rank), its BatchNorm layers converted by
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` with ``sync_bn``; ``model`` as it is when
    ``run`` is None.

    The conversion comes after the wrapping: DDP refuses a CPU module holding
    ``SyncBatchNorm`` (torch's own layer cannot run on the CPU), while pyeuler's fused
    norms synchronise on gloo too.  It keeps the parameter and buffer tensors, so DDP's
    bookkeeping of them stays valid.  The returned wrapper's ``.module`` is ``model``.

    ``cuda_graph``: DDP is constructed on a side stream, as PyTorch's recipe for capturing
    its backward in a CUDA graph asks (CUDA semantics notes, "Usage with
    DistributedDataParallel")."""
    if run is None:
        return model
    stream = torch.cuda.stream(torch.cuda.Stream(device)) if cuda_graph else nullcontext()
    with stream:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if sync_bn:
        # in place: only a bare BatchNorm layer as the root would be replaced
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return ddp
