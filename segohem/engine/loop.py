"""The training loop as plain functions: `train_one_epoch`, `evaluate`, `fit`."""

from __future__ import annotations

import random
import time
import warnings
import zlib
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from segohem.bank import HardPixelBank
from segohem.bank_store import save_bank
from segohem.config import OptimConfig, TrainConfig
from segohem.data.datasets import SegmentationDataset
from segohem.engine.checkpoint import capture_rng_state, save_checkpoint
from segohem.engine.distributed import is_main_process
from segohem.engine.panels import bank_rows, fixed_indices, prediction_panels
from segohem.metrics import ConfusionMatrix, format_table
from segohem.ohem import OhemCrossEntropy
from segohem.tracking import Logger
from segohem.visualize import EpochVisuals

BANK_FILE = "hard_pixels.sqlite"


@dataclass
class TrainState:
    """Progress that lives across epochs and is saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    best_miou: float = -1.0
    best_epoch: int = -1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed per (run seed, epoch): an epoch's randomness does not depend on earlier epochs."""
    return zlib.crc32(f"{seed}/epoch/{epoch}".encode())


def autocast_context(device: torch.device, amp: str) -> AbstractContextManager[Any]:
    """bf16/fp16 autocast on CUDA; on other devices AMP is off (with a warning once)."""
    if amp == "none":
        return nullcontext()
    if device.type != "cuda":
        warnings.warn(f"train.amp={amp} needs CUDA; running in fp32 on {device}", stacklevel=2)
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def train_one_epoch(
    *,
    model: nn.Module,
    loss_fn: OhemCrossEntropy,
    loader: Iterable[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    state: TrainState,
    logger: Logger,
    bank: HardPixelBank | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; updates ``state.step`` and ``bank``. Returns epoch means."""
    model.train()
    num_batches = len(loader)  # type: ignore[arg-type]
    bar = tqdm(
        loader, desc=f"epoch {state.epoch + 1}", disable=not (train_cfg.progress and is_main_process()), leave=False
    )
    totals = {"loss": 0.0, "kept_fraction": 0.0, "batches": 0}
    window_start, window_images = time.perf_counter(), 0
    for batch_index, batch in enumerate(bar):
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True)
        with autocast_context(device, train_cfg.amp):
            logits = model(images)
        pixel_weight = batch["pixel_weight"].to(device) if "pixel_weight" in batch else None
        result = loss_fn(logits, masks, step=state.step, pixel_weight=pixel_weight)
        scaler.scale(result.loss / optim_cfg.accumulate).backward()
        if bank is not None:
            bank.update(
                sample_ids=batch["sample_id"], hard_mask=result.hard_mask, pixel_loss=result.pixel_loss,
                target=masks, pred=logits.detach().argmax(1), source_yx=batch["source_yx"].to(device),
                source_hw=batch["source_hw"], epoch=state.epoch,
            )  # fmt: skip
        window_images += images.shape[0]
        last_batch = batch_index + 1 == num_batches
        if (batch_index + 1) % optim_cfg.accumulate and not last_batch:
            continue
        if optim_cfg.clip_grad_norm > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.step += 1
        loss_value = float(result.loss.detach())  # host sync, once per optimizer step
        kept = float(result.kept_fraction.mean())
        totals["loss"] += loss_value
        totals["kept_fraction"] += kept
        totals["batches"] += 1
        bar.set_postfix(loss=f"{loss_value:.4f}", kept=f"{kept:.1%}")
        if state.step % train_cfg.log_every == 0 or last_batch:
            elapsed = time.perf_counter() - window_start
            logger.log_step(
                {
                    "train/loss": loss_value,
                    "train/lr": optimizer.param_groups[0]["lr"],
                    "train/kept_fraction": kept,
                    "train/prob_threshold": float(result.prob_threshold.mean()),
                    "train/images_per_s": window_images / max(elapsed, 1e-9),
                },
                step=state.step,
            )
            window_start, window_images = time.perf_counter(), 0
        if train_cfg.max_steps and state.step >= train_cfg.max_steps:
            break
    count = max(1, int(totals["batches"]))
    return {"train/loss": totals["loss"] / count, "train/kept_fraction": totals["kept_fraction"] / count}


@torch.no_grad()
def evaluate(
    *,
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    num_classes: int,
    ignore_index: int,
    amp: str = "none",
    progress: bool = False,
) -> dict[str, Any]:
    """Confusion-matrix metrics over ``loader`` (see `ConfusionMatrix.compute`)."""
    model.eval()
    confusion = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    for batch in tqdm(loader, desc="eval", disable=not (progress and is_main_process()), leave=False):
        images = batch["image"].to(device, non_blocking=True)
        with autocast_context(device, amp):
            logits = model(images)
        confusion.update(logits.argmax(1), batch["mask"].to(device))
    confusion.all_reduce()
    return confusion.compute()


def epoch_record(
    train_stats: dict[str, float], val: dict[str, Any] | None, class_names: tuple[str, ...]
) -> dict[str, float]:
    record = dict(train_stats)
    if val is not None:
        record.update({"val/miou": val["miou"], "val/pixel_acc": val["pixel_acc"], "val/mean_acc": val["mean_acc"]})
        record.update({f"val/iou/{name}": iou for name, iou in zip(class_names, val["iou"], strict=True)})
    return record


def epoch_visuals(
    *, model: nn.Module, loss_fn: OhemCrossEntropy, train_loader: torch.utils.data.DataLoader[Any],
    val_loader: torch.utils.data.DataLoader[Any], device: torch.device, train_cfg: TrainConfig, seed: int,
    class_names: tuple[str, ...], bank: HardPixelBank | None, confusion: list[list[int]],
) -> EpochVisuals:  # fmt: skip
    """Predictions on fixed validation images, the confusion matrix and the dictionary's hardest rows."""
    val_set = val_loader.dataset
    panels = []
    if train_cfg.num_panels > 0 and isinstance(val_set, SegmentationDataset):
        indices = fixed_indices(len(val_set), num=train_cfg.num_panels, seed=seed)
        panels = prediction_panels(model=model, dataset=val_set, indices=indices, loss_fn=loss_fn, device=device)
    train_set = getattr(train_loader.dataset, "base", train_loader.dataset)
    rows = []
    if bank is not None and train_cfg.num_bank_rows > 0 and isinstance(train_set, SegmentationDataset):
        rows = bank_rows(bank, train_set, class_names=class_names, top=train_cfg.num_bank_rows)
    return EpochVisuals(panels, np.asarray(confusion, np.int64), rows)


def fit(
    *,
    model: nn.Module,
    loss_fn: OhemCrossEntropy,
    train_loader: torch.utils.data.DataLoader[Any],
    val_loader: torch.utils.data.DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    state: TrainState,
    seed: int,
    class_names: tuple[str, ...],
    ignore_index: int,
    run_dir: Path,
    config_dict: dict[str, Any],
    logger: Logger,
    bank: HardPixelBank | None = None,
) -> TrainState:
    """Train from ``state.epoch`` to ``train_cfg.epochs``, evaluating and checkpointing.

    Each epoch reseeds the global RNGs, the sampler and the dataset's augmentation from
    (seed, epoch), so resuming from the checkpoint of epoch e repeats epoch e + 1 exactly.
    ``last.pt`` is written after every epoch, ``best.pt`` when val mIoU improves.
    """
    while state.epoch < train_cfg.epochs:
        epoch = state.epoch
        seed_everything(epoch_seed(seed, epoch))
        for target in (train_loader.sampler, train_loader.dataset):
            if hasattr(target, "set_epoch"):
                target.set_epoch(epoch)
        started = time.perf_counter()
        train_stats = train_one_epoch(
            model=model, loss_fn=loss_fn, loader=train_loader, optimizer=optimizer, scheduler=scheduler,
            scaler=scaler, device=device, optim_cfg=optim_cfg, train_cfg=train_cfg, state=state, logger=logger,
            bank=bank,
        )  # fmt: skip
        train_stats["train/epoch_seconds"] = time.perf_counter() - started
        state.epoch += 1
        stopping = bool(train_cfg.max_steps and state.step >= train_cfg.max_steps)
        val = None
        if state.epoch % train_cfg.eval_every == 0 or state.epoch == train_cfg.epochs or stopping:
            val = evaluate(
                model=model, loader=val_loader, device=device, num_classes=len(class_names),
                ignore_index=ignore_index, amp=train_cfg.amp, progress=train_cfg.progress,
            )  # fmt: skip
            if is_main_process():
                tqdm.write(
                    f"epoch {state.epoch}/{train_cfg.epochs}  step {state.step}  "
                    f"train loss {train_stats['train/loss']:.4f}  kept {train_stats['train/kept_fraction']:.1%}"
                )
                tqdm.write(format_table(val, class_names))
        improved = val is not None and val["miou"] > state.best_miou
        if improved:
            assert val is not None
            state.best_miou, state.best_epoch = val["miou"], state.epoch
        record = epoch_record(train_stats, val, class_names)
        logger.log_epoch(record, epoch=state.epoch, step=state.step)
        if val is not None and is_main_process():
            visuals = epoch_visuals(
                model=model, loss_fn=loss_fn, train_loader=train_loader, val_loader=val_loader, device=device,
                train_cfg=train_cfg, seed=seed, class_names=class_names, bank=bank, confusion=val["confusion"],
            )  # fmt: skip
            logger.log_visuals(visuals, epoch=state.epoch, step=state.step)
        if is_main_process():
            checkpoint = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "train_state": asdict(state), "rng": capture_rng_state(), "config": config_dict,
                "class_names": list(class_names), "metrics": record,
                "bank": bank.state_dict() if bank is not None else None,
            }  # fmt: skip
            if bank is not None:  # the store first: a checkpoint never points past its dictionary
                save_bank(bank, run_dir / BANK_FILE, class_names=class_names, epoch=state.epoch)
            save_checkpoint(checkpoint, run_dir / "last.pt")
            if improved:
                save_checkpoint(checkpoint, run_dir / "best.pt")
            if improved or state.epoch == train_cfg.epochs or stopping:
                aliases = ["latest", f"epoch-{state.epoch}", *(["best"] if improved else [])]
                logger.log_artifact(run_dir / "last.pt", kind="checkpoint", aliases=aliases)
                if bank is not None:
                    logger.log_artifact(run_dir / BANK_FILE, kind="hard-pixel-dictionary", aliases=aliases)
            if state.epoch in train_cfg.snapshot_epochs:
                save_checkpoint(checkpoint, run_dir / f"epoch{state.epoch:03d}.pt")
        if stopping:
            break
    return state
