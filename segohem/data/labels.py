"""Label encodings turned into class ids: Cityscapes label ids, ADE20K's shifted ids, colour and binary masks.

Each ``read_*`` reader takes a label file's path and returns (H, W) class ids with the ignore id
where nothing is scored; the pure ``*_ids`` functions do the mapping and are tested value by value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segohem.data.errors import DatasetError
from segohem.data.io import display_path, read_colour_mask, read_mask
from segohem.data.presets import CITYSCAPES_LABELS

IGNORE = 255  # the ignore id of the Cityscapes, ADE20K and VOC encodings
CITYSCAPES_TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"


def _cityscapes_lookup() -> np.ndarray:
    lookup = np.full(256, IGNORE, np.uint8)  # label ids not in the table are ignored
    for _, label_id, train_id, _ in CITYSCAPES_LABELS:
        if label_id >= 0:
            lookup[label_id] = train_id if 0 <= train_id < IGNORE else IGNORE
    return lookup


_CITYSCAPES_LOOKUP = _cityscapes_lookup()


def cityscapes_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """(H, W) Cityscapes label ids (gtFine_labelIds) -> (H, W) uint8 train ids 0..18, all else 255.

    Label ids outside the table (negative, such as the license plate's -1, or above 33) are 255.
    """
    ids = label_ids.astype(np.int64, copy=False)
    known = (ids >= 0) & (ids < len(_CITYSCAPES_LOOKUP))
    return np.where(known, _CITYSCAPES_LOOKUP[np.where(known, ids, 0)], IGNORE).astype(np.uint8)


def read_cityscapes_labels(path: Path) -> np.ndarray:
    """A gtFine label file as train ids: ``*_labelTrainIds.png`` as stored, ``*_labelIds.png`` mapped."""
    mask = read_mask(path)
    return mask if path.name.endswith(CITYSCAPES_TRAIN_IDS_SUFFIX) else cityscapes_train_ids(mask)


def reduce_zero_label(labels: np.ndarray, *, num_classes: int, where: str) -> np.ndarray:
    """(H, W) values 0..num_classes -> (H, W) uint8: 0 ("other") -> 255, k -> k - 1 (ADE20K's encoding).

    A value above ``num_classes`` is a DatasetError naming ``where`` and the values.
    """
    bad = np.unique(labels[labels > num_classes])
    if bad.size:
        raise DatasetError(
            f"{where}: label values {bad[:10].tolist()} are not ADE20K annotation values (0 = other, "
            f"1..{num_classes} = the classes); is this file from ADEChallengeData2016/annotations?"
        )
    return np.where(labels == 0, IGNORE, labels.astype(np.int64) - 1).astype(np.uint8)


def read_ade20k_labels(path: Path) -> np.ndarray:
    """An ADEChallengeData2016 annotation PNG as class ids 0..149, ignore 255."""
    return reduce_zero_label(read_mask(path), num_classes=150, where=display_path(path))


def colour_ids(
    rgb: np.ndarray, *, palette: Sequence[Sequence[int]], ignore_colours: Sequence[Sequence[int]],
    ignore_index: int, where: str,
) -> np.ndarray:  # fmt: skip
    """(H, W, 3) uint8 RGB -> (H, W) int64 class ids: palette colour c -> c, an ignore colour -> ignore_index.

    Any other colour is a DatasetError naming ``where``, the colours and their pixel counts.
    """
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]  # (H, W)
    colours = [*palette, *ignore_colours]
    keys = np.array([(r << 16) | (g << 8) | b for r, g, b in colours], np.int64)
    values = np.array([*range(len(palette)), *[ignore_index] * len(ignore_colours)], np.int64)
    order = np.argsort(keys)
    keys, values = keys[order], values[order]
    slot = np.clip(np.searchsorted(keys, codes), 0, len(keys) - 1)
    known = keys[slot] == codes
    if not known.all():
        unknown, counts = np.unique(codes[~known], return_counts=True)
        most = np.argsort(-counts, kind="stable")[:5]
        named = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255}) in {n} pixels"
                          for c, n in zip(unknown[most].tolist(), counts[most].tolist(), strict=True))  # fmt: skip
        raise DatasetError(
            f"{where}: {len(unknown)} colour(s) are neither in data.palette nor in data.ignore_colors: {named}; "
            f"add them to data.palette (a class) or data.ignore_colors (ignored), or save the mask losslessly (PNG)"
        )
    return values[slot]


@dataclass(frozen=True)
class ColourLabels:
    """Reader of colour-coded label files (``data.mask_format: rgb``)."""

    palette: tuple[tuple[int, int, int], ...]
    ignore_colours: tuple[tuple[int, int, int], ...]
    ignore_index: int

    def __call__(self, path: Path) -> np.ndarray:
        return colour_ids(
            read_colour_mask(path), palette=self.palette, ignore_colours=self.ignore_colours,
            ignore_index=self.ignore_index, where=display_path(path),
        )  # fmt: skip


def binary_ids(mask: np.ndarray, *, where: str) -> np.ndarray:
    """(H, W) 0/255 or 0/1 -> (H, W) uint8 0/1; any other value set is a DatasetError naming ``where``."""
    values = set(np.unique(mask).tolist())
    if values <= {0, 1} or values <= {0, 255}:
        return (mask > 0).astype(np.uint8)
    raise DatasetError(
        f"{where}: a binary mask holds 0/255 or 0/1, but this one holds {sorted(values)[:10]}; "
        f"use data.mask_format=index for class ids (with data.class_names)"
    )


def read_binary_labels(path: Path) -> np.ndarray:
    """A 0/255 or 0/1 mask as classes 0 (background) and 1 (foreground)."""
    return binary_ids(read_mask(path), where=display_path(path))


MAX_PACKED_CLASSES = 15  # class bits of a 16-bit label map, with 65535 left for the ignore id


def check_packing(num_classes: int, ignore_index: int) -> None:
    """ValueError unless ``num_classes`` bits and ``ignore_index`` fit one 16-bit label map apart."""
    if not 1 <= num_classes <= MAX_PACKED_CLASSES:
        raise ValueError(f"{num_classes} classes: a 16-bit label map packs 1 to {MAX_PACKED_CLASSES} (one bit each)")
    if not 2**num_classes <= ignore_index <= 65535:
        raise ValueError(
            f"ignore id {ignore_index} is not above the packed values of {num_classes} classes "
            f"(0..{2**num_classes - 1}) within 16 bits; use {255 if num_classes < 8 else 65535}"
        )


def pack_multilabel(masks: list[np.ndarray | None], *, ignore: np.ndarray | None = None,
                    ignore_index: int = 255) -> np.ndarray:  # fmt: skip
    """One binary (H, W) mask per class (non-zero = present; None = absent) as the bit-packed
    label map of ``data.mask_format=multilabel``: bit k set where class k is present, and
    ``ignore_index`` where ``ignore`` is non-zero. uint8 when the values fit, else uint16.

    Raises ValueError (see `check_packing`) when the classes or the ignore id do not fit a
    16-bit map, or the masks differ in size.
    """
    check_packing(len(masks), ignore_index)
    shapes = {m.shape for m in masks if m is not None} | ({ignore.shape} if ignore is not None else set())
    if len(shapes) != 1:
        raise ValueError(f"the class masks of one image differ in size (H, W): {sorted(shapes)}")
    dtype = np.uint8 if max(2 ** len(masks) - 1, ignore_index) <= 255 else np.uint16
    packed = np.zeros(shapes.pop(), dtype)
    for bit, mask in enumerate(masks):
        if mask is not None:
            packed |= ((mask != 0) << bit).astype(dtype)
    if ignore is not None:
        packed[ignore != 0] = ignore_index
    return packed
