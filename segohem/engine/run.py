"""The training-run object: everything that lives across steps, and the one checkpoint format.

`TrainingRun.state_dict()`/`load_state_dict()` alone define what a checkpoint holds; every
command that reads a checkpoint goes through `TrainingRun` (train, resume, refine, eval,
mine, predict, viz).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segohem.bank import HardPixelBank
from segohem.config import Config, ConfigError, config_to_dict, load_config
from segohem.data import ClassInfo, class_info
from segohem.engine.checkpoint import (
    CheckpointError,
    capture_rng_state,
    decode_arrays,
    encode_arrays,
    load_checkpoint,
    restore_rng_state,
)
from segohem.engine.distributed import get_world_size, launched_by_torchrun
from segohem.engine.optim import build_optimizer, build_scheduler, load_optimizer_state
from segohem.losses import OhemRegionLoss, SegmentationLoss
from segohem.model import build_model, load_model_state
from segohem.ohem import OhemBinaryCrossEntropy, OhemCrossEntropy, PackedMultiLabel, TwoClassAsBinary
from segohem.refine import class_weights_from_bank

# Version 2: tensors and plain containers only (loadable with weights_only=True), a
# "progress" section. Version 1 (pickled NumPy arrays, "train_state") is refused.
CHECKPOINT_FORMAT = 2


@dataclass
class Progress:
    """Counters that live across epochs and are saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    best_miou: float = -1.0
    best_epoch: int = -1
    skipped_steps: int = 0  # optimizer steps skipped because the loss or a gradient was not finite


