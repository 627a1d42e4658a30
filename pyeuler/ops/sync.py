"""Synchronised BatchNorm's collectives: what makes R processes' BatchNorm one BatchNorm over
their concatenated batch (docs/semantics.md §10).

Only per-channel vectors cross processes, at three places between the existing passes:

- forward: each process's ``(count, mean, M2)`` is all-gathered and Chan-merged into the
  global ``(count, mean, var)`` (as torch's ``batch_norm_gather_stats_with_counts``), so
  shards of unequal size merge exactly (:func:`merged_statistics`);
- backward: the reduce sums ``Σg``, ``Σg·(x − mean)``, the gradients reaching the global
  mean and variance and the counts are all-reduced (SUM) before the per-channel algebra
  (:func:`all_reduce_sum`);
- second order: the gradients reaching those all-reduced quantities are all-reduced.

The convention is torch's SyncBatchNorm's: every process differentiates ``L = Σ_r L_r``,
the sum of all processes' losses.  The input gradient on process r is ``∂L/∂x_r`` in full;
a parameter's gradient is process r's share, and the shares sum to ``∂L/∂θ``.

Plain ``torch.distributed`` collectives on the layer's ``process_group``: gloo on CPU,
NCCL on GPU, no host synchronisation (counts stay tensors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["SyncGroup", "all_reduce_sum", "merged_statistics", "refuse_synchronised",
           "run_eagerly", "sync_group"]


@dataclass(frozen=True, eq=False)
class SyncGroup:
    """The processes whose batches one synchronised BatchNorm treats as a single batch:
    ``group`` (a ``torch.distributed`` process group) of ``size`` > 1 processes."""

    group: dist.ProcessGroup
    size: int

    @property
    def backend(self) -> str:
        return str(dist.get_backend(self.group))


def sync_group(norm: nn.Module) -> SyncGroup | None:
    """The group an ``nn.SyncBatchNorm`` synchronises over here, or None where it is plain
    BatchNorm: any other layer, eval mode, no initialised process group, or a group of one
    process (as torch's own forward decides; its ``process_group``, else the world)."""
    if not isinstance(norm, nn.SyncBatchNorm) or not norm.training:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = norm.process_group or dist.group.WORLD
    size = dist.get_world_size(group)
    return SyncGroup(group, size) if size > 1 else None


def refuse_synchronised(module: nn.Module, what: str, instead: str) -> None:
    """Raise NotImplementedError if ``module`` holds a BatchNorm that would synchronise
    here: for paths whose synchronised meaning pyeuler does not compute."""
    if any(sync_group(m) is not None for m in module.modules()):
        raise NotImplementedError(
            f"synchronised BatchNorm (nn.SyncBatchNorm under a process group of more than one "
            f"process) inside {what} is not supported (docs/semantics.md §10): {instead}")


def run_eagerly(function):
    """``function``, which torch.compile must not trace (collectives, autograd functions
    holding a process group), wrapped in ``torch.compiler.disable`` while compiling: a graph
    break.  Wrapped only then, since importing dynamo costs seconds."""
    return torch.compiler.disable(function) if torch.compiler.is_compiling() else function


def _all_gather(t: Tensor, sync: SyncGroup) -> Tensor:
    """``[size, *t.shape]``: every process's ``t``, in group-rank order."""
    if sync.backend == "gloo":  # gloo has no all_gather_into_tensor
        parts = [torch.empty_like(t) for _ in range(sync.size)]
        dist.all_gather(parts, t.contiguous(), group=sync.group)
        return torch.stack(parts)
    out = t.new_empty((sync.size, *t.shape))
    dist.all_gather_into_tensor(out, t.contiguous(), group=sync.group)
    return out


def merged_statistics(count: Tensor, mean: Tensor, var: Tensor,
                      sync: SyncGroup) -> tuple[Tensor, Tensor, Tensor]:
    """The global batch's ``(count, mean, var)`` from each process's own.

    ``count``: 0-dim, the values behind each of this process's statistics (0 for an empty
    shard, whose mean and var must then be finite, e.g. zeros); ``mean``, ``var``: ``[C]``
    biased statistics, all three in one float dtype.  One all-gather of ``2C + 1`` values per
    process, then Chan's merge in group-rank order (deterministic):
    ``mean = Σ n_r·mean_r / N``, ``M2 = Σ n_r·(var_r + (mean_r − mean)²)``, ``var = M2/N``
    (an overflowed +inf variance becomes NaN, docs/semantics.md §5).  Not differentiable:
    the backward passes use the closed form with all-reduced sums instead.
    """
    gathered = _all_gather(torch.cat([count.reshape(1), mean, var]), sync)
    channels = mean.numel()
    counts, means, variances = (gathered[:, :1], gathered[:, 1:1 + channels],
                                gathered[:, 1 + channels:])
    total = counts.sum(0)
    safe_total = total.clamp_min(1.0)
    merged_mean = (counts * means).sum(0) / safe_total
    m2 = (counts * (variances + (means - merged_mean).square())).sum(0)
    merged_var = m2 / safe_total
    return (total.reshape(()), merged_mean,
            merged_var.masked_fill(merged_var == float("inf"), float("nan")))


class _AllReduceSum(torch.autograd.Function):
    """``Σ_r t_r`` over the group, for several tensors in one collective.  Its adjoint is
    itself: under ``L = Σ_r L_r`` the gradient of every process's copy of the sum reaches
    each addend.  Differentiable to every order."""

    @staticmethod
    def forward(ctx, sync, *tensors):
        ctx.sync = sync
        dtype = tensors[0].dtype
        flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=sync.group)
        parts = torch.split(flat, [t.numel() for t in tensors])
        return tuple(p.reshape(t.shape).to(t.dtype) for p, t in zip(parts, tensors))

    @staticmethod
    def backward(ctx, *grads):
        return (None, *_AllReduceSum.apply(ctx.sync, *grads))


def all_reduce_sum(tensors: Sequence[Tensor], sync: SyncGroup) -> tuple[Tensor, ...]:
    """Each tensor summed over the group's processes (one all-reduce for all of them),
    differentiable to every order.  Every process must pass tensors of the same shapes in
    the same order."""
    return _AllReduceSum.apply(sync, *tensors)
