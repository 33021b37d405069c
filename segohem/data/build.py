"""Build datasets and class metadata from the `data` and `augment` config sections."""

from __future__ import annotations

from segohem.config import SPLITS, AugmentConfig, ConfigError, DataConfig
from segohem.data.datasets import PairedDataset, SegmentationDataset, SyntheticDataset
from segohem.data.kinds import dataset_files, split_folders
from segohem.data.labels import MAX_PACKED_CLASSES
from segohem.data.presets import PRESETS, ClassInfo
from segohem.data.transforms import build_eval_transform, build_train_transform

__all__ = ["SPLITS", "ClassInfo", "build_dataset", "class_info", "split_folders"]

BINARY_CLASSES = ("background", "foreground")  # data.mask_format=binary without data.class_names


DEFAULT_IGNORE = DataConfig().ignore_index


def class_info(cfg: DataConfig) -> ClassInfo:
    """Class names, palette and ignore id: the config's where given, else the preset's.

    The ignore id of a named dataset (camvid, cityscapes, ade20k, voc) is its preset's: its
    label encoding fixes it.
    """
    preset = PRESETS.get(cfg.kind)
    if preset and cfg.class_names and len(cfg.class_names) != len(preset.class_names):
        raise ConfigError(
            f"data.class_names lists {len(cfg.class_names)} names, but data.kind={cfg.kind} has "
            f"{len(preset.class_names)} classes ({', '.join(preset.class_names)}): its labels fix them; rename "
            f"them one for one, or leave data.class_names empty"
        )
    if preset and cfg.kind != "synthetic" and cfg.ignore_index not in (preset.ignore_index, DEFAULT_IGNORE):
        raise ConfigError(
            f"data.ignore_index={cfg.ignore_index}: data.kind={cfg.kind} ignores label {preset.ignore_index}, "
            f"which its label files fix; leave data.ignore_index unset"
        )
    binary = cfg.kind == "folder" and cfg.mask_format == "binary"
    names = tuple(cfg.class_names) or (preset.class_names if preset else BINARY_CLASSES if binary else ())
    if not names:
        raise ConfigError(f"data.class_names is required for data.kind={cfg.kind}")
    if binary and len(names) != 2:
        raise ConfigError(f"data.class_names: data.mask_format=binary has 2 classes (0 and 1), not {len(names)}")
    if cfg.mask_format == "rgb" and not (cfg.palette or preset):
        raise ConfigError(
            "data.palette is required for data.mask_format=rgb: it maps each mask colour to its class "
            "(one [R, G, B] per class, in class-id order)"
        )
    palette = tuple(tuple(c) for c in cfg.palette) or (preset.palette if preset else ())
    if not palette:  # a distinct, deterministic colour per class
        palette = tuple(((i * 97) % 256, (i * 57 + 80) % 256, (i * 151 + 40) % 256) for i in range(len(names)))
    if len(palette) != len(names) or any(len(c) != 3 for c in palette):
        raise ConfigError(f"data.palette needs one RGB triple per class ({len(names)} classes)")
    ignore_index = preset.ignore_index if preset and cfg.kind != "synthetic" else cfg.ignore_index
    if cfg.mask_format == "multilabel":
        return _multilabel_info(names, palette, ignore_index)  # type: ignore[arg-type]
    if 0 <= ignore_index < len(names):
        raise ConfigError(f"data.ignore_index {ignore_index} collides with class '{names[ignore_index]}'")
    return ClassInfo(names, palette, ignore_index)  # type: ignore[arg-type]


def _multilabel_info(names: tuple[str, ...], palette: tuple[tuple[int, int, int], ...], ignore_index: int) -> ClassInfo:
    """Bit-packed multi-label masks: K classes use the label values 0 .. 2**K - 1, so the ignore id lies above."""
    if len(names) > MAX_PACKED_CLASSES:
        raise ConfigError(
            f"data.class_names: data.mask_format=multilabel packs one class per bit of a 16-bit mask, at most "
            f"{MAX_PACKED_CLASSES} classes (one value left for the ignore id); got {len(names)}"
        )
    if ignore_index < 0:
        raise ConfigError(
            f"data.ignore_index {ignore_index}: data.mask_format=multilabel masks are unsigned, so padding could not "
            f"write a negative ignore id; use {255 if len(names) < 8 else 65535}"
        )
    if ignore_index < 2 ** len(names):
        raise ConfigError(
            f"data.ignore_index {ignore_index} is a label value of data.mask_format=multilabel with {len(names)} "
            f"classes (values 0..{2 ** len(names) - 1} set class bits); use an ignore id of {2 ** len(names)} or "
            f"more, e.g. data.ignore_index={255 if len(names) < 8 else 65535}"
        )
    return ClassInfo(names, palette, ignore_index, multilabel=True)


def build_dataset(
    data: DataConfig, augment: AugmentConfig, *, split: str, train: bool, seed: int
) -> SegmentationDataset:
    """The dataset of ``split`` (one of `SPLITS`) with training or evaluation transforms.

    Synthetic data sizes its test split like its val split (``data.num_val``), with other scenes;
    the other kinds find their files as `segohem.data.kinds` describes.
    """
    if split not in SPLITS:
        raise ConfigError(f"split '{split}' is unknown; valid splits: {', '.join(SPLITS)}")
    info = class_info(data)
    make = build_train_transform if train else build_eval_transform
    common = dict(
        num_classes=info.num_classes, ignore_index=info.ignore_index, multilabel=info.multilabel, seed=seed,
        transform=make(augment, ignore_index=info.ignore_index),
        resize=tuple(data.resize) if data.resize else None,
    )  # fmt: skip
    if data.kind == "synthetic":
        length = data.num_train if split == "train" else data.num_val
        height, width = data.image_size
        return SyntheticDataset(split=split, length=length, image_size=(height, width), **common)  # type: ignore[arg-type]
    pairs, read_labels = dataset_files(data, split=split, info=info)
    return PairedDataset(pairs, read_labels=read_labels, **common)  # type: ignore[arg-type]
