"""Pure visualization functions: arrays in, new RGB uint8 arrays out (nothing is modified in place)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from segohem.disk import naming

CORRECT_RGB, WRONG_RGB, IGNORED_RGB = (40, 170, 60), (220, 30, 30), (90, 90, 90)
HARD_RGB = (255, 0, 255)


@dataclass
class PredictionPanel:
    """One image at the resolution the model saw: (H, W, 3) uint8 image, (H, W) target/pred
    ids, (H, W) bool hard mask under the training rule, (H, W) float32 per-pixel loss."""

    sample_id: str
    image: np.ndarray
    target: np.ndarray
    pred: np.ndarray
    hard_mask: np.ndarray
    pixel_loss: np.ndarray


@dataclass
class BankRow:
    """One image of the dictionary: thumbnail, hardness map and its statistics."""

    sample_id: str
    image: np.ndarray  # (h, w, 3) uint8 thumbnail
    hardness: np.ndarray  # (grid_h, grid_w) float32, NaN where never observed
    hard_fraction: float
    score: float
    top_confusion: str
    class_hard: dict[str, int] = field(default_factory=dict)


@dataclass
class EpochVisuals:
    panels: list[PredictionPanel]
    confusion: np.ndarray | None = None  # (C, C) int64 validation confusion matrix
    bank_rows: list[BankRow] = field(default_factory=list)


def write_png(path: Path, image: np.ndarray) -> None:
    """Encode in memory and write the bytes: works for any file name, unlike ``cv2.imwrite``, and a
    write the disk refuses raises OSError naming the file (``cv2.imwrite`` prints a libpng warning
    and returns False)."""
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"cannot encode {path} as PNG")
    with naming(path):
        path.write_bytes(encoded.tobytes())


def render_panel(
    panel: PredictionPanel, *, names: Sequence[str], palette: Sequence[Sequence[int]], ignore_index: int,
    hardness: np.ndarray | None = None, loss_vmax: float = 4.0,
) -> np.ndarray:  # fmt: skip
    """Image, ground truth, prediction, OHEM-kept pixels, loss, errors (and dictionary hardness)."""
    tiles = [
        panel.image,
        overlay_mask(panel.image, panel.target, palette, ignore_index=ignore_index),
        overlay_mask(panel.image, panel.pred, palette),
        hard_pixel_overlay(panel.image, panel.hard_mask),
        loss_heatmap(panel.pixel_loss, vmax=loss_vmax),
        error_map(panel.pred, panel.target, ignore_index=ignore_index),
    ]
    titles = ["image", "ground truth", "prediction", f"hard pixels {panel.hard_mask.mean():.1%}", "loss", "errors"]
    if hardness is not None:
        tiles.append(hardness_overlay(panel.image, hardness))
        titles.append("dictionary hardness")
    grid = montage(tiles, titles, columns=4)
    key = legend(names, palette)
    if key.shape[0] < grid.shape[0]:
        key = np.pad(key, ((0, grid.shape[0] - key.shape[0]), (0, 0), (0, 0)), constant_values=255)
    return np.concatenate([grid, key[: grid.shape[0]]], axis=1)


def colorize_multilabel(packed: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """(H, W) bit-packed classes (bit k = class k) -> (H, W, 3) uint8 RGB, the mean colour of each
    pixel's classes; black where it holds none."""
    colours = np.asarray(palette, np.float64)
    present = (packed[..., None].astype(np.int64) >> np.arange(len(colours))) & 1  # (H, W, K)
    total = present @ colours
    count = present.sum(-1, keepdims=True)
    return np.round(total / np.maximum(count, 1)).astype(np.uint8)


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


def blend(image: np.ndarray, colors: np.ndarray, *, alpha: float, where: np.ndarray | None = None) -> np.ndarray:
    """``(1 - alpha) * image + alpha * colors`` where ``where`` is True (everywhere by default)."""
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * colors.astype(np.float32)
    out = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    if where is not None:
        out[~where] = image[~where]
    return out


def overlay_mask(
    image: np.ndarray, mask: np.ndarray, palette: Sequence[Sequence[int]], *, alpha: float = 0.5,
    ignore_index: int | None = None,
) -> np.ndarray:  # fmt: skip
    """Blend the colorized ``mask`` over ``image`` (H, W, 3) uint8; ignored pixels stay as they are."""
    colors = colorize_mask(mask, palette, ignore_index=ignore_index)
    keep = None if ignore_index is None else mask != ignore_index
    return blend(image, colors, alpha=alpha, where=keep)


