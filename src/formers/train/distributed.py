"""One process or many: the same code runs alone or under `torchrun --nproc_per_node=N`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; with them we join a process group (NCCL
where GPUs exist, gloo on CPU), each process takes its slice of every batch, DDP averages
the gradients, and only rank 0 writes files. A barrier precedes destroy_process_group:
without it, gloo occasionally aborts at shutdown.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "setup", "teardown"]


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            t = t.to(self.device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def average_norm_stats(self, model: torch.nn.Module):
        """Average BatchNorm's running statistics over the ranks (timm's `--dist-bn reduce`, its default):
        each rank updated them on its own shard of the batch, so without this the ranks evaluate and save
        different models. Parameters need nothing: DDP keeps them equal."""
        if not self.distributed:
            return
        for name, buf in model.named_buffers():
            if name.endswith(("running_mean", "running_var")) and buf.is_floating_point():
                t = buf.detach().to(self.device, torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                buf.copy_(t / self.world_size)

    def gather_objects(self, obj) -> list:
        """`obj` from every rank (a list on every rank)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def setup(device: str | None = None) -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    from formers.cli import resolve_device
    dev = resolve_device(device)             # a device this machine lacks: a one-line ValueError
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local % torch.cuda.device_count())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    ctx = DistContext(rank, world, local, dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                device_id=dev if dev.type == "cuda" else None)
        ctx.initialized_here = True
    return ctx


def teardown(ctx: DistContext):
    if ctx.initialized_here and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
