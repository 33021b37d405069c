"""Segmentation datasets returning (image, mask, sample_id), validated as they are read."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from segohem.data.synthetic import render_scene

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A sample cannot be used; the message names the file and what is wrong with it."""


class SegmentationDataset(Dataset[dict[str, Any]]):
    """Base: subclasses implement ``__len__``, ``sample_id`` and ``read``.

    ``__getitem__`` returns ``{"image": (3, H, W) float32, "mask": (H, W) int64,
    "source_yx": (2, H, W) float32 original row/col of each pixel, "source_hw": (2,) original
    height/width, "sample_id": str, "index": int}``. Augmentation randomness is seeded from
    (seed, epoch, index), so an epoch is reproducible whatever the worker count, and a
    resumed run sees exactly the samples an uninterrupted one would.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        ignore_index: int,
        transform: Callable[..., dict[str, Any]] | None = None,
        resize: tuple[int, int] | None = None,
        seed: int = 0,
    ) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
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

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.finish(index, *self.load(index, scale=1.0))

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
        self, index: int, image: np.ndarray, mask: np.ndarray, source_yx: np.ndarray, original_hw: tuple[int, int]
    ) -> dict[str, Any]:
        """Apply the (seeded) transform and convert to tensors; see the class docstring for keys."""
        if self.transform is not None:
            if hasattr(self.transform, "set_random_seed"):
                self.transform.set_random_seed(zlib.crc32(f"{self.seed}/{self.epoch}/{index}".encode()))
            out = self.transform(image=image, mask=mask, source_yx=source_yx)
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
        if int(mask.max(initial=0)) < self.num_classes:
            return
        values = np.unique(mask)
        bad = [int(v) for v in values if v >= self.num_classes and v != self.ignore_index]
        if bad:
            raise DatasetError(
                f"{where}: label values {bad[:10]} are outside the classes 0..{self.num_classes - 1} "
                f"and are not the ignore id {self.ignore_index}; fix the mask or set data.ignore_index"
            )


class FolderDataset(SegmentationDataset):
    """Images and single-channel label PNGs in two folders, matched by file stem."""

    def __init__(self, image_dir: str | Path, mask_dir: str | Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        for folder in (self.image_dir, self.mask_dir):
            if not folder.is_dir():
                raise DatasetError(f"dataset folder {folder} does not exist")
        images = {p.stem: p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        masks = {p.stem: p for p in self.mask_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        missing = sorted(set(images) - set(masks))
        if missing:
            raise DatasetError(
                f"{len(missing)} image(s) in {self.image_dir} have no label file of the same stem "
                f"in {self.mask_dir}, e.g. {missing[:3]}"
            )
        if not images:
            raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {self.image_dir}")
        self.stems = sorted(images)
        self.image_paths = [images[s] for s in self.stems]
        self.mask_paths = [masks[s] for s in self.stems]

    def __len__(self) -> int:
        return len(self.stems)

    def sample_id(self, index: int) -> str:
        return self.stems[index]

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self.image_paths[index], self.mask_paths[index]
        image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
        if image is None:
            raise DatasetError(f"cannot read image {image_path}: missing, corrupt or not an image")
        mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
        if mask is None:
            raise DatasetError(f"cannot read label file {mask_path}: missing, corrupt or not an image")
        if mask.ndim != 2:
            raise DatasetError(
                f"label file {mask_path} has {mask.shape[2]} channels; expected a single-channel "
                f"map of class ids (colour-coded masks must be converted first)"
            )
        if mask.shape != image.shape[:2]:
            raise DatasetError(
                f"label file {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{image_path} is {image.shape[1]}x{image.shape[0]} (width x height)"
            )
        self.check_labels(mask, str(mask_path))
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), mask


class SyntheticDataset(SegmentationDataset):
    """The built-in street-like dataset (see `segohem.data.synthetic`), no files needed."""

    def __init__(
        self, *, split: str, length: int, image_size: tuple[int, int], scene_seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.split, self.length, self.image_size = split, length, image_size
        self.scene_seed = scene_seed  # fixed scenes; the run seed only drives augmentation

    def __len__(self) -> int:
        return self.length

    def sample_id(self, index: int) -> str:
        return f"synthetic-{self.split}-{index:05d}"

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        height, width = self.image_size
        return render_scene(seed=self.scene_seed, split=self.split, index=index, height=height, width=width)
