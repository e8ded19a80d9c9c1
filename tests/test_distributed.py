"""Data-parallel SVI over 2 CPU processes (gloo) equals the single-process full-batch gradient."""

import sys
from pathlib import Path

import pyro
import pytest
import torch
import torch.distributed

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
ddp_svi = pytest.importorskip("ddp_svi")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_process_ddp_gradient_equals_full_batch_gradient(tmp_path):
    world_size = 2
    result = str(tmp_path / "grads")
    torch.multiprocessing.spawn(
        ddp_svi.worker, args=(world_size, ddp_svi.free_port(), 3, result), nprocs=world_size
    )
    per_rank = [torch.load(f"{result}.rank{rank}") for rank in range(world_size)]
    # single process, the whole data set as one "shard" (scale 1), the same seed
    data = ddp_svi.make_data()
    everything = torch.arange(data.shape[0])
    lone = ddp_svi.shard_of(0, world_size, data.shape[0])
    with pyro.settings.context(module_local_params=True):
        expected = ddp_svi.gradient_step(ddp_svi.make_loss(data, everything), data, everything, 1)
        alone = ddp_svi.gradient_step(ddp_svi.make_loss(data, lone), data, lone, 1)
    for rank_grads in per_rank:
        for got, want in zip(rank_grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # and the shards really differ: one rank alone is not the full-batch gradient
    assert not all(torch.allclose(a, w) for a, w in zip(alone, expected))
