"""How well the read-only network's reduced-size forward picks the hardest candidate crop.

    python scripts/bench_candidates.py runs/camvid-full-bench/topk-s0/last.pt

`mining.candidates` scores each image's M candidate crops with one no-grad forward at
`candidate_scale` of the crop size and trains on the one whose kept pixels have the highest
mean loss. This asks whether the cheap score finds the crop a full-size score would: for
``--images`` training images (M random training crops each, the checkpoint's augmentation),
both scores are taken with the checkpoint's model and OHEM rule, and it prints how often the
reduced-size choice is the full-size hardest (chance: 1 / M), the rank correlation of the two
scores within an image, and the full-size score of the crop each way of choosing trains on:
the reduced-size choice, a random crop (what training without candidates sees) and the
full-size hardest. Scores are the mean OHEM-kept loss, as `choose_candidates` computes them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

from segohem.data import build_dataset
from segohem.engine.run import TrainingRun
from segohem.mining import choose_candidates

ROOT = Path(__file__).resolve().parents[1]


def ranks(values: np.ndarray) -> np.ndarray:
    return values.argsort(-1).argsort(-1).astype(np.float64)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row Spearman correlation of (rows, M) scores (no ties in continuous losses)."""
    ra, rb = ranks(a), ranks(b)
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    return (ra * rb).sum(-1) / np.sqrt((ra**2).sum(-1) * (rb**2).sum(-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "datasets" / "camvid")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--batch", type=int, default=8, help="images per forward (x candidates crops)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run, meta = TrainingRun.for_inference(args.checkpoint, [f"data.root={args.data_root}", "run.device=cpu"])
    cfg = run.config
    dataset = build_dataset(cfg.data, cfg.augment, split="train", train=True, seed=args.seed)
    count = min(args.images, len(dataset))
    scores: dict[float, list[np.ndarray]] = {scale: [] for scale in [*args.scales, 1.0]}
    seconds = dict.fromkeys(scores, 0.0)
    for start in range(0, count, args.batch):
        indices = range(start, min(start + args.batch, count))
        # key k * len + i: image i drawn for the k-th time, a crop of its own (`SegmentationDataset`)
        samples = [[dataset[k * len(dataset) + i] for k in range(args.candidates)] for i in indices]
        batch = {
            f"candidate_{key}": torch.stack([torch.stack([s[key] for s in row]) for row in samples])
            for key in ("image", "mask", "source_yx")
        }
        batch |= {key: default_collate([row[0][key] for row in samples]) for key in ("sample_id", "source_hw")}
        for scale in scores:
            started = time.perf_counter()
            _, batch_scores = choose_candidates(run.model, run.loss_fn, batch, scale=scale, device=run.device,
                                                divisor=cfg.augment.pad_divisor)  # fmt: skip
            seconds[scale] += time.perf_counter() - started
            scores[scale].append(batch_scores.float().numpy())
    full = np.concatenate(scores[1.0])
    crop, scale_range = "x".join(map(str, cfg.augment.crop)), "-".join(f"{s:g}" for s in cfg.augment.scale)
    print(f"{args.checkpoint} (epoch {meta['progress']['epoch']}), {count} CamVid training images, "
          f"{args.candidates} candidate crops each ({crop}, scale {scale_range}), torch {torch.__version__}, "
          f"{args.threads} thread(s)")  # fmt: skip
    best, random_pick = full.max(1).mean(), full.mean(1).mean()
    print(f"full-size score of the crop trained on: full-size hardest {best:.3f}, a random crop {random_pick:.3f}")
    for scale in args.scales:
        reduced = np.concatenate(scores[scale])
        chosen = full[np.arange(len(full)), reduced.argmax(1)]
        agree = (reduced.argmax(1) == full.argmax(1)).mean()
        print(f"scored at {scale:g}x: picks the full-size hardest in {agree:.0%} of images (chance "
              f"{1 / args.candidates:.0%}), rank correlation {np.nanmean(spearman(reduced, full)):.2f}; its crops "
              f"score {chosen.mean():.3f} at full size, {(chosen.mean() - random_pick) / (best - random_pick):.0%} "
              f"of the way from random to the hardest; forward {seconds[scale] / seconds[1.0]:.2f}x the "
              f"full-size one")  # fmt: skip


if __name__ == "__main__":
    main()
