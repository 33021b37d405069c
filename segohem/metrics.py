"""Confusion-matrix accumulation and the benchmark metrics derived from it.

mIoU is per-class IoU averaged over classes present in prediction or ground truth (never
pixel-pooled IoU). Under DDP, call `ConfusionMatrix.all_reduce` before `compute`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def summed_over_processes(counts: Tensor) -> Tensor:
    """``counts`` summed over every process under torch.distributed (itself otherwise), on the CPU."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return counts
    summed = counts.to("cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(summed)
    return summed.cpu()


class ConfusionMatrix:
    """Integer (C, C) matrix; rows are ground truth, columns are predictions."""

    def __init__(self, num_classes: int, *, ignore_index: int) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred, target: (N, H, W) integer class ids; ignored target pixels are skipped."""
        valid_mask = target != self.ignore_index
        index = target[valid_mask].to(torch.int64) * self.num_classes + pred[valid_mask].to(torch.int64)
        counts = torch.bincount(index, minlength=self.num_classes**2)
        self.matrix += counts.reshape(self.num_classes, self.num_classes).cpu()

    def all_reduce(self) -> None:
        self.matrix = summed_over_processes(self.matrix)

    def compute(self) -> dict[str, Any]:
        """Return miou, per-class iou and accuracy (NaN for absent classes), pixel and mean accuracy."""
        matrix = self.matrix.to(torch.float64)
        true_positive = matrix.diag()
        gt_total, pred_total = matrix.sum(1), matrix.sum(0)
        union = gt_total + pred_total - true_positive
        iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.nan)
        class_acc = torch.where(gt_total > 0, true_positive / gt_total.clamp(min=1), torch.nan)
        total = matrix.sum()
        return {
            "miou": float(iou.nanmean()) if (union > 0).any() else 0.0,
            "pixel_acc": float(true_positive.sum() / total) if total > 0 else 0.0,
            "mean_acc": float(class_acc.nanmean()) if (gt_total > 0).any() else 0.0,
            "iou": iou.tolist(),
            "acc": class_acc.tolist(),
            "confusion": self.matrix.tolist(),
        }


class MultiLabelConfusion:
    """Per-class binary confusions of multi-label masks: (K, 2, 2) integer counts [class, true, predicted].

    IoU of class k is that of its positives, TP / (TP + FP + FN), over every pixel its label
    scores (NaN when the class is neither present nor predicted); accuracy is its recall
    TP / (TP + FN); ``pixel_acc`` the share of (pixel, class) decisions that are right.
    """

    def __init__(self, num_classes: int, *, ignore_index: int) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, 2, 2, dtype=torch.int64)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred (N, K, H, W) bool (e.g. logits > 0); target (N, K, H, W) of 0 / 1 / ignore_index."""
        valid = target != self.ignore_index
        classes = torch.arange(self.num_classes, device=target.device).view(1, -1, 1, 1).expand_as(target)
        index = (classes * 2 + target.clamp(0, 1)) * 2 + pred.long()
        counts = torch.bincount(index[valid], minlength=self.num_classes * 4)
        self.matrix += counts.reshape(self.num_classes, 2, 2).cpu()

    def all_reduce(self) -> None:
        self.matrix = summed_over_processes(self.matrix)

    def compute(self) -> dict[str, Any]:
        """The keys of `ConfusionMatrix.compute`; ``confusion`` is the (K, 2, 2) matrix as lists."""
        matrix = self.matrix.to(torch.float64)
        true_negative, false_positive = matrix[:, 0, 0], matrix[:, 0, 1]
        false_negative, true_positive = matrix[:, 1, 0], matrix[:, 1, 1]
        union = true_positive + false_positive + false_negative
        positives = true_positive + false_negative
        iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.nan)
        class_acc = torch.where(positives > 0, true_positive / positives.clamp(min=1), torch.nan)
        total = matrix.sum()
        return {
            "miou": float(iou.nanmean()) if (union > 0).any() else 0.0,
            "pixel_acc": float((true_positive + true_negative).sum() / total) if total > 0 else 0.0,
            "mean_acc": float(class_acc.nanmean()) if (positives > 0).any() else 0.0,
            "iou": iou.tolist(),
            "acc": class_acc.tolist(),
            "confusion": self.matrix.tolist(),
        }


def format_table(metrics: dict[str, Any], class_names: tuple[str, ...] | list[str]) -> str:
    """A per-class IoU / accuracy table with the summary metrics underneath."""
    iou, acc = metrics["iou"], metrics["acc"]
    width = max(12, *(len(n) for n in class_names)) + 2
    lines = [f"{'class':<{width}}{'IoU':>8}{'Acc':>8}", "-" * (width + 16)]
    for name, class_iou, class_acc in zip(class_names, iou, acc, strict=True):
        lines.append(f"{name:<{width}}{100 * class_iou:>8.2f}{100 * class_acc:>8.2f}")
    lines.append("-" * (width + 16))
    lines.append(
        f"{'mIoU':<{width}}{100 * float(metrics['miou']):>8.2f}   "
        f"aAcc {100 * float(metrics['pixel_acc']):.2f}  mAcc {100 * float(metrics['mean_acc']):.2f}"
    )
    return "\n".join(lines)
