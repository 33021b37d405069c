"""Matplotlib plots of a run folder: per-class IoU, training curves, kept fraction, class hardness."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # the object API: no pyplot state, works without a display

from segohem.bank_report import class_hardness


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def class_iou_bars(epoch_record: dict[str, Any]) -> Figure:
    names = [k.removeprefix("val/iou/") for k in epoch_record if k.startswith("val/iou/")]
    values = [100 * (epoch_record[f"val/iou/{n}"] or 0.0) for n in names]
    figure = Figure(figsize=(max(5, 0.6 * len(names)), 3.5))
    axis = figure.subplots()
    axis.bar(names, values, color="#4c72b0")
    axis.axhline(100 * epoch_record["val/miou"], color="#dd8452", linestyle="--", label="mIoU")
    axis.set_ylabel("IoU (%)")
    axis.set_title(f"Per-class IoU, epoch {epoch_record['epoch']}")
    axis.tick_params(axis="x", rotation=45)
    axis.legend()
    figure.tight_layout()
    return figure


def training_curves(steps: list[dict[str, Any]], epochs: list[dict[str, Any]]) -> Figure:
    figure = Figure(figsize=(10, 3.5))
    (loss_axis, miou_axis) = figure.subplots(1, 2)
    loss_axis.plot([r["step"] for r in steps], [r["train/loss"] for r in steps], lw=1)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("train loss (kept pixels)")
    lr_axis = loss_axis.twinx()
    lr_axis.plot([r["step"] for r in steps], [r["train/lr"] for r in steps], color="#c44e52", lw=1)
    lr_axis.set_ylabel("learning rate", color="#c44e52")
    evaluated = [r for r in epochs if r.get("val/miou") is not None]
    miou_axis.plot([r["epoch"] for r in evaluated], [100 * r["val/miou"] for r in evaluated], marker="o")
    miou_axis.set_xlabel("epoch")
    miou_axis.set_ylabel("val mIoU (%)")
    figure.tight_layout()
    return figure


def kept_fraction_curve(steps: list[dict[str, Any]]) -> Figure:
    figure = Figure(figsize=(6, 3.5))
    axis = figure.subplots()
    axis.plot([r["step"] for r in steps], [100 * r["train/kept_fraction"] for r in steps], lw=1)
    axis.set_xlabel("step")
    axis.set_ylabel("kept pixels (% of valid)")
    axis.set_title("OHEM kept fraction")
    figure.tight_layout()
    return figure


def class_hardness_curves(rows: list[dict[str, Any]]) -> Figure:
    figure = Figure(figsize=(7, 4))
    axis = figure.subplots()
    for name in dict.fromkeys(r["class"] for r in rows):
        points = [(r["epoch"] + 1, 100 * r["hard_fraction"]) for r in rows if r["class"] == name]
        axis.plot(*zip(*points, strict=True), marker="o", label=name)
    axis.set_xlabel("epoch")
    axis.set_ylabel("hard pixels (% of the class)")
    axis.set_title("Hard fraction per class")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return figure


def save_run_plots(run_dir: str | Path, *, store: Path | None = None) -> dict[str, Path]:
    """Write every plot the run folder has data for into ``run_dir/plots``; returns name -> path."""
    run_dir = Path(run_dir)
    steps, epochs = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "epochs.jsonl")
    figures: dict[str, Figure] = {}
    evaluated = [r for r in epochs if r.get("val/miou") is not None]
    if evaluated:
        figures["class_iou"] = class_iou_bars(evaluated[-1])
    if steps:
        figures["training_curves"] = training_curves(steps, epochs)
        figures["kept_fraction"] = kept_fraction_curve(steps)
    store = store or run_dir / "hard_pixels.sqlite"
    if store.exists():
        figures["class_hardness"] = class_hardness_curves(class_hardness(store))
    folder = run_dir / "plots"
    folder.mkdir(exist_ok=True)
    paths = {}
    for name, figure in figures.items():
        paths[name] = folder / f"{name}.png"
        figure.savefig(paths[name], dpi=100)
    return paths
