"""Pure visualization functions: arrays in, new RGB uint8 arrays out."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def colorize_mask(
    mask: np.ndarray, palette: Sequence[Sequence[int]], *, ignore_index: int | None = None,
    ignore_color: Sequence[int] = (0, 0, 0),
) -> np.ndarray:  # fmt: skip
    """(H, W) class ids -> (H, W, 3) uint8 RGB; ids outside the palette get ``ignore_color``."""
    table = np.zeros((256, 3), np.uint8)
    table[:] = ignore_color
    table[: len(palette)] = np.asarray(palette, np.uint8)
    ids = mask.astype(np.int64)
    out = table[np.clip(ids, 0, 255)]
    if ignore_index is not None:
        out[ids == ignore_index] = ignore_color
    return out


def overlay_mask(
    image: np.ndarray, mask: np.ndarray, palette: Sequence[Sequence[int]], *, alpha: float = 0.5,
    ignore_index: int | None = None,
) -> np.ndarray:  # fmt: skip
    """Blend the colorized ``mask`` over ``image`` (H, W, 3) uint8; ignored pixels stay as they are."""
    colors = colorize_mask(mask, palette, ignore_index=ignore_index).astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colors
    if ignore_index is not None:
        keep = mask == ignore_index
        blended[keep] = image[keep]
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