def resolve_device(name: str) -> torch.device:
    """``run.device`` as a device; under torchrun, ``auto``/``cuda`` mean this process's GPU."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name} but CUDA is not available; use run.device=cpu")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if launched_by_torchrun() else "cuda")
    return torch.device("cpu" if name == "auto" else name)


def build_loss(cfg: Config, *, refine_bank: HardPixelBank | None = None) -> SegmentationLoss:
    """The OHEM loss of ``cfg.ohem`` (with its region loss, if any); a refinement bank may scale
    the class weights."""
    ohem, info = cfg.ohem, class_info(cfg.data)
    if ohem.class_weight and len(ohem.class_weight) != info.num_classes:
        raise ConfigError(f"ohem.class_weight has {len(ohem.class_weight)} values for {info.num_classes} classes")
    class_weight = np.asarray(ohem.class_weight or [1.0] * info.num_classes, dtype=np.float64)
    if refine_bank is not None and cfg.refine.class_weight_power > 0:
        class_weight = class_weight * class_weights_from_bank(refine_bank, power=cfg.refine.class_weight_power)
        named = zip(info.names, class_weight, strict=True)
        print("class weights from the dictionary:", ", ".join(f"{name} {w:.2f}" for name, w in named))
    loss: OhemCrossEntropy | TwoClassAsBinary | PackedMultiLabel
    if info.multilabel:  # the config refuses what assumes one class per pixel (config._validate_multilabel)
        if ohem.mode != "none" and ohem.neg_ratio <= 0:
            raise ConfigError(
                "data.mask_format=multilabel mines each class's positives and negatives apart: set ohem.neg_ratio "
                "(the hardest negatives kept per kept positive, e.g. ohem.neg_ratio=3), or ohem.mode=none"
            )
        return PackedMultiLabel(_sigmoid_ohem(cfg, info), num_classes=info.num_classes)
    if ohem.neg_ratio > 0:
        loss = _binary_loss(cfg, info)
    else:
        loss = OhemCrossEntropy(
            mode=ohem.mode, thresh=ohem.thresh, min_kept=ohem.min_kept, top_k=ohem.top_k,  # type: ignore[arg-type]
            scope=ohem.scope, ignore_index=info.ignore_index,  # type: ignore[arg-type]
            class_weight=None if (class_weight == 1).all() else class_weight.tolist(),
            warmup_steps=ohem.warmup_steps, class_min_kept=ohem.class_min_kept,
            weight_by_prediction=ohem.class_weight_predicted,
        )  # fmt: skip
    if ohem.region_loss == "none" and ohem.ce_weight == 1.0:
        return loss
    return OhemRegionLoss(loss, ohem.region_loss, ce_weight=ohem.ce_weight, region_weight=ohem.region_weight)


def _binary_loss(cfg: Config, info: ClassInfo) -> TwoClassAsBinary:
    """``ohem.neg_ratio``: positives and negatives of a two-class task mined apart (a sigmoid loss)."""
    ohem = cfg.ohem
    if info.num_classes != 2:
        raise ConfigError(
            f"ohem.neg_ratio mines positives and negatives of a two-class task; this data has {info.num_classes} "
            f"classes (binary masks: data.mask_format=binary; classes that overlap: data.mask_format=multilabel)"
        )
    if ohem.class_weight or ohem.class_min_kept or ohem.scope != "image" or cfg.refine.class_weight_power \
            or ohem.warmup_steps or cfg.mining.class_weight_power or ohem.class_weight_predicted:  # fmt: skip
        raise ConfigError(
            "ohem.neg_ratio does not combine with ohem.class_weight, ohem.class_weight_predicted, "
            "ohem.class_min_kept, ohem.scope=batch, ohem.warmup_steps, refine.class_weight_power or "
            "mining.class_weight_power"
        )
    return TwoClassAsBinary(_sigmoid_ohem(cfg, info))


def _sigmoid_ohem(cfg: Config, info: ClassInfo) -> OhemBinaryCrossEntropy:
    """The ``ohem`` section as positives and negatives mined apart under a sigmoid."""
    ohem = cfg.ohem
    return OhemBinaryCrossEntropy(
        mode=ohem.mode, thresh=ohem.thresh, min_kept=ohem.min_kept, top_k=ohem.top_k,  # type: ignore[arg-type]
        neg_ratio=ohem.neg_ratio, min_neg=ohem.min_neg, ignore_index=info.ignore_index,  # type: ignore[arg-type]
    )  # fmt: skip


def check_format(path: Path, checkpoint: dict[str, Any]) -> None:
    """Refuse a checkpoint of another format than `CHECKPOINT_FORMAT`, naming the way to upgrade it."""
    version = checkpoint.get("format")
    if version is None and not {"config", "model"} <= checkpoint.keys():
        keys = ", ".join(repr(key) for key in list(checkpoint)[:3]) + (", ..." if len(checkpoint) > 3 else "")
        raise CheckpointError(
            f"checkpoint {path} is not a segohem checkpoint: it holds {keys or 'nothing'} (a plain state_dict?), "
            f"not the 'format', 'config' and 'model' a run writes (an encoder's state_dict is read by "
            f"model.encoder_weights=PATH)"
        )
    if version != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {version!r}; this segohem reads format {CHECKPOINT_FORMAT} "
            f"(a format-1 checkpoint you wrote yourself: `segohem upgrade-checkpoint {path} --trusted`)"
        )


def checkpoint_config(path: Path, checkpoint: dict[str, Any], overrides: list[str]) -> Config:
    """The config a checkpoint was written with, plus ``overrides``; refuses other formats."""
    check_format(path, checkpoint)
    return load_config(None, overrides, base=checkpoint["config"])


@dataclass
class TrainingRun:
    """Model, loss, optimizer, scheduler, scaler, dictionary and progress of one run."""

    config: Config
    classes: ClassInfo
    device: torch.device
    model: nn.Module
    loss_fn: SegmentationLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    bank: HardPixelBank | None
    progress: Progress = field(default_factory=Progress)
    train_model: nn.Module | None = None  # the model as trained: DistributedDataParallel under torchrun

    def wrap_for_training(self) -> None:
        """Under torchrun, wrap the model in DistributedDataParallel (SyncBatchNorm first if
        ``model.sync_bn``); with ``train.compile``, compile what is trained. Checkpoints and
        evaluation always use ``model`` itself."""
        train_model = self.model
        if get_world_size() > 1:
            if self.config.model.sync_bn:  # the new modules keep the same Parameter objects
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        if self.config.train.compile:  # compiled around DDP, as torch's DDPOptimizer expects
            train_model = torch.compile(train_model)  # type: ignore[assignment]
        self.train_model = train_model

    @classmethod
    def create(
        cls, cfg: Config, *, steps_per_epoch: int, refine_bank: HardPixelBank | None = None, pretrained: bool = True
    ) -> TrainingRun:
        """A new run from ``cfg``: fresh model and state.

        ``pretrained=False`` skips ``model.encoder_weights`` (a checkpoint is about to supply
        every weight, and the weights file need not exist any more).
        """
        device = resolve_device(cfg.run.device)
        info = class_info(cfg.data)
        model_cfg = cfg.model if pretrained else dataclasses.replace(cfg.model, encoder_weights=None)
        model = build_model(model_cfg, num_classes=info.num_classes).to(device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, cfg.optim)
        total_steps = steps_per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            total_steps = min(total_steps, cfg.train.max_steps)
        bank = None
        if cfg.bank.enabled:
            bank = HardPixelBank(info.num_classes, cell_size=cfg.bank.cell_size, momentum=cfg.bank.momentum,
                                 multilabel=info.multilabel)  # fmt: skip
        return cls(
            config=cfg, classes=info, device=device, model=model,
            loss_fn=build_loss(cfg, refine_bank=refine_bank).to(device), optimizer=optimizer,
            scheduler=build_scheduler(optimizer, cfg.optim, total_steps=total_steps),
            scaler=torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16" and device.type == "cuda"),
            bank=bank,
        )  # fmt: skip

    @classmethod
    def resume(
        cls, cfg: Config, checkpoint_path: Path, *, steps_per_epoch: int, refine_bank: HardPixelBank | None = None
    ) -> TrainingRun:
        """Continue exactly where ``checkpoint_path`` (a run's last.pt) stopped; a refinement
        stage passes the bank that drives it (its class weights)."""
        run = cls.create(cfg, steps_per_epoch=steps_per_epoch, pretrained=False, refine_bank=refine_bank)
        run.load_state_dict(load_checkpoint(checkpoint_path), source=checkpoint_path)
        return run

    @classmethod
    def refine_from(
        cls, cfg: Config, checkpoint: dict[str, Any], *, source: Path, bank: HardPixelBank | None,
        steps_per_epoch: int,
    ) -> TrainingRun:  # fmt: skip
        """A new run continuing the schedule of ``checkpoint`` (read from ``source``), best score reset.

        A model with a refinement head accepts a base model's weights (the head starts at
        zero, its optimizer state fresh). ``bank`` (a mined store) replaces the checkpoint's own.
        """
        run = cls.create(cfg, steps_per_epoch=steps_per_epoch, refine_bank=bank, pretrained=False)
        run.load_state_dict(checkpoint, source=source, allow_new_head=True)
        run.progress.best_miou, run.progress.best_epoch = -1.0, -1
        if bank is not None and run.bank is not None:
            run.bank.load_state_dict(copy.deepcopy(bank.state_dict()))
        return run

    @classmethod
    def for_inference(cls, checkpoint_path: Path, overrides: list[str]) -> tuple[TrainingRun, dict[str, Any]]:
        """The checkpoint's config (plus overrides) and model in eval mode; optimizer state untouched.

        Returns the run and the checkpoint's metadata (progress, metrics, class names).
        """
        checkpoint = load_checkpoint(checkpoint_path)
        cfg = checkpoint_config(checkpoint_path, checkpoint, overrides)
        run = cls.create(cfg, steps_per_epoch=1, pretrained=False)
        _load_model(run.model, checkpoint, checkpoint_path)
        run.progress = Progress(**checkpoint["progress"])
        run.model.eval()
        return run, {key: checkpoint[key] for key in ("progress", "metrics", "class_names")}

    def state_dict(self, *, metrics: dict[str, float] | None = None) -> dict[str, Any]:
        """The checkpoint: tensors and plain containers only (``torch.load(weights_only=True)``)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": asdict(self.progress),
            "rng": capture_rng_state(),
            "config": config_to_dict(self.config),
            "class_names": list(self.classes.names),
            "metrics": dict(metrics or {}),
            "bank": encode_arrays(self.bank.state_dict()) if self.bank is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], *, source: Path, allow_new_head: bool = False) -> None:
        """Restore everything from a checkpoint of this format; ``source`` names it in errors."""
        check_format(source, state)
        if list(state["class_names"]) != list(self.classes.names):
            raise CheckpointError(
                f"checkpoint {source} was trained on classes {state['class_names']}; this config has "
                f"{list(self.classes.names)}"
            )
        new_head = _load_model(self.model, state, source) == "base"
        if new_head and not allow_new_head:
            raise CheckpointError(f"checkpoint {source} has no refinement head; resume it with model.refine_head=0")
        if new_head:
            print(f"attached a new refinement head (width {self.config.model.refine_head}) to the model of {source}")
        try:
            load_optimizer_state(self.optimizer, state["optimizer"], allow_new=new_head)
        except ValueError as err:
            raise CheckpointError(f"checkpoint {source}: {err} (was optim.name changed?)") from err
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_configured_lr()
        self.scaler.load_state_dict(state["scaler"])
        known = {f.name for f in fields(Progress)}
        self.progress = Progress(**{k: v for k, v in state["progress"].items() if k in known})
        restore_rng_state(state["rng"])
        if self.bank is not None and state.get("bank"):
            self.bank.load_state_dict(decode_arrays(state["bank"]))

    def _apply_configured_lr(self) -> None:
        """Continue the restored schedule from the configured ``optim.lr``: a resumed run given
        ``optim.lr=...`` trains at the new rate (the schedule otherwise keeps the saved base rate)."""
        scheduler = self.scheduler
        assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
        scheduler.base_lrs = [self.config.optim.lr for _ in self.optimizer.param_groups]
        for group, factor in zip(self.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group["initial_lr"] = self.config.optim.lr
            group["lr"] = self.config.optim.lr * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # what get_last_lr reports


def checkpoint_bank(checkpoint: dict[str, Any], *, source: Path) -> HardPixelBank | None:
    """The hard-pixel dictionary saved in ``checkpoint`` (None when it holds none)."""
    state = checkpoint.get("bank")
    if not state or not state["samples"]:
        return None
    bank = HardPixelBank(state["num_classes"])
    bank.load_state_dict(decode_arrays(state))
    return bank


def _load_model(model: nn.Module, checkpoint: dict[str, Any], source: Path) -> str:
    try:
        return load_model_state(model, checkpoint["model"])
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith(("size mismatch", "Missing", "Unexpected"))), lines[0])
        raise CheckpointError(
            f"checkpoint {source} does not fit the configured model (was model.* overridden?): {detail[:300]}"
        ) from err
