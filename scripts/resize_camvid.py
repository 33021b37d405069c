"""Write a copy of CamVid resized the way the loader resizes it (smaller to move, same pixels).

    python scripts/resize_camvid.py ../shared/datasets/camvid camvid-180x240 --size 180 240

Images use area interpolation and labels nearest, as `data.resize` does, so training on the
copy with `data.resize=[180, 240]` reads pixel-identical arrays. What changes: the dictionary's
cells are in the copy's coordinates, and hard crops with `crop_scale` > 1 upsample the copy
instead of reading the full-resolution original.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import cv2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--size", type=int, nargs=2, default=(180, 240), metavar=("H", "W"))
    args = parser.parse_args()
    height, width = args.size
    folders = {split: cv2.INTER_AREA for split in ("train", "val", "test")}
    folders |= {f"{split}annot": cv2.INTER_NEAREST for split in ("train", "val", "test")}
    for folder, interpolation in folders.items():
        if not (args.source / folder).is_dir():
            continue
        (args.target / folder).mkdir(parents=True, exist_ok=True)
        flag = cv2.IMREAD_UNCHANGED if interpolation == cv2.INTER_NEAREST else cv2.IMREAD_COLOR
        for path in sorted((args.source / folder).glob("*.png")):
            image = cv2.imread(str(path), flag)
            if image is None:
                raise SystemExit(f"cannot read {path}")
            resized = cv2.resize(image, (width, height), interpolation=interpolation)
            cv2.imwrite(str(args.target / folder / path.name), resized, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    for extra in args.source.glob("*.md"):
        shutil.copy(extra, args.target / extra.name)
    print(f"wrote {args.target}")


if __name__ == "__main__":
    main()
