"""The training loop as plain functions over one `TrainingRun`: `train_one_epoch`, `evaluate`, `fit`."""

from __future__ import annotations

import random
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from segohem.bank_store import save_bank
from segohem.config import EvalConfig
from segohem.data import ClassInfo
from segohem.data.datasets import SegmentationDataset
from segohem.engine.checkpoint import save_checkpoint
from segohem.engine.distributed import all_reduce_device, get_world_size, is_main_process, sync_bank
from segohem.engine.inference import eval_logits, valid_sizes, working_size_of
from segohem.engine.panels import bank_rows, fixed_indices, prediction_panels
from segohem.engine.run import Progress, TrainingRun
from segohem.metrics import ConfusionMatrix, MultiLabelConfusion, format_table
from segohem.mining import CROP_KINDS, choose_candidates, recall_weights
from segohem.ohem import OhemCrossEntropy, PackedMultiLabel, unpack_labels
from segohem.tracking import Logger
from segohem.visualize import EpochVisuals

BANK_FILE = "hard_pixels.sqlite"


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row, or non-finite weights: the run stops without saving them."""


class Loaders(NamedTuple):
    train: DataLoader[Any]
    val: DataLoader[Any]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed per (run seed, epoch): an epoch's randomness does not depend on earlier epochs."""
    return zlib.crc32(f"{seed}/epoch/{epoch}".encode())


_AMP_WARNED: set[tuple[str, str]] = set()


def autocast_context(device: torch.device, amp: str) -> AbstractContextManager[Any]:
    """bf16/fp16 autocast on CUDA; on other devices AMP is off (with a warning once)."""
    if amp == "none":
        return nullcontext()
    if device.type != "cuda":
        if (amp, device.type) not in _AMP_WARNED:  # training and evaluation both ask: say it once
            _AMP_WARNED.add((amp, device.type))
            warnings.warn(f"train.amp={amp} needs CUDA; running in fp32 on {device}", stacklevel=2)
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class _Group(NamedTuple):
    """Detached per-micro-batch results of one optimizer step's accumulation group."""

    losses: list[torch.Tensor]
    kept: list[torch.Tensor]
    thresholds: list[torch.Tensor]


def _no_sync(model: nn.Module, *, skip: bool) -> AbstractContextManager[Any]:
    """DistributedDataParallel's ``no_sync`` when ``skip`` (a micro-batch before the last of its group)."""
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return nullcontext()


def _step_means(group: _Group) -> tuple[float, float, float]:
    """Loss, kept fraction and threshold of one optimizer step, averaged over micro-batches and
    ranks (one small all-reduce under DDP, then one host sync)."""
    means = torch.stack([torch.stack(values).mean().float() for values in group])
    if get_world_size() > 1:
        means = means.to(all_reduce_device())
        torch.distributed.all_reduce(means)
        means /= get_world_size()
    loss, kept, threshold = means.tolist()
    return loss, kept, threshold


def _optimizer_step(run: TrainingRun, *, group_finite: bool) -> bool:
    """Clip, check and take one optimizer step; returns False when it was skipped as non-finite.

    With an fp16 gradient scaler, overflowing gradients are the scaler's business (it skips
    the step and lowers the scale); only a non-finite loss counts as a bad step then.
    """
    optim_cfg, scaler = run.config.optim, run.scaler
    scaler.unscale_(run.optimizer)
    max_norm = optim_cfg.clip_grad_norm if optim_cfg.clip_grad_norm > 0 else float("inf")
    grad_norm = nn.utils.clip_grad_norm_(run.model.parameters(), max_norm)
    # One host sync per optimizer step: a non-finite update must never reach the weights.
    grads_finite = scaler.is_enabled() or bool(torch.isfinite(grad_norm))
    finite = group_finite and grads_finite
    if finite or scaler.is_enabled():
        scaler.step(run.optimizer)
        scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return finite


def _count_bad_step(run: TrainingRun, streak: int) -> int:
    """Record a skipped step; raise `TrainingDiverged` after ``train.max_nonfinite_steps`` in a row."""
    run.progress.skipped_steps += 1
    limit = run.config.train.max_nonfinite_steps
    tqdm.write(f"step {run.progress.step + 1}: loss or gradients not finite; step skipped ({streak} in a row)")
    if streak >= limit:
        raise TrainingDiverged(
            f"training diverged: {streak} optimizer steps in a row had a non-finite loss or gradients "
            f"(train.max_nonfinite_steps={limit}); lower optim.lr or set optim.clip_grad_norm. "
            f"Checkpoints of earlier epochs are kept; nothing non-finite was saved"
        )
    return streak


