"""`segohem train` and `segohem refine`: build everything from a config and call the engine."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch

from segohem.bank import HardPixelBank
from segohem.cli.build import build_loaders, build_loss, load_refine_bank, resolve_device
from segohem.config import Config, ConfigError, config_to_dict, save_config
from segohem.data import class_info
from segohem.engine.checkpoint import load_checkpoint, restore_rng_state
from segohem.engine.distributed import is_main_process
from segohem.engine.loop import TrainState, fit, seed_everything
from segohem.engine.optim import build_optimizer, build_scheduler, load_optimizer_state
from segohem.model import build_model, load_model_state
from segohem.plots import save_run_plots
from segohem.tracking import LocalLogger, MultiLogger
from segohem.wandb_logger import WandbLogger


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
        new_head = load_model_state(model, checkpoint["model"]) == "base"
        if new_head:
            print(f"attached a new refinement head (width {cfg.model.refine_head}) to the model of {start_from}")
        load_optimizer_state(optimizer, checkpoint["optimizer"], allow_new=new_head)
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
    if is_main_process():
        logger.log_plots(save_run_plots(run_dir))
    logger.close()
    print(
        f"done in {time.perf_counter() - started:.0f}s: best val mIoU {100 * state.best_miou:.2f} "
        f"(epoch {state.best_epoch}); run folder {run_dir}"
    )
    return state
