"""Segmentation datasets returning (image, mask, sample_id), validated as they are read."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from segohem.data.errors import DatasetError
from segohem.data.io import IMAGE_SUFFIXES, display_path, read_image, read_mask
from segohem.data.pairing import SamplePair, folder_pairs
from segohem.data.samplers import draw_seed
from segohem.data.synthetic import SPLIT_KEYS, render_scene

__all__ = [
    "IMAGE_SUFFIXES", "DatasetError", "FolderDataset", "LabelReader", "PairedDataset", "SegmentationDataset",
    "SyntheticDataset",
]  # fmt: skip

LabelReader = Callable[[Path], np.ndarray]  # a label file's path -> (H, W) class ids


class SegmentationDataset(Dataset[dict[str, Any]]):
    """Base: subclasses implement ``__len__``, ``sample_id`` and ``read``.

    ``__getitem__`` returns ``{"image": (3, H, W) float32, "mask": (H, W) int64,
    "source_yx": (2, H, W) float32 original row/col of each pixel, "source_hw": (2,) original
    height/width, "sample_id": str, "index": int}``. Augmentation randomness is seeded from
    (seed, epoch, index), so an epoch is reproducible whatever the worker count, and a
    resumed run sees exactly the samples an uninterrupted one would.

    A key ``k >= len(dataset)`` is image ``k % len`` drawn for the ``k // len``-th time in the
    epoch (samplers that draw with replacement, `segohem.data.samplers.repeat_keys`): it gets
    augmentation of its own, where the same index twice would repeat the same crop.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        ignore_index: int,
        transform: Callable[..., dict[str, Any]] | None = None,
        resize: tuple[int, int] | None = None,
        seed: int = 0,
        multilabel: bool = False,
    ) -> None:
        self.num_classes, self.ignore_index, self.multilabel = num_classes, ignore_index, multilabel
        self.transform, self.resize, self.seed = transform, resize, seed
        self.epoch = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def sample_id(self, index: int) -> str:
        raise NotImplementedError

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (image (H, W, 3) uint8 RGB, mask (H, W) integer labels), validated."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def split_key(self, key: int) -> tuple[int, int]:
        """(index, repeat) of a sampler key (see the class docstring)."""
        repeat, index = divmod(key, len(self))
        return index, repeat

    def __getitem__(self, key: int) -> dict[str, Any]:
        index, repeat = self.split_key(key)
        return self.finish(index, *self.load(index, scale=1.0), repeat=repeat)

    def load(self, index: int, *, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
        """Read, then resize to ``data.resize`` times ``scale`` (area for images, nearest for labels).

        Returns (image (H, W, 3) uint8, mask (H, W), source_yx (H, W, 2) float32 original row/col,
        original (height, width)).
        """
        image, mask = self.read(index)
        original_hw = image.shape[:2]
        rows, cols = np.meshgrid(np.arange(original_hw[0]), np.arange(original_hw[1]), indexing="ij")
        source_yx: np.ndarray = np.stack([rows, cols], axis=-1).astype(np.float32)  # (H0, W0, 2)
        height, width = self.resize or original_hw
        height, width = round(height * scale), round(width * scale)
        if (height, width) != original_hw:
            shrink = height * width < original_hw[0] * original_hw[1]
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
            source_yx = cv2.resize(source_yx, (width, height), interpolation=cv2.INTER_NEAREST)
        return image, mask, source_yx, (original_hw[0], original_hw[1])

    def finish(
        self,
        index: int,
        image: np.ndarray,
        mask: np.ndarray,
        source_yx: np.ndarray,
        original_hw: tuple[int, int],
        *,
        transform: Callable[..., dict[str, Any]] | None = None,
        repeat: int = 0,
    ) -> dict[str, Any]:
        """Apply the (seeded) transform, the dataset's own unless ``transform`` is given, and
        convert to tensors; see the class docstring for keys and ``repeat``."""
        transform = transform or self.transform
        if transform is not None:
            if hasattr(transform, "set_random_seed"):
                transform.set_random_seed(draw_seed(self.seed, self.epoch, index, repeat=repeat))
            out = transform(image=image, mask=mask, source_yx=source_yx)
            image, mask, source_yx = out["image"], out["mask"], out["source_yx"]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)),
            "mask": torch.from_numpy(mask.astype(np.int64)),
            "source_yx": torch.from_numpy(np.ascontiguousarray(source_yx.transpose(2, 0, 1), dtype=np.float32)),
            "source_hw": torch.tensor(original_hw),
            "sample_id": self.sample_id(index),
            "index": index,
        }

    def check_labels(self, mask: np.ndarray, where: str) -> None:
        limit = 2**self.num_classes if self.multilabel else self.num_classes  # multilabel: one bit per class
        if int(mask.max(initial=0)) < limit:
            return
        values = np.unique(mask)
        bad = [int(v) for v in values if v >= limit and v != self.ignore_index]
        if bad and self.multilabel:
            raise DatasetError(
                f"{where}: label values {bad[:10]} set bits beyond the {self.num_classes} classes of "
                f"data.mask_format=multilabel (bit k = class k: values 0..{limit - 1}) and are not the ignore id "
                f"{self.ignore_index}; fix the mask, data.class_names or data.ignore_index"
            )
        if bad:
            raise DatasetError(
                f"{where}: label values {bad[:10]} are outside the classes 0..{self.num_classes - 1} "
                f"and are not the ignore id {self.ignore_index}; fix the mask or set data.ignore_index"
            )