def hard_pixel_overlay(
    image: np.ndarray, hard_mask: np.ndarray, *, alpha: float = 0.7, color: Sequence[int] = HARD_RGB
) -> np.ndarray:
    """Paint the pixels OHEM kept in ``color`` over the image."""
    colors = np.broadcast_to(np.asarray(color, np.uint8), image.shape)
    return blend(image, colors, alpha=alpha, where=hard_mask.astype(bool))


def heatmap(values: np.ndarray, *, vmax: float | None = None) -> np.ndarray:
    """(H, W) non-negative values -> (H, W, 3) RGB with the inferno colour map; NaN -> black."""
    finite = np.nan_to_num(values.astype(np.float32), nan=0.0)
    top = float(vmax if vmax is not None else max(float(finite.max()), 1e-12))
    scaled = np.clip(finite / top, 0, 1) * 255
    bgr = cv2.applyColorMap(scaled.astype(np.uint8), cv2.COLORMAP_INFERNO)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    rgb[np.isnan(values)] = 0
    return rgb


def loss_heatmap(pixel_loss: np.ndarray, *, vmax: float | None = None) -> np.ndarray:
    """Per-pixel loss as a heatmap (``vmax`` fixes the scale across images)."""
    return heatmap(pixel_loss, vmax=vmax)


def error_map(pred: np.ndarray, target: np.ndarray, *, ignore_index: int) -> np.ndarray:
    """Green where correct, red where wrong, grey where the label is ignored."""
    out = np.empty((*target.shape, 3), np.uint8)
    out[:] = WRONG_RGB
    out[pred == target] = CORRECT_RGB
    out[target == ignore_index] = IGNORED_RGB
    return out


def hardness_overlay(image: np.ndarray, hardness: np.ndarray, *, alpha: float = 0.6) -> np.ndarray:
    """Upsample a (grid_h, grid_w) hardness map in [0, 1] onto the image as a heatmap.

    Cells never observed (NaN) leave the image as it is.
    """
    height, width = image.shape[:2]
    grid = cv2.resize(
        np.nan_to_num(hardness, nan=0.0).astype(np.float32), (width, height), interpolation=cv2.INTER_NEAREST
    )
    seen = cv2.resize((~np.isnan(hardness)).astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    return blend(image, heatmap(grid, vmax=1.0), alpha=alpha, where=seen.astype(bool))


def legend(names: Sequence[str], palette: Sequence[Sequence[int]], *, width: int = 160, row: int = 18) -> np.ndarray:
    """A column of colour swatches with class names."""
    out = np.full((row * len(names) + 4, width, 3), 255, np.uint8)
    for i, (name, color) in enumerate(zip(names, palette, strict=True)):
        top = 2 + i * row
        out[top : top + row - 4, 4 : 4 + row - 4] = color
        cv2.putText(out, name, (row + 6, top + row - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def montage(images: Sequence[np.ndarray], titles: Sequence[str] | None = None, *, columns: int = 4) -> np.ndarray:
    """Tile RGB images (resized to the first one's height) in a grid, each with a title bar."""
    height = images[0].shape[0]
    tiles = []
    for i, image in enumerate(images):
        scale = height / image.shape[0]
        tile = cv2.resize(image, (max(1, round(image.shape[1] * scale)), height), interpolation=cv2.INTER_NEAREST)
        bar = np.full((16, tile.shape[1], 3), 255, np.uint8)
        if titles is not None:
            cv2.putText(bar, titles[i], (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.concatenate([bar, tile], axis=0))
    width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0)), constant_values=255) for t in tiles]
    while len(tiles) % columns:
        tiles.append(np.full_like(tiles[0], 255))
    rows = [np.concatenate(tiles[r : r + columns], axis=1) for r in range(0, len(tiles), columns)]
    return np.concatenate(rows, axis=0)


def confusion_image(matrix: np.ndarray, names: Sequence[str], *, cell: int = 28) -> np.ndarray:
    """Row-normalized confusion matrix (rows: truth) as a heatmap with class names."""
    rows = matrix.astype(np.float64)
    normalized = rows / np.maximum(rows.sum(1, keepdims=True), 1)
    grid = cv2.resize(heatmap(normalized, vmax=1.0), (cell * len(names), cell * len(names)),
                      interpolation=cv2.INTER_NEAREST)  # fmt: skip
    margin = 90
    out = np.full((grid.shape[0] + margin, grid.shape[1] + margin, 3), 255, np.uint8)
    out[margin:, margin:] = grid
    for i, name in enumerate(names):
        cv2.putText(out, name[:12], (2, margin + i * cell + cell // 2 + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                    (0, 0, 0), 1, cv2.LINE_AA)  # fmt: skip
        cv2.putText(out, name[:2], (margin + i * cell + 4, margin - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                    (0, 0, 0), 1, cv2.LINE_AA)  # fmt: skip
    return out
