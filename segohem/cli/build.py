"""Builders shared by the commands: the loaders (one evaluation-loader builder) and the refinement bank."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from segohem.bank import HardPixelBank
from segohem.bank_store import load_bank
from segohem.config import Config, ConfigError
from segohem.data import build_dataset, class_info, collate_samples
from segohem.data.datasets import SegmentationDataset
from segohem.data.samplers import EpochShuffleSampler
from segohem.data.transforms import build_train_transform
from segohem.engine.distributed import get_rank, get_world_size
from segohem.engine.loop import Loaders
from segohem.engine.run import checkpoint_bank
from segohem.mining import DictionaryCropDataset, DictionarySampler
from segohem.refine import BankDrivenDataset, WeightedEpochSampler, image_weights


def build_eval_loader(cfg: Config, *, split: str) -> DataLoader[Any]:
    """The loader every evaluation-like pass uses (validation, eval, mine, viz): no augmentation, in
    order; under torchrun each process takes every N-th image, none twice."""
    dataset = build_dataset(cfg.data, cfg.augment, split=split, train=False, seed=cfg.run.seed)
    return DataLoader(
        dataset,
        batch_size=cfg.data.val_batch_size,
        shuffle=False,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_samples,
    )


def build_loaders(cfg: Config, *, refine_bank: HardPixelBank | None = None) -> Loaders:
    """Train and val loaders; a ``refine_bank`` drives the sampler, crops and pixel weights.

    ``data.batch_size`` is per process: under torchrun the global batch is N times larger
    (the learning rate is not rescaled). The samplers drop an incomplete last global batch.
    """
    base_set = build_dataset(cfg.data, cfg.augment, split="train", train=True, seed=cfg.run.seed)
    if refine_bank is not None:
        _check_bank_covers(refine_bank, [base_set.sample_id(i) for i in range(len(base_set))], cfg)
    train_set: Dataset[Any] = base_set
    shard = {"batch_size": cfg.data.batch_size, "rank": get_rank(), "world_size": get_world_size()}
    sampler: Sampler[int] = EpochShuffleSampler(len(base_set), seed=cfg.run.seed, **shard)
    refine, mining = cfg.refine, cfg.mining
    if mining.sampler != "none":
        sampler = DictionarySampler(base_set, mining, seed=cfg.run.seed, **shard)
    if mining.places_crops:
        if refine_bank is not None and (refine.hard_crop_prob > 0 or refine.pixel_weight > 0):
            raise ConfigError(
                "mining.hard_crop_prob / rare_crop_prob / paste_prob / candidates (online crops) do not combine with "
                "a refinement stage's refine.hard_crop_prob / pixel_weight; use one of the two"
            )
        info = class_info(cfg.data)
        train_set = DictionaryCropDataset(
            base_set, mining, crop=(cfg.augment.crop[0], cfg.augment.crop[1]),
            scale=(cfg.augment.scale[0], cfg.augment.scale[1]), cell_size=cfg.bank.cell_size,
            placed_transform=build_train_transform(cfg.augment, ignore_index=info.ignore_index, placement=False),
        )  # fmt: skip
    if refine_bank is not None and refine.sampler != "none":
        sample_ids = [base_set.sample_id(i) for i in range(len(base_set))]
        weights = image_weights(refine_bank, sample_ids, score=refine.sampler, floor=refine.sampler_floor)
        sampler = WeightedEpochSampler(weights, seed=cfg.run.seed, **shard)
    if refine_bank is not None and (refine.hard_crop_prob > 0 or refine.pixel_weight > 0):
        train_set = BankDrivenDataset(
            base_set, refine_bank, hard_crop_prob=refine.hard_crop_prob, crop_scale=refine.crop_scale,
            sharpness=refine.crop_sharpness, pixel_weight=refine.pixel_weight,
        )  # fmt: skip
    # Training workers are not persistent: each epoch's workers must see the dataset's new
    # epoch (set_epoch seeds augmentation and hard crops), which a kept worker's copy would not.
    train_loader = DataLoader(
        train_set, batch_size=cfg.data.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
        pin_memory=torch.cuda.is_available(), collate_fn=collate_samples,
    )  # fmt: skip
    return Loaders(train_loader, build_eval_loader(cfg, split="val"))


def eval_dataset(loader: DataLoader[Any]) -> SegmentationDataset:
    dataset = loader.dataset
    assert isinstance(dataset, SegmentationDataset)
    return dataset


def _check_bank_covers(bank: HardPixelBank, sample_ids: list[str], cfg: Config) -> None:
    """Refuse a refinement bank that knows none of the training images (a store mined on val, or on
    other data): it would steer nothing, every image weighing the same. Warn when it knows few."""
    source = f"refine.bank {cfg.refine.bank}" if cfg.refine.bank else f"the hard-pixel bank of {cfg.refine.init}"
    known = sum(1 for sample_id in sample_ids if sample_id in bank.samples)
    mine = f"`segohem mine --checkpoint {cfg.refine.init or 'CHECKPOINT'} --split train`"
    if known == 0:
        example = next(iter(bank.samples), None)
        raise ConfigError(
            f"{source} holds none of the {len(sample_ids)} training images (it holds "
            f"{len(bank.samples)}, e.g. {example!r}; training: {sample_ids[0]!r}): mined on another split or "
            f"other data? mine the train split: {mine}"
        )
    if known < len(sample_ids) / 2:
        warnings.warn(
            f"{source} knows {known} of the {len(sample_ids)} training images; the others are "
            f"steered as if never seen ({mine} covers them all)",
            stacklevel=2,
        )


def load_refine_bank(cfg: Config, checkpoint: dict[str, Any]) -> HardPixelBank:
    """The bank that drives a refinement stage: a mined store (of ``cfg``'s kind and classes), or
    the init checkpoint's own bank."""
    refine = cfg.refine
    if refine.bank:
        store = load_bank(refine.bank)
        info = class_info(cfg.data)
        kind = "multi-label" if store.multilabel else "single-label"
        if store.multilabel != info.multilabel or store.num_classes != info.num_classes:
            raise ConfigError(
                f"refine.bank {refine.bank} is a {kind} store of {store.num_classes} classes, but refine.init "
                f"{refine.init} is refined on {'multi-label' if info.multilabel else 'single-label'} masks of "
                f"{info.num_classes} classes; pass a store mined or trained on this data"
            )
        return store
    bank = checkpoint_bank(checkpoint, source=Path(refine.init))
    if bank is None:
        raise ConfigError(
            f"refine.init {refine.init} holds no hard-pixel bank; mine one with "
            f"`segohem mine --checkpoint {refine.init}` and pass refine.bank=<store>"
        )
    return bank
