"""`segohem export` (a checkpoint as an ONNX model that carries its preprocessing and classes in
its metadata) and `segohem predict --model` (that model under ONNX Runtime, no torch model)."""

from __future__ import annotations

import importlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from segohem import __version__
from segohem.cli.commands import prediction_inputs, require_single_label, write_predictions
from segohem.config import AugmentConfig, Config, ConfigError, config_to_dict
from segohem.data import DatasetError, display_path
from segohem.data.images import ImageListDataset
from segohem.data.transforms import build_eval_transform
from segohem.engine.run import TrainingRun

# Opset 17: everything these graphs use (Conv, BatchNormalization folded into Conv, MaxPool,
# Resize, Concat, Softmax) exists since opset 13, and 17 is what the deployment runtimes of the
# last years all read (ONNX Runtime >= 1.13, TensorRT >= 8.6, OpenVINO >= 2022.3); newer opsets
# would only narrow that list. It was also the TorchScript exporter's default up to torch 2.5.
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "logits"
METADATA_FORMAT = "1"
EXTRA = "pip install 'segohem[export]'"


class MissingExtra(ValueError):
    """An optional dependency is not installed; reported like bad input (one line, exit status 2)."""


def require(module: str) -> ModuleType:
    """Import ``module`` from the ``export`` extra, or raise `MissingExtra` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(
            f"the {module} package is not installed; ONNX export and prediction need the export extra: {EXTRA}"
        ) from None


def input_divisor(model: nn.Module) -> int:
    """The number the model's input height and width must be multiples of, as smp declares it: the
    encoder's output stride (32 for FPN, Unet++ or Segformer with 5 stages, 16 for DeepLabV3+), or 1
    for Unet, whose decoder (smp >= 0.5) resizes to each skip connection and takes any size."""
    base: Any = getattr(model, "base", model)  # a RefinedModel wraps the smp model
    if not getattr(base, "requires_divisible_input_shape", False):
        return 1
    return int(base.encoder.output_stride)


def export_size(cfg: Config, *, height: int | None, width: int | None, divisor: int) -> tuple[int, int]:
    """The (H, W) to export at: the given one, or the working size (``data.resize``, or the
    synthetic ``data.image_size``) padded to ``augment.pad_divisor`` as evaluation pads it."""
    if (height is None) != (width is None):
        raise ConfigError("give both --height and --width (or neither)")
    if height is None or width is None:
        size = cfg.data.resize or (cfg.data.image_size if cfg.data.kind == "synthetic" else [])
        if not size:
            raise ConfigError(
                "the checkpoint's images keep their own size (data.resize is empty): give --height H --width W "
                f"(multiples of {math.lcm(divisor, cfg.augment.pad_divisor)}) or --dynamic"
            )
        pad = cfg.augment.pad_divisor
        height, width = -(-size[0] // pad) * pad, -(-size[1] // pad) * pad
    step = math.lcm(divisor, cfg.augment.pad_divisor)
    if height < 1 or width < 1 or height % step or width % step:
        raise ConfigError(
            f"--height {height} --width {width}: give positive multiples of {step} (the model's input divisor "
            f"{divisor} and augment.pad_divisor {cfg.augment.pad_divisor}, to which prediction pads every image), "
            f"e.g. --height {max(1, -(-height // step)) * step} --width {max(1, -(-width // step)) * step}"
        )
    return height, width


def model_metadata(run: TrainingRun, *, divisor: int, size: tuple[int, int] | None, source: Path) -> dict[str, str]:
    """The ONNX ``metadata_props``: what a consumer needs to preprocess and read the outputs."""
    cfg, info = run.config, run.classes
    return {
        "segohem.format": METADATA_FORMAT,
        "producer": f"segohem {__version__}",
        "source_checkpoint": source.name,
        "class_names": json.dumps(list(info.names)),
        "palette": json.dumps([list(c) for c in info.palette]),
        "ignore_index": str(info.ignore_index),
        "mean": json.dumps(list(cfg.augment.mean)),
        "std": json.dumps(list(cfg.augment.std)),
        "pad_divisor": str(cfg.augment.pad_divisor),
        "resize": json.dumps(list(cfg.data.resize)),
        "input_divisor": str(divisor),
        "input_size": json.dumps(list(size) if size else None),
        "preprocessing": (
            "RGB uint8 -> resize to `resize` [H, W] when given (area when shrinking, else bilinear) -> "
            "(x / 255 - mean) / std -> zero-pad bottom/right to a multiple of pad_divisor -> images (N, 3, H, W) "
            "float32; take argmax over the classes of logits (N, C, H, W) and crop the padding off"
        ),
        "config": json.dumps(config_to_dict(cfg)),
    }


def run_export(
    checkpoint: Path, *, fmt: str, output: Path | None, height: int | None, width: int | None, dynamic: bool,
    overrides: list[str],
) -> Path:  # fmt: skip
    """Write ``checkpoint``'s model as ONNX (``output``, default beside the checkpoint); returns the path.

    The batch axis is always dynamic; ``dynamic`` also frees height and width (each must stay a
    multiple of `input_divisor`). Otherwise the model takes exactly (H, W) from `export_size`.
    The written model is run once under ONNX Runtime and compared with PyTorch.
    """
    if fmt != "onnx":
        raise ConfigError(f"--format {fmt}: the export format must be onnx")
    if dynamic and (height is not None or width is not None):
        raise ConfigError("--dynamic exports every size; drop --height/--width")
    for module in ("onnx", "onnxruntime"):  # before the model is built: a missing extra fails fast
        require(module)
    # On the CPU in fp32 whatever run.device says: the traced graph does not depend on a device,
    # and the comparison with PyTorch is exact up to kernel rounding.
    run, _ = TrainingRun.for_inference(checkpoint, [*overrides, "run.device=cpu"])
    require_single_label(run, "export")
    model = run.model.float().eval()
    divisor = input_divisor(model)
    if dynamic:
        size = None
        trace_height = trace_width = -(-64 // divisor) * divisor  # any size the model takes: the axes stay symbolic
    else:
        size = export_size(run.config, height=height, width=width, divisor=divisor)
        trace_height, trace_width = size
    output = output or checkpoint.with_suffix(".onnx")
    sample = torch.randn(1, 3, trace_height, trace_width, generator=torch.Generator().manual_seed(0))
    metadata = model_metadata(run, divisor=divisor, size=size, source=checkpoint)
    difference = write_onnx(model, sample, output=output, dynamic=dynamic, metadata=metadata)
    free = "any H, W" if divisor == 1 else f"H, W multiples of {divisor}"
    shape = f"N x 3 x {size[0]} x {size[1]}" if size else f"N x 3 x H x W ({free})"
    print(f"wrote {output}: ONNX opset {OPSET}, input {INPUT_NAME} {shape}, {run.classes.num_classes} classes")
    print(f"max |logit difference| against PyTorch on a random input: {difference:.2e}")
    eval_cfg = run.config.eval
    if eval_cfg.mode != "whole" or eval_cfg.flip or list(eval_cfg.scales) != [1.0]:
        print(
            "note: the checkpoint's eval section (slide windows, flip, scales) is not part of the ONNX model; "
            "`segohem predict --model` runs whole-image inference"
        )
    return output


def write_onnx(
    model: nn.Module, sample: torch.Tensor, *, output: Path, dynamic: bool, metadata: dict[str, str]
) -> float:  # fmt: skip
    """Trace ``model`` on ``sample`` (1, 3, H, W) into ``output`` with ``metadata``, checked and
    compared with PyTorch before it replaces ``output``; returns the largest logit difference.

    Batch is a dynamic axis; with ``dynamic`` height and width too.
    """
    onnx = require("onnx")
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".export-") as scratch:
        traced, staged = Path(scratch) / "traced.onnx", Path(scratch) / "model.onnx"
        # The TorchScript exporter (dynamo=False) needs only the onnx package, and tracing passes
        # over smp's Python-level input-size check, which torch.export would have to prove.
        torch.onnx.export(model, (sample,), traced, dynamo=False, opset_version=OPSET, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes})  # fmt: skip
        proto = onnx.load(traced)
        onnx.helper.set_model_props(proto, metadata)
        onnx.checker.check_model(proto)
        onnx.save(proto, staged)
        difference = max_logit_difference(model, staged, sample)
        os.replace(staged, output)  # same folder: a reader never sees half a model
    return difference


def open_session(path: Path) -> Any:
    """An ONNX Runtime session for ``path``; DatasetError naming the file if it is not a model."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    # Threads wait passively, as OMP_WAIT_POLICY=PASSIVE does for torch (segohem/cli/__init__.py).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=ort.get_available_providers())
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
        raise DatasetError(f"cannot load ONNX model {display_path(path)}: {str(err).splitlines()[0][:300]}") from None


