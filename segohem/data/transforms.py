"""Albumentations pipelines for training and evaluation, built from the `augment` config section."""

from __future__ import annotations

import albumentations as A
import cv2

from segohem.config import AugmentConfig

# The original (row, col) of every pixel travels as a second mask, through the same nearest
# interpolation, crops and flips as the labels; the hard-pixel bank uses it to map hard
# pixels back to the original image.
SOURCE_TARGETS = {"source_yx": "mask"}


def _normalize_and_pad(cfg: AugmentConfig, ignore_index: int) -> list[A.BasicTransform]:
    # Pad bottom/right only, so predictions are cropped back with [:H, :W]; masks are padded
    # with the ignore id, never with class 0.
    return [
        A.Normalize(mean=cfg.mean, std=cfg.std, max_pixel_value=255.0),
        A.PadIfNeeded(
            min_height=None, min_width=None, pad_height_divisor=cfg.pad_divisor,
            pad_width_divisor=cfg.pad_divisor, position="top_left",
            border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index,
        ),
    ]  # fmt: skip


def build_train_transform(cfg: AugmentConfig, *, ignore_index: int, placement: bool = True) -> A.Compose:
    """Random scale, crop, flip and colour jitter, then normalization and padding.

    placement=False leaves out the random scale and crop: the transform of a crop that was
    already scaled and placed (`segohem.mining.DictionaryCropDataset`).
    """
    ops: list[A.BasicTransform] = []
    low, high = cfg.scale
    if (low, high) != (1.0, 1.0) and placement:
        ops.append(A.RandomScale(scale_limit=(low - 1.0, high - 1.0), p=1.0))
    if cfg.crop and placement:
        height, width = cfg.crop
        ops.append(
            A.RandomCrop(
                height=height, width=width, pad_if_needed=True, border_mode=cv2.BORDER_CONSTANT,
                fill=0, fill_mask=ignore_index,
            )
        )  # fmt: skip
    if cfg.hflip > 0:
        ops.append(A.HorizontalFlip(p=cfg.hflip))
    if cfg.color_jitter > 0:
        ops.append(A.RandomBrightnessContrast(p=cfg.color_jitter))
    return A.Compose(ops + _normalize_and_pad(cfg, ignore_index), strict=True, additional_targets=SOURCE_TARGETS)


def build_eval_transform(cfg: AugmentConfig, *, ignore_index: int) -> A.Compose:
    """Normalization and padding only: deterministic, and labels keep their pixels."""
    return A.Compose(_normalize_and_pad(cfg, ignore_index), strict=True, additional_targets=SOURCE_TARGETS)
