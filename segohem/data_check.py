"""Whole-dataset checks for `segohem check-data`: lists a split's files without stopping at the first
problem, reads every image and label file in worker processes, and sums label statistics."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from segohem.config import FOLDER_KINDS, DataConfig
from segohem.data import IMAGE_SUFFIXES, ClassInfo, DatasetError, SamplePair, display_path, read_image
from segohem.data.datasets import LabelReader
from segohem.data.kinds import dataset_files, folder_reader, split_folders

ERROR, WARNING = "error", "warning"  # error: training would stop on it; warning: it would not
ABSENT = ("missing_folder", "listing")  # the problems of a split that is simply not there


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a split, a folder or a file."""

    kind: str  # missing_folder, listing, no_images, duplicate_stem, image_without_mask, mask_without_image,
    # empty_file, unreadable, colour_mask, bad_labels, size_mismatch, labels_outside_classes, mixed_sizes
    severity: str  # ERROR or WARNING
    file: str  # printable path of the file (or folder) concerned
    detail: str


@dataclass
class SplitListing:
    """A split's samples, the reader of its label files and the problems found by listing them."""

    split: str
    read_labels: LabelReader
    pairs: list[SamplePair] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    num_images: int = 0
    num_masks: int = 0


def _by_stem(folder: Path) -> tuple[dict[str, Path], list[list[Path]]]:
    """The image files of ``folder`` by stem (the first of each stem), and the stems naming several files."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            groups.setdefault(path.stem, []).append(path)
    return {stem: paths[0] for stem, paths in groups.items()}, [p for p in groups.values() if len(p) > 1]


def _list_folders(data: DataConfig, listing: SplitListing) -> SplitListing:
    """folder / camvid without a split list: pair the two folders by stem as training does, recording
    every problem (missing folder, shared stems, unpaired files) instead of raising on the first."""
    split = listing.split
    try:
        image_dir, mask_dir = split_folders(data, split=split)
    except DatasetError as err:  # name the absent folder (data.<split>_images / _masks) as the file
        folders = [Path(data.root) / getattr(data, f"{split}_{part}") for part in ("images", "masks")]
        absent = next((folder for folder in folders if not folder.is_dir()), Path(data.root))
        listing.problems.append(Problem("missing_folder", ERROR, display_path(absent), str(err)))
        return listing
    images, image_clashes = _by_stem(image_dir)
    masks, mask_clashes = _by_stem(mask_dir)
    listing.num_images, listing.num_masks = len(images), len(masks)
    for paths in image_clashes + mask_clashes:
        names = " and ".join(display_path(p.name) for p in paths)
        detail = f"{names} share one stem; samples are matched by stem, so keep one file per stem"
        listing.problems.append(Problem("duplicate_stem", ERROR, display_path(paths[-1]), detail))
    for stem in sorted(set(images) - set(masks)):
        detail = f"no label file of stem {display_path(stem)} in {display_path(mask_dir)}"
        listing.problems.append(Problem("image_without_mask", ERROR, display_path(images[stem]), detail))
    for stem in sorted(set(masks) - set(images)):
        detail = f"no image of stem {display_path(stem)} in {display_path(image_dir)}; training ignores it"
        listing.problems.append(Problem("mask_without_image", WARNING, display_path(masks[stem]), detail))
    if not images:
        detail = f"no images ({', '.join(IMAGE_SUFFIXES)}) in the {split} split"
        listing.problems.append(Problem("no_images", ERROR, display_path(image_dir), detail))
    stems = sorted(set(images) & set(masks))
    listing.pairs = [SamplePair(display_path(stem), images[stem], masks[stem]) for stem in stems]
    return listing


def list_split(data: DataConfig, info: ClassInfo, *, split: str) -> SplitListing:
    """The samples of ``split`` and the problems of listing them.

    folder / camvid folders are paired here, every problem recorded. Split lists and the other
    kinds' layouts go through `segohem.data.kinds`, which stops at its first problem: that one is
    recorded (kind ``listing``) and the split has no samples.
    """
    if data.kind in FOLDER_KINDS and not getattr(data, f"{split}_list"):
        return _list_folders(data, SplitListing(split, folder_reader(data, info)))
    try:
        pairs, read_labels = dataset_files(data, split=split, info=info)
    except DatasetError as err:
        listing = SplitListing(split, folder_reader(data, info))
        listing.problems.append(Problem("listing", ERROR, display_path(Path(data.root)), str(err)))
        return listing
    num_masks = sum(pair.mask_path is not None for pair in pairs)
    return SplitListing(split, read_labels, pairs=list(pairs), num_images=len(pairs), num_masks=num_masks)


@dataclass(frozen=True)
class PairTask:
    """One sample to read: its files, its label reader and classes, whether colour label files are expected."""

    image_path: Path
    mask_path: Path | None
    read_labels: LabelReader
    info: ClassInfo
    colour_labels: bool


@dataclass
class PairCheck:
    """What reading one image and its label file found; the counts are empty when the labels were not read."""

    problems: list[Problem]
    size: tuple[int, int] | None = None  # the image's (H, W); None when unreadable
    class_pixels: np.ndarray | None = None  # (C,) int64
    ignored: int = 0
    outside: dict[int, int] = field(default_factory=dict)  # label value outside the classes -> pixels
    pixels: int = 0  # pixels of the label file (multi-label classes overlap: not the sum of the counts)


def _label_problem(path: Path, err: Exception, task: PairTask) -> Problem:
    """Classify a label file the reader refused: empty, undecodable, colour-coded where ids are expected,
    or holding values the reader rejects (its message names them)."""
    if path.stat().st_size == 0:
        return Problem("empty_file", ERROR, display_path(path), "the file is empty (0 bytes)")
    decoded = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        return Problem("unreadable", ERROR, display_path(path), str(err))
    if decoded.ndim == 3 and not task.colour_labels:
        rgb = decoded[..., 2::-1].reshape(-1, 3).astype(np.int64)  # BGR(A) -> RGB
        colours = set(np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]).tolist())
        known = {r << 16 | g << 8 | b for r, g, b in task.info.palette}
        hint = "; its colours are the class palette: set data.mask_format=rgb" if colours <= known else ""
        detail = f"a colour ({decoded.shape[2]}-channel) label file where single-channel class ids are expected{hint}"
        return Problem("colour_mask", ERROR, display_path(path), detail)
    where, detail = display_path(path), str(err)
    # the readers' messages begin with the file's name, which the problem's file column already gives
    detail = detail.removeprefix(f"{where}: ")
    return Problem("bad_labels", ERROR, where, detail)


def _count_labels(labels: np.ndarray, info: ClassInfo) -> tuple[np.ndarray, int, dict[int, int]]:
    """(H, W) class ids -> (pixels per class (C,), ignored pixels, {other value: pixels}); multi-label
    masks count a pixel in each class whose bit it sets, and values setting higher bits as other values."""
    flat = labels.ravel()
    if info.multilabel:
        values, counts = np.unique(flat, return_counts=True)
        inside = values < 2**info.num_classes
        bits = (values[inside, None].astype(np.int64) >> np.arange(info.num_classes)) & 1
        others = {int(v): int(n) for v, n in zip(values[~inside], counts[~inside], strict=True)}
        return (counts[inside] @ bits).astype(np.int64), others.pop(info.ignore_index, 0), others
    if flat.size and flat.min() < 0:  # a negative ignore id (colour masks): bincount takes no negatives
        values, counts = np.unique(flat, return_counts=True)
    else:
        counts = np.bincount(flat, minlength=info.num_classes)
        values = np.flatnonzero(counts)
        counts = counts[values]
    by_value = dict(zip(values.tolist(), counts.tolist(), strict=True))
    class_pixels = np.array([by_value.pop(c, 0) for c in range(info.num_classes)], np.int64)
    return class_pixels, by_value.pop(info.ignore_index, 0), by_value


def check_pair(task: PairTask) -> PairCheck:
    """Read one sample with the training readers; report what is wrong and count its labels."""
    check = PairCheck([])
    image = None
    try:
        image = read_image(task.image_path)
        check.size = (image.shape[0], image.shape[1])
    except (DatasetError, OSError) as err:
        empty = task.image_path.stat().st_size == 0
        kind, detail = ("empty_file", "the file is empty (0 bytes)") if empty else ("unreadable", str(err))
        check.problems.append(Problem(kind, ERROR, display_path(task.image_path), detail))
    if task.mask_path is None:
        return check
    try:
        labels = task.read_labels(task.mask_path)
    except (DatasetError, OSError) as err:
        check.problems.append(_label_problem(task.mask_path, err, task))
        return check
    check.class_pixels, check.ignored, check.outside = _count_labels(labels, task.info)
    check.pixels = int(labels.size)
    where = display_path(task.mask_path)
    if check.outside:
        values = ", ".join(f"{value} ({count} px)" for value, count in sorted(check.outside.items()))
        info = task.info
        what = f"the values 0..{2**info.num_classes - 1} (bit k = class k)" if info.multilabel else \
            f"the classes 0..{info.num_classes - 1}"  # fmt: skip
        detail = f"label values {values} are outside {what} and are not the ignore id {info.ignore_index}"
        check.problems.append(Problem("labels_outside_classes", ERROR, where, detail))
    if image is not None and image.shape[:2] != labels.shape:
        detail = (f"label file is {labels.shape[0]}x{labels.shape[1]} but its image {display_path(task.image_path)} "
                  f"is {image.shape[0]}x{image.shape[1]} (height x width)")  # fmt: skip
        check.problems.append(Problem("size_mismatch", ERROR, where, detail))
    return check


def _one_thread() -> None:
    cv2.setNumThreads(1)  # one file per process at a time: OpenCV's own threads would only compete


def check_pairs(tasks: list[PairTask], *, workers: int, progress: bool) -> Iterator[PairCheck]:
    """`check_pair` over ``tasks`` in order, in ``workers`` processes (1: in this process)."""
    with tqdm(total=len(tasks), desc="check-data", unit="sample", disable=None if progress else True) as bar:
        if workers <= 1 or len(tasks) < 2:
            for task in tasks:
                yield check_pair(task)
                bar.update()
            return
        # fork where the platform has it: workers start at once instead of importing torch again.
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        chunk = max(1, min(16, len(tasks) // (workers * 4)))
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread) as pool:
            for result in pool.map(check_pair, tasks, chunksize=chunk):
                yield result
                bar.update()


def default_workers() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
