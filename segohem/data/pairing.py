"""Pair image files with label files: by stem across two folders, or by the entries of a split list."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from segohem.data.errors import DatasetError
from segohem.data.io import IMAGE_SUFFIXES, display_path


class SamplePair(NamedTuple):
    """One sample: its id, image file and label file (None: unlabelled, every pixel ignored)."""

    sample_id: str
    image_path: Path
    mask_path: Path | None


def files_by_stem(folder: Path, *, what: str) -> dict[str, Path]:
    """The image files of ``folder`` keyed by stem; DatasetError when two files share a stem."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            groups.setdefault(path.stem, []).append(path)
    clashes = [paths for paths in groups.values() if len(paths) > 1]
    if clashes:
        named = "; ".join(" and ".join(display_path(p.name) for p in paths) for paths in clashes[:3])
        raise DatasetError(
            f"{len(clashes)} stem(s) in the {what} folder {display_path(folder)} name more than one file "
            f"({named}); samples are matched by file stem, so keep one file per stem"
        )
    return {stem: paths[0] for stem, paths in groups.items()}


def folder_pairs(image_dir: Path, mask_dir: Path) -> list[SamplePair]:
    """Every image of ``image_dir`` with the label file of the same stem in ``mask_dir``, sorted by stem."""
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise DatasetError(f"dataset folder {display_path(folder)} does not exist")
    images = files_by_stem(image_dir, what="image")
    masks = files_by_stem(mask_dir, what="label")
    missing = sorted(display_path(stem) for stem in set(images) - set(masks))
    if missing:
        raise DatasetError(
            f"{len(missing)} image(s) in {display_path(image_dir)} have no label file of the same stem "
            f"in {display_path(mask_dir)}, e.g. {missing[:3]}"
        )
    if not images:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {display_path(image_dir)}")
    return [SamplePair(display_path(stem), images[stem], masks[stem]) for stem in sorted(images)]


def read_split_list(path: Path, *, key: str, fix: str) -> list[str]:
    """The entries of a split list file, one a line (blank lines skipped); DatasetError naming ``key``
    and, for a file that cannot be read, ``fix``.

    Lines are file-system names (``os.fsdecode``), so names that are not UTF-8 work; two lines
    naming one sample (``a``, ``a.jpg``) are an error because sample ids must be unique.
    """
    try:
        lines = path.read_bytes().splitlines()
    except OSError as err:
        raise DatasetError(
            f"cannot read the split list {display_path(path)} ({key}): {err.strerror or err}; {fix}"
        ) from None
    entries: list[str] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        entry = os.fsdecode(raw.strip())
        if not entry:
            continue
        stem = entry_stem(entry)
        if stem in first_line:
            raise DatasetError(
                f"{display_path(path)} ({key}) line {number} names sample {display_path(stem)!r} again "
                f"(first on line {first_line[stem]}); list each sample once"
            )
        first_line[stem] = number
        entries.append(entry)
    if not entries:
        raise DatasetError(f"the split list {display_path(path)} ({key}) names no samples")
    return entries


def entry_stem(entry: str) -> str:
    """A list entry without an image suffix: ``'city/a.png'`` -> ``'city/a'``, ``'a.b'`` stays."""
    suffix = Path(entry).suffix
    return entry[: -len(suffix)] if suffix.lower() in IMAGE_SUFFIXES else entry


class _StemIndex:
    """Files by stem per folder, each folder listed once (a split list of 10k entries lists a folder once)."""

    def __init__(self, *, what: str) -> None:
        self.what = what
        self.folders: dict[Path, dict[str, Path]] = {}

    def find(self, root: Path, stem: str) -> Path | None:
        folder = (root / stem).parent
        if folder not in self.folders:
            self.folders[folder] = files_by_stem(folder, what=self.what) if folder.is_dir() else {}
        return self.folders[folder].get(Path(stem).name)


def listed_pairs(
    entries: Sequence[str], *, image_dir: Path, mask_dirs: Sequence[Path], list_name: str,
    labels_optional: bool = False,
) -> list[SamplePair]:  # fmt: skip
    """The samples a split list names: entry ``e`` (a stem or relative path, suffix optional) is the
    image of stem ``e`` under ``image_dir`` and the label file of that stem in the first of
    ``mask_dirs`` that has one; images and labels may have different suffixes.

    A missing image, or a missing label file unless ``labels_optional`` (then the pair has none),
    is a DatasetError naming ``list_name`` and examples.
    """
    images, masks = _StemIndex(what="image"), _StemIndex(what="label")
    pairs, no_image, no_label = [], [], []
    for entry in entries:
        stem = entry_stem(entry)
        image_path = images.find(image_dir, stem)
        mask_path = next((found for folder in mask_dirs if (found := masks.find(folder, stem))), None)
        if image_path is None:
            no_image.append(display_path(entry))
        elif mask_path is None and not labels_optional:
            no_label.append(display_path(entry))
        else:
            pairs.append(SamplePair(display_path(stem), image_path, mask_path))
    if no_image:
        raise DatasetError(
            f"{len(no_image)} of the {len(entries)} entries of {list_name} have no image "
            f"({', '.join(IMAGE_SUFFIXES)}) of that stem under {display_path(image_dir)}, e.g. {no_image[:3]}"
        )
    if no_label:
        folders = " or ".join(display_path(folder) for folder in mask_dirs)
        raise DatasetError(
            f"{len(no_label)} of the {len(entries)} entries of {list_name} have no label file of that stem "
            f"under {folders}, e.g. {no_label[:3]}"
        )
    return pairs
