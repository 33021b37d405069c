"""Is a class missed because its logit is too low, or because the model cannot tell it apart?

    python scripts/class_bias_sweep.py runs/camvid-full-bench/combo-c-s0/last.pt --class pole \
        --split val train data.root=../shared/datasets/camvid

Adds a constant b to one class's logit before the argmax, for a range of b, and prints that
class's IoU and accuracy (recall) and the mIoU, on each split, with the checkpoint's own
evaluation (``eval`` section, whole images by default). If some b lifts the class's IoU far
above b = 0, the class is under-predicted and a decision bias or a class weight can fix it; if
no b does, its logits do not separate it from its neighbours and it needs better features.
Reading the train split beside val tells a class the model has not learnt yet (low on both)
from one it has memorised (high on train only).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from segohem.cli.build import build_eval_loader
from segohem.engine.loop import eval_batches, run_eval_settings
from segohem.engine.run import TrainingRun
from segohem.metrics import ConfusionMatrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--class", dest="class_name", required=True)
    parser.add_argument("--split", nargs="+", default=["val"], choices=["train", "val", "test"])
    parser.add_argument("--biases", nargs="+", type=float, default=[0, 0.5, 1, 1.5, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=...")
    args = parser.parse_intermixed_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run, _ = TrainingRun.for_inference(args.checkpoint, ["data.num_workers=0", *args.overrides])
    cfg, names = run.config, run.classes.names
    if args.class_name not in names:
        parser.error(f"--class {args.class_name!r} is not one of the checkpoint's classes: {', '.join(names)}")
    index, num_classes = names.index(args.class_name), run.classes.num_classes
    if run.classes.multilabel:
        parser.error("multi-label checkpoints decide each class by its own sigmoid; there is no argmax to bias")
    print(f"{args.checkpoint}: bias on the {args.class_name} logit")
    print(f"{'split':6} {'bias':>5} {'IoU':>6} {'acc':>6} {'mIoU':>6}")
    for split in args.split:
        started = time.perf_counter()
        confusions = {bias: ConfusionMatrix(num_classes, ignore_index=run.classes.ignore_index) for bias in args.biases}
        for logits, mask in eval_batches(run.model, build_eval_loader(cfg, split=split), **run_eval_settings(run)):
            for bias, confusion in confusions.items():
                shifted = logits.clone()
                shifted[:, index] += bias
                confusion.update(shifted.argmax(1), mask)
        for bias, confusion in confusions.items():
            scores = confusion.compute()
            print(f"{split:6} {bias:5.1f} {100 * scores['iou'][index]:6.2f} {100 * scores['acc'][index]:6.2f} "
                  f"{100 * scores['miou']:6.2f}")  # fmt: skip
        print(f"({split}: {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
