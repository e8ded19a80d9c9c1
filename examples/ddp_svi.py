"""Data-parallel SVI with torch.distributed: each rank fits its shard, gradients are averaged.

Each of W ranks holds the whole data set but evaluates the likelihood only on its shard
(``pyro.plate("data", N, subsample=shard)``, so Pyro scales the shard's log-likelihood by
N / len(shard)).  The loss is an :class:`~pyro.infer.elbo.ELBOModule` wrapped in
:class:`torch.nn.parallel.DistributedDataParallel`, which averages the gradients over ranks
after ``backward``.  With the same random seed on every rank (so every rank draws the same
global latents from the guide) the averaged gradient equals the single-process full-batch
gradient, up to floating-point rounding.

Run on one machine with two CPU processes::

    torchrun --nproc_per_node=2 examples/ddp_svi.py --steps 500

or, without torchrun, ``python examples/ddp_svi.py --spawn 2`` (the script starts the processes
itself).  On GPUs use the ``nccl`` backend and move the data to ``cuda:<local rank>``.
"""

from __future__ import annotations

import argparse
import os
import socket

import pyro
import pyro.distributions as dist
import torch
import torch.distributed as torch_dist
from pyro.infer.autoguide import AutoNormal
from torch.nn.parallel import DistributedDataParallel

from pyro_elbo_ext import JensenELBO


def model(data: torch.Tensor, shard: torch.Tensor) -> None:
    """z ~ N(0, 2), x_i ~ N(z, 1); the likelihood is evaluated on ``shard`` only."""
    z = pyro.sample("z", dist.Normal(data.new_tensor(0.0), 2.0))
    with pyro.plate("data", data.shape[0], subsample=shard) as idx:
        pyro.sample("obs", dist.Normal(z, 1.0), obs=data[idx])


def make_data(num_data: int = 1000, seed: int = 0) -> torch.Tensor:
    """The same synthetic data on every rank."""
    generator = torch.Generator().manual_seed(seed)
    return 1.3 + torch.randn(num_data, generator=generator, dtype=torch.float64)


def make_loss(data: torch.Tensor, shard: torch.Tensor, num_particles: int = 4):
    """An initialized ELBOModule over an AutoNormal guide.

    Call it with ``pyro.settings.set(module_local_params=True)`` in force (as ``worker`` does),
    so that the guide's parameters live in the module that DDP synchronizes.
    """
    guide = AutoNormal(model)
    elbo = JensenELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    loss_module = elbo(model, guide)
    pyro.set_rng_seed(0)
    loss_module(data, shard)  # creates the guide's parameters
    return loss_module


def shard_of(rank: int, world_size: int, num_data: int) -> torch.Tensor:
    """Rank ``rank``'s indices: every ``world_size``-th data point."""
    return torch.arange(rank, num_data, world_size)


def gradient_step(loss_module: torch.nn.Module, data, shard, seed: int) -> list[torch.Tensor]:
    """One loss evaluation and backward pass; returns copies of the parameters' gradients."""
    loss_module.zero_grad()
    pyro.set_rng_seed(seed)  # the same guide draws on every rank
    loss_module(data, shard).backward()
    return [p.grad.detach().clone() for p in loss_module.parameters()]


def worker(rank: int, world_size: int, port: int, steps: int, result_path: str | None) -> None:
    """One rank: join the process group, train with DDP, optionally save the first gradients."""
    torch_dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        torch.set_num_threads(1)
        pyro.settings.set(module_local_params=True)
        data = make_data()
        shard = shard_of(rank, world_size, data.shape[0])
        loss_module = make_loss(data, shard)
        ddp = DistributedDataParallel(loss_module)
        first_grads = gradient_step(ddp, data, shard, seed=1)
        if result_path is not None:
            torch.save(first_grads, f"{result_path}.rank{rank}")
        optimizer = torch.optim.Adam(ddp.parameters(), lr=0.02)
        for step in range(steps):
            optimizer.zero_grad()
            pyro.set_rng_seed(1000 + step)
            ddp(data, shard).backward()
            optimizer.step()
        if rank == 0 and steps:
            median = float(loss_module.guide.median(data, shard)["z"])
            print(f"after {steps} steps on {world_size} ranks: median of q(z) = {median:.4f}")
        # release DDP's reducer and wait for every rank before the group goes away: a rank that
        # tears gloo down while another still talks to it can abort ("terminate called
        # without an active exception")
        del ddp, optimizer
        torch_dist.barrier()
    finally:
        torch_dist.destroy_process_group()


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--spawn", type=int, default=0, help="start this many local processes")
    args = parser.parse_args(argv)
    if args.spawn:
        torch.multiprocessing.spawn(
            worker, args=(args.spawn, free_port(), args.steps, None), nprocs=args.spawn
        )
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    port = int(os.environ.get("MASTER_PORT", "29500"))
    worker(rank, world_size, port, args.steps, None)


if __name__ == "__main__":
    main()
