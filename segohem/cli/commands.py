"""`segohem eval | predict | mine | hard-pixels | viz`."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from segohem.bank import HardPixelBank
from segohem.bank_report import class_hardness, confused_pairs, format_rows, hardest_images
from segohem.bank_store import load_bank, save_bank
from segohem.cli.build import build_eval_loader, eval_dataset
from segohem.config import ConfigError
from segohem.data import IMAGE_SUFFIXES, DatasetError, display_path
from segohem.data.images import ImageListDataset
from segohem.data.transforms import build_eval_transform
from segohem.engine.inference import eval_logits, working_size_of
from segohem.engine.loop import BANK_FILE, autocast_context, evaluate, run_eval_settings
from segohem.engine.mine import mine_split
from segohem.engine.run import TrainingRun
from segohem.gallery import choose_ids, write_gallery
from segohem.metrics import format_table
from segohem.plots import save_run_plots
from segohem.visualize import colorize_mask, colorize_multilabel, write_png


def require_single_label(run: TrainingRun, command: str) -> None:
    """ConfigError for a command that draws or stores one class per pixel, given a multi-label run."""
    if run.classes.multilabel:
        raise ConfigError(
            f"segohem {command} handles one class per pixel, and this checkpoint was trained on multi-label masks "
            f"(data.mask_format=multilabel); segohem eval, predict and hard-pixels read multi-label runs"
        )


def run_eval(checkpoint: Path, *, split: str, overrides: list[str], output: Path | None) -> dict[str, Any]:
    run, _ = TrainingRun.for_inference(checkpoint, overrides)
    loader = build_eval_loader(run.config, split=split)
    started = time.perf_counter()
    metrics = evaluate(run.model, loader, **run_eval_settings(run, progress=run.config.train.progress))
    seconds = time.perf_counter() - started
    count = len(eval_dataset(loader))
    print(f"{checkpoint} on {split}: {count} images in {seconds:.1f}s ({count / seconds:.1f} images/s)")
    print(format_table(metrics, run.classes.names))
    if output is not None:
        output.write_text(json.dumps({"class_names": list(run.classes.names), **metrics}, indent=2))
    return metrics


def prediction_files(paths: list[Path], output_dir: Path) -> list[tuple[Path, Path]]:
    """(label PNG, colour PNG) per input; refuses names that would collide or overwrite an input."""
    outputs = [(output_dir / f"{p.stem}.png", output_dir / f"{p.stem}_color.png") for p in paths]
    writers: dict[Path, Path] = {}
    inputs = {p.resolve() for p in paths}
    for path, pair in zip(paths, outputs, strict=True):
        for target in pair:
            if target.resolve() in inputs:
                raise DatasetError(f"predicting {path} would overwrite the input {target}; choose another --output")
            if target in writers:
                raise DatasetError(
                    f"{writers[target].name} and {path.name} would both be written as {target.name}; "
                    f"rename one of them or predict them into separate --output folders"
                )
            writers[target] = path
    return outputs


def run_predict(checkpoint: Path, *, input_dir: Path, output_dir: Path, overrides: list[str]) -> int:
    """Write ``<stem>.png`` (class ids) and ``<stem>_color.png`` for every image in ``input_dir``.

    Multi-label runs write the classes predicted present as bits, the encoding they train on
    (data.mask_format=multilabel), and colour each pixel by the mean colour of its classes.

    Images go through the evaluation preprocessing of the checkpoint's config (the one path
    datasets use); predictions are resized back to each image's own size.
    """
    paths = prediction_inputs(input_dir, output_dir)
    run, _ = TrainingRun.for_inference(checkpoint, overrides)
    cfg, info = run.config, run.classes
    dataset = ImageListDataset(
        paths, num_classes=info.num_classes, ignore_index=info.ignore_index, seed=cfg.run.seed,
        transform=build_eval_transform(cfg.augment, ignore_index=info.ignore_index),
        resize=tuple(cfg.data.resize) if cfg.data.resize else None,  # type: ignore[arg-type]
    )  # fmt: skip
    return write_predictions(
        dataset,
        output_dir=output_dir,
        palette=info.palette,
        progress=cfg.train.progress,
        multilabel=info.multilabel,
        labels_of=lambda index, sample: _predict_labels(run, sample, size=dataset.resize),
    )


def prediction_inputs(input_dir: Path, output_dir: Path) -> list[Path]:
    """The images of ``input_dir`` to predict, after checking that their outputs in ``output_dir``
    overwrite neither an input nor each other (see `prediction_files`)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise DatasetError(f"--output {output_dir} is a file; give a folder for the predictions")
    if not input_dir.is_dir():
        state = "is a file" if input_dir.exists() else "does not exist"
        raise DatasetError(f"--input {input_dir} {state}; give a folder of images")
    paths = sorted(p for p in input_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {input_dir}")
    prediction_files(paths, output_dir)
    return paths


def write_predictions(
    dataset: ImageListDataset, *, output_dir: Path, palette: Sequence[Sequence[int]], progress: bool | None,
    labels_of: Callable[[int, dict[str, Any]], np.ndarray], multilabel: bool = False,
) -> int:  # fmt: skip
    """Write ``<stem>.png`` and ``<stem>_color.png`` for each image, ``labels_of(index, sample)``
    giving its (H0, W0) class ids; images that cannot be read or predicted (a DatasetError:
    corrupt, or a size a fixed-size model does not take) are reported and skipped. Returns the
    exit status: 1 if any image was skipped, else 0."""
    paths = dataset.paths
    outputs = prediction_files(paths, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    for index in tqdm(range(len(dataset)), desc="predict", disable=None if progress is None else not progress):
        try:
            labels = labels_of(index, dataset[index])
        except DatasetError as err:  # keep going: predictions already written stay valid
            failed.append(display_path(paths[index]))
            tqdm.write(f"skipping: {err}")
            continue
        label_path, color_path = outputs[index]
        write_png(label_path, labels)
        colour = colorize_multilabel(labels, palette) if multilabel else colorize_mask(labels, palette)
        write_png(color_path, cv2.cvtColor(colour, cv2.COLOR_RGB2BGR))
    print(f"wrote {len(paths) - len(failed)} prediction(s) to {output_dir}")
    if failed:
        print(f"skipped {len(failed)} file(s): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


@torch.no_grad()
def _predict_labels(run: TrainingRun, sample: dict[str, Any], *, size: tuple[int, int] | None) -> np.ndarray:
    """(H0, W0) class ids at the image's original size for one preprocessed sample.

    ``size``: the (H, W) the image was resized to (``data.resize``), None when kept; the
    padding added after it is cropped off before resizing back. Logits as in evaluation
    (`eval_logits` with the ``eval`` section).
    """
    source_height, source_width = sample["source_hw"].tolist()
    height, width = size or (source_height, source_width)
    cfg = run.config
    with autocast_context(run.device, cfg.train.amp):
        logits = eval_logits(run.model, sample["image"][None].to(run.device), cfg=cfg.eval,
                             num_classes=run.classes.num_classes, size_divisor=cfg.augment.pad_divisor,
                             valid_hw=[(height, width)], multilabel=run.classes.multilabel)  # fmt: skip
    logits = logits[:, :, :height, :width]
    if run.classes.multilabel:  # bit k set: class k present (logit above 0)
        bits = torch.arange(run.classes.num_classes, device=logits.device).view(1, -1, 1, 1)
        packed = ((logits > 0).long() << bits).sum(1)[0].cpu().numpy()
        return cv2.resize(packed.astype(np.uint8 if run.classes.num_classes <= 8 else np.uint16),
                          (source_width, source_height), interpolation=cv2.INTER_NEAREST)  # fmt: skip
    label_dtype = np.uint8 if run.classes.num_classes <= 256 else np.uint16
    labels: np.ndarray = logits.argmax(1)[0].cpu().numpy().astype(label_dtype)
    return cv2.resize(labels, (source_width, source_height), interpolation=cv2.INTER_NEAREST)


def run_mine(checkpoint: Path, *, split: str, output: Path | None, overrides: list[str]) -> Path:
    """Mine a split with a checkpoint into a hard-pixel store; returns the store's path."""
    run, meta = TrainingRun.for_inference(checkpoint, overrides)
    require_single_label(run, "mine")
    cfg, info = run.config, run.classes
    loader = build_eval_loader(cfg, split=split)
    output = output or checkpoint.parent / f"mined_{split}_{checkpoint.stem}.sqlite"
    bank = HardPixelBank(info.num_classes, cell_size=cfg.bank.cell_size, momentum=cfg.bank.momentum)
    started = time.perf_counter()
    count = mine_split(
        model=run.model, loader=loader, loss_fn=run.loss_fn, device=run.device, bank=bank, store_path=output,
        working_size=working_size_of(cfg.data), eval_cfg=cfg.eval, pad_divisor=cfg.augment.pad_divisor,
        amp=cfg.train.amp, progress=cfg.train.progress,
    )  # fmt: skip
    save_bank(bank, output, class_names=info.names, epoch=int(meta["progress"]["epoch"]))
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
    trained, _ = TrainingRun.for_inference(checkpoint, overrides)
    require_single_label(trained, "viz")
    dataset = eval_dataset(build_eval_loader(trained.config, split=split))
    store = run / BANK_FILE
    bank = load_bank(store) if store.exists() else None
    page = write_gallery(
        model=trained.model, dataset=dataset, sample_ids=ids or choose_ids(bank, dataset, num=num),
        loss_fn=trained.loss_fn, device=trained.device, classes=trained.classes, bank=bank,
        output=output or run / "gallery", plots=save_run_plots(run), progress=trained.config.train.progress,
        eval_cfg=trained.config.eval, pad_divisor=trained.config.augment.pad_divisor,
    )  # fmt: skip
    print(f"gallery written: open {page}")
    return page