def _micro_batch(run: TrainingRun, model: nn.Module, batch: dict[str, Any], *, group: _Group, group_size: int,
                 sync: bool) -> bool:  # fmt: skip
    """Forward, OHEM loss and backward of one micro-batch (its gradient weighted 1 / group_size;
    under DDP all-reduced only when ``sync``), then the dictionary update; appends its results
    to ``group``. Returns whether its loss was finite."""
    train_cfg, device = run.config.train, run.device
    memory_format = torch.channels_last if train_cfg.channels_last else torch.preserve_format
    images = batch["image"].to(device, non_blocking=True, memory_format=memory_format)
    masks = batch["mask"].to(device, non_blocking=True)
    with _no_sync(model, skip=not sync):
        with autocast_context(device, train_cfg.amp):
            logits = model(images)
        pixel_weight = batch["pixel_weight"].to(device) if "pixel_weight" in batch else None
        result = run.loss_fn(logits, masks, step=run.progress.step, pixel_weight=pixel_weight)
        run.scaler.scale(result.loss / group_size).backward()
    # Host sync per micro-batch: a non-finite loss must not reach the dictionary either.
    loss_finite = bool(torch.isfinite(result.loss))
    if run.bank is not None and loss_finite:
        target, pred = masks, logits.detach().argmax(1)
        if isinstance(run.loss_fn, PackedMultiLabel):  # (N, K, H, W): a decision per pixel and class
            target, pred = run.loss_fn.unpack(masks), logits.detach() > 0
        run.bank.update(
            sample_ids=batch["sample_id"], hard_mask=result.hard_mask, pixel_loss=result.pixel_loss,
            target=target, pred=pred, epoch=run.progress.epoch,
            source_yx=batch["source_yx"].to(device, non_blocking=True), source_hw=batch["source_hw"],
        )  # fmt: skip
    group.losses.append(result.loss.detach())
    group.kept.append(result.kept_fraction.mean())
    group.thresholds.append(result.prob_threshold.mean())
    return loss_finite


@torch.no_grad()
def _restore_buffers(model: nn.Module, saved: list[torch.Tensor]) -> None:
    """Put back the batch-norm statistics that a skipped step's forward passes moved (maybe to NaN)."""
    for buffer, value in zip(model.buffers(), saved, strict=True):
        buffer.copy_(value)


