"""nn.SyncBatchNorm inside pyeuler modules: refused where it would synchronise (not
implemented yet, docs/semantics.md §10), plain BatchNorm in a single process."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pyeuler.models import wide_resnet


def _convert(model):
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def test_single_process_sync_batchnorm_is_batchnorm():
    torch.manual_seed(0)
    plain = wide_resnet(10, 1, num_classes=3, backend="eager")
    synced = _convert(wide_resnet(10, 1, num_classes=3, backend="eager"))
    synced.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(synced(x), plain(x))


def _two_ranks(rank: int, init_file: str, errors) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = _convert(wide_resnet(10, 1, num_classes=3, backend="eager"))
        x = torch.randn(4, 3, 8, 8)
        try:
            model(x)
            errors.put((rank, "no error"))
        except NotImplementedError as e:
            errors.put((rank, str(e)))
        model.eval()(x)  # eval: running statistics, nothing to synchronise
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32",
                    reason="needs torch.distributed with gloo")
def test_sync_batchnorm_across_processes_is_refused_not_silently_local(tmp_path):
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    mp.spawn(_two_ranks, args=(os.fspath(tmp_path / "init"), errors), nprocs=2)
    messages = sorted(errors.get(timeout=60) for _ in range(2))
    assert [rank for rank, _ in messages] == [0, 1]
    for _, message in messages:
        assert "not synchronised yet" in message and "docs/semantics.md §10" in message
