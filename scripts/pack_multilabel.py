"""Pack one binary mask per class into the multi-label label maps segohem trains on.

    python scripts/pack_multilabel.py masks/ trainannot/ --classes globule milia_like_cyst streaks
    python scripts/pack_multilabel.py masks/ trainannot/ --classes a b c --ignore ignore/

Reads ``<masks>/<class>/<stem>.png`` (a single-channel image; non-zero = the class is present;
a stem without a file for some class has none of that class) and writes ``<output>/<stem>.png``
with bit k set where class k (in --classes order) is present, the ignore id where the optional
``<ignore>/<stem>.png`` is non-zero. Train on the result with ``data.mask_format=multilabel
data.class_names=[...]`` in the same order (and the same ``data.ignore_index``). Every input is
read and checked before anything is written, so a bad mask leaves the output folder as it was.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from segohem.data.errors import DatasetError
from segohem.data.io import read_mask
from segohem.data.labels import check_packing, pack_multilabel

Masks = tuple[list[np.ndarray | None], np.ndarray | None]  # class masks (None: no file), ignore mask


def read_stem(folders: list[Path], ignore_dir: Path | None, stem: str) -> Masks:
    """The class masks (None: no file) and ignore mask of ``stem``; SystemExit naming the file that is wrong."""
    paths = [folder / f"{stem}.png" for folder in folders]
    ignore_path = ignore_dir / f"{stem}.png" if ignore_dir is not None else None
    read: dict[Path, np.ndarray] = {}
    for path in [*paths, *([ignore_path] if ignore_path is not None else [])]:
        if path.is_file():
            try:
                read[path] = read_mask(path)
            except DatasetError as err:  # e.g. a colour file: this script reads one channel per class
                raise SystemExit(f"{path}: {err}; each class mask must be a single-channel image") from err
    sizes = {path: mask.shape for path, mask in read.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{path} {h}x{w}" for path, (h, w) in sizes.items())
        raise SystemExit(f"the masks of {stem} differ in size (height x width): {listed}")
    ignore = read.get(ignore_path) if ignore_path is not None else None
    return [read.get(path) for path in paths], ignore


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("masks", type=Path, help="folder holding one sub-folder of binary masks per class")
    parser.add_argument("output", type=Path, help="folder for the packed label maps")
    parser.add_argument("--classes", nargs="+", required=True, help="class sub-folders, in label-bit order")
    parser.add_argument("--ignore", type=Path, help="folder of masks whose non-zero pixels are ignored")
    parser.add_argument("--ignore-index", type=int, default=255)
    args = parser.parse_args(argv)
    try:
        check_packing(len(args.classes), args.ignore_index)
    except ValueError as err:
        parser.error(f"--classes / --ignore-index: {err}")
    folders = [args.masks / name for name in args.classes]
    missing = [str(folder) for folder in [*folders, *([args.ignore] if args.ignore else [])] if not folder.is_dir()]
    if missing:
        parser.error(f"no folder {', '.join(missing)} (class masks: <masks>/<class>/<stem>.png; --ignore: a folder)")
    stems = sorted({path.stem for folder in folders for path in folder.glob("*.png")})
    if not stems:
        parser.error(f"no *.png masks in the class folders under {args.masks}")
    for stem in stems:  # check everything first (memory stays one image's masks); then read again and write
        read_stem(folders, args.ignore, stem)
    args.output.mkdir(parents=True, exist_ok=True)
    for stem in stems:
        masks, ignore = read_stem(folders, args.ignore, stem)
        labels = pack_multilabel(masks, ignore=ignore, ignore_index=args.ignore_index)
        cv2.imwrite(str(args.output / f"{stem}.png"), labels)
    print(f"packed {len(stems)} label maps of {len(folders)} classes into {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
