"""The `segohem` command: parse arguments, load config, build objects, call the engine.

This is the one place that wires data, model, loss, optimizer, loggers and the loop together.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from segohem.bank import HardPixelBank
from segohem.bank_report import class_hardness, confused_pairs, format_rows, hardest_images
from segohem.bank_store import load_bank, save_bank
from segohem.config import Config, ConfigError, RefineConfig, config_to_dict, load_config, save_config
from segohem.data import DatasetError, build_dataset, class_info
from segohem.data.datasets import IMAGE_SUFFIXES
from segohem.data.samplers import EpochShuffleSampler
from segohem.data.transforms import build_eval_transform
from segohem.engine.checkpoint import load_checkpoint, restore_rng_state
from segohem.engine.loop import BANK_FILE, TrainState, autocast_context, evaluate, fit, seed_everything
from segohem.engine.mine import mine_split
from segohem.engine.optim import build_optimizer, build_scheduler
from segohem.gallery import choose_ids, write_gallery
from segohem.metrics import format_table
from segohem.model import build_model
from segohem.ohem import OhemCrossEntropy
from segohem.plots import save_run_plots
from segohem.refine import BankDrivenDataset, WeightedEpochSampler, class_weights_from_bank, image_weights
from segohem.tracking import LocalLogger, MultiLogger
from segohem.visualize import colorize_mask
from segohem.wandb_logger import WandbLogger


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name} but CUDA is not available; use run.device=cpu")
    return torch.device(name)


def build_loss(cfg: Config, *, refine_bank: HardPixelBank | None = None) -> OhemCrossEntropy:
    """The OHEM loss of ``cfg.ohem``; a refinement bank may scale the class weights."""
    ohem, info = cfg.ohem, class_info(cfg.data)
    if ohem.class_weight and len(ohem.class_weight) != info.num_classes:
        raise ConfigError(f"ohem.class_weight has {len(ohem.class_weight)} values for {info.num_classes} classes")
    class_weight = np.asarray(ohem.class_weight or [1.0] * info.num_classes, dtype=np.float64)
    if refine_bank is not None and cfg.refine.class_weight_power > 0:
        class_weight = class_weight * class_weights_from_bank(refine_bank, power=cfg.refine.class_weight_power)
        named = zip(info.names, class_weight, strict=True)
        print("class weights from the dictionary:", ", ".join(f"{name} {w:.2f}" for name, w in named))
    return OhemCrossEntropy(
        mode=ohem.mode, thresh=ohem.thresh, min_kept=ohem.min_kept, top_k=ohem.top_k,  # type: ignore[arg-type]
        scope=ohem.scope, ignore_index=info.ignore_index,  # type: ignore[arg-type]
        class_weight=None if (class_weight == 1).all() else class_weight.tolist(), warmup_steps=ohem.warmup_steps,
    )  # fmt: skip


def build_loaders(cfg: Config, *, refine_bank: HardPixelBank | None = None) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """Train and val loaders; a ``refine_bank`` drives the sampler, crops and pixel weights."""
    base_set = build_dataset(cfg.data, cfg.augment, split="train", train=True, seed=cfg.run.seed)
    val_set = build_dataset(cfg.data, cfg.augment, split="val", train=False, seed=cfg.run.seed)
    train_set: Dataset[Any] = base_set
    sampler: Sampler[int] = EpochShuffleSampler(len(base_set), seed=cfg.run.seed)
    refine = cfg.refine
    if refine_bank is not None and refine.sampler != "none":
        sample_ids = [base_set.sample_id(i) for i in range(len(base_set))]
        weights = image_weights(refine_bank, sample_ids, score=refine.sampler, floor=refine.sampler_floor)
        sampler = WeightedEpochSampler(weights, seed=cfg.run.seed)
    if refine_bank is not None and (refine.hard_crop_prob > 0 or refine.pixel_weight > 0):
        train_set = BankDrivenDataset(
            base_set, refine_bank, hard_crop_prob=refine.hard_crop_prob, crop_scale=refine.crop_scale,
            sharpness=refine.crop_sharpness, pixel_weight=refine.pixel_weight,
        )  # fmt: skip
    workers = cfg.data.num_workers
    train_loader = DataLoader(
        train_set, batch_size=cfg.data.batch_size, sampler=sampler, num_workers=workers,
        drop_last=len(base_set) >= cfg.data.batch_size, pin_memory=torch.cuda.is_available(),
    )  # fmt: skip
    val_loader = DataLoader(val_set, batch_size=cfg.data.val_batch_size, shuffle=False, num_workers=workers)
    return train_loader, val_loader


def run_train(cfg: Config, *, resume_from: Path | None) -> TrainState:
    """Build everything from ``cfg``, resume from ``resume_from/last.pt`` if given, and fit."""
    started = time.perf_counter()
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    if resume_from is None and (run_dir / "last.pt").exists():
        raise ConfigError(
            f"run folder {run_dir} already holds a run; resume it with --resume {run_dir} or pick another run.name=..."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    seed_everything(cfg.run.seed)
    torch.use_deterministic_algorithms(cfg.run.deterministic, warn_only=True)
    device = resolve_device(cfg.run.device)
    info = class_info(cfg.data)
    refine_bank = load_refine_bank(cfg.refine) if cfg.refine.init else None
    train_loader, val_loader = build_loaders(cfg, refine_bank=refine_bank)
    model = build_model(cfg.model, num_classes=info.num_classes).to(device)
    loss_fn = build_loss(cfg, refine_bank=refine_bank).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.optim.accumulate)
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps=total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16" and device.type == "cuda")
    state = TrainState()
    bank = HardPixelBank(info.num_classes, cell_size=cfg.bank.cell_size, momentum=cfg.bank.momentum)
    start_from = resume_from / "last.pt" if resume_from is not None else None
    if start_from is None and cfg.refine.init:
        start_from = Path(cfg.refine.init)
    if start_from is not None:
        checkpoint = load_checkpoint(start_from)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        state = TrainState(**checkpoint["train_state"])
        restore_rng_state(checkpoint["rng"])
        if checkpoint.get("bank"):
            bank.load_state_dict(checkpoint["bank"])
        if resume_from is None:  # a refinement stage: a new run that continues the schedule
            state.best_miou, state.best_epoch = -1.0, -1
            if refine_bank is not None:
                bank.load_state_dict(copy.deepcopy(refine_bank.state_dict()))
        print(f"continuing from {start_from} after epoch {state.epoch} (step {state.step})")
    logger = MultiLogger(
        LocalLogger(run_dir, resume_step=state.step, resume_epoch=state.epoch, classes=info),
        WandbLogger(cfg.wandb, run_dir=run_dir, run_name=cfg.run.name, config=config_to_dict(cfg), classes=info),
    )
    logger.log_config(config_to_dict(cfg))
    state = fit(
        model=model, loss_fn=loss_fn, train_loader=train_loader, val_loader=val_loader, optimizer=optimizer,
        scheduler=scheduler, scaler=scaler, device=device, optim_cfg=cfg.optim, train_cfg=cfg.train,
        state=state, seed=cfg.run.seed, class_names=info.names, ignore_index=info.ignore_index,
        run_dir=run_dir, config_dict=config_to_dict(cfg), logger=logger, bank=bank if cfg.bank.enabled else None,
    )  # fmt: skip
    logger.close()
    print(
        f"done in {time.perf_counter() - started:.0f}s: best val mIoU {100 * state.best_miou:.2f} "
        f"(epoch {state.best_epoch}); run folder {run_dir}"
    )
    return state


def load_refine_bank(refine: RefineConfig) -> HardPixelBank:
    """The bank that drives a refinement stage: a mined store, or the init checkpoint's own bank."""
    if refine.bank:
        return load_bank(refine.bank)
    state = load_checkpoint(refine.init).get("bank")
    if not state or not state["samples"]:
        raise ConfigError(
            f"refine.init {refine.init} holds no hard-pixel bank; mine one with "
            f"`segohem mine --checkpoint {refine.init}` and pass refine.bank=<store>"
        )
    bank = HardPixelBank(state["num_classes"])
    bank.load_state_dict(state)
    return bank


