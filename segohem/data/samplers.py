"""Samplers choose images (never pixels): seeded epoch orders, sharded across ranks by batch.

Every rank draws the same order from (seed, epoch); `shard_by_batch` gives rank r the r-th
block of ``batch_size`` indices of every global batch, so N processes x batch B see exactly
the batches of one process x batch N*B, and an epoch's image set does not depend on N.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def draw_seed(*parts: object, repeat: int = 0) -> int:
    """The 32-bit seed of one seeded draw, from its parts (run seed, purpose, epoch, image index)
    joined by "/"; repeat n > 0 of an image in an epoch (see `repeat_keys`) appends "/n", so its
    draw differs while a first draw keeps the seed it had before repeats existed."""
    return zlib.crc32(("/".join(str(part) for part in parts) + (f"/{repeat}" if repeat else "")).encode())


def shard_by_batch(order: list[int], *, rank: int, world_size: int, batch_size: int) -> list[int]:
    """Rank ``rank``'s share of ``order``: its block of every full global batch, in order.

    A global batch is ``batch_size * world_size`` consecutive entries of ``order``; an
    incomplete last one is dropped (as ``drop_last``), except with one process when there is no
    full batch at all (a tiny dataset then trains on one partial batch).
    """
    global_batch = batch_size * world_size
    usable = len(order) // global_batch * global_batch
    if usable == 0:
        if world_size == 1:
            return list(order)
        raise ValueError(
            f"{len(order)} training images cannot fill one global batch of {world_size} processes x "
            f"data.batch_size={batch_size}; lower data.batch_size or use fewer processes"
        )
    return [
        index
        for start in range(0, usable, global_batch)
        for index in order[start + rank * batch_size : start + (rank + 1) * batch_size]
    ]


def repeat_keys(draws: list[int], length: int) -> list[int]:
    """Draws with replacement as dataset keys: the n-th draw of index i in the list becomes
    ``i + n * length``, so a repeated image gets augmentation of its own (see
    `segohem.data.datasets.SegmentationDataset`); first draws keep their index."""
    seen: dict[int, int] = {}
    keys = []
    for index in draws:
        repeat = seen.get(index, 0)
        seen[index] = repeat + 1
        keys.append(index + repeat * length)
    return keys


class EpochShuffleSampler(Sampler[int]):
    """A permutation drawn from (seed, epoch), sharded by `shard_by_batch`: resume-exact, DDP-consistent."""

    def __init__(self, length: int, *, seed: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.seed, self.batch_size = length, seed, batch_size
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        shard_by_batch(list(range(length)), rank=rank, world_size=world_size, batch_size=batch_size)  # checks

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        """The whole epoch's order, the same on every rank."""
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/shuffle/{self.epoch}".encode()))
        return torch.randperm(self.length, generator=generator).tolist()

    def __len__(self) -> int:
        return len(shard_by_batch(list(range(self.length)), rank=self.rank, world_size=self.world_size,
                                  batch_size=self.batch_size))  # fmt: skip

    def __iter__(self) -> Iterator[int]:
        return iter(shard_by_batch(self.order(), rank=self.rank, world_size=self.world_size,
                                   batch_size=self.batch_size))  # fmt: skip


class ShardSampler(Sampler[int]):
    """Evaluation: rank r takes indices r, r + N, r + 2N, ... with no padding, so a sum over ranks
    counts every sample exactly once (DistributedSampler pads by repeating samples)."""

    def __init__(self, length: int, *, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))
