"""Build datasets and class metadata from the `data` and `augment` config sections."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from segohem.config import AugmentConfig, ConfigError, DataConfig
from segohem.data.datasets import FolderDataset, SegmentationDataset, SyntheticDataset
from segohem.data.presets import PRESETS
from segohem.data.transforms import build_eval_transform, build_train_transform


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
    """The dataset of ``split`` (train | val) with training or evaluation transforms."""
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
    images, masks = (data.train_images, data.train_masks) if split == "train" else (data.val_images, data.val_masks)
    root = Path(data.root)
    return FolderDataset(root / images, root / masks, **common)  # type: ignore[arg-type]
