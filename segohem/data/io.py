"""The one image and label-map reader: file bytes decoded in memory, errors naming the file.

Reading bytes first (``np.fromfile`` + ``cv2.imdecode``) works for any file name the OS
accepts; ``cv2.imread`` crashes the interpreter on a name that is not valid UTF-8.
"""

from __future__ import annotations

import os
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np

from segohem.data.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def display_path(path: str | Path) -> str:
    """``path`` as printable UTF-8 text; bytes of the name that are not UTF-8 appear as ``\\xff``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _read_bytes(path: str | Path, *, what: str) -> np.ndarray:
    """The file's bytes as a (num_bytes,) uint8 array; DatasetError if missing, unreadable or empty."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise DatasetError(f"cannot read {what} {display_path(path)}: {err.strerror or err}") from None
    if data.size == 0:
        raise DatasetError(f"cannot read {what} {display_path(path)}: the file is empty (0 bytes)")
    return data


def _decode(data: np.ndarray, flags: int) -> np.ndarray | None:
    try:
        return cv2.imdecode(data, flags)
    except cv2.error:
        return None


def _palette_indices(data: np.ndarray) -> np.ndarray | None:
    """(H, W) uint8 palette indices of a palette-mode file (VOC-style PNG), else None.

    OpenCV expands a palette to colours, which would turn class ids into RGB triples.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(BytesIO(data.tobytes())) as picture:
            if picture.mode != "P":
                return None
            return np.asarray(picture)
    except (UnidentifiedImageError, OSError, ValueError):
        return None  # not something PIL reads; OpenCV decides


def _read_rgb(path: str | Path, *, what: str) -> np.ndarray:
    image = _decode(_read_bytes(path, what=what), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(
            f"cannot read {what} {display_path(path)}: corrupt or not an image "
            f"(readable formats: {', '.join(IMAGE_SUFFIXES)})"
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB; grey or palette images are expanded.

    Raises DatasetError naming the file when it is missing, empty, corrupt or not an image.
    """
    return _read_rgb(path, what="image")


def read_colour_mask(path: str | Path) -> np.ndarray:
    """Read a colour-coded label file as (H, W, 3) uint8 RGB (palette files give their colours).

    Raises DatasetError naming the file when it is missing, empty, corrupt or not an image.
    """
    return _read_rgb(path, what="label file")


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label map as (H, W) integer class ids (uint8 or uint16 as stored).

    Palette-mode files give their palette indices. Raises DatasetError naming the file when it
    is missing, empty, corrupt, not single-channel or not integer.
    """
    data = _read_bytes(path, what="label file")
    mask = _palette_indices(data)
    if mask is None:
        mask = _decode(data, cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise DatasetError(f"cannot read label file {display_path(path)}: corrupt or not an image")
    if mask.ndim != 2:
        raise DatasetError(
            f"label file {display_path(path)} has {mask.shape[2]} channels; expected a single-channel "
            f"map of class ids or a palette PNG (colour-coded masks: data.mask_format=rgb with data.palette)"
        )
    if not np.issubdtype(mask.dtype, np.integer):
        raise DatasetError(f"label file {display_path(path)} holds {mask.dtype} values; expected integer class ids")
    return mask
