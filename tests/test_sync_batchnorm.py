"""nn.SyncBatchNorm inside pyeuler modules (docs/semantics.md §10).

Two gloo processes on the CPU, each holding a shard of one global batch: a training step
of the converted model (outputs, input and parameter gradients, running statistics; second
order through "unrolled" IE-Skips and a gradient penalty) must equal a single process's
step on the concatenated batch with plain nn.BatchNorm, computed independently on the
"reference" backend in float64.  Shards of equal and of unequal size.
"""

import copy
import os
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pyeuler.models import wide_resnet
from pyeuler.nn import IESkip, PreActBranch

WORLD = 2
F64 = dict(rtol=1e-9, atol=1e-10)  # docs/semantics.md §6
F32 = dict(rtol=1e-4, atol=1e-5)

needs_gloo = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32",
                                reason="needs torch.distributed with gloo")


def _convert(model):
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def test_single_process_sync_batchnorm_is_batchnorm():
    torch.manual_seed(0)
    plain = wide_resnet(10, 1, num_classes=3, backend="eager")
    synced = _convert(wide_resnet(10, 1, num_classes=3, backend="eager"))
    synced.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(synced(x), plain(x))


# ----------------------------------------------------------------------------------------
# Two processes.  mp.spawn runs _run in each; a failing assertion fails the test (the other
# process's collectives time out instead of hanging).


def _run(rank: int, worker, init_file: str, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=90))
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, worker, *args) -> None:
    mp.spawn(_run, args=(worker, os.fspath(tmp_path / "init"), args), nprocs=WORLD)


def _set_backend(model: nn.Module, backend: str) -> nn.Module:
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = backend
    return model


def _ie_skip(channels: int = 4):
    """An IE-Skip (K = 1, "unrolled") around a BatchNorm pre-activation branch, as a model
    whose output is the skip's output flattened."""
    return nn.Sequential(IESkip(PreActBranch(channels, h=0.5), steps=1), nn.Flatten())


MODELS = {
    # plain pre-activation blocks, BatchNorm heads and a downsampling shortcut
    "wrn": lambda: wide_resnet(10, 1, num_classes=3),
    # IE-Skip with BatchNorm inside, K = 1, "unrolled": its backward is the VJP's second order
    "ie_wrn": lambda: wide_resnet(10, 1, num_classes=3, ie_steps=1),
    "ie_skip": _ie_skip,
}
INPUTS = {"wrn": (3, 8, 8), "ie_wrn": (3, 4, 4), "ie_skip": (4, 4, 4)}
OUTPUTS = {"wrn": 3, "ie_wrn": 3, "ie_skip": 64}


def _step(model, x, weights, count, penalty):
    """The loss (``Σ weights·model(x) / count``, plus ``‖∂loss/∂x‖²`` with ``penalty``: a
    second order) and its gradients with respect to x and the parameters."""
    out = model(x)
    loss = (out * weights).sum() / count
    if penalty:
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        loss = loss + gx.square().sum()
    grads = torch.autograd.grad(loss, [x, *model.parameters()])
    return out.detach(), grads[0], list(grads[1:])


