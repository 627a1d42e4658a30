"""Normalisation + affine + scaled residual add + ReLU, ``act(shortcut + h·Norm(x))``: the
public API (docs/semantics.md §1, §3, §4) and the adapter for ``nn.BatchNorm*d`` / ``nn.GroupNorm``.

:func:`norm_act` validates, picks the backend and runs the op: the literal composition on
``"reference"``, pyeuler's explicit formulas in torch ops on ``"eager"``, the custom ops of
:mod:`pyeuler.ops.norm_act_ops` (and the convolution fusion of
:mod:`pyeuler.ops.norm_act_fusions`) on the fused backends.  The per-channel algebra every
backend shares is :mod:`pyeuler.ops.norm_algebra`.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from pyeuler.backend import resolve_backend
from pyeuler.ops import primitives, reference_norm
from pyeuler.ops import sync as collectives
from pyeuler.ops.dispatch import forward_mode_active, func_transform_active, kernel_backend
from pyeuler.ops.norm_act_fusions import (conv_weight_for, norm_relu_backward_conv,
                                          norm_relu_backward_ie_update, norm_relu_conv)
from pyeuler.ops.norm_act_ops import (Affine, NormStats, SyncedNormAct, forward_math,
                                      norm_act_backward, norm_act_fwd, update_running_stats_op)
from pyeuler.ops.norm_algebra import statistic_count

__all__ = ["NormStats", "conv_weight_for", "norm_act", "norm_act_backward", "norm_act_module",
           "norm_relu_backward_conv", "norm_relu_backward_ie_update", "update_running_stats"]


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         count: int, momentum: float | Tensor | None, *,
                         num_batches_tracked: Tensor | None = None,
                         backend: str = "eager") -> None:
    """``nn.BatchNorm``'s running-statistics update in place
    (:func:`pyeuler.ops.norm_algebra.update_running_stats`: ``num_batches_tracked`` += 1
    when given, then ``r ← lerp(r, batch, m)`` with the unbiased variance stored, ``m`` =
    ``momentum`` or, for None, ``1/num_batches_tracked``).  One launch on the fused
    backends; no host synchronisation.  Raises ValueError for ``count < 2``."""
    if count < 2:
        raise ValueError("running statistics need more than one value per channel")
    mean, var = mean.detach(), var.detach()
    if backend not in ("triton", "cuda"):
        primitives.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var,
                                        count, momentum)
        return
    momentum_tensor = momentum if isinstance(momentum, Tensor) else None
    update_running_stats_op(running_mean, running_var, num_batches_tracked, mean, var, count,
                             None if momentum_tensor is not None or momentum is None
                             else float(momentum), momentum_tensor, backend)



def _is_real(v) -> bool:
    """A real number: Python's or NumPy's (bools and strings are not)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _validate(x, weight, bias, running_mean, running_var, shortcut, h, groups, training, eps,
              momentum, relu, num_batches_tracked=None, synchronised=False):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.dim() > 5:
        raise ValueError(f"x must have shape (N, C, *spatial) with 0-3 spatial dims, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    channels = x.shape[1]
    if channels < 1:
        raise ValueError(f"x must have at least one channel (dim 1), got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.shape != (channels,):
            if t.dim() == 1:
                raise ValueError(f"{name} must have shape ({channels},): x has {channels} "
                                 f"channels (dim 1) but {name} has {t.shape[0]}")
            raise ValueError(f"{name} must have shape ({channels},), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if shortcut is not None:
        if not isinstance(shortcut, Tensor):
            raise TypeError(f"shortcut must be a Tensor or None, got {type(shortcut).__name__}")
        if shortcut.shape != x.shape:
            raise ValueError(f"shortcut must have x's shape {tuple(x.shape)}, got {tuple(shortcut.shape)}")
        if shortcut.device != x.device:
            raise ValueError(f"shortcut is on {shortcut.device} but x is on {x.device}")
        if not shortcut.is_floating_point():
            raise TypeError(f"shortcut must be floating point, got {shortcut.dtype}")
    if isinstance(h, Tensor):
        if h.dim() > 1 or (h.dim() == 1 and h.shape[0] not in (1, channels)):
            raise ValueError(f"h must be a float, a scalar tensor or a ({channels},) tensor, "
                             f"got shape {tuple(h.shape)}")
        if h.device != x.device:
            raise ValueError(f"h is on {h.device} but x is on {x.device}")
        if not h.is_floating_point():
            raise TypeError(f"h must be a floating-point tensor, got {h.dtype}")
    elif not _is_real(h):
        raise TypeError(f"h must be a float or a floating-point tensor, got {type(h).__name__}")
    elif math.isinf(h):
        # h·Norm(x) is computed as scale·x + shift with h folded into both: an infinite h
        # would give inf − inf = NaN where torch gives ±inf (a NaN h gives NaN in both)
        raise ValueError(f"h must not be infinite, got {h!r}")
    if not _is_real(eps) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    if isinstance(momentum, Tensor):
        if momentum.dim() != 0 or not momentum.is_floating_point():
            raise ValueError(f"momentum must be a float or a 0-dim floating-point tensor, got "
                             f"{momentum.dtype} of shape {tuple(momentum.shape)}")
        if running_mean is not None and momentum.device != running_mean.device:
            raise ValueError(f"momentum is on {momentum.device} but the running statistics "
                             f"are on {running_mean.device}")
        # its value is not checked: that would read it on the host (a sync)
    elif momentum is None:
        pass  # the cumulative average: needs num_batches_tracked when an update runs (below)
    elif not _is_real(momentum) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a float in [0, 1] or None, got {momentum!r}")
    if num_batches_tracked is not None:
        if not isinstance(num_batches_tracked, Tensor):
            raise TypeError("num_batches_tracked must be a Tensor or None, got "
                            f"{type(num_batches_tracked).__name__}")
        if num_batches_tracked.dtype != torch.int64 or num_batches_tracked.numel() != 1:
            raise ValueError("num_batches_tracked must be a one-element int64 tensor, got "
                             f"{num_batches_tracked.dtype} of shape {tuple(num_batches_tracked.shape)}")
        if running_mean is None:
            raise ValueError("num_batches_tracked needs running_mean and running_var")
        if num_batches_tracked.device != running_mean.device:
            raise ValueError(f"num_batches_tracked is on {num_batches_tracked.device} but the "
                             f"running statistics are on {running_mean.device}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 0 or (
            groups > 0 and channels % groups):
        raise ValueError(f"groups must be 0 (batch norm) or divide C={channels}, got {groups!r}")
    # N·spatial == 1, as torch refuses (synchronised: the global batch counts, as in torch)
    if groups == 0 and training and x.numel() == channels and not synchronised:
        raise ValueError(f"x has one value per channel ({tuple(x.shape)}); batch statistics in "
                         "training mode need more than one (N·spatial > 1)")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if groups == 0 and not training and running_mean is None:
        raise ValueError("eval mode (training=False) needs running_mean and running_var")


def _promoted(x: Tensor, shortcut: Tensor | None, h) -> tuple[Tensor, Tensor | None]:
    """x and the shortcut in the dtype torch's ``shortcut + h·Norm(x)`` has: promoted over x,
    the shortcut and a per-channel h (a 0-dim h does not promote, as in torch); the kernels
    compute and write in x's dtype."""
    dtype = x.dtype
    if shortcut is not None:
        dtype = torch.promote_types(dtype, shortcut.dtype)
    if isinstance(h, Tensor) and h.dim() > 0:
        dtype = torch.promote_types(dtype, h.dtype)
    if shortcut is not None and shortcut.dtype != dtype:
        shortcut = shortcut.to(dtype)
    return x.to(dtype), shortcut


def _validate_conv(conv, x, shortcut, h, relu):
    if not isinstance(conv, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        raise TypeError(f"conv must be an nn.Conv1d/2d/3d, got {type(conv).__name__}")
    if conv.weight.dim() != x.dim():
        raise ValueError(f"conv is a {conv.weight.dim() - 2}-d convolution but x has "
                         f"{x.dim() - 2} spatial dims")
    if conv.bias is not None or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError("conv must be bias-free with numeric zero padding")
    if shortcut is not None or not relu or not (isinstance(h, float) and h == 1.0):
        raise ValueError("conv needs relu=True, no shortcut and h=1.0")


def _reference(x, weight, bias, running_mean, running_var, training, momentum, eps, groups,
               shortcut, h, relu, update_running):
    """The literal composition every other backend is tested against: the norms of
    :mod:`pyeuler.ops.reference_norm` (plain arithmetic, exact at every derivative order,
    unlike native batch_norm's third), then step, shortcut and ReLU."""
    if groups:
        y = reference_norm.group_norm(x, groups, weight, bias, eps)
    else:
        if training and not update_running:
            running_mean = running_var = None
        y = reference_norm.batch_norm(x, running_mean, running_var, weight, bias, training,
                                      momentum, eps)
    return _step_shortcut_act(y, shortcut, h, relu)


def _step_shortcut_act(y: Tensor, shortcut: Tensor | None, h, relu: bool) -> Tensor:
    """``act(shortcut + h·y)`` of a normalised y, literally."""
    if isinstance(h, Tensor) and h.dim() == 1:
        h = h.view(1, -1, *([1] * (y.dim() - 2)))
    if not (isinstance(h, float) and h == 1.0):
        y = h * y
    if shortcut is not None:
        y = shortcut + y
    return torch.relu(y) if relu else y


def norm_act(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    *,
    training: bool = True,
    momentum: float | Tensor | None = 0.1,
    eps: float = 1e-5,
    groups: int = 0,
    shortcut: Tensor | None = None,
    h: float | Tensor = 1.0,
    relu: bool = True,
    update_running: bool = True,
    num_batches_tracked: Tensor | None = None,
    backend: str | None = None,
    return_stats: bool = False,
    conv: torch.nn.Module | None = None,
):
    """``act(shortcut + h·Norm(x))`` with BatchNorm (``groups=0``) or GroupNorm(groups).

    BatchNorm follows ``F.batch_norm``: batch statistics when ``training`` (running
    statistics updated in place when given and ``update_running``, together with
    ``num_batches_tracked`` if given; ``momentum=None`` is the cumulative average
    ``1/num_batches_tracked``, as in ``nn.BatchNorm``), running statistics otherwise.
    GroupNorm always uses per-sample statistics.  ``h`` is a float, a scalar
    tensor or a per-channel tensor (learnable if it requires grad).  With
    ``return_stats=True`` also returns the :class:`NormStats` a backward pass needs.

    ``conv`` (a bias-free ``nn.Conv{1,2,3}d``; ReLU, no shortcut, ``h=1``) returns
    ``conv(ReLU(Norm(x)))`` instead.  On the fused backends its backward then recomputes
    the activation from x rather than keeping it: the first-order backward's reduction
    pass writes it (one write for a tensor of memory), a differentiable one
    (``create_graph=True``) spends an elementwise pass.
    """
    _validate(x, weight, bias, running_mean, running_var, shortcut, h, groups, training, eps,
              momentum, relu, num_batches_tracked)
    if conv is not None:
        _validate_conv(conv, x, shortcut, h, relu)
    name = resolve_backend(backend, x.device)
    tracking = groups == 0 and training and running_mean is not None and update_running
    if tracking and momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (the cumulative average) needs num_batches_tracked")
    if _is_real(momentum):
        momentum = float(momentum)
    if _is_real(h):
        h = float(h)
    if not tracking:
        num_batches_tracked = None
        momentum = 0.0 if momentum is None else momentum  # unused
    if name == "reference":
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / num_batches_tracked.to(running_mean.dtype)
        if return_stats:
            raise ValueError("return_stats=True needs an explicit backend, not 'reference'")
        y = _reference(x, weight, bias, running_mean, running_var, training, momentum, eps,
                       groups, shortcut, h, relu, update_running)
        return y if conv is None else conv(y)
    x, shortcut = _promoted(x, shortcut, h)
    name = kernel_backend(name, x, weight, bias, shortcut, h, running_mean, running_var)
    h_tensor = h.reshape(-1)[0] if isinstance(h, Tensor) and h.numel() == 1 and h.dim() == 1 else h
    h_tensor, h_value = (h_tensor, 1.0) if isinstance(h_tensor, Tensor) else (None, float(h))
    batch_stats = groups > 0 or training or running_mean is None
    mean_in = None if batch_stats else running_mean
    var_in = None if batch_stats else running_var
    empty = x.numel() == 0
    if empty and batch_stats:
        # No values, no statistics: placeholders (mean 0, variance 1) that only ever scale
        # empty tensors; running statistics stay as they are, as torch's layers leave them.
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        stat_shape = (x.shape[1],) if groups == 0 else (x.shape[0], groups)
        mean_in = torch.zeros(stat_shape, dtype=acc, device=x.device)
        var_in = torch.ones(stat_shape, dtype=acc, device=x.device)
    save_mask = relu and shortcut is not None
    if conv is not None and name != "eager":
        y, mean, var, *affine = norm_relu_conv(
            x, weight, bias, mean_in, var_in, eps, groups, conv_weight_for(x, conv.weight),
            list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups, name)
        mask = None
    elif name == "eager":
        y, mean, var, mask, affine = forward_math(primitives, x, weight, bias, shortcut, h_tensor,
                                                   h_value, mean_in, var_in, eps, groups, relu,
                                                   save_mask)
    else:
        y, mean, var, mask, *affine = norm_act_fwd(x, weight, bias, shortcut, h_tensor, h_value,
                                                    mean_in, var_in, eps, groups, relu, save_mask,
                                                    name)
        mask = mask if save_mask else None
    if conv is not None and name == "eager":
        y = conv(y)
    if tracking and empty:  # nothing to average in; the module still counts the batch
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
    elif tracking:
        update_running_stats(running_mean, running_var, mean, var, statistic_count(x, 0), momentum,
                             num_batches_tracked=num_batches_tracked, backend=name)
    if return_stats:
        affine = Affine(*(t.detach() for t in affine))  # they only ever gate the ReLU
        return y, NormStats(x, mean, var, mask, batch_stats, affine)
    return y



def _synced_reference(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                      eps, shortcut, h, relu, sync):
    """The literal synchronised BatchNorm: mean and variance as sums all-reduced over the
    group (differentiable, so every derivative order is autograd's), then
    :func:`_reference`'s step, shortcut and ReLU."""
    dims = [0, *range(2, x.dim())]
    broadcast = (1, -1, *([1] * (x.dim() - 2)))
    local_count = torch.full((), float(x.numel() // x.shape[1]), dtype=x.dtype, device=x.device)
    count, total = collectives.all_reduce_sum((local_count, x.sum(dims)), sync)
    mean = total / count
    (m2,) = collectives.all_reduce_sum(((x - mean.view(broadcast)).square().sum(dims),), sync)
    var = m2 / count
    var = var.masked_fill(var == float("inf"), float("nan"))  # docs/semantics.md §5
    y = (x - mean.view(broadcast)) * torch.rsqrt(var + eps).view(broadcast)
    if weight is not None:
        y = y * weight.view(broadcast)
    if bias is not None:
        y = y + bias.view(broadcast)
    if running_mean is not None:
        primitives.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var,
                                        count, momentum)
    return _step_shortcut_act(y, shortcut, h, relu)


def _synced_norm_act(norm: torch.nn.Module, x: Tensor, sync: collectives.SyncGroup, *, shortcut,
                     h, relu, update_running, backend, return_stats, conv):
    """:func:`norm_act_module` for a BatchNorm layer that synchronises over ``sync``
    (docs/semantics.md §10): the statistics and every gradient of the global batch."""
    tracking = norm.track_running_stats and update_running
    running_mean, running_var = (norm.running_mean, norm.running_var) if tracking else (None, None)
    num_batches_tracked = norm.num_batches_tracked if tracking else None
    momentum = norm.momentum if tracking else 0.0
    _validate(x, norm.weight, norm.bias, running_mean, running_var, shortcut, h, 0, True, norm.eps,
              momentum, relu, num_batches_tracked, synchronised=True)
    if conv is not None:
        _validate_conv(conv, x, shortcut, h, relu)
    if tracking and momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (the cumulative average) needs num_batches_tracked")
    if forward_mode_active(x, norm.weight, norm.bias, h) or func_transform_active():
        raise NotImplementedError(
            "synchronised BatchNorm (docs/semantics.md §10) supports reverse-mode autograd "
            "only, not forward mode or torch.func transforms: use .backward() / "
            "torch.autograd.grad, or call .eval() (running statistics need no synchronisation)")
    momentum = float(momentum) if _is_real(momentum) else momentum
    h = float(h) if _is_real(h) else h
    name = resolve_backend(backend, x.device)
    if name == "reference":
        if return_stats:
            raise ValueError("return_stats=True needs an explicit backend, not 'reference'")
        y = _synced_reference(x, norm.weight, norm.bias, running_mean, running_var,
                              num_batches_tracked, momentum, norm.eps, shortcut, h, relu, sync)
        return y if conv is None else conv(y)
    x, shortcut = _promoted(x, shortcut, h)
    h_tensor = h.reshape(-1)[0] if isinstance(h, Tensor) and h.numel() == 1 and h.dim() == 1 else h
    h_tensor, h_value = (h_tensor, 1.0) if isinstance(h_tensor, Tensor) else (None, float(h))
    save_mask = relu and shortcut is not None
    y, mean, var, count, scale, shift, mask = SyncedNormAct.apply(
        x, norm.weight, norm.bias, shortcut, h_tensor, h_value, norm.eps, relu, save_mask, sync,
        name)
    if conv is not None:  # unfused: the convolution's input is kept for its backward
        y = conv(y)
    if tracking:  # the global count, a tensor: no host read
        primitives.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var,
                                        count, momentum)
    if return_stats:
        return y, NormStats(x, mean, var, mask, True, Affine(scale, shift), sync)
    return y


def norm_act_module(
    norm: torch.nn.Module,
    x: Tensor,
    *,
    shortcut: Tensor | None = None,
    h: float | Tensor = 1.0,
    relu: bool = True,
    update_running: bool = True,
    backend: str | None = None,
    return_stats: bool = False,
    conv: torch.nn.Module | None = None,
):
    """:func:`norm_act` with the parameters and buffers of an ``nn.BatchNorm*d`` or
    ``nn.GroupNorm``, updating ``num_batches_tracked`` and honouring ``momentum=None``
    (cumulative average) exactly as the module's own forward does.

    An ``nn.SyncBatchNorm`` in training mode under a process group of more than one
    process synchronises (docs/semantics.md §10): statistics, gradients and running
    statistics of the global batch, and ``return_stats`` carries the group
    (:attr:`NormStats.sync`) for the backward passes.  It raises NotImplementedError under
    forward-mode AD or a ``torch.func`` transform."""
    if isinstance(norm, torch.nn.GroupNorm):
        return norm_act(x, norm.weight, norm.bias, eps=norm.eps, groups=norm.num_groups,
                        shortcut=shortcut, h=h, relu=relu, backend=backend,
                        return_stats=return_stats, conv=conv)
    if not isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"norm must be an nn.BatchNorm*d or nn.GroupNorm, got {type(norm).__name__}")
    sync = collectives.sync_group(norm)
    if sync is not None:
        return collectives.run_eagerly(_synced_norm_act)(
            norm, x, sync, shortcut=shortcut, h=h, relu=relu, update_running=update_running,
            backend=backend, return_stats=return_stats, conv=conv)
    tracking = norm.training and norm.track_running_stats and update_running
    use_running = not norm.training or norm.track_running_stats
    return norm_act(
        x, norm.weight, norm.bias,
        norm.running_mean if use_running else None,
        norm.running_var if use_running else None,
        training=norm.training or norm.running_mean is None,
        momentum=norm.momentum if tracking else 0.0, eps=norm.eps,
        shortcut=shortcut, h=h, relu=relu, update_running=tracking,
        num_batches_tracked=norm.num_batches_tracked if tracking else None, backend=backend,
        return_stats=return_stats, conv=conv)

