"""The per-split result of `segohem check-data`: problems, label statistics and suggested class weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segohem.config import AugmentConfig, DataConfig
from segohem.data import ClassInfo, display_path
from segohem.data_check import ERROR, PairCheck, PairTask, Problem, SplitListing, check_pairs


@dataclass
class SplitReport:
    """Problems and label statistics of one split; the counts cover the label files that could be read."""

    split: str
    class_names: tuple[str, ...]
    num_images: int = 0
    num_masks: int = 0
    num_pairs: int = 0
    problems: list[Problem] = field(default_factory=list)
    sizes: dict[tuple[int, int], int] = field(default_factory=dict)  # image (H, W) -> images
    class_pixels: np.ndarray = field(init=False)  # (C,) int64 pixels of each class
    class_images: np.ndarray = field(init=False)  # (C,) int64 images holding the class
    present_pixels: np.ndarray = field(init=False)  # (C,) int64 pixels of the images holding the class
    ignore_pixels: int = 0
    label_pixels: int = 0  # pixels of the label files read
    outside_pixels: dict[int, int] = field(default_factory=dict)  # label value outside the classes -> pixels
    outside_files: dict[int, list[str]] = field(default_factory=dict)  # label value -> label files holding it

    def __post_init__(self) -> None:
        num_classes = len(self.class_names)
        self.class_pixels = np.zeros(num_classes, np.int64)
        self.class_images = np.zeros(num_classes, np.int64)
        self.present_pixels = np.zeros(num_classes, np.int64)

    def add(self, check: PairCheck, mask_path: Path | None) -> None:
        """Count one sample's problems, size and labels (``mask_path`` names it among the examples)."""
        self.problems.extend(check.problems)
        if check.size is not None:
            self.sizes[check.size] = self.sizes.get(check.size, 0) + 1
        if check.class_pixels is None or mask_path is None:
            return
        image_pixels = check.pixels
        self.label_pixels += image_pixels
        present = check.class_pixels > 0
        self.class_pixels += check.class_pixels
        self.class_images[present] += 1
        self.present_pixels[present] += image_pixels
        self.ignore_pixels += check.ignored
        for value, count in check.outside.items():
            self.outside_pixels[value] = self.outside_pixels.get(value, 0) + count
            self.outside_files.setdefault(value, []).append(display_path(mask_path))

    @property
    def total_pixels(self) -> int:
        return self.label_pixels

    def class_weights(self) -> list[float | None]:
        """Median-frequency balancing (Eigen & Fergus, ICCV 2015; SegNet's CamVid weights):
        freq(c) = pixels of c / all pixels of the images where c is present, and
        weight(c) = median of freq over the present classes / freq(c). None: c is absent."""
        present = self.class_images > 0
        if not present.any():
            return [None] * len(self.class_names)
        freq = self.class_pixels / np.maximum(self.present_pixels, 1)
        median = float(np.median(freq[present]))
        return [float(median / f) if ok else None for f, ok in zip(freq, present, strict=True)]


def mixed_size_problem(
    split: str, sizes: dict[tuple[int, int], int], *, folder: Path, data: DataConfig, augment: AugmentConfig
) -> Problem | None:  # fmt: skip
    """An error naming the image ``folder`` when the split's images differ in size and a batch would
    have to stack them (`collate_samples` refuses that)."""
    if len(sizes) < 2 or data.resize:
        return None
    batch = data.batch_size if split == "train" else data.val_batch_size
    if batch == 1 or (split == "train" and augment.crop):
        return None
    listed = ", ".join(f"{h}x{w} ({n})" for (h, w), n in sorted(sizes.items(), key=lambda item: -item[1])[:5])
    fix = "augment.crop=[H, W]" if split == "train" else "data.val_batch_size=1"
    detail = (
        f"the {split} images come in {len(sizes)} sizes (height x width: {listed}); a batch of {batch} cannot "
        f"stack them: set data.resize=[H, W] or {fix}"
    )
    return Problem("mixed_sizes", ERROR, display_path(folder), detail)


def scan_dataset(
    listings: list[SplitListing], *, data: DataConfig, augment: AugmentConfig, info: ClassInfo, workers: int,
    progress: bool,
) -> list[SplitReport]:  # fmt: skip
    """Read every sample of ``listings`` with ``workers`` processes; one report per split."""
    colour_labels = data.mask_format == "rgb"
    tasks = [
        PairTask(pair.image_path, pair.mask_path, listing.read_labels, info, colour_labels)
        for listing in listings
        for pair in listing.pairs
    ]
    results = iter(list(check_pairs(tasks, workers=workers, progress=progress)))
    reports = []
    for listing in listings:
        report = SplitReport(
            listing.split, info.names, num_images=listing.num_images, num_masks=listing.num_masks,
            num_pairs=len(listing.pairs), problems=list(listing.problems),
        )  # fmt: skip
        for pair in listing.pairs:
            report.add(next(results), pair.mask_path)
        folder = listing.pairs[0].image_path.parent if listing.pairs else Path(data.root)
        mixed = mixed_size_problem(listing.split, report.sizes, folder=folder, data=data, augment=augment)
        report.problems += [mixed] if mixed is not None else []
        reports.append(report)
    return reports


def count_errors(reports: list[SplitReport]) -> tuple[int, int]:
    """(errors, warnings) over every report."""
    problems = [problem for report in reports for problem in report.problems]
    errors = sum(problem.severity == ERROR for problem in problems)
    return errors, len(problems) - errors
