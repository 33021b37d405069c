"""Time a whole training step (forward, loss, backward, optimizer step, dictionary update) for
plain cross-entropy and the OHEM modes, all measured in one run.

    python scripts/bench_step.py                      # CPU: Unet-ResNet18, batch 2 at 128x256, fp32
    python scripts/bench_step.py --device cuda        # Unet-ResNet50, batch 8 at 512x1024, bf16
    python scripts/bench_step.py --device cuda --arch DeepLabV3Plus --channels-last --compile

Random initialisation (no weights are read), C=19, random labels with an ignored strip. The
methods take turns, one step each per round, so drift on a shared machine hits them alike.
Prints the median ms/step after warm-up, images/s, peak memory and the ratio to plain CE. The
step has no host synchronisation of its own (the trainer adds one per step for its finiteness
checks); on CUDA each timed step is bracketed by torch.cuda.synchronize.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from segohem.bank import HardPixelBank
from segohem.config import ModelConfig
from segohem.engine.loop import autocast_context
from segohem.model import build_model
from segohem.ohem import OhemCrossEntropy

NUM_CLASSES, IGNORE_INDEX = 19, 255
DEFAULTS = {  # device -> (encoder, batch, height, width, amp)
    "cpu": ("resnet18", 2, 128, 256, "none"),
    "cuda": ("resnet50", 8, 512, 1024, "bf16"),
}


class Method(NamedTuple):
    loss: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]]  # -> (loss, OhemResult or None)
    bank: HardPixelBank | None


def methods() -> dict[str, Method]:
    threshold = OhemCrossEntropy(mode="threshold", thresh=0.7, min_kept=0.1, ignore_index=IGNORE_INDEX)
    topk = OhemCrossEntropy(mode="topk", top_k=0.2, ignore_index=IGNORE_INDEX)

    def ohem(loss_fn: OhemCrossEntropy) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]]:
        def loss(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, Any]:
            result = loss_fn(logits, target)
            return result.loss, result

        return loss

    def plain(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX), None

    return {
        "plain CE": Method(plain, None),
        "threshold OHEM": Method(ohem(threshold), None),
        "top-k OHEM": Method(ohem(topk), None),
        "top-k OHEM + dictionary": Method(ohem(topk), HardPixelBank(NUM_CLASSES)),
    }


def make_batch(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Random images and labels, identity source coordinates (the loader's when nothing is cropped)."""
    gen = torch.Generator().manual_seed(0)
    n, h, w = args.batch, args.size[0], args.size[1]
    images = torch.randn(n, 3, h, w, generator=gen)
    target = torch.randint(0, NUM_CLASSES, (n, h, w), generator=gen)
    target[:, :, : w // 20] = IGNORE_INDEX
    rows, cols = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    memory_format = torch.channels_last if args.channels_last else torch.preserve_format
    return {
        "image": images.to(device, memory_format=memory_format), "mask": target.to(device),
        "source_yx": torch.stack([rows, cols]).expand(n, 2, h, w).contiguous().to(device),
        "source_hw": torch.tensor([[h, w]] * n),  # stays on the CPU, as the loader gives it
    }  # fmt: skip


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform == "darwin" else kib / 2**10  # bytes on macOS, KiB on Linux


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", choices=["none", "bf16"], help="default: bf16 on cuda, none on cpu")
    parser.add_argument("--arch", default="Unet", help="Unet, DeepLabV3Plus or any smp architecture")
    parser.add_argument("--encoder", help="default: resnet50 on cuda, resnet18 on cpu")
    parser.add_argument("--batch", type=int, help="default: 8 on cuda, 2 on cpu")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="default: 512 1024 on cuda, 128 256")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    parser.add_argument("--channels-last", action="store_true", help="model and images channels-last")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = parser.parse_args()
    encoder, batch, height, width, amp = DEFAULTS[args.device]
    args.encoder, args.batch, args.amp = args.encoder or encoder, args.batch or batch, args.amp or amp
    args.size = args.size or (height, width)
    return args


def make_step(args: argparse.Namespace, device: torch.device) -> Callable[[Method], None]:
    """One training step of a method on a fixed batch: forward, loss, backward, optimizer, dictionary."""
    model_cfg = ModelConfig(arch=args.arch, encoder=args.encoder, encoder_weights=None)
    model = build_model(model_cfg, num_classes=NUM_CLASSES).to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_model: Any = torch.compile(model) if args.compile else model
    batch = make_batch(args, device)
    sample_ids = [f"image{i}" for i in range(args.batch)]

    def step(method: Method) -> None:
        with autocast_context(device, args.amp):
            logits = train_model(batch["image"])
        loss, result = method.loss(logits, batch["mask"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if method.bank is not None:
            method.bank.update(
                sample_ids=sample_ids, hard_mask=result.hard_mask, pixel_loss=result.pixel_loss,
                target=batch["mask"], pred=logits.detach().argmax(1), source_yx=batch["source_yx"],
                source_hw=batch["source_hw"], epoch=0,
            )  # fmt: skip

    return step


def measure(
    step: Callable[[Method], None], chosen: dict[str, Method], *, device: torch.device, warmup: int, steps: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds of each timed step and peak memory (MiB) per method; methods take turns each round."""
    times: dict[str, list[float]] = {name: [] for name in chosen}
    peaks = dict.fromkeys(chosen, 0.0)
    for round_index in range(warmup + steps):
        for name, method in chosen.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start = time.perf_counter()
            step(method)
            synchronize(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], peak_memory_mib(device))
    return times, peaks


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    chosen = methods()
    times, peaks = measure(make_step(args, device), chosen, device=device, warmup=args.warmup, steps=args.steps)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"torch {torch.__version__}, {device_name}, threads {torch.get_num_threads()}, {args.arch}-{args.encoder}, "
        f"batch {args.batch} at {args.size[0]}x{args.size[1]}, amp {args.amp}, channels-last {args.channels_last}, "
        f"compile {args.compile}, C={NUM_CLASSES}, median of {args.steps} after {args.warmup} warm-up steps"
    )
    memory = "peak MiB (GPU allocated)" if device.type == "cuda" else "peak MiB (process RSS so far)"
    print(f"{'method':<26}{'ms/step':>10}{'images/s':>10}{memory:>30}{'x plain CE':>12}")
    plain_ms = 1000 * statistics.median(times["plain CE"])
    for name in chosen:
        ms = 1000 * statistics.median(times[name])
        print(f"{name:<26}{ms:>10.1f}{1000 * args.batch / ms:>10.1f}{peaks[name]:>30.0f}{ms / plain_ms:>12.2f}")


if __name__ == "__main__":
    main()
