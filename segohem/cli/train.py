"""`segohem train` and `segohem refine`: build everything from a config and call the engine."""

from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext, suppress
from pathlib import Path

import torch

from segohem.bank_store import check_store
from segohem.cli.build import build_loaders, load_refine_bank
from segohem.config import Config, ConfigError, config_to_dict, save_config
from segohem.disk import write_atomically
from segohem.engine.checkpoint import load_checkpoint, remove_stale_temporaries
from segohem.engine.distributed import close_distributed, init_distributed, is_main_process
from segohem.engine.loop import BANK_FILE, Loaders, fit, seed_everything
from segohem.engine.run import Progress, TrainingRun, build_loss
from segohem.engine.run_folder import lock_run_folder
from segohem.plots import save_run_plots
from segohem.tracking import LocalLogger, Logger, MultiLogger, NullLogger
from segohem.wandb_logger import WandbLogger


def run_train(cfg: Config, *, resume_from: Path | None) -> Progress:
    """Build everything from ``cfg``, resume from ``resume_from/last.pt`` if given, and fit.

    Under torchrun every process trains; only rank 0 locks and writes the run folder.
    ``config.yaml`` is written only once the run (and any checkpoint it continues from) has
    been built, so a failed start never changes a run folder's config.
    """
    started = time.perf_counter()
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    if resume_from is None and (run_dir / "last.pt").exists():
        raise ConfigError(
            f"run folder {run_dir} already holds a run; resume it with `segohem train --resume {run_dir}` or pick "
            f"another run.name=..."
        )
    build_loss(cfg)  # what the config alone does not rule out (e.g. ohem.neg_ratio) fails before the folder is made
    launch = init_distributed(cfg.run.device)
    try:
        with lock_run_folder(run_dir) if launch.rank == 0 else nullcontext():
            progress = _train(cfg, run_dir=run_dir, resume_from=resume_from)
    finally:
        close_distributed()
    if launch.rank == 0:
        print(
            f"done in {time.perf_counter() - started:.0f}s: best val mIoU {100 * progress.best_miou:.2f} "
            f"(epoch {progress.best_epoch}); run folder {run_dir}"
        )
    return progress


def _train(cfg: Config, *, run_dir: Path, resume_from: Path | None) -> Progress:
    main = is_main_process()
    if main:
        for path in remove_stale_temporaries(run_dir):
            print(f"removed {path.name}, left by an interrupted checkpoint write")
    seed_everything(cfg.run.seed)
    torch.use_deterministic_algorithms(cfg.run.deterministic, warn_only=True)
    run, loaders = _build_run(cfg, resume_from=resume_from)
    if _finished(cfg, run.progress, refine=resume_from is None and bool(cfg.refine.init)):
        if main:
            print(f"{run_dir} has finished: {run.progress.epoch} epochs, {run.progress.step} steps; "
                  f"raise train.epochs (or train.max_steps) to train on")  # fmt: skip
        return run.progress
    run.wrap_for_training()
    logger: Logger = NullLogger()
    config_path, last_path = run_dir / "config.yaml", run_dir / "last.pt"
    config_before = config_path.read_bytes() if main and config_path.is_file() else None
    last_before = _identity(last_path)
    if main:
        save_config(cfg, config_path)
        logger = MultiLogger(
            LocalLogger(run_dir, resume_step=run.progress.step, resume_epoch=run.progress.epoch, classes=run.classes),
            WandbLogger(
                cfg.wandb, run_dir=run_dir, run_name=cfg.run.name, config=config_to_dict(cfg), classes=run.classes
            ),
        )
    try:
        logger.log_config(config_to_dict(cfg))
        progress = fit(run, loaders, run_dir=run_dir, logger=logger)
        if main:
            logger.log_plots(save_run_plots(run_dir))
    except (ValueError, KeyError):
        # bad input met once training started (data read in the first batches), before an epoch was
        # saved: the folder's config goes back to the settings of its last.pt, so that a later
        # --resume does not meet it again. A kill or a full disk keeps the new settings.
        if main and _identity(last_path) == last_before and config_before is not None:
            with suppress(OSError):  # the error that stopped the run is the one to report
                write_atomically(config_path, config_before)
        raise
    finally:
        logger.close()
    return progress


def _identity(path: Path) -> tuple[int, int] | None:
    """What tells a rewritten file from the same one: inode and modification time (None: no file)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _finished(cfg: Config, progress: Progress, *, refine: bool) -> bool:
    """Whether a continued run has nothing left to do (True: a resume of a finished run, a no-op).

    Raises ConfigError when ``train.epochs`` or ``train.max_steps`` lies below what the
    checkpoint has done, or when a refinement stage would train no step at all.
    """
    epochs, max_steps = cfg.train.epochs, cfg.train.max_steps
    if progress.epoch > epochs or (max_steps and progress.step > max_steps):
        raise ConfigError(
            f"the checkpoint has done {progress.epoch} epochs ({progress.step} steps), beyond train.epochs="
            f"{epochs}" + (f" / train.max_steps={max_steps}" if max_steps else "") + "; raise them to train on"
        )
    done = progress.epoch == epochs or bool(max_steps and progress.step >= max_steps)
    if done and refine:
        raise ConfigError(
            f"refine.init {cfg.refine.init} has done {progress.epoch} epochs: raise train.epochs above it "
            f"(e.g. train.epochs={progress.epoch + 5}) for the refinement stage to train"
        )
    return done


def _build_run(cfg: Config, *, resume_from: Path | None) -> tuple[TrainingRun, Loaders]:
    """A new run, a resumed one (``resume_from/last.pt``) or a refinement stage (``refine.init``)."""
    if resume_from is not None:
        store = resume_from / BANK_FILE
        problem = check_store(store) if store.exists() else None
        if problem:
            warnings.warn(f"{problem}; it will be rebuilt from the checkpoint's dictionary", stacklevel=2)
        # a refinement stage keeps being driven by the bank it started from (sampler, crops, weights)
        refine_bank = load_refine_bank(cfg, load_checkpoint(Path(cfg.refine.init))) if cfg.refine.init else None
        loaders = build_loaders(cfg, refine_bank=refine_bank)
        run = TrainingRun.resume(cfg, resume_from / "last.pt", steps_per_epoch=_steps_per_epoch(cfg, loaders),
                                 refine_bank=refine_bank)  # fmt: skip
        if is_main_process():
            print(
                f"continuing from {resume_from / 'last.pt'} after epoch {run.progress.epoch} (step {run.progress.step})"
            )
    elif cfg.refine.init:
        init = Path(cfg.refine.init)
        checkpoint = load_checkpoint(init)
        refine_bank = load_refine_bank(cfg, checkpoint)
        loaders = build_loaders(cfg, refine_bank=refine_bank)
        run = TrainingRun.refine_from(cfg, checkpoint, source=init, bank=refine_bank,
                                      steps_per_epoch=_steps_per_epoch(cfg, loaders))  # fmt: skip
        if is_main_process():
            print(f"refining from {init} after epoch {run.progress.epoch} (step {run.progress.step})")
    else:
        loaders = build_loaders(cfg)
        run = TrainingRun.create(cfg, steps_per_epoch=_steps_per_epoch(cfg, loaders))
    return run, loaders


def _steps_per_epoch(cfg: Config, loaders: Loaders) -> int:
    return math.ceil(len(loaders.train) / cfg.optim.accumulate)