def max_logit_difference(model: nn.Module, path: Path, images: torch.Tensor) -> float:
    """Largest absolute difference between ``model``'s logits and the ONNX model's at ``path`` for
    ``images`` (N, 3, H, W)."""
    with torch.no_grad():
        expected = model(images).float().numpy()
    (logits,) = open_session(path).run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
    return float(np.abs(logits - expected).max())


@dataclass(frozen=True)
class OnnxModelInfo:
    """What `segohem export` stored in a model's metadata (see `model_metadata`)."""

    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int
    augment: AugmentConfig  # mean, std and pad_divisor: the evaluation preprocessing
    resize: tuple[int, int] | None
    input_size: tuple[int, int] | None  # None: any multiple of the input divisor


def read_model_info(session: Any, path: Path) -> OnnxModelInfo:
    """The metadata of a model written by `run_export`; DatasetError naming the file otherwise."""
    props = session.get_modelmeta().custom_metadata_map
    if props.get("segohem.format") != METADATA_FORMAT:
        raise DatasetError(
            f"ONNX model {display_path(path)} has no segohem metadata (format {METADATA_FORMAT}); "
            f"write it with `segohem export --checkpoint RUN/best.pt --format onnx`"
        )
    try:
        resize, input_size = json.loads(props["resize"]), json.loads(props["input_size"])
        return OnnxModelInfo(
            names=tuple(json.loads(props["class_names"])),
            palette=tuple(tuple(c) for c in json.loads(props["palette"])),
            ignore_index=int(props["ignore_index"]),
            augment=AugmentConfig(
                mean=json.loads(props["mean"]), std=json.loads(props["std"]), pad_divisor=int(props["pad_divisor"])
            ),
            resize=(resize[0], resize[1]) if resize else None,
            input_size=(input_size[0], input_size[1]) if input_size else None,
        )
    except (KeyError, ValueError, TypeError, IndexError) as err:
        raise DatasetError(f"ONNX model {display_path(path)}: damaged segohem metadata ({err!r})") from None


