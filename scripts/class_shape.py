"""How thin is a class, split by split? Pixel share, widths and what survives an erosion.

    python scripts/class_shape.py data.root=../shared/datasets/camvid --class pole --split train val

(config overrides go before the options.)

For one class, over each split's label maps (any layout the config reads): the share of valid
pixels it covers, how many images hold it, the median and mean width of its horizontal runs
(the width of vertical structures: a pole 3 px wide gives runs of 3), and the share of its pixels left after an
erosion by a 3x3 and a 5x5 square (pixels at least 2 and 3 px inside the class; the image
border does not erode, an ignored pixel does). A class whose pixels mostly vanish under a 3x3 erosion is 1-2 px
wide: a one-pixel error on each side of it costs most of its IoU. Comparing the splits tells
whether val's instances are thinner than those the model trained on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from segohem.config import ConfigError, load_config
from segohem.data.build import class_info
from segohem.data.errors import DatasetError
from segohem.data.kinds import dataset_files

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "camvid_full.yaml"


def run_widths(mask: np.ndarray) -> np.ndarray:
    """The lengths of the horizontal runs of True in a 2-D boolean mask."""
    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
    edges = np.diff(padded, axis=1)
    starts, ends = np.nonzero(edges == 1), np.nonzero(edges == -1)
    return ends[1] - starts[1]  # row-major order: the k-th start and the k-th end are one run


def split_shape(config, split: str, class_id: int) -> dict[str, float]:
    info = class_info(config.data)
    pairs, read_labels = dataset_files(config.data, split=split, info=info)
    valid = pixels = images = labelled = 0
    kept = {3: 0, 5: 0}
    widths: list[np.ndarray] = []
    for pair in pairs:
        if pair.mask_path is None:
            continue
        labels, labelled = read_labels(pair.mask_path), labelled + 1
        mask = labels == class_id
        valid += int((labels != config.data.ignore_index).sum())
        count = int(mask.sum())
        if not count:
            continue
        pixels, images = pixels + count, images + 1
        widths.append(run_widths(mask))
        for size in kept:
            kept[size] += int(cv2.erode(mask.astype(np.uint8), np.ones((size, size), np.uint8)).sum())
    all_widths = np.concatenate(widths) if widths else np.zeros(0)
    return {
        "images": images, "of": labelled, "share": 100 * pixels / max(valid, 1),
        "median_width": float(np.median(all_widths)) if len(all_widths) else float("nan"),
        "mean_width": float(all_widths.mean()) if len(all_widths) else float("nan"),
        "after_3x3": 100 * kept[3] / max(pixels, 1), "after_5x5": 100 * kept[5] / max(pixels, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--class", dest="class_name", required=True)
    parser.add_argument("--split", nargs="+", default=["train", "val"], choices=("train", "val", "test"))
    parser.add_argument("--config", type=Path, help="YAML config (default: configs/camvid_full.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args()
    try:
        config = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        names = list(class_info(config.data).names)
    except ConfigError as err:
        parser.error(str(err))
    if args.class_name not in names:
        parser.error(f"--class {args.class_name!r} is not one of {', '.join(names)}")
    class_id = names.index(args.class_name)
    print(f"{args.class_name}: share of valid pixels, images holding it, horizontal run widths (px), pixels left")
    print("after an erosion by a 3x3 / 5x5 square")
    print("split   images     share  median w  mean w  after 3x3  after 5x5")
    for split in args.split:
        try:
            s = split_shape(config, split, class_id)
        except (ConfigError, DatasetError) as err:
            parser.error(f"{split}: {err}")
        print(f"{split:<6} {s['images']:>4}/{s['of']:<4} {s['share']:6.2f}%  {s['median_width']:8.1f}  "
              f"{s['mean_width']:6.2f}  {s['after_3x3']:8.1f}%  {s['after_5x5']:8.1f}%")  # fmt: skip


if __name__ == "__main__":
    main()