class PairedDataset(SegmentationDataset):
    """Samples given as (sample id, image file, label file) pairs; ``read_labels`` decodes a label file.

    ``read_labels`` (default `read_mask`: stored ids) maps a label file's path to (H, W) class ids;
    a pair without a label file reads as all ``ignore_index`` (benchmarks that withhold test labels).
    """

    def __init__(self, pairs: Sequence[SamplePair], *, read_labels: LabelReader = read_mask, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pairs, self.read_labels = list(pairs), read_labels

    def __len__(self) -> int:
        return len(self.pairs)

    def sample_id(self, index: int) -> str:
        return self.pairs[index].sample_id

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        _, image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        if mask_path is None:
            return image, np.full(image.shape[:2], self.ignore_index, _label_dtype(self.ignore_index))
        mask = self.read_labels(mask_path)
        if mask.shape != image.shape[:2]:
            raise DatasetError(
                f"label file {display_path(mask_path)} is {mask.shape[0]}x{mask.shape[1]} but its image "
                f"{display_path(image_path)} is {image.shape[0]}x{image.shape[1]} (height x width)"
            )
        self.check_labels(mask, display_path(mask_path))
        limits = np.iinfo(mask.dtype)
        if not limits.min <= self.ignore_index <= limits.max:  # room for the ignore id that padding writes
            mask = mask.astype(_label_dtype(self.ignore_index))
        return image, mask


def _label_dtype(ignore_index: int) -> type[np.integer]:
    """The smallest integer type OpenCV resizes that holds ``ignore_index``."""
    if 0 <= ignore_index <= 255:
        return np.uint8
    return np.uint16 if 0 <= ignore_index <= 65535 else np.int32


class FolderDataset(PairedDataset):
    """Images and single-channel (or palette) label PNGs in two folders, matched by file stem.

    ``sample_id`` is the stem as printable text (non-UTF-8 bytes of a name as ``\\xff``).
    """

    def __init__(self, image_dir: str | Path, mask_dir: str | Path, **kwargs: Any) -> None:
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        super().__init__(folder_pairs(self.image_dir, self.mask_dir), **kwargs)


class SyntheticDataset(SegmentationDataset):
    """The built-in street-like dataset (see `segohem.data.synthetic`), no files needed."""

    def __init__(
        self, *, split: str, length: int, image_size: tuple[int, int], scene_seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if split not in SPLIT_KEYS:
            raise DatasetError(f"synthetic split '{split}' is unknown; valid splits: {', '.join(SPLIT_KEYS)}")
        self.split, self.length, self.image_size = split, length, image_size
        self.scene_seed = scene_seed  # fixed scenes; the run seed only drives augmentation

    def __len__(self) -> int:
        return self.length

    def sample_id(self, index: int) -> str:
        return f"synthetic-{self.split}-{index:05d}"

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        height, width = self.image_size
        return render_scene(seed=self.scene_seed, split=self.split, index=index, height=height, width=width)
