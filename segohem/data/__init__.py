"""Datasets, presets and augmentation pipelines."""

from segohem.data.build import ClassInfo, build_dataset, class_info
from segohem.data.datasets import DatasetError, FolderDataset, SegmentationDataset, SyntheticDataset

__all__ = [
    "ClassInfo", "DatasetError", "FolderDataset", "SegmentationDataset", "SyntheticDataset",
    "build_dataset", "class_info",
]  # fmt: skip
