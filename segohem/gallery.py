"""A browsable gallery of hard-pixel maps: one PNG per image plus an index.html and the run's plots."""

from __future__ import annotations

import html
import os
from pathlib import Path

import cv2
import torch
from torch import nn
from tqdm import tqdm

from segohem.bank import HardPixelBank
from segohem.config import EvalConfig
from segohem.data.build import ClassInfo
from segohem.data.datasets import SegmentationDataset
from segohem.engine.panels import prediction_panels
from segohem.losses import SegmentationLoss
from segohem.visualize import render_panel, write_png


def choose_ids(bank: HardPixelBank | None, dataset: SegmentationDataset, *, num: int) -> list[str]:
    """The ``num`` hardest images by the dictionary's score, or the first ``num`` when the
    dictionary holds none of ``dataset``'s images (a split it was not built on)."""
    known = {dataset.sample_id(i) for i in range(len(dataset))}
    if bank is not None:
        ranked = sorted((s for s in bank.samples if s in known), key=lambda s: -bank.samples[s].score)
        if ranked:
            return ranked[:num]
        print(f"the dictionary holds none of these {len(dataset)} images: showing the first {num} instead")
    return [dataset.sample_id(i) for i in range(min(num, len(dataset)))]


def write_gallery(
    *, model: nn.Module, dataset: SegmentationDataset, sample_ids: list[str], loss_fn: SegmentationLoss,
    device: torch.device, classes: ClassInfo, bank: HardPixelBank | None, output: Path,
    plots: dict[str, Path] | None = None, progress: bool = True, eval_cfg: EvalConfig | None = None,
    pad_divisor: int = 1,
) -> Path:  # fmt: skip
    """Render each sample's panel (with its dictionary hardness map when known); returns index.html."""
    index_of = {dataset.sample_id(i): i for i in range(len(dataset))}
    unknown = [s for s in sample_ids if s not in index_of]
    if unknown:
        raise KeyError(f"sample ids not in the dataset: {unknown[:5]}")
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    for sample_id in tqdm(sample_ids, desc="gallery", disable=not progress):
        (panel,) = prediction_panels(model=model, dataset=dataset, indices=[index_of[sample_id]], loss_fn=loss_fn,
                                     device=device, eval_cfg=eval_cfg, pad_divisor=pad_divisor)  # fmt: skip
        stats = bank.samples.get(sample_id) if bank is not None else None
        picture = render_panel(panel, names=classes.names, palette=classes.palette, ignore_index=classes.ignore_index,
                               hardness=stats.hardness if stats is not None else None)  # fmt: skip
        name = f"{sample_id}.png"
        write_png(output / name, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        score = f"{stats.score:.3f}" if stats is not None else "-"
        rows.append(f"<tr><td>{html.escape(sample_id)}<br>kept {panel.hard_mask.mean():.1%}<br>score {score}</td>"
                    f'<td><a href="{name}"><img src="{name}" width="900"></a></td></tr>')  # fmt: skip
    plot_html = "".join(
        f'<figure><img src="{html.escape(os.path.relpath(path, output))}" width="450">'
        f"<figcaption>{name}</figcaption></figure>"
        for name, path in (plots or {}).items()
    )
    page = output / "index.html"
    page.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>segohem hard pixels</title></head><body>"
        f"<h1>Hard-pixel gallery</h1><div style='display:flex;flex-wrap:wrap'>{plot_html}</div>"
        f"<table border='1' cellpadding='4'>{''.join(rows)}</table></body></html>"
    )
    return page
