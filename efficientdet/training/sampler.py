"""Deterministic, resumable, sharded training-set order."""
from __future__ import annotations

import math
from typing import Iterator, List

import torch
from torch.utils.data import Sampler

__all__ = ['EpochSampler']


class EpochSampler(Sampler[int]):
    """Deterministic per-epoch order (seeded by ``seed + epoch``), sharded across ``world`` ranks
    (padded by repeating, like DistributedSampler), able to start mid-epoch.

    ``set_epoch(epoch, skip)`` skips the first ``skip`` indices of this rank's share, so a resumed
    run continues with exactly the batches it had not seen yet.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world: int = 1):
        self.size, self.shuffle, self.seed = int(size), bool(shuffle), int(seed)
        self.rank, self.world = int(rank), int(world)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip)

    def per_rank(self) -> int:
        return math.ceil(self.size / self.world)

    def _indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = self.per_rank() * self.world
        while len(order) < total:
            order += order[:total - len(order)]
        return order[self.rank:total:self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip:])

    def __len__(self) -> int:
        return max(self.per_rank() - self.skip, 0)
