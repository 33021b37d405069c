"""Crop placement shared by online mining and refinement: a cell drawn by hardness, a window around it."""

from __future__ import annotations

import numpy as np


def cut_window(
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray], centre_yx: tuple[float, float], size_hw: tuple[int, int],
    *, ignore_index: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """A ``size_hw`` window of (image, mask, source_yx) centred on ``centre_yx`` as far as the
    image allows (the window stays inside it); a side shorter than the window is padded at the
    bottom / right, the mask with ``ignore_index``."""
    image, mask, source_yx = arrays
    out_h, out_w = size_hw
    top = int(np.clip(round(centre_yx[0] - out_h / 2), 0, max(0, image.shape[0] - out_h)))
    left = int(np.clip(round(centre_yx[1] - out_w / 2), 0, max(0, image.shape[1] - out_w)))
    window = (slice(top, top + out_h), slice(left, left + out_w))
    image, mask, source_yx = image[window], mask[window], source_yx[window]
    if image.shape[:2] != (out_h, out_w):
        pad = ((0, out_h - image.shape[0]), (0, out_w - image.shape[1]))
        image = np.pad(image, (*pad, (0, 0)))
        mask = np.pad(mask, pad, constant_values=ignore_index)
        source_yx = np.pad(source_yx, (*pad, (0, 0)))
    return image, mask, source_yx


def hard_cell_centre(
    hardness: np.ndarray, *, cell_size: int, sharpness: float, rng: np.random.Generator
) -> tuple[float, float] | None:
    """A point in original-image pixels: a cell drawn in proportion to hardness ** sharpness, a
    uniform point inside it. None when no cell is hard (nothing to steer by)."""
    known = np.nan_to_num(hardness, nan=0.0).ravel().astype(np.float64)
    weights = np.where(known > 0, known**sharpness, 0.0)  # 0 ** 0 is 1: never steer to an easy cell
    total = weights.sum()
    if not total > 0:
        return None
    cell = int(rng.choice(weights.size, p=weights / total))
    row, col = divmod(cell, hardness.shape[1])
    return (row + rng.random()) * cell_size, (col + rng.random()) * cell_size
