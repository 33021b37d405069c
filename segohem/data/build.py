"""Build datasets and class metadata from the `data` and `augment` config sections."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from segohem.config import AugmentConfig, ConfigError, DataConfig
from segohem.data.datasets import DatasetError, FolderDataset, SegmentationDataset, SyntheticDataset
from segohem.data.io import display_path
from segohem.data.presets import PRESETS
from segohem.data.transforms import build_eval_transform, build_train_transform

SPLITS = ("train", "val", "test")  # the splits build_dataset knows; data.<split>_images/_masks name their folders


@dataclass(frozen=True)
class ClassInfo:
    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int

    @property
    def num_classes(self) -> int:
        return len(self.names)


def class_info(cfg: DataConfig) -> ClassInfo:
    """Class names, palette and ignore id: the config's where given, else the preset's."""
    preset = PRESETS.get(cfg.kind)
    names = tuple(cfg.class_names) or (preset.class_names if preset else ())
    if not names:
        raise ConfigError(f"data.class_names is required for data.kind={cfg.kind}")
    palette = tuple(tuple(c) for c in cfg.palette) or (preset.palette if preset else ())
    if not palette:  # a distinct, deterministic colour per class
        palette = tuple(((i * 97) % 256, (i * 57 + 80) % 256, (i * 151 + 40) % 256) for i in range(len(names)))
    if len(palette) != len(names) or any(len(c) != 3 for c in palette):
        raise ConfigError(f"data.palette needs one RGB triple per class ({len(names)} classes)")
    ignore_index = preset.ignore_index if preset and cfg.kind == "camvid" else cfg.ignore_index
    if 0 <= ignore_index < len(names):
        raise ConfigError(f"data.ignore_index {ignore_index} collides with class '{names[ignore_index]}'")
    return ClassInfo(names, palette, ignore_index)  # type: ignore[arg-type]


def build_dataset(
    data: DataConfig, augment: AugmentConfig, *, split: str, train: bool, seed: int
) -> SegmentationDataset:
    """The dataset of ``split`` (one of `SPLITS`) with training or evaluation transforms.

    Synthetic data sizes its test split like its val split (``data.num_val``), with other scenes.
    """
    if split not in SPLITS:
        raise ConfigError(f"split '{split}' is unknown; valid splits: {', '.join(SPLITS)}")
    info = class_info(data)
    make = build_train_transform if train else build_eval_transform
    common = dict(
        num_classes=info.num_classes, ignore_index=info.ignore_index, seed=seed,
        transform=make(augment, ignore_index=info.ignore_index),
        resize=tuple(data.resize) if data.resize else None,
    )  # fmt: skip
    if data.kind == "synthetic":
        length = data.num_train if split == "train" else data.num_val
        height, width = data.image_size
        return SyntheticDataset(split=split, length=length, image_size=(height, width), **common)  # type: ignore[arg-type]
    image_dir, mask_dir = split_folders(data, split=split)
    return FolderDataset(image_dir, mask_dir, **common)  # type: ignore[arg-type]


def split_folders(data: DataConfig, *, split: str) -> tuple[Path, Path]:
    """The (image folder, label folder) of ``split`` under ``data.root``; DatasetError naming the keys if absent."""
    names = {
        "train": (data.train_images, data.train_masks),
        "val": (data.val_images, data.val_masks),
        "test": (data.test_images, data.test_masks),
    }[split]
    root = Path(data.root)
    for what, name in zip(("image", "label"), names, strict=True):
        if not (root / name).is_dir():
            raise DatasetError(
                f"the {split} split's {what} folder {display_path(root / name)} does not exist; set "
                f"data.{split}_images and data.{split}_masks to its image and label folders "
                f"(relative to data.root={display_path(root)})"
            )
    return root / names[0], root / names[1]
