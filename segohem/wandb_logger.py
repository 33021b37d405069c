"""Weights & Biases logging: the only module that imports wandb.

Implements the engine's logger protocol. Any failure inside W&B (init, network, full disk)
is turned into one warning and W&B logging stops; training and the local logs go on.
"""

from __future__ import annotations

import netrc
import os
import secrets
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from segohem.config import WandbConfig
from segohem.data.build import ClassInfo
from segohem.visualize import EpochVisuals, confusion_image, hardness_overlay

RUN_ID_FILE = "wandb_run_id.txt"


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(configured: str) -> str:
    """``WANDB_MODE`` wins; ``auto`` is online with credentials, else offline."""
    mode = os.environ.get("WANDB_MODE") or configured
    if mode == "auto":
        mode = "online" if has_credentials() else "offline"
    if mode == "dryrun":
        mode = "offline"
    return mode


def mask_layers(panel_target: np.ndarray, panel_pred: np.ndarray, hard_mask: np.ndarray, classes: ClassInfo) -> dict:
    """W&B mask layers with class names; the ignore id becomes ``num_classes`` (ids > 127 break)."""
    ignore_id = classes.num_classes
    labels = {i: name for i, name in enumerate(classes.names)} | {ignore_id: "ignore"}
    target = np.where(panel_target == classes.ignore_index, ignore_id, panel_target).astype(np.uint8)
    errors = np.where(panel_target == classes.ignore_index, 2, (panel_pred != panel_target).astype(np.uint8))
    return {
        "ground_truth": {"mask_data": target, "class_labels": labels},
        "prediction": {"mask_data": panel_pred.astype(np.uint8), "class_labels": labels},
        "hard_pixels": {"mask_data": hard_mask.astype(np.uint8), "class_labels": {0: "easy", 1: "hard (kept)"}},
        "errors": {"mask_data": errors.astype(np.uint8), "class_labels": {0: "correct", 1: "wrong", 2: "ignored"}},
    }


class WandbLogger:
    """Logs metrics, validation mask overlays, the dictionary table and checkpoint artifacts."""

    def __init__(self, cfg: WandbConfig, *, run_dir: Path, run_name: str, config: dict[str, Any], classes: ClassInfo):
        self.cfg, self.classes = cfg, classes
        self.run: Any = None
        mode = resolve_mode(cfg.mode)
        if mode == "disabled":
            return
        import wandb

        self.wandb = wandb
        id_file = run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        self._guard(lambda: self._init(mode, run_dir, run_name, config, run_id))
        if self.run is not None:
            id_file.write_text(run_id)
            if mode == "offline":
                print(f"W&B is offline: upload later with `wandb sync {run_dir / 'wandb'}/offline-run-*`")

    def _init(self, mode: str, run_dir: Path, run_name: str, config: dict[str, Any], run_id: str) -> None:
        cfg = self.cfg
        self.run = self.wandb.init(
            project=cfg.project, entity=cfg.entity or None, name=cfg.name or run_name, group=cfg.group or None,
            tags=cfg.tags or None, mode=mode,  # type: ignore[arg-type]
            dir=str(run_dir), id=run_id, resume="allow", config=config,
        )  # fmt: skip
        self.run.define_metric("trainer/step")
        self.run.define_metric("train/*", step_metric="trainer/step")
        self.run.define_metric("epoch")
        for pattern in ("val/*", "dictionary/*", "epoch/*"):
            self.run.define_metric(pattern, step_metric="epoch")
        self.run.define_metric("val/miou", step_metric="epoch", summary="max")

    def _guard(self, action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception as err:
            warnings.warn(f"W&B logging failed and is now off ({type(err).__name__}: {err}); "
                          f"local logs in the run folder keep everything", stacklevel=3)  # fmt: skip
            self.run = None

    def log_config(self, config: dict[str, Any]) -> None:
        if self.run is not None:
            self._guard(lambda: self.run.config.update(config, allow_val_change=True))

    def log_step(self, metrics: dict[str, float], *, step: int) -> None:
        if self.run is not None:
            self._guard(lambda: self.run.log({**metrics, "trainer/step": step}))

    def log_epoch(self, metrics: dict[str, float], *, epoch: int, step: int) -> None:
        if self.run is not None:
            renamed = {(k if k.startswith("val/") else f"epoch/{k}"): v for k, v in metrics.items()}
            self._guard(lambda: self.run.log({**renamed, "epoch": epoch}))

    def log_visuals(self, visuals: EpochVisuals, *, epoch: int, step: int) -> None:
        if self.run is not None:
            self._guard(lambda: self.run.log({**self._media(visuals), "epoch": epoch}))

    def _media(self, visuals: EpochVisuals) -> dict[str, Any]:
        wandb, classes = self.wandb, self.classes
        media: dict[str, Any] = {
            "val/examples": [
                wandb.Image(p.image, masks=mask_layers(p.target, p.pred, p.hard_mask, classes), caption=p.sample_id)
                for p in visuals.panels
            ]
        }
        if visuals.confusion is not None:
            media["val/confusion_matrix"] = wandb.Image(confusion_image(visuals.confusion, classes.names))
        if visuals.bank_rows:
            columns = ["thumbnail", "sample_id", "hard_fraction", "score", "top_confused_pair", *classes.names]
            table = wandb.Table(columns=columns)
            for row in visuals.bank_rows:
                thumb = hardness_overlay(row.image, row.hardness)
                table.add_data(wandb.Image(thumb), row.sample_id, row.hard_fraction, row.score, row.top_confusion,
                               *(row.class_hard[name] for name in classes.names))  # fmt: skip
            media["dictionary/hardest_images"] = table
        return media

    def log_artifact(self, path: Path, *, kind: str, aliases: list[str]) -> None:
        if self.run is not None and self.cfg.log_checkpoints:

            def upload() -> None:
                artifact = self.wandb.Artifact(f"{self.run.id}-{kind}", type=kind)
                artifact.add_file(str(path))
                self.run.log_artifact(artifact, aliases=aliases)

            self._guard(upload)

    def log_plots(self, paths: dict[str, Path]) -> None:
        if self.run is not None:
            self._guard(lambda: self.run.log({f"plots/{name}": self.wandb.Image(str(p)) for name, p in paths.items()}))

    def close(self) -> None:
        if self.run is not None:
            self._guard(lambda: self.run.finish())
            self.run = None
