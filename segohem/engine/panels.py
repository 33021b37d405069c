"""Raw material for pictures: predictions and hard pixels on fixed images, the dictionary's rows.

Loggers turn these arrays into PNGs or W&B media; nothing here draws or knows about W&B.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn

from segohem.bank import HardPixelBank, SampleStats, split_decisions
from segohem.config import EvalConfig
from segohem.data.datasets import SegmentationDataset
from segohem.engine.inference import eval_logits
from segohem.losses import SegmentationLoss
from segohem.visualize import BankRow, PredictionPanel


def fixed_indices(length: int, *, num: int, seed: int) -> list[int]:
    """The same ``num`` indices of a dataset for every evaluation of a run."""
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(length, size=min(num, length), replace=False).tolist())


@torch.no_grad()
def prediction_panels(
    *, model: nn.Module, dataset: SegmentationDataset, indices: list[int], loss_fn: SegmentationLoss,
    device: torch.device, eval_cfg: EvalConfig | None = None, pad_divisor: int = 1,
) -> list[PredictionPanel]:  # fmt: skip
    """Image, labels, prediction, hard pixels and loss of each of ``indices``, at the size the model saw.

    Logits come from `eval_logits` with ``eval_cfg`` (None: the whole padded image), model
    inputs padded to ``pad_divisor`` (``augment.pad_divisor``).
    """
    was_training = model.training
    model.eval()
    eval_cfg = eval_cfg or EvalConfig()
    panels = []
    for index in indices:
        image, mask, source_yx, original_hw = dataset.load(index, scale=1.0)  # read once
        height, width = image.shape[:2]
        sample = dataset.finish(index, image, mask, source_yx, original_hw)
        logits = eval_logits(model, sample["image"][None].to(device), cfg=eval_cfg, num_classes=dataset.num_classes,
                             size_divisor=pad_divisor, valid_hw=[(height, width)])  # fmt: skip
        result = loss_fn(logits, sample["mask"][None].to(device))
        crop = (0, slice(0, height), slice(0, width))
        panels.append(PredictionPanel(
            sample["sample_id"], image, sample["mask"][crop[1:]].numpy(), logits.argmax(1)[crop].cpu().numpy(),
            result.hard_mask[crop].cpu().numpy(), result.pixel_loss[crop].cpu().numpy(),
        ))  # fmt: skip
    model.train(was_training)
    return panels


def bank_rows(
    bank: HardPixelBank, dataset: SegmentationDataset, *, class_names: tuple[str, ...], top: int,
    thumbnail_width: int = 160,
) -> list[BankRow]:  # fmt: skip
    """The ``top`` hardest images of ``dataset`` by the bank's score, with thumbnails."""
    index_of = {dataset.sample_id(i): i for i in range(len(dataset))}
    ranked = sorted((s for s in bank.samples if s in index_of), key=lambda s: -bank.samples[s].score)[:top]
    rows = []
    for sample_id in ranked:
        stats = bank.samples[sample_id]
        image = dataset.read(index_of[sample_id])[0]
        scale = thumbnail_width / image.shape[1]
        thumbnail = cv2.resize(
            image, (thumbnail_width, max(1, round(image.shape[0] * scale))), interpolation=cv2.INTER_AREA
        )
        rows.append(BankRow(
            sample_id, thumbnail, stats.hardness, stats.ema_kept_fraction, stats.score,
            _top_confusion(stats, class_names),
            {name: int(n) for name, n in zip(class_names, stats.hard_positives(), strict=True)},
        ))  # fmt: skip
    return rows


def _top_confusion(stats: SampleStats, class_names: tuple[str, ...]) -> str:
    """The "true -> predicted (hard pixels)" of the image's most frequent confusion, "-" if none.

    Ties go to the smallest flat index true * C + pred, as an argmax over the dense matrix would.
    Multi-label: "class missed (n)" or "class false positive (n)", the most frequent wrong decision.
    """
    if stats.multilabel:
        class_ids, true, pred = split_decisions(stats.confusion_pairs)
        wrong = np.flatnonzero(true != pred)
        if not len(wrong):
            return "-"
        top = wrong[int(stats.confusion_counts[wrong].argmax())]
        error = "missed" if true[top] == 1 else "false positive"
        return f"{class_names[class_ids[top]]} {error} ({int(stats.confusion_counts[top])})"
    true_ids, pred_ids = np.divmod(stats.confusion_pairs, stats.num_classes)
    wrong = np.flatnonzero((true_ids != pred_ids) & (stats.confusion_counts > 0))  # sorted, as the dense argmax
    if not len(wrong):
        return "-"
    top = wrong[int(stats.confusion_counts[wrong].argmax())]
    return f"{class_names[true_ids[top]]} -> {class_names[pred_ids[top]]} ({stats.confusion_counts[top]})"
