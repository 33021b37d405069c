"""Datasets, presets, augmentation pipelines, the image reader and batch collation."""

from segohem.data.build import SPLITS, ClassInfo, build_dataset, class_info
from segohem.data.collate import collate_samples
from segohem.data.datasets import FolderDataset, PairedDataset, SegmentationDataset, SyntheticDataset
from segohem.data.errors import DatasetError, dataset_error_message
from segohem.data.io import IMAGE_SUFFIXES, display_path, read_colour_mask, read_image, read_mask
from segohem.data.pairing import SamplePair

__all__ = [
    "IMAGE_SUFFIXES", "SPLITS", "ClassInfo", "DatasetError", "FolderDataset", "PairedDataset", "SamplePair",
    "SegmentationDataset", "SyntheticDataset", "build_dataset", "class_info", "collate_samples",
    "dataset_error_message", "display_path", "read_colour_mask", "read_image", "read_mask",
]  # fmt: skip
