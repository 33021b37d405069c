"""The offline mining pass: the paper's read-only network over a whole split, no augmentation."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from segohem.bank import HardPixelBank
from segohem.bank_store import save_mined
from segohem.config import EvalConfig
from segohem.engine.inference import eval_logits, valid_sizes
from segohem.engine.loop import autocast_context
from segohem.losses import SegmentationLoss


@torch.no_grad()
def mine_split(
    *,
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    loss_fn: SegmentationLoss,
    device: torch.device,
    bank: HardPixelBank,
    store_path: Path,
    working_size: tuple[int, int] | None,
    eval_cfg: EvalConfig | None = None,
    pad_divisor: int = 1,
    amp: str = "none",
    progress: bool = True,
) -> int:
    """Record every image's exact hard mask and loss map, and fold the statistics into ``bank``.

    Masks are stored at the resolution the model saw (``working_size``, or each image's
    original size when None), padding removed. Logits come from `eval_logits` with
    ``eval_cfg`` (None: whole padded images), model inputs padded to ``pad_divisor``. Each
    batch is its own transaction, so a killed pass keeps what it finished. Returns the number
    of images mined.
    """
    model.eval()
    count = 0
    # The bank update, compression and the SQLite write overlap the next batch's forward pass
    # (torch, zlib and sqlite3 release the GIL); one batch in flight keeps memory bounded, keeps
    # the updates in order and surfaces errors promptly.
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: Future[None] | None = None
        for batch in tqdm(loader, desc="mine", disable=not progress):
            update, rows = _mine_batch(batch, model=model, loss_fn=loss_fn, device=device, working_size=working_size,
                                       num_classes=bank.num_classes, eval_cfg=eval_cfg or EvalConfig(),
                                       pad_divisor=pad_divisor, amp=amp)  # fmt: skip
            if pending is not None:
                pending.result()
            pending = writer.submit(_record, bank, update, store_path, rows)
            count += len(rows)
        if pending is not None:
            pending.result()
    return count


def _record(bank: HardPixelBank, update: dict[str, Any], store_path: Path, rows: list[Any]) -> None:
    bank.update(**update)
    save_mined(store_path, rows)


def _mine_batch(
    batch: dict[str, Any], *, model: nn.Module, loss_fn: SegmentationLoss, device: torch.device,
    working_size: tuple[int, int] | None, num_classes: int, eval_cfg: EvalConfig, pad_divisor: int, amp: str,
) -> tuple[dict[str, Any], list[tuple[str, np.ndarray, np.ndarray]]]:  # fmt: skip
    """Forward one batch read-only: the bank update's arguments and rows of (sample_id, hard mask, loss map)."""
    images, masks = batch["image"].to(device), batch["mask"].to(device)
    valid_hw = valid_sizes(batch["source_hw"], working_size)
    with autocast_context(device, amp):
        logits = eval_logits(model, images, cfg=eval_cfg, num_classes=num_classes,
                             size_divisor=pad_divisor, valid_hw=valid_hw)  # fmt: skip
    result = loss_fn(logits, masks)
    update = dict(
        sample_ids=batch["sample_id"], hard_mask=result.hard_mask, pixel_loss=result.pixel_loss, target=masks,
        pred=logits.argmax(1), source_yx=batch["source_yx"].to(device), source_hw=batch["source_hw"], epoch=0,
    )  # fmt: skip
    rows = []
    for i, sample_id in enumerate(batch["sample_id"]):
        height, width = valid_hw[i]
        rows.append((
            sample_id, result.hard_mask[i, :height, :width].cpu().numpy(),
            result.pixel_loss[i, :height, :width].cpu().numpy(),
        ))  # fmt: skip
    return update, rows
