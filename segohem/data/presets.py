"""Class names, palettes and ignore ids of the built-in datasets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetPreset:
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]  # RGB per class id
    ignore_index: int


CAMVID = DatasetPreset(
    class_names=(
        "sky", "building", "pole", "road", "pavement", "tree",
        "sign_symbol", "fence", "car", "pedestrian", "bicyclist",
    ),
    palette=(
        (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
        (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
    ),
    ignore_index=11,
)  # fmt: skip

# Large easy regions (sky, road, building), a low-contrast class (car on road) and small or
# thin rare classes (pole, sign, person): imbalanced the way street scenes are.
SYNTHETIC = DatasetPreset(
    class_names=("sky", "building", "road", "car", "pole", "sign", "person"),
    palette=(
        (70, 130, 180), (128, 0, 0), (128, 64, 128), (0, 0, 142),
        (153, 153, 153), (220, 220, 0), (220, 20, 60),
    ),
    ignore_index=255,
)  # fmt: skip

PRESETS: dict[str, DatasetPreset] = {"camvid": CAMVID, "synthetic": SYNTHETIC}
