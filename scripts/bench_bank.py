"""Cost of the hard-pixel bank: its update vs a training step, and mining vs evaluation.

    python scripts/bench_bank.py                     # CamVid-like: batch 8, 180x240, 11 classes
    python scripts/bench_bank.py --encoder resnet18  # another encoder
    python scripts/bench_bank.py --state-only        # only the bank's bytes per image at --classes 150

Times are medians of repeats measured in the same run; ratios are what to read.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from segohem.bank import HardPixelBank
from segohem.config import load_config
from segohem.data import build_dataset, class_info
from segohem.engine.loop import evaluate
from segohem.engine.mine import mine_split
from segohem.model import build_model
from segohem.ohem import OhemCrossEntropy


def median_seconds(fn, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def state_bytes_per_image(*, num_classes: int, size: tuple[int, int], images: int) -> tuple[float, float, float]:
    """Mean bytes of one image's arrays in ``bank.state_dict()`` (what a checkpoint holds), as stored
    (sparse confusion) and as a dense (C, C) int64 confusion would make them, after three updates of
    each image: four of the ``num_classes`` classes per image, a quarter of the pixels hard, a third
    of those called the image's next class. Also the sparse confusion's own bytes per image."""
    gen = torch.Generator().manual_seed(0)
    height, width = size
    bank = HardPixelBank(num_classes)
    rows, cols = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    for epoch in range(3):
        for i in range(images):
            classes = torch.randperm(num_classes, generator=gen)[:4]
            target = classes[(torch.arange(width) * 4 // width).expand(1, height, width)]
            pred = torch.where(torch.rand(1, height, width, generator=gen) < 1 / 3, classes.roll(1)[0], target)
            bank.update(sample_ids=[f"img{i}"], hard_mask=torch.rand(1, height, width, generator=gen) < 0.25,
                        pixel_loss=torch.ones(1, height, width), target=target, pred=pred,
                        source_yx=torch.stack([rows, cols])[None], source_hw=torch.tensor([[height, width]]),
                        epoch=epoch)  # fmt: skip
    sparse = dense = confusion = 0
    for fields in bank.state_dict()["samples"].values():
        arrays = {k: v.nbytes for k, v in fields.items() if isinstance(v, np.ndarray)}
        sparse += sum(arrays.values())
        confusion += sum(n for k, n in arrays.items() if k.startswith("confusion_"))
        dense += sum(n for k, n in arrays.items() if not k.startswith("confusion_")) + 8 * num_classes**2
    return sparse / images, dense / images, confusion / images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="timm-tf_efficientnet_lite0")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=(180, 240))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=32, help="images for the mining vs evaluation timing")
    parser.add_argument("--classes", type=int, default=150, help="classes for the bank's bytes per image")
    parser.add_argument("--state-only", action="store_true", help="measure only the bank's bytes per image")
    args = parser.parse_args()
    sparse, dense, confusion = state_bytes_per_image(num_classes=args.classes, size=args.size, images=args.images)
    print(
        f"bank state per image at {args.classes} classes, {args.size[0]}x{args.size[1]}: {sparse / 1e3:.1f} kB "
        f"(confusion {confusion:.0f} B; a dense one would make it {dense / 1e3:.1f} kB, x{dense / sparse:.0f})"
    )
    if args.state_only:
        return
    cfg = load_config(None, [f"data.image_size={list(args.size)}", f"data.num_train={args.images}",
                             f"data.batch_size={args.batch}", f"data.val_batch_size={args.batch}",
                             f"model.encoder={args.encoder}"])  # fmt: skip
    dataset = build_dataset(cfg.data, cfg.augment, split="train", train=True, seed=0)
    batch = next(iter(DataLoader(dataset, batch_size=args.batch)))
    model = build_model(cfg.model, num_classes=7)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = OhemCrossEntropy(mode="threshold", thresh=0.7, min_kept=0.1)
    bank = HardPixelBank(7)
    state: dict = {}

    def train_step() -> None:
        model.train()
        logits = model(batch["image"])
        result = loss_fn(logits, batch["mask"])
        result.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        state["result"], state["pred"] = result, logits.detach().argmax(1)

    def bank_update() -> None:
        result = state["result"]
        bank.update(sample_ids=batch["sample_id"], hard_mask=result.hard_mask, pixel_loss=result.pixel_loss,
                    target=batch["mask"], pred=state["pred"], source_yx=batch["source_yx"],
                    source_hw=batch["source_hw"], epoch=0)  # fmt: skip

    step_s = median_seconds(train_step, args.repeats)
    update_s = median_seconds(bank_update, args.repeats * 4)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.encoder}, "
        f"batch {args.batch} at {args.size[0]}x{args.size[1]}"
    )
    print(
        f"training step {1000 * step_s:8.1f} ms   bank.update {1000 * update_s:6.2f} ms   "
        f"ratio {100 * update_s / step_s:.2f}% of a step"
    )
    eval_set = build_dataset(cfg.data, cfg.augment, split="train", train=False, seed=0)
    loader = DataLoader(eval_set, batch_size=args.batch)
    device = torch.device("cpu")
    classes = class_info(cfg.data)
    eval_s = median_seconds(lambda: evaluate(model, loader, device=device, classes=classes), 2)
    with tempfile.TemporaryDirectory() as tmp:
        mine_s = median_seconds(lambda: mine_split(
            model=model, loader=loader, loss_fn=loss_fn, device=device, bank=HardPixelBank(7),
            store_path=Path(tmp) / "m.sqlite", working_size=None, progress=False), 2)  # fmt: skip
    print(
        f"evaluation {args.images / eval_s:6.1f} images/s   mining {args.images / mine_s:6.1f} images/s   "
        f"mining/eval time ratio {mine_s / eval_s:.2f}"
    )


if __name__ == "__main__":
    main()