def load_model_from_checkpoint(path: Path, overrides: list[str]) -> tuple[Config, torch.nn.Module, torch.device]:
    checkpoint = load_checkpoint(path)
    cfg = load_config(None, overrides, base=checkpoint["config"])
    device = resolve_device(cfg.run.device)
    model = build_model(cfg.model, num_classes=class_info(cfg.data).num_classes)
    model.load_state_dict(checkpoint["model"])
    return cfg, model.to(device).eval(), device


def run_eval(checkpoint: Path, *, split: str, overrides: list[str], output: Path | None) -> dict[str, Any]:
    cfg, model, device = load_model_from_checkpoint(checkpoint, overrides)
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
    cfg, model, device = load_model_from_checkpoint(checkpoint, overrides)
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
    cfg, model, device = load_model_from_checkpoint(checkpoint, overrides)
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
    save_bank(bank, output, class_names=info.names, epoch=int(load_checkpoint(checkpoint)["train_state"]["epoch"]))
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
    cfg, model, device = load_model_from_checkpoint(checkpoint, overrides)
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


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segohem", description="Segmentation training with pixel-level OHEM.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model (built-in synthetic data by default)")
    train.add_argument("--config", type=Path, help="YAML config; defaults give the synthetic demo")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from last.pt")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    ev = commands.add_parser("eval", help="evaluate a checkpoint")
    ev.add_argument("--checkpoint", type=Path, required=True)
    ev.add_argument("--split", default="val", choices=("train", "val"))
    ev.add_argument("--output", type=Path, help="also write the metrics as JSON here")
    ev.add_argument("overrides", nargs="*", metavar="key.sub=value")
    pr = commands.add_parser("predict", help="write label and colour PNGs for a folder of images")
    pr.add_argument("--checkpoint", type=Path, required=True)
    pr.add_argument("--input", type=Path, required=True)
    pr.add_argument("--output", type=Path, required=True)
    pr.add_argument("overrides", nargs="*", metavar="key.sub=value")
    mi = commands.add_parser("mine", help="read-only pass over a split: exact hard masks and loss maps")
    mi.add_argument("--checkpoint", type=Path, required=True)
    mi.add_argument("--split", default="train", choices=("train", "val"))
    mi.add_argument("--output", type=Path, help="store path (default: mined_<split>_<checkpoint>.sqlite beside it)")
    mi.add_argument("overrides", nargs="*", metavar="key.sub=value")
    hp = commands.add_parser("hard-pixels", help="query a run's hard-pixel dictionary")
    hp.add_argument("--run", type=Path, help="run folder (reads its hard_pixels.sqlite)")
    hp.add_argument("--store", type=Path, help="a store file instead, e.g. one written by `mine`")
    hp.add_argument("--view", default="images", choices=("images", "pairs", "classes"))
    hp.add_argument("--class", dest="class_name", help="with --view images: hardest images for this class")
    hp.add_argument("--top", type=int, default=10)
    hp.add_argument("--format", default="table", choices=("table", "csv", "json"))
    vz = commands.add_parser("viz", help="gallery of hard-pixel maps and plots (PNGs + index.html)")
    vz.add_argument("--run", type=Path, required=True)
    vz.add_argument("--checkpoint", type=Path, help="default: the run's best.pt")
    vz.add_argument("--num", type=int, default=8, help="the N hardest images by the dictionary")
    vz.add_argument("--ids", nargs="+", help="these sample ids instead")
    vz.add_argument("--split", default="train", choices=("train", "val"))
    vz.add_argument("--output", type=Path, help="default: RUN/gallery")
    vz.add_argument("overrides", nargs="*", metavar="key.sub=value")
    rf = commands.add_parser("refine", help="a refinement stage driven by a run's hard-pixel dictionary")
    rf.add_argument("--run", type=Path, required=True, help="the base run folder")
    rf.add_argument("--checkpoint", default="last.pt", help="checkpoint in the run folder to continue from")
    rf.add_argument("--bank", type=Path, help="store driving the stage (default: the checkpoint's own bank)")
    rf.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. refine.hard_crop_prob=0.5")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        if args.command == "train":
            if args.resume is not None:
                base = args.resume / "config.yaml"
                if not base.is_file():
                    raise ConfigError(f"--resume {args.resume}: no config.yaml there; is it a run folder?")
                located = [f"run.output_dir={args.resume.parent}", f"run.name={args.resume.name}"]
                cfg = load_config(base, [*args.overrides, *located])
            else:
                cfg = load_config(args.config, args.overrides)
            run_train(cfg, resume_from=args.resume)
            return 0
        if args.command == "refine":
            defaults = [f"run.output_dir={args.run.parent}", f"run.name={args.run.name}-refine",
                        f"refine.init={args.run / args.checkpoint}", f"refine.bank={args.bank or ''}"]  # fmt: skip
            run_train(load_config(args.run / "config.yaml", [*defaults, *args.overrides]), resume_from=None)
            return 0
        if args.command == "viz":
            run_viz(args.run, checkpoint=args.checkpoint, num=args.num, ids=args.ids, split=args.split,
                    output=args.output, overrides=args.overrides)  # fmt: skip
            return 0
        if args.command == "mine":
            run_mine(args.checkpoint, split=args.split, output=args.output, overrides=args.overrides)
            return 0
        if args.command == "hard-pixels":
            if (args.run is None) == (args.store is None):
                raise ConfigError("give exactly one of --run DIR and --store FILE")
            store = args.store or args.run / BANK_FILE
            run_hard_pixels(store, view=args.view, class_name=args.class_name, top=args.top, fmt=args.format)
            return 0
        if args.command == "eval":
            run_eval(args.checkpoint, split=args.split, overrides=args.overrides, output=args.output)
            return 0
        return run_predict(args.checkpoint, input_dir=args.input, output_dir=args.output, overrides=args.overrides)
    except (ValueError, FileNotFoundError, KeyError) as err:  # ConfigError, DatasetError included
        print(f"segohem {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
