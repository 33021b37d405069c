"""Time forward+backward of the OHEM loss against plain cross-entropy and a sort-based reference.

The reference is a straightforward version of the mmseg/HRNet algorithm: softmax, gather the
true-class probability, sort every valid pixel, threshold = max(p at min_kept, thresh).

    python scripts/bench_ohem.py                  # B=4, C=19, 512x1024, 7 repeats
    python scripts/bench_ohem.py --size 128 256   # quick look

Prints median milliseconds and ratios measured in the same run (absolute times are noisy).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from segohem.ohem import OhemCrossEntropy

IGNORE_INDEX = 255


def sort_based_ohem(logits: torch.Tensor, target: torch.Tensor, *, thresh: float, min_kept: int) -> torch.Tensor:
    """mmseg/HRNet-style batch OHEM: a full sort of all valid true-class probabilities."""
    pixel_loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
    with torch.no_grad():
        valid_mask = target != IGNORE_INDEX
        safe_target = target.masked_fill(~valid_mask, 0)
        true_probs = logits.softmax(1).gather(1, safe_target.unsqueeze(1)).squeeze(1)
        sorted_probs = true_probs[valid_mask].sort().values
        kth_prob = sorted_probs[min(min_kept, sorted_probs.numel() - 1)]
        keep_mask = valid_mask & (true_probs < max(float(kth_prob), thresh))
    return pixel_loss[keep_mask].mean()


def make_inputs(
    *, batch: int, classes: int, height: int, width: int, confident: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits where most pixels are hard (early training) or almost all easy (late training)."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, classes, (batch, height, width), generator=gen)
    target[:, :, : width // 20] = IGNORE_INDEX  # a strip of ignored pixels, as in real labels
    logits = torch.randn(batch, classes, height, width, generator=gen)
    if confident:
        boost = torch.zeros_like(logits)
        boost.scatter_(1, target.clamp(max=classes - 1).unsqueeze(1), 8.0)
        logits = logits + boost
    return logits, target


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def with_target(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], target: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda logits: fn(logits, target)


def median_ms(fn: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        leaf = logits.detach().requires_grad_()
        synchronize(logits.device)
        start = time.perf_counter()
        fn(leaf).backward()
        synchronize(logits.device)
        if i:  # the first call warms up allocators and kernels
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-kept", type=int, default=100_000, help="per image, mmseg's default")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    height, width = args.size
    threshold_loss = OhemCrossEntropy(mode="threshold", thresh=0.7, min_kept=args.min_kept, ignore_index=IGNORE_INDEX)
    topk_loss = OhemCrossEntropy(mode="topk", top_k=0.2, ignore_index=IGNORE_INDEX)
    methods: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "plain CE": lambda x, t: F.cross_entropy(x, t, ignore_index=IGNORE_INDEX),
        "sort-based ref": lambda x, t: sort_based_ohem(x, t, thresh=0.7, min_kept=args.min_kept * args.batch),
        "segohem threshold": lambda x, t: threshold_loss(x, t).loss,
        "segohem topk 20%": lambda x, t: topk_loss(x, t).loss,
    }
    print(
        f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
        f"threads {torch.get_num_threads()}, "
        f"B={args.batch} C={args.classes} {height}x{width}, median of {args.repeats}"
    )
    print(f"{'scenario':<26}{'method':<20}{'ms':>9}{'x plain CE':>12}{'ref / this':>12}")
    for scenario, confident in (("early (most pixels hard)", False), ("late (almost all easy)", True)):
        logits, target = make_inputs(
            batch=args.batch, classes=args.classes, height=height, width=width, confident=confident
        )
        logits, target = logits.to(device), target.to(device)
        kept = threshold_loss(logits, target).kept_fraction.mean().item()
        timings = {name: median_ms(with_target(fn, target), logits, args.repeats) for name, fn in methods.items()}
        for name, ms in timings.items():
            speedup = timings["sort-based ref"] / ms
            print(f"{scenario:<26}{name:<20}{ms:>9.1f}{ms / timings['plain CE']:>12.2f}{speedup:>12.2f}")
        print(f"{'':<26}(threshold mode kept {kept:.1%} of valid pixels)")


if __name__ == "__main__":
    main()