def run_predict_onnx(model_path: Path, *, input_dir: Path, output_dir: Path) -> int:
    """`segohem predict --model`: the files and exit status of `run_predict`, from an exported model.

    Images go through the evaluation preprocessing the metadata describes (the dataset path
    `run_predict` uses); whole-image inference under ONNX Runtime, labels resized back to each
    image's own size.
    """
    paths = prediction_inputs(input_dir, output_dir)
    if not model_path.is_file():
        raise DatasetError(f"--model {display_path(model_path)}: no such file")
    session = open_session(model_path)
    info = read_model_info(session, model_path)
    dataset = ImageListDataset(
        paths, num_classes=len(info.names), ignore_index=info.ignore_index,
        transform=build_eval_transform(info.augment, ignore_index=info.ignore_index), resize=info.resize,
    )  # fmt: skip
    return write_predictions(
        dataset,
        output_dir=output_dir,
        palette=info.palette,
        progress=None,
        labels_of=lambda index, sample: onnx_labels(session, info, sample, source=paths[index]),
    )


def onnx_labels(session: Any, info: OnnxModelInfo, sample: dict[str, Any], *, source: Path) -> np.ndarray:
    """(H0, W0) class ids at the image's original size for one preprocessed ``sample`` (padded
    (3, Hp, Wp)): logits cropped to the resized image, argmax, resized back (nearest)."""
    source_height, source_width = sample["source_hw"].tolist()
    height, width = info.resize or (source_height, source_width)
    images = sample["image"][None].numpy()  # (1, 3, Hp, Wp)
    padded_hw = tuple(images.shape[-2:])
    if info.input_size is not None and padded_hw != info.input_size:
        raise DatasetError(
            f"{display_path(source)} is {padded_hw[0]}x{padded_hw[1]} after resizing and padding, but the model "
            f"takes {info.input_size[0]}x{info.input_size[1]} only; export it with --dynamic, or with "
            f"--height {padded_hw[0]} --width {padded_hw[1]}"
        )
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images})  # (1, C, Hp, Wp)
    if logits.shape[1] != len(info.names) or tuple(logits.shape[-2:]) != padded_hw:
        raise DatasetError(f"the ONNX model returned logits {logits.shape} for an input {images.shape}")
    label_dtype = np.uint8 if len(info.names) <= 256 else np.uint16
    labels: np.ndarray = logits[0, :, :height, :width].argmax(0).astype(label_dtype)
    return cv2.resize(labels, (source_width, source_height), interpolation=cv2.INTER_NEAREST)
