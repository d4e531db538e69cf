"""Deterministic, resumable, sharded training-set order, and augmentation randomness that depends
only on an image's place in that order.

:class:`EpochSampler` gives each rank its share of an epoch, can start mid-epoch, and with
``examples_per_epoch`` makes epochs of a fixed number of images drawn from consecutive shuffled
passes over the set (the official 120,000-image epoch). With ``item_seeds`` it yields
``(index, seed)`` pairs; :class:`SeededItems` reseeds the random number generators from that seed
before loading the item, so an image's augmentation is the same whichever data-loader worker loads
it, with any number of workers, and after a resume (the exact-resume property does not depend on
``--num_workers``).
"""
from __future__ import annotations

import math
import random
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .rng import seed_generators

__all__ = ['EpochSampler', 'SeededItems', 'item_seed', 'CROWD_CLASS']

CROWD_CLASS = -2  # the class of crowd boxes in annotation tensors (efficientdet.data)
_BN_EPOCH = -1    # item seeds of int keys (BN calibration images) use this epoch
_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def item_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for the item at global ``position`` of ``epoch`` (splitmix64 of the three
    numbers): well spread for neighbouring positions, the same on every rank and worker."""
    x = 0
    for v in (int(seed), int(epoch), int(position)):
        x = (x + (v & 0xFFFFFFFFFFFFFFFF) + _MIX[0]) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * _MIX[1]) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * _MIX[2]) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x >> 1


class EpochSampler(Sampler[Any]):
    """Deterministic per-pass order (pass p shuffled with ``seed + p``), sharded across ``world``
    ranks (global position j goes to rank ``j % world``), able to start mid-epoch.

    ``examples_per_epoch`` None: epoch e is pass e, padded by repeating its start to a multiple of
    ``world`` (like DistributedSampler). Given: epoch e is global positions ``[e*E, (e+1)*E)`` of
    the endless stream of passes, with ``E = examples_per_epoch`` rounded down to a multiple of
    ``world``. ``set_epoch(epoch, skip)`` skips the first ``skip`` indices of this rank's share, so
    a resumed run continues with exactly the batches it had not seen. ``item_seeds``: yield
    ``(index, item_seed(seed, epoch, global position))`` for :class:`SeededItems`.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world: int = 1,
                 examples_per_epoch: Optional[int] = None, item_seeds: bool = False):
        self.size, self.shuffle, self.seed = int(size), bool(shuffle), int(seed)
        self.rank, self.world = int(rank), int(world)
        if examples_per_epoch is not None and int(examples_per_epoch) < self.world:
            raise ValueError(f'examples_per_epoch={examples_per_epoch} is fewer than one image per process')
        self.examples_per_epoch = None if examples_per_epoch is None else int(examples_per_epoch)
        self.item_seeds = bool(item_seeds)
        self.epoch, self.skip = 0, 0
        self._pass_cache: Tuple[int, List[int]] = (-1, [])

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip)

    def per_rank(self) -> int:
        """Images of one epoch per rank."""
        if self.examples_per_epoch is None:
            return math.ceil(self.size / self.world)
        return self.examples_per_epoch // self.world

    def _pass(self, p: int) -> List[int]:
        if self._pass_cache[0] != p:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + p)
                order = torch.randperm(self.size, generator=g).tolist()
            else:
                order = list(range(self.size))
            self._pass_cache = (p, order)
        return self._pass_cache[1]

    def _positions(self) -> List[int]:
        """Global positions of this rank's share of the epoch (whole epoch, before ``skip``)."""
        start = 0 if self.examples_per_epoch is None else self.epoch * self.per_rank() * self.world
        return [start + k * self.world + self.rank for k in range(self.per_rank())]

    def _index(self, position: int) -> int:
        if self.examples_per_epoch is None:  # pass = epoch, padded by repeating its start
            order = self._pass(self.epoch)
            return order[position % self.size]
        return self._pass(position // self.size)[position % self.size]

    def __iter__(self) -> Iterator[Any]:
        for pos in self._positions()[self.skip:]:
            i = self._index(pos)
            yield (i, item_seed(self.seed, self.epoch, pos)) if self.item_seeds else i

    def __len__(self) -> int:
        return max(self.per_rank() - self.skip, 0)


class SeededItems(Dataset):
    """``dataset`` whose items are loaded with the random generators (Python, numpy, torch)
    seeded from the key: ``items[(i, seed)]`` is ``dataset[i]`` drawn with ``seed`` (keys from
    :class:`EpochSampler` with ``item_seeds``); ``items[i]`` uses ``item_seed(base_seed, -1, i)``
    (e.g. the fixed images of BN re-estimation). The caller's generator states are restored after
    each item, so loading in the main process (``num_workers=0``) does not disturb training
    randomness. ``drop_crowd``: crowd boxes (class -2) are removed from ``annot`` (the official
    input pipeline's ``skip_crowd_during_training``); otherwise they stay, as regions the loss
    ignores."""

    def __init__(self, dataset: Dataset, base_seed: int = 0, drop_crowd: bool = False):
        self.dataset, self.base_seed, self.drop_crowd = dataset, int(base_seed), bool(drop_crowd)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # the wrapped dataset's attributes (summary, obj_list …)
        if name in ('dataset', '__setstate__', '__getstate__'):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Dict[str, Any]:
        if isinstance(key, tuple):
            index, seed = int(key[0]), int(key[1])
        else:
            index, seed = int(key), item_seed(self.base_seed, _BN_EPOCH, int(key))
        saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        try:
            seed_generators(seed, cuda=False)  # only the CPU states are saved and restored here
            item = self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
        if self.drop_crowd and isinstance(item, dict) and 'annot' in item:
            annot = item['annot']
            item = dict(item, annot=annot[annot[:, 4] != CROWD_CLASS])
        return item
