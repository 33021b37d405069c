"""What a dictionary-placed crop costs against a uniform one, and against a training step.

    python scripts/bench_crops.py --bank runs/camvid-full-bench/topk-s0/hard_pixels.sqlite

Reads CamVid at full resolution with the full-resolution protocol's crops (256x256, scale
0.75-1.5). For each of ``--images`` training images, in turn: a uniform crop (the base
dataset's), a crop centred on a hard cell, and a crop centred on a rare-class pixel, each timed;
medians in ms per sample, and a uniform crop with a hard rare-class region pasted in
(``mining.paste_prob``). Then the median of ``--steps`` training steps (Unet + EfficientNet-Lite0,
batch 8, forward + backward + AdamW, top-k OHEM) on the same thread count, so that the extra
loading time of a batch of placed crops reads as a share of a step. Last, the read-only
network's cost (``mining.candidates``): loading ``--candidates`` crops per image and scoring
them with a no-grad forward at ``--candidate-scale`` of the crop size, against the same step.
``--classes`` prints instead the class shares of the pixels of each kind of crop over every
third training image (what a kind of crop shows the model). Without ``--bank`` every image
gets random hardness maps (placement costs the same whatever
the values).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from segohem.bank import EpochClassStats, HardPixelBank, SampleStats, confusion_fields
from segohem.bank_store import load_bank
from segohem.config import load_config
from segohem.data import build_dataset, class_info
from segohem.data.transforms import build_train_transform
from segohem.mining import DictionaryCropDataset, choose_candidates
from segohem.model import build_model
from segohem.ohem import OhemCrossEntropy

ROOT = Path(__file__).resolve().parents[1]


def random_bank(dataset, num_classes: int) -> HardPixelBank:
    bank = HardPixelBank(num_classes, cell_size=8)
    rng = np.random.default_rng(0)
    for index in range(len(dataset)):
        hard = rng.random((45, 60)).astype(np.float32)
        bank.samples[dataset.sample_id(index)] = SampleStats(
            height=360, width=480, hard_acc=hard, seen_acc=np.ones_like(hard),
            **confusion_fields(rng.integers(0, 100, (num_classes, num_classes))), seen=1,
        )  # fmt: skip
    bank.epochs[0] = EpochClassStats(np.zeros(num_classes, np.int64), np.arange(1, num_classes + 1) * 1000)
    return bank


def one_crop(dataset: DictionaryCropDataset, index: int, kind: str) -> dict:
    """Image ``index``'s crop of ``kind``: uniform (the base dataset's), hard, rare, or a uniform
    crop with a region pasted in."""
    if kind in ("uniform", "pasted"):
        sample = dataset.base[index]
        if kind == "pasted":
            dataset._paste(index, sample)
        return sample
    placed = dataset._placed(index, kind, np.random.default_rng(index))
    assert placed is not None
    return placed


def print_class_shares(dataset: DictionaryCropDataset, base) -> None:
    """Share of each class among the labelled pixels of uniform, hard-cell and rare-class crops."""
    shares = {}
    for kind in ("uniform", "hard", "rare", "pasted"):
        counts = np.zeros(base.num_classes)
        for index in range(0, len(base), 3):
            sample = one_crop(dataset, index, kind)
            mask = sample["mask"].numpy().ravel()
            counts += np.bincount(mask[mask < base.num_classes], minlength=base.num_classes)
        shares[kind] = counts / counts.sum()
    names = load_config(ROOT / "configs" / "camvid_full.yaml").data
    print("class          uniform     hard     rare   pasted   (% of labelled crop pixels)")
    for c, name in enumerate(class_info(names).names):
        print(f"{name:12} " + "  ".join(f"{100 * shares[k][c]:7.2f}" for k in shares))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "datasets" / "camvid")
    parser.add_argument("--bank", type=Path, help="a hard_pixels.sqlite of a CamVid run; default: random maps")
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--candidate-scale", type=float, default=0.5)
    parser.add_argument("--classes", action="store_true", help="class shares per kind of crop, no timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "configs" / "camvid_full.yaml", [
        f"data.root={args.data_root}", "augment.crop=[256,256]", "augment.scale=[0.75,1.5]", "mining.start_epoch=1",
        "mining.hard_crop_prob=0.5", "mining.rare_crop_prob=0.5", "mining.paste_prob=1.0", "model.encoder_weights=null",
    ])  # fmt: skip
    base = build_dataset(cfg.data, cfg.augment, split="train", train=True, seed=0)
    placed = build_train_transform(cfg.augment, ignore_index=base.ignore_index, placement=False)
    dataset = DictionaryCropDataset(base, cfg.mining, crop=(256, 256), scale=(0.75, 1.5), cell_size=8,
                                    placed_transform=placed)  # fmt: skip
    bank = load_bank(args.bank) if args.bank else random_bank(base, 11)
    dataset.observe(bank, 1)
    if args.classes:
        print_class_shares(dataset, base)
        return
    times: dict[str, list[float]] = {"uniform": [], "hard": [], "rare": [], "pasted": []}
    for index in range(args.images):
        for kind in times:
            started = time.perf_counter()
            one_crop(dataset, index, kind)
            times[kind].append(time.perf_counter() - started)
    print(f"torch {torch.__version__}, threads {args.threads}, {args.images} CamVid images, 256x256 crops")
    uniform = statistics.median(times["uniform"])
    for kind, values in times.items():
        print(f"{kind:8} crop  {1000 * statistics.median(values):6.1f} ms per sample  "
              f"x uniform {statistics.median(values) / uniform:.2f}")  # fmt: skip
    model = build_model(cfg.model, num_classes=11)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = OhemCrossEntropy(mode="topk", top_k=0.2, ignore_index=11)
    batch = torch.utils.data.default_collate([base[i] for i in range(8)])
    step_times = []
    for _ in range(args.steps + 1):
        started = time.perf_counter()
        loss_fn(model(batch["image"]), batch["mask"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_times.append(time.perf_counter() - started)
    step = statistics.median(step_times[1:])
    for kind in ("hard", "rare", "pasted"):
        extra = 8 * (statistics.median(times[kind]) - uniform)
        print(f"a batch of 8 {kind} crops loads {1000 * extra:+.1f} ms more than uniform ones: "
              f"{100 * extra / step:+.2f}% of a {1000 * step:.0f} ms training step")  # fmt: skip
    candidates = torch.utils.data.default_collate([base[i] for i in range(8 * args.candidates)])
    batch = {f"candidate_{k}": candidates[k].reshape(8, args.candidates, *candidates[k].shape[1:])
             for k in ("image", "mask", "source_yx")}  # fmt: skip
    batch["candidate_crop_kind"] = torch.zeros(8, args.candidates, dtype=torch.long)
    score_times = []
    for _ in range(args.steps + 1):
        started = time.perf_counter()
        choose_candidates(model, loss_fn, batch, scale=args.candidate_scale, device=torch.device("cpu"))
        score_times.append(time.perf_counter() - started)
    score = statistics.median(score_times[1:])
    loading = 8 * (args.candidates - 1) * uniform
    print(f"read-only scoring of {args.candidates} candidates per image at {args.candidate_scale:g}x: "
          f"{1000 * score:.0f} ms forward + {1000 * loading:.0f} ms loading per batch of 8, "
          f"{100 * (score + loading) / step:+.1f}% of a training step")  # fmt: skip


if __name__ == "__main__":
    main()