def _compare(model_name, shards, rank, backend, dtype, penalty=False, ddp=False):
    """One step of ``model_name`` on this process's shard equals the single-process step on
    the concatenated batch: outputs and input gradients of the shard, parameter gradients
    summed over processes, running statistics.  The loss is the global batch's mean: each
    process's share divides its sum by the global batch size.  With ``ddp`` the model is
    wrapped in DistributedDataParallel, which averages parameter gradients, so each
    process's loss is scaled by the number of processes (and so is the input gradient)."""
    torch.manual_seed(0)
    plain = MODELS[model_name]().double()
    initial = copy.deepcopy(plain)
    synced = _set_backend(_convert(copy.deepcopy(plain)), backend).to(dtype)
    _set_backend(plain, "reference")
    n, start = sum(shards), sum(shards[:rank])
    mine = slice(start, start + shards[rank])
    x = torch.randn(n, *INPUTS[model_name], dtype=torch.float64) * 2 + 0.5
    x[: shards[0]] += 1.0  # the shards' means differ: local statistics would be wrong
    weights = torch.randn(n, OUTPUTS[model_name], dtype=torch.float64)

    out_full, gx_full, gparams_full = _step(plain, x.clone().requires_grad_(), weights, n, penalty)

    x_mine = x[mine].to(dtype).requires_grad_()
    if ddp:
        # DDP refuses to wrap a CPU model holding SyncBatchNorm (torch's own cannot run on
        # the CPU); pyeuler's can, so the layers are converted in place after wrapping.
        wrapped = nn.parallel.DistributedDataParallel(
            _set_backend(initial, backend).to(dtype))
        synced = _convert(wrapped.module)
        out = wrapped(x_mine)
        (WORLD * (out * weights[mine].to(dtype)).sum() / n).backward()
        gx = x_mine.grad / WORLD  # the input gradient is that of the scaled loss
        gparams = [p.grad for p in synced.parameters()]  # averaged by DDP
    else:
        out, gx, gparams = _step(synced, x_mine, weights[mine].to(dtype), n, penalty)
        # an empty shard's gradients may be expanded zeros: reduce dense copies
        gparams = [g.contiguous().clone() for g in gparams]
        for g in gparams:
            dist.all_reduce(g)

    tol = F64 if dtype == torch.float64 else F32
    case = f"{model_name} shards={shards} rank={rank} backend={backend}"
    torch.testing.assert_close(out.double(), out_full[mine], **tol,
                               msg=lambda m: f"{case} output: {m}")
    torch.testing.assert_close(gx.double(), gx_full[mine], **tol,
                               msg=lambda m: f"{case} input gradient: {m}")
    for (name, _), g, g_full in zip(synced.named_parameters(), gparams, gparams_full):
        torch.testing.assert_close(g.double(), g_full, **tol,
                                   msg=lambda m: f"{case} gradient of {name}: {m}")
    for (name, b), b_full in zip(synced.named_buffers(), plain.buffers()):
        assert b.dtype == b_full.dtype or b.is_floating_point(), name
        torch.testing.assert_close(b.to(b_full.dtype), b_full, **tol,
                                   msg=lambda m: f"{case} buffer {name}: {m}")
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) > 0


def _eager_cases(rank: int) -> None:
    for shards in ((4, 4), (3, 5)):
        _compare("wrn", shards, rank, "eager", torch.float64)
        _compare("ie_wrn", shards, rank, "eager", torch.float64)
    _compare("wrn", (2, 5), rank, "eager", torch.float64, penalty=True)
    _compare("ie_skip", (3, 2), rank, "eager", torch.float64, penalty=True)
    _compare("wrn", (3, 5), rank, "eager", torch.float64, ddp=True)
    # an empty shard adds nothing but joins every collective
    _compare("wrn", (0, 4), rank, "eager", torch.float64)
    _compare("ie_skip", (4, 0), rank, "eager", torch.float64)
    _compare("ie_wrn", (5, 3), rank, "reference", torch.float64)


def _triton_cases(rank: int) -> None:
    for shards in ((3, 3), (2, 4)):
        _compare("ie_skip", shards, rank, "triton", torch.float32)
    _compare("ie_skip", (3, 2), rank, "triton", torch.float32, penalty=True)
    _compare("ie_wrn", (3, 5), rank, "triton", torch.float32)


@needs_gloo
def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    _spawn(tmp_path, _eager_cases)


@needs_gloo
def test_two_processes_on_triton_equal_one_process(tmp_path):
    from conftest import triton_usable

    usable, why = triton_usable()
    if not usable:
        pytest.skip(f"triton: {why}")
    _spawn(tmp_path, _triton_cases)


def _refused(rank: int, errors) -> None:
    model = _convert(wide_resnet(10, 1, num_classes=3, ie_steps=2, grad="implicit",
                                 backend="eager"))
    x = torch.randn(4, 3, 8, 8)
    try:
        model(x)
        errors.put((rank, "no error"))
    except NotImplementedError as e:
        errors.put((rank, str(e)))
    model.eval()(x)  # eval: running statistics, nothing to synchronise


@needs_gloo
def test_implicit_ie_skips_with_synchronised_batchnorm_are_refused(tmp_path):
    errors = mp.get_context("spawn").Queue()
    _spawn(tmp_path, _refused, errors)
    messages = sorted(errors.get(timeout=60) for _ in range(WORLD))
    assert [rank for rank, _ in messages] == [0, 1]
    for _, message in messages:
        assert "grad='implicit'" in message and "docs/semantics.md §10" in message, message
