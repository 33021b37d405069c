"""Refinement driven by the hard-pixel bank: which images to draw (sampler), where to crop, how
much each pixel weighs. Samplers choose images; the dataset wrapper chooses crops and weights.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from segohem.bank import HardPixelBank
from segohem.crops import cut_window, hard_cell_centre
from segohem.data.datasets import SegmentationDataset
from segohem.data.samplers import draw_seed, repeat_keys, shard_by_batch

SAMPLER_SCORES = ("none", "image", "class")


def image_weights(bank: HardPixelBank, sample_ids: list[str], *, score: str, floor: float) -> np.ndarray:
    """Sampling weight per image, mean 1, never below ``floor`` (so easy images are not forgotten).

    score ``image``: EMA kept fraction x EMA hard loss. score ``class``: every class gets the
    same total mass, spread over images by their share of that class's hard pixels (rare
    classes are drawn as often as common ones; DAFormer's rare-class sampling, on hard pixels).
    Images the bank has not seen get weight 1.
    """
    if score not in SAMPLER_SCORES or score == "none":
        raise ValueError(f"sampler score {score!r} is unknown; valid: image, class")
    known = [bank.samples.get(s) for s in sample_ids]
    if score == "image":
        raw = np.array([s.score if s is not None else np.nan for s in known])
    else:
        per_class = np.stack([s.hard_positives() if s is not None else np.zeros(bank.num_classes) for s in known])
        totals = per_class.sum(0)
        raw = (per_class[:, totals > 0] / totals[totals > 0]).sum(1)
        raw[[s is None for s in known]] = np.nan
    seen = ~np.isnan(raw)
    weights = np.ones(len(sample_ids))
    if seen.any() and raw[seen].mean() > 0:
        scaled = raw[seen] / raw[seen].mean()
        weights[seen] = np.maximum(scaled, floor)
    return weights / weights.mean()


def class_weights_from_bank(bank: HardPixelBank, *, power: float) -> np.ndarray:
    """Per-class loss weights from the latest epoch's hard fraction of each class, mean 1.

    A class whose pixels are mostly hard (thin poles) weighs more than one that is mostly
    easy (road): weight_c = hard_fraction_c ** power, normalized to mean 1 over the classes
    present. Classes the bank never saw get weight 1.
    """
    if not bank.epochs:
        raise ValueError("the bank holds no per-epoch class statistics to weigh classes by")
    latest = bank.epochs[max(bank.epochs)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return weights_from_shares(np.where(latest.valid > 0, latest.hard / latest.valid, np.nan), power=power)


def weights_from_shares(shares: np.ndarray, *, power: float) -> np.ndarray:
    """Class weights max(share, 1e-3) ** ``power``, mean 1 over the classes with a share; 1 for a
    class without one (NaN: no valid pixels seen). The floor keeps a class with a zero share
    (learnt perfectly, or never hard) at a little weight rather than none."""
    seen = ~np.isnan(shares)
    weights = np.ones(len(shares))
    if seen.any():
        weights[seen] = np.maximum(shares[seen], 1e-3) ** power
        weights[seen] /= weights[seen].mean()
    return weights


class WeightedEpochSampler(Sampler[int]):
    """Draws ``len(weights)`` indices per epoch with replacement, in proportion to ``weights``;
    an image's second and later draws are yielded as repeat keys (`repeat_keys`).

    Seeded from (seed, epoch) and identical on every rank, sharded by `shard_by_batch`, so it
    is deterministic and DDP-consistent; the epoch length, and so the LR schedule, is unchanged.
    """

    def __init__(
        self, weights: np.ndarray, *, seed: int, batch_size: int = 1, rank: int = 0, world_size: int = 1
    ) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.seed, self.batch_size, self.rank, self.world_size, self.epoch = seed, batch_size, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        """The whole epoch's draws, the same on every rank."""
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/weighted/{self.epoch}".encode()))
        draws = torch.multinomial(self.weights, len(self.weights), replacement=True, generator=generator).tolist()
        return repeat_keys(draws, len(self.weights))

    def _shard(self, order: list[int]) -> list[int]:
        return shard_by_batch(order, rank=self.rank, world_size=self.world_size, batch_size=self.batch_size)

    def __len__(self) -> int:
        return len(self._shard(list(range(len(self.weights)))))

    def __iter__(self) -> Iterator[int]:
        return iter(self._shard(self.order()))


class BankDrivenDataset(Dataset[dict[str, Any]]):
    """Wraps a training dataset: hard-region crops and per-pixel weights from the bank.

    hard_crop_prob: probability that a sample is a window of the base sample's size, cut from
        the image resized by ``crop_scale`` (2.0 on half-resolution data = full resolution)
        around a cell drawn in proportion to hardness**sharpness.
    pixel_weight: alpha; every pixel gets weight 1 + alpha * hardness of its original cell.
    """

    def __init__(
        self,
        base: SegmentationDataset,
        bank: HardPixelBank,
        *,
        hard_crop_prob: float = 0.0,
        crop_scale: float = 1.0,
        sharpness: float = 2.0,
        pixel_weight: float = 0.0,
    ) -> None:
        self.base, self.bank = base, bank
        self.hard_crop_prob, self.crop_scale, self.sharpness = hard_crop_prob, crop_scale, sharpness
        self.pixel_weight = pixel_weight

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def _hardness(self, sample_id: str) -> np.ndarray | None:
        stats = self.bank.samples.get(sample_id)
        return None if stats is None else np.nan_to_num(stats.hardness, nan=0.0)

    def __getitem__(self, key: int) -> dict[str, Any]:
        base = self.base
        index, repeat = base.split_key(key)
        rng = np.random.default_rng(draw_seed(base.seed, "refine", base.epoch, index, repeat=repeat))
        hardness = self._hardness(base.sample_id(index))
        if hardness is not None and hardness.max() > 0 and rng.random() < self.hard_crop_prob:
            sample = base.finish(index, *self._hard_crop(index, hardness, rng), repeat=repeat)
        else:
            sample = base[key]
        if self.pixel_weight > 0:
            sample["pixel_weight"] = self._pixel_weight(sample, hardness)
        return sample

    def _hard_crop(
        self, index: int, hardness: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
        image, mask, source_yx, original_hw = self.base.load(index, scale=self.crop_scale)
        centre = hard_cell_centre(hardness, cell_size=self.bank.cell_size, sharpness=self.sharpness, rng=rng)
        assert centre is not None  # the caller saw a hard cell
        # centre in original pixels -> in the scaled image's pixels
        scaled = (centre[0] * image.shape[0] / original_hw[0], centre[1] * image.shape[1] / original_hw[1])
        window = cut_window((image, mask, source_yx), scaled, self.base.resize or original_hw,
                            ignore_index=self.base.ignore_index)  # fmt: skip
        return (*window, original_hw)

    def _pixel_weight(self, sample: dict[str, Any], hardness: np.ndarray | None) -> torch.Tensor:
        weight = torch.ones(sample["mask"].shape)
        if hardness is None:
            return weight
        cells = (sample["source_yx"] / self.bank.cell_size).floor().long()
        rows = cells[0].clamp(0, hardness.shape[0] - 1)
        cols = cells[1].clamp(0, hardness.shape[1] - 1)
        return weight + self.pixel_weight * torch.from_numpy(hardness).float()[rows, cols]
