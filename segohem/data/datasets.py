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

from segohem.data.errors import DatasetError
from segohem.data.io import IMAGE_SUFFIXES, display_path, read_image, read_mask
from segohem.data.synthetic import SPLIT_KEYS, render_scene

__all__ = ["IMAGE_SUFFIXES", "DatasetError", "FolderDataset", "SegmentationDataset", "SyntheticDataset"]


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


def files_by_stem(folder: Path, *, what: str) -> dict[str, Path]:
    """The image files of ``folder`` keyed by stem; DatasetError when two files share a stem."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            groups.setdefault(path.stem, []).append(path)
    clashes = [paths for paths in groups.values() if len(paths) > 1]
    if clashes:
        named = "; ".join(" and ".join(display_path(p.name) for p in paths) for paths in clashes[:3])
        raise DatasetError(
            f"{len(clashes)} stem(s) in the {what} folder {display_path(folder)} name more than one file "
            f"({named}); samples are matched by file stem, so keep one file per stem"
        )
    return {stem: paths[0] for stem, paths in groups.items()}


class FolderDataset(SegmentationDataset):
    """Images and single-channel (or palette) label PNGs in two folders, matched by file stem.

    ``sample_id`` is the stem as printable text (non-UTF-8 bytes of a name as ``\\xff``).
    """

    def __init__(self, image_dir: str | Path, mask_dir: str | Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        for folder in (self.image_dir, self.mask_dir):
            if not folder.is_dir():
                raise DatasetError(f"dataset folder {display_path(folder)} does not exist")
        images = files_by_stem(self.image_dir, what="image")
        masks = files_by_stem(self.mask_dir, what="label")
        missing = sorted(display_path(stem) for stem in set(images) - set(masks))
        if missing:
            raise DatasetError(
                f"{len(missing)} image(s) in {display_path(self.image_dir)} have no label file of the same stem "
                f"in {display_path(self.mask_dir)}, e.g. {missing[:3]}"
            )
        if not images:
            raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {display_path(self.image_dir)}")
        stems = sorted(images)
        self.image_paths = [images[s] for s in stems]
        self.mask_paths = [masks[s] for s in stems]
        self.stems = [display_path(s) for s in stems]

    def __len__(self) -> int:
        return len(self.stems)

    def sample_id(self, index: int) -> str:
        return self.stems[index]

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self.image_paths[index], self.mask_paths[index]
        image, mask = read_image(image_path), read_mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise DatasetError(
                f"label file {display_path(mask_path)} is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{display_path(image_path)} is {image.shape[1]}x{image.shape[0]} (width x height)"
            )
        self.check_labels(mask, display_path(mask_path))
        return image, mask


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
