"""`segohem eval | predict | mine | hard-pixels | viz`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from segohem.bank import HardPixelBank
from segohem.bank_report import class_hardness, confused_pairs, format_rows, hardest_images
from segohem.bank_store import load_bank, save_bank
from segohem.cli.build import build_loss, load_model_from_checkpoint
from segohem.data import DatasetError, build_dataset, class_info
from segohem.data.datasets import IMAGE_SUFFIXES
from segohem.data.transforms import build_eval_transform
from segohem.engine.loop import BANK_FILE, autocast_context, evaluate
from segohem.engine.mine import mine_split
from segohem.gallery import choose_ids, write_gallery
from segohem.metrics import format_table
from segohem.plots import save_run_plots
from segohem.visualize import colorize_mask


def run_eval(checkpoint: Path, *, split: str, overrides: list[str], output: Path | None) -> dict[str, Any]:
    cfg, model, device, _ = load_model_from_checkpoint(checkpoint, overrides)
    info = class_info(cfg.data)
    dataset = build_dataset(cfg.data, cfg.augment, split=split, train=False, seed=cfg.run.seed)
    loader = DataLoader(dataset, batch_size=cfg.data.val_batch_size, num_workers=cfg.data.num_workers)
    started = time.perf_counter()
    metrics = evaluate(
        model=model, loader=loader, device=device, num_classes=info.num_classes,
        ignore_index=info.ignore_index, amp=cfg.train.amp, progress=cfg.train.progress,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    print(f"{checkpoint} on {split}: {len(dataset)} images in {seconds:.1f}s ({len(dataset) / seconds:.1f} images/s)")
    print(format_table(metrics, info.names))
    if output is not None:
        output.write_text(json.dumps({"class_names": list(info.names), **metrics}, indent=2))
    return metrics


def run_predict(checkpoint: Path, *, input_dir: Path, output_dir: Path, overrides: list[str]) -> int:
    """Write ``<stem>.png`` (class ids) and ``<stem>_color.png`` for every image in ``input_dir``."""
    cfg, model, device, _ = load_model_from_checkpoint(checkpoint, overrides)
    info = class_info(cfg.data)
    transform = build_eval_transform(cfg.augment, ignore_index=info.ignore_index)
    paths = sorted(p for p in input_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if input_dir.is_dir() else []
    if not paths:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {input_dir}")
    output_dir.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    for path in tqdm(paths, desc="predict", disable=not cfg.train.progress):
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:  # keep going: predictions already written stay valid
            failed.append(str(path))
            tqdm.write(f"skipping {path}: cannot read it as an image")
            continue
        height, width = bgr.shape[:2]
        if cfg.data.resize:
            bgr = cv2.resize(bgr, (cfg.data.resize[1], cfg.data.resize[0]), interpolation=cv2.INTER_AREA)
        image = transform(image=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))["image"]
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].to(device)
        with torch.no_grad(), autocast_context(device, cfg.train.amp):
            logits = model(tensor)[:, :, : bgr.shape[0], : bgr.shape[1]]
        labels = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
        labels = cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(output_dir / f"{path.stem}.png"), labels)
        color = colorize_mask(labels, info.palette)
        cv2.imwrite(str(output_dir / f"{path.stem}_color.png"), cv2.cvtColor(color, cv2.COLOR_RGB2BGR))
    print(f"wrote {len(paths) - len(failed)} prediction(s) to {output_dir}")
    if failed:
        print(f"could not read {len(failed)} file(s): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def run_mine(checkpoint: Path, *, split: str, output: Path | None, overrides: list[str]) -> Path:
    """Mine a split with a checkpoint into a hard-pixel store; returns the store's path."""
    cfg, model, device, state = load_model_from_checkpoint(checkpoint, overrides)
    info = class_info(cfg.data)
    dataset = build_dataset(cfg.data, cfg.augment, split=split, train=False, seed=cfg.run.seed)
    loader = DataLoader(dataset, batch_size=cfg.data.val_batch_size, num_workers=cfg.data.num_workers)
    output = output or checkpoint.parent / f"mined_{split}_{checkpoint.stem}.sqlite"
    bank = HardPixelBank(info.num_classes, cell_size=cfg.bank.cell_size, momentum=cfg.bank.momentum)
    started = time.perf_counter()
    count = mine_split(
        model=model, loader=loader, loss_fn=build_loss(cfg).to(device), device=device, bank=bank,
        store_path=output, working_size=tuple(cfg.data.resize) if cfg.data.resize else None,  # type: ignore[arg-type]
        amp=cfg.train.amp, progress=cfg.train.progress,
    )  # fmt: skip
    save_bank(bank, output, class_names=info.names, epoch=int(state["train_state"]["epoch"]))
    seconds = time.perf_counter() - started
    size = output.stat().st_size
    print(
        f"mined {count} {split} images in {seconds:.1f}s ({count / seconds:.1f} images/s) into {output} "
        f"({size / 1024:.0f} KiB, {size / max(count, 1) / 1024:.1f} KiB per image)"
    )
    return output


def run_hard_pixels(store: Path, *, view: str, class_name: str | None, top: int, fmt: str) -> str:
    if view == "images":
        rows = hardest_images(store, class_name=class_name, top=top)
    elif view == "pairs":
        rows = confused_pairs(store, top=top)
    else:
        rows = class_hardness(store)
    text = format_rows(rows, fmt)
    print(text)
    return text


def run_viz(
    run: Path, *, checkpoint: Path | None, num: int, ids: list[str] | None, split: str, output: Path | None,
    overrides: list[str],
) -> Path:  # fmt: skip
    """Gallery of hard-pixel maps for a run's hardest (or chosen) images, plus its plots."""
    checkpoint = checkpoint or (run / "best.pt" if (run / "best.pt").exists() else run / "last.pt")
    cfg, model, device, _ = load_model_from_checkpoint(checkpoint, overrides)
    dataset = build_dataset(cfg.data, cfg.augment, split=split, train=False, seed=cfg.run.seed)
    store = run / BANK_FILE
    bank = load_bank(store) if store.exists() else None
    page = write_gallery(
        model=model, dataset=dataset, sample_ids=ids or choose_ids(bank, dataset, num=num),
        loss_fn=build_loss(cfg).to(device), device=device, classes=class_info(cfg.data), bank=bank,
        output=output or run / "gallery", plots=save_run_plots(run), progress=cfg.train.progress,
    )  # fmt: skip
    print(f"gallery written: open {page}")
    return page
