"""The hard-pixel dictionary: what was hard, per image, region and class, across a whole run.

`HardPixelBank` is keyed by the dataset's stable ``sample_id`` and changed only through
`update` (called by the loop with each step's OHEM result). Hard pixels are mapped back to
the **original image's coordinates** through the source-coordinate map that the data
pipeline carries beside the mask, so crops, rescales and flips land in the right cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass
class SampleStats:
    """Everything the bank knows about one image.

    hard_acc / seen_acc: (grid_h, grid_w) per-cell decayed sums of hard and of observed valid
    pixels, in original-image cells of ``cell_size`` pixels; hardness = hard_acc / seen_acc.
    confusion: (C, C) int64 hard pixels by true class (rows) and predicted class (columns):
    row sums are hard pixels per class ("hard positives": pixels of c the model struggles
    with), column sums minus the diagonal are "hard negatives" (pixels wrongly called c).
    """

    height: int
    width: int
    hard_acc: np.ndarray
    seen_acc: np.ndarray
    confusion: np.ndarray
    seen: int = 0
    ema_kept_fraction: float = 0.0
    ema_hard_loss: float = 0.0
    last_epoch: int = -1

    @property
    def hardness(self) -> np.ndarray:
        """(grid_h, grid_w) float32 fraction of hard pixels per cell; NaN where never observed."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.seen_acc > 0, self.hard_acc / self.seen_acc, np.nan).astype(np.float32)

    @property
    def score(self) -> float:
        """Image-level hardness: EMA kept fraction x EMA mean hard loss."""
        return self.ema_kept_fraction * self.ema_hard_loss


@dataclass
class EpochClassStats:
    hard: np.ndarray  # (C,) int64 hard pixels per true class
    valid: np.ndarray  # (C,) int64 valid pixels per true class


@dataclass
class HardPixelBank:
    """Per-sample hard-pixel statistics; ``update`` is the only mutator.

    momentum: weight of the past in the per-sample EMAs (each sample is seen about once per
    epoch, so 0.5 halves the weight of an epoch's observation every epoch).
    """

    num_classes: int
    cell_size: int = 8
    momentum: float = 0.5
    samples: dict[str, SampleStats] = field(default_factory=dict)
    epochs: dict[int, EpochClassStats] = field(default_factory=dict)

    def _get(self, sample_id: str, height: int, width: int) -> SampleStats:
        stats = self.samples.get(sample_id)
        if stats is None:
            grid = (math.ceil(height / self.cell_size), math.ceil(width / self.cell_size))
            stats = SampleStats(
                height=height, width=width, hard_acc=np.zeros(grid, np.float32), seen_acc=np.zeros(grid, np.float32),
                confusion=np.zeros((self.num_classes, self.num_classes), np.int64),
            )  # fmt: skip
            self.samples[sample_id] = stats
        return stats

    @torch.no_grad()
    def update(
        self,
        *,
        sample_ids: list[str],
        hard_mask: Tensor,
        pixel_loss: Tensor,
        target: Tensor,
        pred: Tensor,
        source_yx: Tensor,
        source_hw: Tensor,
        epoch: int,
    ) -> None:
        """Fold one batch into the bank.

        hard_mask (N, H, W) bool; pixel_loss (N, H, W) float; target, pred (N, H, W) int64
        (pred = argmax of the logits); source_yx (N, 2, H, W) float, the original-image row
        and column of every pixel (any value where the target is ignored); source_hw (N, 2)
        int, original height and width.
        """
        num_images, num_classes = hard_mask.shape[0], self.num_classes
        valid_mask = (target >= 0) & (target < num_classes)
        num_kept = hard_mask.flatten(1).sum(1)
        num_valid = valid_mask.flatten(1).sum(1)
        hard_loss_sum = (pixel_loss.float() * hard_mask).flatten(1).sum(1)
        # One bincount for all (image, true, pred) triples of hard pixels.
        safe_target, safe_pred = target.clamp(0, num_classes - 1), pred.clamp(0, num_classes - 1)
        triple = torch.arange(num_images, device=target.device).view(-1, 1, 1) * num_classes + safe_target
        triple = triple * num_classes + safe_pred
        confusion = torch.bincount(triple[hard_mask], minlength=num_images * num_classes**2)
        class_valid = torch.bincount(safe_target[valid_mask], minlength=num_classes)
        cells = (source_yx.float() / self.cell_size).floor().long()  # (N, 2, H, W)
        sizes = source_hw.tolist()  # host sync: small
        per_image: list[tuple[np.ndarray, np.ndarray]] = []
        for i in range(num_images):
            grid_h, grid_w = math.ceil(sizes[i][0] / self.cell_size), math.ceil(sizes[i][1] / self.cell_size)
            cell_index = (cells[i, 0].clamp(0, grid_h - 1) * grid_w + cells[i, 1].clamp(0, grid_w - 1))[valid_mask[i]]
            hard_here = hard_mask[i][valid_mask[i]]
            seen_counts = torch.bincount(cell_index, minlength=grid_h * grid_w).view(grid_h, grid_w)
            hard_counts = torch.bincount(cell_index[hard_here], minlength=grid_h * grid_w).view(grid_h, grid_w)
            per_image.append((hard_counts.cpu().numpy(), seen_counts.cpu().numpy()))
        confusion_np = confusion.view(num_images, num_classes, num_classes).cpu().numpy()
        kept_np, valid_np, loss_np = num_kept.cpu().numpy(), num_valid.cpu().numpy(), hard_loss_sum.cpu().numpy()
        for i, sample_id in enumerate(sample_ids):
            stats = self._get(sample_id, *sizes[i])
            hard, seen = per_image[i]
            observed = seen > 0
            stats.hard_acc[observed] = self.momentum * stats.hard_acc[observed] + hard[observed]
            stats.seen_acc[observed] = self.momentum * stats.seen_acc[observed] + seen[observed]
            stats.confusion += confusion_np[i]
            kept_fraction = float(kept_np[i]) / max(1, int(valid_np[i]))
            hard_loss = float(loss_np[i]) / max(1, int(kept_np[i]))
            weight = self.momentum if stats.seen else 0.0
            stats.ema_kept_fraction = weight * stats.ema_kept_fraction + (1 - weight) * kept_fraction
            stats.ema_hard_loss = weight * stats.ema_hard_loss + (1 - weight) * hard_loss
            stats.seen += 1
            stats.last_epoch = epoch
        history = self.epochs.setdefault(
            epoch, EpochClassStats(np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64))
        )
        history.hard += confusion_np.sum(axis=(0, 2))
        history.valid += class_valid.cpu().numpy()

    def state_dict(self) -> dict[str, Any]:
        """A snapshot: its arrays are copies, so later updates leave a saved or pending checkpoint alone."""
        return {
            "num_classes": self.num_classes, "cell_size": self.cell_size, "momentum": self.momentum,
            "samples": {k: _copied_fields(vars(v)) for k, v in self.samples.items()},
            "epochs": {k: _copied_fields(vars(v)) for k, v in self.epochs.items()},
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take ``state``'s values as copies: updating this bank never changes the dict (or bank) it came from."""
        self.num_classes, self.cell_size, self.momentum = state["num_classes"], state["cell_size"], state["momentum"]
        self.samples = {k: SampleStats(**_copied_fields(v)) for k, v in state["samples"].items()}
        self.epochs = {int(k): EpochClassStats(**_copied_fields(v)) for k, v in state["epochs"].items()}


def _copied_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A copy of a dataclass's fields with every array copied too."""
    return {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in fields.items()}
