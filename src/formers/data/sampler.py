"""A deterministic, resumable order of training batches, the same for any number of processes.

Epoch e shuffles the training set with a generator seeded by (seed, e) and cuts it into
global batches (the last incomplete one is dropped; the next epoch's shuffle uses it).
Batch k of epoch e is therefore a pure function of (seed, e, k): a run resumed at
(epoch, position) continues with exactly the batches it would have seen, and under
`torchrun` process r takes the r-th contiguous slice of each global batch, so the data
a step trains on does not depend on the number of processes.
"""
from __future__ import annotations

from typing import Iterator

import torch

__all__ = ["EpochSampler", "step_generator", "shard_slice"]


def _mix(*ints: int) -> int:
    """A 63-bit seed from a few integers (a small splitmix-style hash, stable across runs)."""
    h = 0x9E3779B97F4A7C15
    for v in ints:
        h ^= (int(v) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def step_generator(seed: int, epoch: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for the random draws (augmentation) of one training step."""
    return torch.Generator().manual_seed(_mix(seed, epoch, step, stream, 1))


def shard_slice(batch_size: int, rank: int, world_size: int) -> slice:
    """The slice of a global batch that process `rank` takes."""
    per = batch_size // world_size
    return slice(rank * per, (rank + 1) * per)


class EpochSampler:
    def __init__(self, num_samples: int, batch_size: int, seed: int = 0):
        if batch_size > num_samples:
            raise ValueError(f"batch size {batch_size} is larger than the {num_samples} training images")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.num_samples // self.batch_size

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_mix(self.seed, epoch, 0))
        return torch.randperm(self.num_samples, generator=g)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """(position, indices of the global batch) for positions start .. len-1 of `epoch`."""
        perm = self.order(epoch)
        b = self.batch_size
        for k in range(start, len(self)):
            yield k, perm[k * b:(k + 1) * b]
