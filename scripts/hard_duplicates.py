"""How many hard examples are near-duplicates? The OHEM paper's NMS question, for a mined store.

    python scripts/hard_duplicates.py runs/camvid-bench/threshold-s0/mined_train_epoch015.sqlite

Fast R-CNN's OHEM runs NMS at IoU 0.7 over hard RoIs so that one object is not counted many
times. The pixel analogue for a dataset of video frames: two images whose exact hard-pixel
masks overlap at IoU >= 0.7 are the same hard example twice. This greedy NMS (hardest image
first, within each sequence: the sample_id prefix before the first "_") reports how many
images it would suppress, with and without a tolerance of a few pixels (masks dilated first).
"""

from __future__ import annotations

import argparse
import sqlite3
from pathlib import Path

import cv2
import numpy as np

from segohem.bank_store import load_mined


def pairwise_iou(masks: np.ndarray) -> np.ndarray:
    """(N, P) bool -> (N, N) IoU of every pair."""
    flat = masks.reshape(len(masks), -1).astype(np.float32)
    inter = flat @ flat.T
    area = flat.sum(1)
    union = area[:, None] + area[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def greedy_nms(scores: np.ndarray, iou: np.ndarray, threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS: hardest first, drop anything overlapping a kept one."""
    kept: list[int] = []
    for index in np.argsort(-scores, kind="stable"):
        if all(iou[index, k] < threshold for k in kept):
            kept.append(int(index))
    return np.array(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path, help="a store written by `segohem mine`")
    parser.add_argument("--iou", type=float, default=0.7)
    parser.add_argument("--dilate", type=int, nargs="+", default=[0, 2], help="tolerances in pixels")
    args = parser.parse_args()
    with sqlite3.connect(args.store) as db:
        rows = db.execute("SELECT sample_id, kept_fraction * mean_hard_loss FROM mined ORDER BY sample_id").fetchall()
    if not rows:
        raise SystemExit(f"{args.store} holds no mined samples; run `segohem mine` first")
    sequences: dict[str, list[tuple[str, float]]] = {}
    for sample_id, score in rows:
        sequences.setdefault(sample_id.split("_")[0], []).append((sample_id, score))
    masks = {sample_id: load_mined(args.store, sample_id)[0] for sample_id, _ in rows}
    print(f"{len(rows)} images in {len(sequences)} sequences; NMS at IoU {args.iou} within each sequence")
    for tolerance in args.dilate:
        kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
        suppressed, neighbour_iou = 0, []
        for members in sequences.values():
            stack = np.stack([masks[s] for s, _ in members])
            if tolerance:
                stack = np.stack([cv2.dilate(m.astype(np.uint8), kernel).astype(bool) for m in stack])
            iou = pairwise_iou(stack)
            neighbour_iou += [float(iou[i, i + 1]) for i in range(len(members) - 1)]
            kept = greedy_nms(np.array([score for _, score in members]), iou, args.iou)
            suppressed += len(members) - len(kept)
        values = np.array(neighbour_iou)
        print(
            f"tolerance {tolerance} px: consecutive frames' hard-mask IoU median {np.median(values):.3f}, "
            f"90th percentile {np.percentile(values, 90):.3f}, max {values.max():.3f}; "
            f"NMS would suppress {suppressed} of {len(rows)} images"
        )


if __name__ == "__main__":
    main()
