"""Pack one binary mask per class into the multi-label label maps segohem trains on.

    python scripts/pack_multilabel.py masks/ trainannot/ --classes globule milia_like_cyst streaks
    python scripts/pack_multilabel.py masks/ trainannot/ --classes a b c --ignore ignore/

Reads ``<masks>/<class>/<stem>.png`` (any single-channel image; non-zero = the class is present;
a stem without a file for some class has none of that class) and writes ``<output>/<stem>.png``
with bit k set where class k (in --classes order) is present, the ignore id where the optional
``<ignore>/<stem>.png`` is non-zero. Train on the result with ``data.mask_format=multilabel
data.class_names=[...]`` in the same order (and the same ``data.ignore_index``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2

from segohem.data.io import read_mask
from segohem.data.labels import pack_multilabel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("masks", type=Path, help="folder holding one sub-folder of binary masks per class")
    parser.add_argument("output", type=Path, help="folder for the packed label maps")
    parser.add_argument("--classes", nargs="+", required=True, help="class sub-folders, in label-bit order")
    parser.add_argument("--ignore", type=Path, help="folder of masks whose non-zero pixels are ignored")
    parser.add_argument("--ignore-index", type=int, default=255)
    args = parser.parse_args(argv)
    folders = [args.masks / name for name in args.classes]
    missing = [str(folder) for folder in folders if not folder.is_dir()]
    if missing:
        parser.error(f"no class folder {', '.join(missing)} (expected <masks>/<class>/<stem>.png)")
    stems = sorted({path.stem for folder in folders for path in folder.glob("*.png")})
    if not stems:
        parser.error(f"no *.png masks in the class folders under {args.masks}")
    args.output.mkdir(parents=True, exist_ok=True)
    for stem in stems:
        files = [folder / f"{stem}.png" for folder in folders]
        masks = [read_mask(path) if path.is_file() else None for path in files]
        ignore_path = args.ignore / f"{stem}.png" if args.ignore else None
        ignore = read_mask(ignore_path) if ignore_path is not None and ignore_path.is_file() else None
        try:
            packed = pack_multilabel(masks, ignore=ignore, ignore_index=args.ignore_index)
        except ValueError as err:
            raise SystemExit(f"{stem}: {err}") from err
        cv2.imwrite(str(args.output / f"{stem}.png"), packed)
    print(f"packed {len(stems)} label maps of {len(folders)} classes into {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
