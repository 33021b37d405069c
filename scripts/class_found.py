"""Is a thin class missed, or found a pixel off? Strict and tolerant scores of one class.

    python scripts/class_found.py runs/camvid-full-bench/combo-c-s0/last.pt data.root=../shared/datasets/camvid \
        --class pole --tolerance 1 2

With the checkpoint's own evaluation (``eval`` section), over one split, for one class:

* strict IoU, recall and precision, as the metric counts them;
* tolerant recall: the share of the class's labelled pixels within t px (a (2t+1)^2 square) of a
  pixel predicted as the class; tolerant precision: the share of pixels predicted as the class
  (on labelled pixels) within t px of a labelled one;
* instances found: the labelled class's connected regions (8-connected, at least
  ``--min-pixels``) with at least one predicted pixel within t px, as a share of the regions
  and of their pixels;
* where its pixels go: the predicted classes of its labelled pixels, and the labelled classes of
  the pixels predicted as it (the class's row and column of the confusion matrix, in percent).

If tolerant recall and the share of instances found stay low, the model does not detect the
class; if they jump at t = 1 while strict IoU is low, it finds the class and misplaces its
edges (a one-pixel offset costs a 3 px wide pole half its IoU).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np

from segohem.cli.build import build_eval_loader
from segohem.engine.loop import eval_batches, run_eval_settings
from segohem.engine.run import TrainingRun

COUNTS = ("label", "pred", "hit", "label_near", "pred_near", "regions", "regions_found", "region_px", "found_px")


def found_counts(predicted: np.ndarray, labelled: np.ndarray, valid: np.ndarray, *, tolerance: int,
                 min_pixels: int = 1) -> dict[str, int]:  # fmt: skip
    """Counts for one image: ``predicted`` and ``labelled`` are boolean (H, W) masks of the class,
    ``valid`` the labelled (not ignored) pixels. Predictions on ignored pixels do not count."""
    predicted = predicted & valid
    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    near_pred = cv2.dilate(predicted.astype(np.uint8), kernel).astype(bool)
    near_label = cv2.dilate(labelled.astype(np.uint8), kernel).astype(bool)
    counts = {
        "label": int(labelled.sum()), "pred": int(predicted.sum()), "hit": int((predicted & labelled).sum()),
        "label_near": int((labelled & near_pred).sum()), "pred_near": int((predicted & near_label).sum()),
        "regions": 0, "regions_found": 0, "region_px": 0, "found_px": 0,
    }  # fmt: skip
    _, regions = cv2.connectedComponents(labelled.astype(np.uint8), connectivity=8)
    sizes = np.bincount(regions.ravel())  # index 0: the background
    counted = sizes >= min_pixels
    counted[0] = False
    found = np.zeros(len(sizes), bool)
    found[regions[near_pred]] = True
    found &= counted
    counts.update(regions=int(counted.sum()), regions_found=int(found.sum()), region_px=int(sizes[counted].sum()),
                  found_px=int(sizes[found].sum()))  # fmt: skip
    return counts


def row_and_column(predicted: np.ndarray, mask: np.ndarray, *, index: int, num_classes: int,
                   ignore_index: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Class ``index``'s confusion row (predicted classes of its labelled pixels) and column
    (labelled classes of the pixels predicted as it, ignored pixels left out), as counts per class,
    from integer (H, W) label maps ``predicted`` and ``mask``."""
    row = np.bincount(predicted[mask == index], minlength=num_classes)
    column = np.bincount(mask[(predicted == index) & (mask != ignore_index)], minlength=num_classes)
    return row[:num_classes], column[:num_classes]


def scores(counts: dict[str, int]) -> dict[str, float]:
    """Percentages from summed counts."""

    def pct(a: int, b: int) -> float:
        return 100 * a / b if b else float("nan")

    return {
        "iou": pct(counts["hit"], counts["label"] + counts["pred"] - counts["hit"]),
        "recall": pct(counts["hit"], counts["label"]), "precision": pct(counts["hit"], counts["pred"]),
        "tolerant_recall": pct(counts["label_near"], counts["label"]),
        "tolerant_precision": pct(counts["pred_near"], counts["pred"]),
        "regions_found": pct(counts["regions_found"], counts["regions"]),
        "region_px_found": pct(counts["found_px"], counts["region_px"]),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--class", dest="class_name", required=True)
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument("--tolerance", nargs="+", type=int, default=[1, 2], help="pixels (0 is always shown)")
    parser.add_argument("--min-pixels", type=int, default=10, help="smallest labelled region counted as one")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=...")
    args = parser.parse_intermixed_args()
    if any(t < 0 for t in args.tolerance):
        parser.error(f"--tolerance takes pixels >= 0, got {args.tolerance}")
    run, _ = TrainingRun.for_inference(args.checkpoint, ["data.num_workers=0", *args.overrides])
    cfg, names = run.config, run.classes.names
    if args.class_name not in names:
        parser.error(f"--class {args.class_name!r} is not one of the checkpoint's classes: {', '.join(names)}")
    if run.classes.multilabel:
        parser.error("multi-label checkpoints: use a class's own sigmoid mask; this script reads the argmax")
    index, ignore = names.index(args.class_name), run.classes.ignore_index
    tolerances = sorted({0, *args.tolerance})
    totals = {t: dict.fromkeys(COUNTS, 0) for t in tolerances}
    row, column = np.zeros(len(names), np.int64), np.zeros(len(names), np.int64)
    started = time.perf_counter()
    batches = eval_batches(run.model, build_eval_loader(cfg, split=args.split), **run_eval_settings(run))
    for logits, masks in batches:  # as the trainer's evaluation sees them
        for predicted, mask in zip(logits.argmax(1).cpu().numpy(), masks.cpu().numpy(), strict=True):
            image_row, image_column = row_and_column(predicted, mask, index=index, num_classes=len(names),
                                                     ignore_index=ignore)  # fmt: skip
            row, column = row + image_row, column + image_column
            for t in tolerances:
                image = found_counts(predicted == index, mask == index, mask != ignore, tolerance=t,
                                     min_pixels=args.min_pixels)  # fmt: skip
                for key, value in image.items():
                    totals[t][key] += value
    print(f"{args.checkpoint}: {args.class_name} on {args.split} ({time.perf_counter() - started:.0f} s; regions of "
          f">= {args.min_pixels} px: {totals[0]['regions']})")  # fmt: skip
    print("tol px    IoU  recall  precision  regions found  their pixels")
    for t in tolerances:
        s = scores(totals[t])
        recall, precision = (s["recall"], s["precision"]) if t == 0 else (s["tolerant_recall"], s["tolerant_precision"])
        iou = f"{s['iou']:6.2f}" if t == 0 else "     -"
        print(f"{t:6d} {iou} {recall:7.2f} {precision:10.2f} {s['regions_found']:14.1f} {s['region_px_found']:13.1f}")
    into, taken = f"% of labelled {args.class_name} predicted as", f"% of predicted {args.class_name} labelled as"
    print(f"\n{'class':14} {into:>{len(into)}} {taken:>{len(taken)}}")
    for name, r, c in zip(names, 100 * row / max(row.sum(), 1), 100 * column / max(column.sum(), 1), strict=True):
        print(f"{name:14} {r:{len(into)}.1f} {c:{len(taken)}.1f}")


if __name__ == "__main__":
    main()
