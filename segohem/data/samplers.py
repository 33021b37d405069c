"""Samplers choose images (never pixels): a seeded shuffle that is reproducible per epoch."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A permutation drawn from (seed, epoch): resume-exact and identical on every rank.

    Under DDP pass ``rank``/``world_size``: each rank takes every world_size-th index of the
    same permutation (padded by wrapping so every rank gets the same number of batches).
    """

    def __init__(self, length: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.seed, self.rank, self.world_size = length, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.length // self.world_size)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/shuffle/{self.epoch}".encode()))
        order = torch.randperm(self.length, generator=generator).tolist()
        order += order[: len(self) * self.world_size - self.length]
        return iter(order[self.rank :: self.world_size])