def train_one_epoch(run: TrainingRun, loader: DataLoader[Any], *, logger: Logger) -> dict[str, float]:
    """One pass over ``loader``: steps the optimizer, updates ``run.progress`` and ``run.bank``.

    Each optimizer step averages the gradients of its accumulation group (the last group of
    an epoch may be smaller and is averaged over its own size). Returns epoch means.
    """
    train_cfg, accumulate, progress = run.config.train, run.config.optim.accumulate, run.progress
    model = run.train_model or run.model
    model.train()
    num_batches = len(loader)
    bar = tqdm(loader, desc=f"epoch {progress.epoch + 1}", leave=False,
               disable=not (train_cfg.progress and is_main_process()))  # fmt: skip
    totals = {"loss": 0.0, "kept_fraction": 0.0, "steps": 0}
    window_start, window_images, streak = time.perf_counter(), 0, 0
    group, group_finite = _Group([], [], []), True
    crop_kinds = torch.zeros(len(CROP_KINDS), dtype=torch.int64)  # online mining: crops by kind
    pasted = 0  # online mining: crops that got a region pasted in
    for batch_index, batch in enumerate(bar):
        if "candidate_image" in batch:  # online mining: keep the hardest of each image's candidate crops
            with autocast_context(run.device, train_cfg.amp):
                batch, _ = choose_candidates(run.model, run.loss_fn, batch, scale=run.config.mining.candidate_scale,
                                             device=run.device, divisor=run.config.augment.pad_divisor)  # fmt: skip
        if "crop_kind" in batch:
            crop_kinds += torch.bincount(batch["crop_kind"], minlength=len(CROP_KINDS))
            pasted += int((batch["pasted"] > 0).sum())
        group_start = batch_index - batch_index % accumulate
        group_size = min(accumulate, num_batches - group_start)
        if batch_index == group_start:  # batch-norm statistics to restore if this step is skipped
            saved_buffers = [buffer.detach().clone() for buffer in run.model.buffers()]
        last_of_group = batch_index + 1 == group_start + group_size
        group_finite &= _micro_batch(run, model, batch, group=group, group_size=group_size, sync=last_of_group)
        window_images += len(batch["sample_id"])
        if not last_of_group:
            continue
        stepped = _optimizer_step(run, group_finite=group_finite)
        means = _step_means(group) if stepped else None  # stepped is the same on every rank
        group, group_finite = _Group([], [], []), True
        if means is None:
            _restore_buffers(run.model, saved_buffers)
            streak = _count_bad_step(run, streak + 1)
            continue
        streak = 0
        run.scheduler.step()
        progress.step += 1
        loss_value, kept, threshold = means
        totals["loss"], totals["kept_fraction"], totals["steps"] = (
            totals["loss"] + loss_value, totals["kept_fraction"] + kept, totals["steps"] + 1)  # fmt: skip
        bar.set_postfix(loss=f"{loss_value:.4f}", kept=f"{kept:.1%}")
        if progress.step % train_cfg.log_every == 0 or batch_index + 1 == num_batches:
            images_per_s = window_images / max(time.perf_counter() - window_start, 1e-9)
            logger.log_step(
                {"train/loss": loss_value, "train/lr": run.optimizer.param_groups[0]["lr"],
                 "train/kept_fraction": kept, "train/prob_threshold": threshold, "train/images_per_s": images_per_s},
                step=progress.step,
            )  # fmt: skip
            window_start, window_images = time.perf_counter(), 0
        if train_cfg.max_steps and progress.step >= train_cfg.max_steps:
            break
    count = max(1, int(totals["steps"]))
    stats = {"train/loss": totals["loss"] / count, "train/kept_fraction": totals["kept_fraction"] / count}
    if get_world_size() > 1:  # every rank's crops (all ranks take the same number of batches)
        counts = torch.cat([crop_kinds, torch.tensor([pasted])]).to(all_reduce_device())
        torch.distributed.all_reduce(counts)
        crop_kinds, pasted = counts[:-1].cpu(), int(counts[-1])
    if crop_kinds.sum() > 0:
        stats["train/crops"] = int(crop_kinds.sum())
        for kind, number in zip(CROP_KINDS[1:], crop_kinds[1:].tolist(), strict=True):
            stats[f"train/{kind}_crops"] = number / int(crop_kinds.sum())
        stats["train/pasted_crops"] = pasted / int(crop_kinds.sum())
    return stats


