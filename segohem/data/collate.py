"""Batch collation that names the samples and the fix when images of one batch differ in size."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import default_collate

from segohem.data.errors import DatasetError


def _describe(sample: dict[str, Any], key: str) -> str:
    height, width = sample[key].shape[-2:]
    text = f"{sample.get('sample_id', '?')} {height}x{width}"
    source_hw = sample.get("source_hw")
    if isinstance(source_hw, torch.Tensor):
        source_height, source_width = source_hw.tolist()
        if (source_height, source_width) != (height, width):
            text += f" (read as {source_height}x{source_width})"
    return text


def collate_samples(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate`` of dataset samples, after checking that their tensors match in size.

    ``batch``: samples as returned by `SegmentationDataset.__getitem__` (``image`` (3, H, W),
    ``mask`` (H, W), ...). Returns the stacked batch (``image`` (B, 3, H, W), ...). Raises
    DatasetError naming every sample id with its size when, for some key, the tensors differ.
    """
    for key, value in batch[0].items():
        if not isinstance(value, torch.Tensor):
            continue
        if any(sample[key].shape != value.shape for sample in batch[1:]):
            sizes = ", ".join(_describe(sample, key) for sample in batch)
            raise DatasetError(
                f"the samples of one batch differ in {key} size (height x width): {sizes}; set "
                f"data.resize=[H, W] (every split) or augment.crop=[H, W] (training) so that every "
                f"sample has one size, or use a batch size of 1"
            )
    return default_collate(batch)  # type: ignore[no-any-return]
