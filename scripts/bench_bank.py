"""Cost of the hard-pixel bank: its update vs a training step, and mining vs evaluation.

    python scripts/bench_bank.py                     # CamVid-like: batch 8, 180x240, 11 classes
    python scripts/bench_bank.py --encoder resnet18  # another encoder

Times are medians of repeats measured in the same run; ratios are what to read.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="timm-tf_efficientnet_lite0")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=(180, 240))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=32, help="images for the mining vs evaluation timing")
    args = parser.parse_args()
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