def eval_batches(
    model: nn.Module, loader: Iterable[dict[str, Any]], *, device: torch.device, classes: ClassInfo,
    eval_cfg: EvalConfig | None = None, pad_divisor: int = 1, working_size: tuple[int, int] | None = None,
    amp: str = "none", progress: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """(logits, mask) of each batch of ``loader``, both on ``device``, as the evaluation sees them:
    the model in eval mode, no gradients, under ``amp``'s autocast.

    Logits come from `eval_logits` with ``eval_cfg`` (None: whole padded images), model inputs
    padded to ``pad_divisor`` (``augment.pad_divisor``); ``working_size`` is ``data.resize``
    (None: each image keeps its own size), which tells where each padded image ends.
    """
    model.eval()
    eval_cfg = eval_cfg or EvalConfig()
    for batch in tqdm(loader, desc="eval", disable=not (progress and is_main_process()), leave=False):
        images = batch["image"].to(device, non_blocking=True)
        valid_hw = valid_sizes(batch["source_hw"], working_size)
        with torch.no_grad(), autocast_context(device, amp):
            logits = eval_logits(model, images, cfg=eval_cfg, num_classes=classes.num_classes,
                                 size_divisor=pad_divisor, valid_hw=valid_hw,
                                 multilabel=classes.multilabel)  # fmt: skip
        yield logits, batch["mask"].to(device)


def run_eval_settings(run: TrainingRun, *, progress: bool = False) -> dict[str, Any]:
    """The keyword arguments of `eval_batches` and `evaluate` that evaluate ``run`` as its trainer does."""
    cfg = run.config
    return {"device": run.device, "classes": run.classes, "eval_cfg": cfg.eval, "pad_divisor": cfg.augment.pad_divisor,
            "working_size": working_size_of(cfg.data), "amp": cfg.train.amp, "progress": progress}  # fmt: skip


def evaluate(
    model: nn.Module, loader: Iterable[dict[str, Any]], *, device: torch.device, classes: ClassInfo,
    eval_cfg: EvalConfig | None = None, pad_divisor: int = 1, working_size: tuple[int, int] | None = None,
    amp: str = "none", progress: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Confusion-matrix metrics over ``loader`` (see `ConfusionMatrix.compute`; multi-label
    classes: `MultiLabelConfusion.compute`, a class present where its logit is above 0), from the
    logits of `eval_batches` (which the arguments are passed to).
    """
    confusion: ConfusionMatrix | MultiLabelConfusion
    if classes.multilabel:
        confusion = MultiLabelConfusion(classes.num_classes, ignore_index=classes.ignore_index)
    else:
        confusion = ConfusionMatrix(classes.num_classes, ignore_index=classes.ignore_index)
    batches = eval_batches(model, loader, device=device, classes=classes, eval_cfg=eval_cfg, pad_divisor=pad_divisor,
                           working_size=working_size, amp=amp, progress=progress)  # fmt: skip
    for logits, mask in batches:
        if classes.multilabel:
            confusion.update(logits > 0, unpack_labels(mask, num_classes=classes.num_classes,
                                                       ignore_index=classes.ignore_index))  # fmt: skip
        else:
            confusion.update(logits.argmax(1), mask)
    confusion.all_reduce()
    return confusion.compute()


def epoch_record(train_stats: dict[str, float], val: dict[str, Any] | None, names: tuple[str, ...]) -> dict[str, float]:
    record = dict(train_stats)
    if val is not None:
        record.update({"val/miou": val["miou"], "val/pixel_acc": val["pixel_acc"], "val/mean_acc": val["mean_acc"]})
        record.update({f"val/iou/{name}": iou for name, iou in zip(names, val["iou"], strict=True)})
    return record


def epoch_visuals(run: TrainingRun, loaders: Loaders, confusion: list[list[int]]) -> EpochVisuals:
    """Predictions on fixed validation images, the confusion matrix and the dictionary's hardest rows
    (multi-label classes: the dictionary's rows only; panels and the matrix picture one class per pixel)."""
    train_cfg, val_set, multilabel = run.config.train, loaders.val.dataset, run.classes.multilabel
    panels = []
    if train_cfg.num_panels > 0 and isinstance(val_set, SegmentationDataset) and not multilabel:
        indices = fixed_indices(len(val_set), num=train_cfg.num_panels, seed=run.config.run.seed)
        panels = prediction_panels(model=run.model, dataset=val_set, indices=indices, loss_fn=run.loss_fn,
                                   device=run.device, eval_cfg=run.config.eval,
                                   pad_divisor=run.config.augment.pad_divisor)  # fmt: skip
    train_set = getattr(loaders.train.dataset, "base", loaders.train.dataset)
    rows = []
    if run.bank is not None and train_cfg.num_bank_rows > 0 and isinstance(train_set, SegmentationDataset):
        rows = bank_rows(run.bank, train_set, class_names=run.classes.names, top=train_cfg.num_bank_rows)
    return EpochVisuals(panels, None if multilabel else np.asarray(confusion, np.int64), rows)


def check_finite_weights(model: nn.Module, *, epoch: int) -> None:
    """Raise `TrainingDiverged` if any parameter or buffer is NaN or infinite (one host sync)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        raise TrainingDiverged(
            f"the weights are not finite after epoch {epoch}; they were not saved (the run folder keeps the "
            f"checkpoints of earlier epochs); lower optim.lr or set optim.clip_grad_norm"
        )


def save_epoch(run: TrainingRun, *, run_dir: Path, record: dict[str, float], improved: bool, final: bool,
               logger: Logger) -> None:  # fmt: skip
    """Write the store, then best.pt, then last.pt: after a kill at any point, last.pt never
    records a best epoch whose best.pt was not written, and resuming redoes what is missing."""
    progress, bank = run.progress, run.bank
    checkpoint = run.state_dict(metrics=record)
    if bank is not None:  # the store first: a checkpoint never points past its dictionary
        save_bank(bank, run_dir / BANK_FILE, class_names=run.classes.names, epoch=progress.epoch)
    if improved:
        save_checkpoint(checkpoint, run_dir / "best.pt")
    save_checkpoint(checkpoint, run_dir / "last.pt")
    if progress.epoch in run.config.train.snapshot_epochs:
        save_checkpoint(checkpoint, run_dir / f"epoch{progress.epoch:03d}.pt")
    if improved or final:
        aliases = ["latest", f"epoch-{progress.epoch}", *(["best"] if improved else [])]
        logger.log_artifact(run_dir / "last.pt", kind="checkpoint", aliases=aliases)
        if bank is not None:
            logger.log_artifact(run_dir / BANK_FILE, kind="hard-pixel-dictionary", aliases=aliases)


def apply_recall_weights(run: TrainingRun, epoch: int) -> dict[str, float]:
    """``mining.class_weight_power``: from ``mining.start_epoch`` on, set the cross-entropy's class
    weights from the dictionary as it stands before ``epoch`` (`segohem.mining.recall_weights`),
    identical on every rank and after a resume; returns them as ``train/class_weight/<class>``."""
    mining = run.config.mining
    if not (mining.class_weight_power > 0 and run.bank is not None and epoch + 1 >= mining.start_epoch):
        return {}
    loss = getattr(run.loss_fn, "ohem", run.loss_fn)  # OhemRegionLoss wraps the cross-entropy
    if not isinstance(loss, OhemCrossEntropy):  # the config refuses sigmoid losses; a guard, not a path
        raise TypeError(f"mining.class_weight_power weighs a softmax cross-entropy, not {type(loss).__name__}")
    weights = recall_weights(
        run.bank,
        power=mining.class_weight_power,
        momentum=mining.class_weight_momentum,
        floor=mining.class_weight_floor,
    )
    if weights is None:
        return {}
    loss.scale_class_weight(torch.as_tensor(weights, dtype=torch.float32, device=run.device))
    assert loss.class_weight is not None
    return {f"train/class_weight/{name}": float(w) for name, w in zip(run.classes.names, loss.class_weight.tolist(),
                                                                       strict=True)}  # fmt: skip


def fit(run: TrainingRun, loaders: Loaders, *, run_dir: Path, logger: Logger) -> Progress:
    """Train from ``run.progress.epoch`` to ``train.epochs``, evaluating and checkpointing.

    Each epoch reseeds the global RNGs, the sampler and the dataset's augmentation from
    (seed, epoch), so resuming from the checkpoint of epoch e repeats epoch e + 1 exactly.
    ``last.pt`` is written after every epoch, ``best.pt`` when val mIoU improves.
    """
    train_cfg, progress_bar = run.config.train, run.config.train.progress
    while run.progress.epoch < train_cfg.epochs:
        epoch = run.progress.epoch
        seed_everything(epoch_seed(run.config.run.seed, epoch))
        for target in (loaders.train.sampler, loaders.train.dataset):
            if run.bank is not None and hasattr(target, "observe"):  # online mining: the dictionary now
                target.observe(run.bank, epoch)
            if hasattr(target, "set_epoch"):
                target.set_epoch(epoch)
        class_weights = apply_recall_weights(run, epoch)
        started = time.perf_counter()
        train_stats = train_one_epoch(run, loaders.train, logger=logger)
        train_stats["train/epoch_seconds"] = time.perf_counter() - started
        train_stats.update(class_weights)
        progress = run.progress
        if run.bank is not None:
            sync_bank(run.bank, epoch=epoch)
        progress.epoch += 1
        stopping = bool(train_cfg.max_steps and progress.step >= train_cfg.max_steps)
        final = stopping or progress.epoch == train_cfg.epochs
        val = None
        if progress.epoch % train_cfg.eval_every == 0 or final:
            val = evaluate(run.model, loaders.val, **run_eval_settings(run, progress=progress_bar))
            if is_main_process():
                tqdm.write(
                    f"epoch {progress.epoch}/{train_cfg.epochs}  step {progress.step}  "
                    f"train loss {train_stats['train/loss']:.4f}  kept {train_stats['train/kept_fraction']:.1%}"
                )
                tqdm.write(format_table(val, run.classes.names))
        improved = val is not None and val["miou"] > progress.best_miou
        if val is not None and improved:
            progress.best_miou, progress.best_epoch = val["miou"], progress.epoch
        record = epoch_record(train_stats, val, run.classes.names)
        logger.log_epoch(record, epoch=progress.epoch, step=progress.step)
        if val is not None and is_main_process():
            logger.log_visuals(epoch_visuals(run, loaders, val["confusion"]), epoch=progress.epoch, step=progress.step)
        check_finite_weights(run.model, epoch=progress.epoch)  # on every rank: all stop together
        if is_main_process():
            save_epoch(run, run_dir=run_dir, record=record, improved=improved, final=final, logger=logger)
        if stopping:
            break
    return run.progress
