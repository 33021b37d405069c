"""Unlabelled images for prediction, through the same reading and preprocessing as the datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from segohem.data.datasets import SegmentationDataset
from segohem.data.io import display_path, read_image


class ImageListDataset(SegmentationDataset):
    """Images without labels: the mask is all ``ignore_index``; ``sample_id`` is the file name.

    Resizing (``data.resize``), normalization and padding are exactly those of evaluation.
    """

    def __init__(self, paths: list[Path], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def sample_id(self, index: int) -> str:
        return display_path(self.paths[index].name)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = read_image(self.paths[index])
        return image, np.full(image.shape[:2], self.ignore_index, np.int64)
