"""Builders shared by the commands: device, loss, loaders, refinement bank, model from a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from segohem.bank import HardPixelBank
from segohem.bank_store import load_bank
from segohem.config import Config, ConfigError, RefineConfig, load_config
from segohem.data import build_dataset, class_info
from segohem.data.samplers import EpochShuffleSampler
from segohem.engine.checkpoint import load_checkpoint
from segohem.model import build_model, load_model_state
from segohem.ohem import OhemCrossEntropy
from segohem.refine import BankDrivenDataset, WeightedEpochSampler, class_weights_from_bank, image_weights


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name} but CUDA is not available; use run.device=cpu")
    return torch.device(name)


def build_loss(cfg: Config, *, refine_bank: HardPixelBank | None = None) -> OhemCrossEntropy:
    """The OHEM loss of ``cfg.ohem``; a refinement bank may scale the class weights."""
    ohem, info = cfg.ohem, class_info(cfg.data)
    if ohem.class_weight and len(ohem.class_weight) != info.num_classes:
        raise ConfigError(f"ohem.class_weight has {len(ohem.class_weight)} values for {info.num_classes} classes")
    class_weight = np.asarray(ohem.class_weight or [1.0] * info.num_classes, dtype=np.float64)
    if refine_bank is not None and cfg.refine.class_weight_power > 0:
        class_weight = class_weight * class_weights_from_bank(refine_bank, power=cfg.refine.class_weight_power)
        named = zip(info.names, class_weight, strict=True)
        print("class weights from the dictionary:", ", ".join(f"{name} {w:.2f}" for name, w in named))
    return OhemCrossEntropy(
        mode=ohem.mode, thresh=ohem.thresh, min_kept=ohem.min_kept, top_k=ohem.top_k,  # type: ignore[arg-type]
        scope=ohem.scope, ignore_index=info.ignore_index,  # type: ignore[arg-type]
        class_weight=None if (class_weight == 1).all() else class_weight.tolist(), warmup_steps=ohem.warmup_steps,
    )  # fmt: skip


def build_loaders(cfg: Config, *, refine_bank: HardPixelBank | None = None) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """Train and val loaders; a ``refine_bank`` drives the sampler, crops and pixel weights."""
    base_set = build_dataset(cfg.data, cfg.augment, split="train", train=True, seed=cfg.run.seed)
    val_set = build_dataset(cfg.data, cfg.augment, split="val", train=False, seed=cfg.run.seed)
    train_set: Dataset[Any] = base_set
    sampler: Sampler[int] = EpochShuffleSampler(len(base_set), seed=cfg.run.seed)
    refine = cfg.refine
    if refine_bank is not None and refine.sampler != "none":
        sample_ids = [base_set.sample_id(i) for i in range(len(base_set))]
        weights = image_weights(refine_bank, sample_ids, score=refine.sampler, floor=refine.sampler_floor)
        sampler = WeightedEpochSampler(weights, seed=cfg.run.seed)
    if refine_bank is not None and (refine.hard_crop_prob > 0 or refine.pixel_weight > 0):
        train_set = BankDrivenDataset(
            base_set, refine_bank, hard_crop_prob=refine.hard_crop_prob, crop_scale=refine.crop_scale,
            sharpness=refine.crop_sharpness, pixel_weight=refine.pixel_weight,
        )  # fmt: skip
    workers = cfg.data.num_workers
    train_loader = DataLoader(
        train_set, batch_size=cfg.data.batch_size, sampler=sampler, num_workers=workers,
        drop_last=len(base_set) >= cfg.data.batch_size, pin_memory=torch.cuda.is_available(),
    )  # fmt: skip
    val_loader = DataLoader(val_set, batch_size=cfg.data.val_batch_size, shuffle=False, num_workers=workers)
    return train_loader, val_loader


def load_refine_bank(refine: RefineConfig) -> HardPixelBank:
    """The bank that drives a refinement stage: a mined store, or the init checkpoint's own bank."""
    if refine.bank:
        return load_bank(refine.bank)
    state = load_checkpoint(refine.init).get("bank")
    if not state or not state["samples"]:
        raise ConfigError(
            f"refine.init {refine.init} holds no hard-pixel bank; mine one with "
            f"`segohem mine --checkpoint {refine.init}` and pass refine.bank=<store>"
        )
    bank = HardPixelBank(state["num_classes"])
    bank.load_state_dict(state)
    return bank


def load_model_from_checkpoint(
    path: Path, overrides: list[str]
) -> tuple[Config, torch.nn.Module, torch.device, dict[str, Any]]:
    """The checkpoint's config (plus overrides), its model in eval mode, the device, the checkpoint."""
    checkpoint = load_checkpoint(path)
    cfg = load_config(None, overrides, base=checkpoint["config"])
    device = resolve_device(cfg.run.device)
    model = build_model(cfg.model, num_classes=class_info(cfg.data).num_classes)
    load_model_state(model, checkpoint["model"])
    return cfg, model.to(device).eval(), device, checkpoint
