"""Processes launched by torchrun: the process group, ranks, and what is reduced across them.

Everything that writes files or prints asks `is_main_process` first; metrics and the
hard-pixel dictionary are reduced explicitly (`ConfusionMatrix.all_reduce`, `sync_bank`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from segohem.bank import EpochClassStats, HardPixelBank


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


@dataclass(frozen=True)
class Launch:
    """Where this process sits: global rank, rank on its node, number of processes."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_name: str) -> Launch:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on the CPU); a no-op alone.

    ``device_name`` is ``run.device``: with CUDA each process takes GPU ``LOCAL_RANK``.
    """
    if not launched_by_torchrun():
        return Launch()
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Launch(dist.get_rank(), local_rank, dist.get_world_size())


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_device() -> torch.device:
    """Where tensors must be for a collective: this process's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def sync_bank(bank: HardPixelBank, *, epoch: int) -> None:
    """Make every rank's dictionary the one a single process would hold after ``epoch``.

    Each rank updated the images of its own shard: their per-image statistics are exchanged
    (the rank that saw an image this epoch holds its new state) and the epoch's per-class
    counts are summed. Replicas are identical before the epoch, so after this they are again.
    An image drawn on several ranks in one epoch (weighted sampling with replacement) keeps
    the lowest rank's state.
    """
    if get_world_size() == 1:
        return
    mine = {key: stats for key, stats in bank.samples.items() if stats.last_epoch == epoch}
    history = bank.epochs.get(epoch)
    shared: list[Any] = [None] * get_world_size()
    dist.all_gather_object(shared, (mine, history))
    merged: dict[str, Any] = {}
    for updated, _ in shared:
        for key, stats in updated.items():
            merged.setdefault(key, stats)
    bank.samples.update(merged)
    totals = [h for _, h in shared if h is not None]
    if totals:
        missed = None if any(h.missed is None for h in totals) else sum(h.missed for h in totals)
        bank.epochs[epoch] = EpochClassStats(sum(h.hard for h in totals), sum(h.valid for h in totals), missed)
