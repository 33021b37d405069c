"""Typed, documented, validated configuration: YAML plus dotted ``key.sub=value`` overrides.

Each field carries its documentation and limits (`setting`); the loader checks types, choices
(``Literal``) and limits per dotted key; `validate` holds the checks that span several fields.
"""

# ruff: noqa: RUF009  (`setting` returns a dataclasses.field, so fields never share a default)
from __future__ import annotations

import copy
import dataclasses
import difflib
import operator
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from segohem.disk import write_atomically

DataKind = Literal["synthetic", "folder", "camvid", "cityscapes", "ade20k", "voc"]
MaskFormat = Literal["index", "rgb", "binary", "multilabel"]
VocTrainSet = Literal["auto", "train", "trainaug"]
MiningMode = Literal["threshold", "topk", "none"]
MiningScope = Literal["image", "batch"]
RefineSampler = Literal["none", "image", "class"]
OptimizerName = Literal["adamw", "sgd"]
AmpMode = Literal["none", "bf16", "fp16"]
WandbMode = Literal["auto", "online", "offline", "disabled"]
EvalMode = Literal["whole", "slide"]
RegionLossName = Literal["none", "dice", "lovasz", "focal"]


class ConfigError(ValueError):
    """A configuration value, key or file is wrong; the message says where and what would work."""


Check = Callable[[Any], "str | None"]  # returns what is wrong and what would work, or None


def setting(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    lengths: tuple[int, ...] = (),
    check: Check | None = None,
) -> Any:
    """A dataclass field with its one-line documentation and the limits the loader enforces.

    ge / gt / le / lt: bounds of a number, or of every number in a (nested) list.
    lengths: the list lengths allowed. check: a test of the whole value (see `Check`).
    """
    metadata = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "lengths": lengths, "check": check}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_PERCENT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*")


def _pixel_amount(*, positive: bool) -> Check:
    """``min_kept`` / ``top_k``: what `segohem.ohem.parse_amount` accepts (tests keep the two equal)."""
    least = 1 if positive else 0

    def problem(value: int | float | str) -> str | None:
        if isinstance(value, int):
            ok = value >= least
        elif isinstance(value, float):
            ok = 0.0 < value < 1.0
        else:
            match = _PERCENT.fullmatch(value)
            percent = float(match.group(1)) if match else -1.0
            ok = (percent > 0.0 if positive else percent >= 0.0) and percent <= 100.0
        if ok:
            return None
        if isinstance(value, float) and value >= 1.0 and value.is_integer():
            return f"is ambiguous; write '100%' to keep every valid pixel, or {int(value)} for a count of pixels"
        return (
            f"is not a pixel amount; write an integer count >= {least} (1000), a fraction strictly "
            f"between 0 and 1 (0.2) or a percentage ('20%')"
        )

    return problem


def _device(value: str) -> str | None:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        return None
    return "is not a device; use auto, cpu, cuda or cuda:N (e.g. cuda:1)"


def _low_high(value: list[float]) -> str | None:
    return None if value[0] <= value[1] else "has low > high; use [low, high] with low <= high"


def _rgb_triples(value: list[list[int]]) -> str | None:
    ok = all(len(rgb) == 3 and all(0 <= c <= 255 for c in rgb) for rgb in value)
    return None if ok else "needs one [R, G, B] per class, each in 0..255"


def _colour_list(value: list[list[int]]) -> str | None:
    ok = all(len(rgb) == 3 and all(0 <= c <= 255 for c in rgb) for rgb in value)
    return None if ok else "needs [R, G, B] colours, each value in 0..255"


def _non_empty(value: list[Any]) -> str | None:
    return None if value else "is empty; give at least one value, e.g. [1.0]"


@dataclass
class RunConfig:
    """Run identity, seeding and device."""

    name: str = setting("synthetic-ohem", "run folder name under output_dir")
    output_dir: str = setting("runs", "parent folder of run folders")
    seed: int = setting(0, "seeds model init, batch order and augmentation", ge=0)
    deterministic: bool = setting(False, "torch.use_deterministic_algorithms (slower on GPU)")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N; auto: cuda when available", check=_device)


@dataclass
class DataConfig:
    """Dataset, splits, classes and batching."""

    kind: DataKind = setting("synthetic", "synthetic | folder | camvid | cityscapes | ade20k | voc")
    root: str = setting(
        "", "dataset root: folder / camvid: the split folders; cityscapes: holds leftImg8bit/ and gtFine/; "
        "ade20k: ADEChallengeData2016 or its parent; voc: VOC2012, VOCdevkit or its parent"
    )  # fmt: skip
    train_images: str = setting("train", "folder / camvid: image folder of the train split, relative to root")
    train_masks: str = setting("trainannot", "folder / camvid: label PNG folder of the train split, relative to root")
    val_images: str = setting("val", "folder / camvid: image folder of the val split, relative to root")
    val_masks: str = setting("valannot", "folder / camvid: label PNG folder of the val split, relative to root")
    test_images: str = setting("test", "folder / camvid: image folder of the test split, relative to root")
    test_masks: str = setting("testannot", "folder / camvid: label PNG folder of the test split, relative to root")
    train_list: str = setting(
        "", "folder / camvid: text file (relative to root) naming the train samples, one stem or path relative to "
        "train_images / train_masks a line (suffix optional); empty: every image in train_images"
    )  # fmt: skip
    val_list: str = setting("", "folder / camvid: like train_list, for the val split (in val_images / val_masks)")
    test_list: str = setting("", "folder / camvid: like train_list, for the test split (in test_images / test_masks)")
    mask_format: MaskFormat = setting(
        "index", "folder / camvid: index (label ids, 8 or 16 bit, or palette indices) | rgb (colours mapped "
        "through palette; ignore_colors are ignored) | binary (0/255 or 0/1 -> classes 0 and 1) | multilabel "
        "(folder: classes may overlap; bit k of a label value set = class k present, 8 or 16 bit; ignore_index "
        "marks pixels scored for no class; see scripts/pack_multilabel.py)"
    )  # fmt: skip
    ignore_colors: list[list[int]] = setting(
        [], "mask_format rgb: [R, G, B] colours read as the ignore id", check=_colour_list
    )
    voc_train_set: VocTrainSet = setting(
        "auto", "voc: train split list; trainaug: SBD-augmented ImageSets/Segmentation/trainaug.txt (labels from "
        "SegmentationClass, else SegmentationClassAug); auto: trainaug when it and SegmentationClassAug/ exist, "
        "else train.txt"
    )  # fmt: skip
    class_names: list[str] = setting([], "class names in label-id order; empty: the preset's")
    palette: list[list[int]] = setting(
        [], "RGB per class for masks and overlays; empty: the preset's", check=_rgb_triples
    )
    ignore_index: int = setting(
        255, "folder / synthetic: label id never trained on nor scored (named kinds: 255, camvid 11)"
    )
    num_train: int = setting(320, "synthetic: images in the train split", ge=1)
    num_val: int = setting(64, "synthetic: images in the val split (and in the test split)", ge=1)
    image_size: list[int] = setting([96, 128], "synthetic: [H, W] of every image", lengths=(2,), ge=1)
    resize: list[int] = setting([], "[H, W] to resize every sample to; empty: keep", lengths=(0, 2), ge=1)
    batch_size: int = setting(8, "training images per batch (per process)", ge=1)
    val_batch_size: int = setting(8, "evaluation images per batch (per process)", ge=1)
    num_workers: int = setting(0, "DataLoader worker processes; 0: load in the main process", ge=0)


FILE_KINDS = ("folder", "camvid", "cityscapes", "ade20k", "voc")  # data kinds read from data.root
SPLITS = ("train", "val", "test")  # the splits a dataset has; data.<split>_images/_masks name their folders
FOLDER_KINDS = ("folder", "camvid")  # kinds whose layout and label encoding the config describes


def _validate_data(data: DataConfig) -> None:
    """A file kind needs a root; split lists and mask formats describe folder / camvid data only."""
    if data.kind in FILE_KINDS and not data.root:
        raise ConfigError(f"data.root is required for data.kind={data.kind}; set data.root=/path/to/dataset")
    if data.kind in FOLDER_KINDS:
        return
    given = [f"data.{key}" for key in ("train_list", "val_list", "test_list") if getattr(data, key)]
    given += ["data.mask_format"] if data.mask_format != "index" else []
    if given and data.kind != "synthetic":
        raise ConfigError(
            f"{', '.join(given)} describe folder / camvid data; data.kind={data.kind} has its own layout and "
            f"label encoding: remove them, or use data.kind=folder"
        )


@dataclass
class AugmentConfig:
    """Training augmentation and input normalization."""

    hflip: float = setting(0.5, "probability of a horizontal flip", ge=0.0, le=1.0)
    scale: list[float] = setting([1.0, 1.0], "[low, high] random scale range", lengths=(2,), gt=0.0, check=_low_high)
    crop: list[int] = setting([], "[H, W] random crop (padded with ignore); empty: none", lengths=(0, 2), ge=1)
    color_jitter: float = setting(0.0, "probability of brightness/contrast jitter", ge=0.0, le=1.0)
    mean: list[float] = setting([0.5, 0.5, 0.5], "RGB mean in [0, 1] subtracted per channel", lengths=(3,))
    std: list[float] = setting([0.5, 0.5, 0.5], "RGB std in [0, 1] divided per channel", lengths=(3,), gt=0.0)
    pad_divisor: int = setting(32, "eval images are padded to a multiple of this (with the ignore id)", ge=1)


@dataclass
class ModelConfig:
    """Segmentation network (segmentation_models_pytorch)."""

    arch: str = setting("Unet", "any segmentation_models_pytorch architecture")
    encoder: str = setting("resnet18", "any smp encoder name")
    encoder_weights: str | None = setting(None, "null | smp weight set name | local state-dict path")
    encoder_depth: int = setting(5, "encoder stages used by the decoder", ge=1, le=5)
    refine_head: int = setting(0, "width of a small logit-correcting head on top of the model; 0: none", ge=0)
    sync_bn: bool = setting(False, "under torchrun: batch-norm statistics over all processes (SyncBatchNorm, CUDA)")


@dataclass
class OhemConfig:
    """Pixel-level online hard example mining (see docs/ohem.md)."""

    mode: MiningMode = setting("threshold", "threshold | topk | none (plain cross-entropy)")
    thresh: float = setting(0.7, "threshold mode: keep pixels whose true-class probability is below", gt=0.0, le=1.0)
    min_kept: int | float | str = setting(
        0.1,
        "threshold mode: at least this many per image: 1000 pixels, 0.1 or '10%'",
        check=_pixel_amount(positive=False),
    )
    top_k: int | float | str = setting(
        0.2, "topk mode: the hardest per image: 1000 pixels, 0.2 or '20%'", check=_pixel_amount(positive=True)
    )
    scope: MiningScope = setting("image", "image (per-image selection) | batch (mmseg/HRNet behaviour)")
    warmup_steps: int = setting(0, "ramp the kept share from 100% to the target over N steps", ge=0)
    class_weight: list[float] = setting([], "per-class loss weights; empty: none", ge=0.0)
    class_weight_predicted: bool = setting(
        False, "each kept pixel weighs the larger of its true and its predicted class's weight, so a false "
        "prediction of a heavy class costs what missing it does (needs class weights: ohem.class_weight, "
        "mining.class_weight_power or refine.class_weight_power)",
    )  # fmt: skip
    class_min_kept: int | float | str = setting(
        0, "per image, each class present also keeps at least this many of its hardest pixels: 100 pixels, "
        "0.2 or '20%' of that class's pixels; 0: no quota", check=_pixel_amount(positive=False),
    )  # fmt: skip
    neg_ratio: float = setting(
        0.0, "two classes (e.g. data.mask_format=binary): mine label-1 pixels (positives) by mode and keep this many "
        "hardest label-0 pixels (negatives) per kept positive, a sigmoid loss; 0: off", ge=0.0,
    )  # fmt: skip
    min_neg: int | float | str = setting(
        0.01, "with neg_ratio: at least this many negatives per image (100, 0.01 or '1%')",
        check=_pixel_amount(positive=False),
    )  # fmt: skip
    ce_weight: float = setting(1.0, "weight of the OHEM cross-entropy in the loss", ge=0.0)
    region_loss: RegionLossName = setting(
        "none", "none | dice | lovasz | focal: segmentation-models-pytorch's loss on the kept pixels, added"
    )
    region_weight: float = setting(1.0, "weight of region_loss", ge=0.0)


@dataclass
class MiningConfig:
    """Online, dictionary-driven choice of what the model sees while it trains (see docs/ohem.md)."""

    start_epoch: int = setting(
        2, "first epoch (from 1) the dictionary steers crops, the sampler and recall weights", ge=1
    )
    hard_crop_prob: float = setting(
        0.0, "probability a training crop (augment.crop) is centred on a cell drawn by the dictionary's hardness",
        ge=0.0, le=1.0,
    )  # fmt: skip
    crop_sharpness: float = setting(1.0, "hard crops: a cell is drawn in proportion to its hardness ** this", ge=0.0)
    rare_crop_prob: float = setting(
        0.0, "probability a training crop is centred on a pixel of a rare class present in the image", ge=0.0, le=1.0
    )
    rare_power: float = setting(
        1.0, "rare crops: a class present is drawn in proportion to its pixel frequency ** -this", ge=0.0, le=8.0
    )
    paste_prob: float = setting(
        0.0, "probability a training crop gets a hard rare-class region pasted in from another image, labels "
        "with it (ClassMix-style; class by frequency ** -rare_power x its hard share, source image by its hard "
        "pixels of it)",
        ge=0.0, le=1.0,
    )  # fmt: skip
    candidates: int = setting(
        1, "the paper's read-only network: each training image offers this many crops, scored by a no-grad forward; "
        "the hardest is trained on (1: off)", ge=1,
    )  # fmt: skip
    candidate_scale: float = setting(0.5, "candidates are scored at this fraction of the crop size", gt=0.0, le=1.0)
    sampler: RefineSampler = setting(
        "none", "none | image | class: draw training images by their hardness in the dictionary (see refine.sampler)"
    )
    sampler_floor: float = setting(0.3, "no image is drawn less than this fraction of the mean rate", ge=0.0, le=1.0)
    class_weight_power: float = setting(
        0.0, "recall weights: each epoch, the cross-entropy's class weights become the share of each class's "
        "pixels the dictionary's latest epoch missed (hard and predicted wrong: 1 - training recall under "
        "threshold OHEM) ** this, mean 1, times ohem.class_weight (0: off)", ge=0.0, le=8.0,
    )  # fmt: skip
    class_weight_momentum: float = setting(
        0.0, "recall weights: earlier epochs' missed and valid pixels count with this factor per epoch of age "
        "(0: the latest epoch alone)", ge=0.0, lt=1.0,
    )  # fmt: skip
    class_weight_floor: float = setting(
        0.0, "recall weights: a class's recall factor below this is raised to it, after the mean-1 "
        "normalization and before the product with ohem.class_weight (1: the classes the model gets right all "
        "keep factor 1, not weighed down against each other; 0: off)", ge=0.0, le=1.0,
    )  # fmt: skip

    @property
    def places_crops(self) -> bool:
        """Whether training crops are made by `segohem.mining.DictionaryCropDataset`."""
        return self.hard_crop_prob > 0 or self.rare_crop_prob > 0 or self.paste_prob > 0 or self.candidates > 1


@dataclass
class BankConfig:
    """The hard-pixel dictionary kept across steps."""

    enabled: bool = setting(True, "keep the hard-pixel dictionary (hard_pixels.sqlite in the run folder)")
    cell_size: int = setting(8, "spatial hardness maps use cells of this many original-image pixels", ge=1)
    momentum: float = setting(0.5, "weight of the past in per-image EMAs and per-cell decayed sums", ge=0.0, lt=1.0)


@dataclass
class RefineConfig:
    """A refinement stage driven by a hard-pixel dictionary."""

    init: str = setting("", "checkpoint to continue from (e.g. runs/x/epoch015.pt); empty: no refinement stage")
    bank: str = setting("", "hard-pixel store driving the stage (e.g. from `segohem mine`); empty: the checkpoint's")
    sampler: RefineSampler = setting(
        "none", "none | image (EMA kept fraction x hard loss) | class (equal mass per class)"
    )
    sampler_floor: float = setting(0.3, "no image is drawn less than this fraction of the mean rate", ge=0.0, le=1.0)
    hard_crop_prob: float = setting(0.0, "probability a sample is a crop centred on a hard region", ge=0.0, le=1.0)
    crop_scale: float = setting(1.0, "hard crops come from the image resized by this (2.0: half-res to full)", gt=0.0)
    crop_sharpness: float = setting(2.0, "crop centres are drawn in proportion to hardness ** this", ge=0.0)
    pixel_weight: float = setting(0.0, "alpha: kept pixels weigh 1 + alpha * their cell's stored hardness", ge=0.0)
    class_weight_power: float = setting(
        0.0, "gamma: class c weighs (its hard fraction in the bank) ** gamma, mean 1", ge=0.0
    )


@dataclass
class WandbConfig:
    """Weights & Biases logging."""

    mode: WandbMode = setting("auto", "auto (online with credentials, else offline) | online | offline | disabled")
    project: str = setting("segohem", "W&B project")
    entity: str = setting("", "W&B entity (user or team); empty: the default one")
    name: str = setting("", "W&B run name; empty: run.name")
    group: str = setting("", "W&B group; empty: none")
    tags: list[str] = setting([], "W&B tags")
    log_checkpoints: bool = setting(True, "checkpoints and the dictionary as artifacts (aliases latest / best)")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: OptimizerName = setting("adamw", "adamw | sgd")
    lr: float = setting(1e-3, "peak learning rate", gt=0.0)
    weight_decay: float = setting(1e-4, "decoupled (adamw) or L2 (sgd) weight decay", ge=0.0)
    momentum: float = setting(0.9, "sgd only", ge=0.0, lt=1.0)
    warmup_iters: int = setting(0, "linear LR warm-up, in optimizer steps", ge=0)
    poly_power: float = setting(0.9, "poly decay exponent over the whole run", ge=0.0)
    min_lr: float = setting(0.0, "learning rate at the end of the poly decay (<= lr)", ge=0.0)
    accumulate: int = setting(1, "gradient accumulation: batches per optimizer step", ge=1)
    clip_grad_norm: float = setting(0.0, "clip the gradient norm to this; 0 disables clipping", ge=0.0)


@dataclass
class TrainConfig:
    """Training length, precision, evaluation and logging cadence."""

    epochs: int = setting(8, "passes over the train split", ge=1)
    max_steps: int = setting(0, "stop after this many optimizer steps in total; 0: no limit", ge=0)
    amp: AmpMode = setting("none", "none | bf16 | fp16 (CUDA only; ignored with a warning on CPU)")
    channels_last: bool = setting(False, "model and inputs in channels-last memory format (faster GPU convolutions)")
    compile: bool = setting(False, "torch.compile the model for training (first steps are slow while it compiles)")
    eval_every: int = setting(1, "epochs between evaluations", ge=1)
    log_every: int = setting(10, "steps between metric log lines", ge=1)
    progress: bool = setting(True, "show progress bars")
    snapshot_epochs: list[int] = setting([], "also keep epochNNN.pt after these epochs", ge=1)
    num_panels: int = setting(4, "fixed, seeded validation images drawn at each evaluation (0: none)", ge=0)
    num_bank_rows: int = setting(16, "hardest training images shown from the dictionary at each evaluation", ge=0)
    max_nonfinite_steps: int = setting(
        5, "stop (exit status 3) after this many non-finite steps in a row; each is skipped", ge=1
    )


@dataclass
class EvalConfig:
    """How validation, eval, predict, mine and the panels compute logits (segohem.engine.inference)."""

    mode: EvalMode = setting("whole", "whole (the padded image in one pass) | slide (crop windows every stride)")
    crop: list[int] = setting([], "slide: [H, W] of each window (required for slide)", lengths=(0, 2), ge=1)
    stride: list[int] = setting(
        [], "slide: [H, W] between windows, <= crop; overlaps are averaged (required for slide)", lengths=(0, 2), ge=1
    )
    flip: bool = setting(False, "also infer the horizontally flipped image; probabilities are averaged")
    scales: list[float] = setting(
        [1.0], "infer the image resized by each scale; probabilities are averaged", gt=0.0, check=_non_empty
    )
    batch_windows: int = setting(4, "slide: windows per forward pass", ge=1)


@dataclass
class Config:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    ohem: OhemConfig = dataclasses.field(default_factory=OhemConfig)
    mining: MiningConfig = dataclasses.field(default_factory=MiningConfig)
    bank: BankConfig = dataclasses.field(default_factory=BankConfig)
    refine: RefineConfig = dataclasses.field(default_factory=RefineConfig)
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load`` that also reads YAML 1.2 floats: ``1e-4`` is a float, not a string."""


class _Dumper(yaml.SafeDumper):
    """``yaml.safe_dump`` that quotes strings `_Loader` would read as floats (a run named ``1e3``)."""


_YAML12_FLOAT = re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+$")
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(annotation))
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _check_type(value: Any, annotation: Any, path: str) -> Any:
    """Return ``value`` converted to ``annotation`` (int -> float allowed), or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _check_type(value, option, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_type_name(annotation)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        choices = typing.get_args(annotation)
        if isinstance(value, str) and value in choices:
            return value
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(choices)}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_check_type(item, item_type, f"{path}[{i}]") for i, item in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and (type(value) is annotation):
        return value
    raise ConfigError(f"{path}: expected {annotation.__name__}, got {value!r} ({type(value).__name__})")


def _numbers(value: Any, path: str) -> Iterator[tuple[str, float]]:
    """(dotted path, number) for a number or every number inside nested lists."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


def _check_limits(value: Any, meta: typing.Mapping[str, Any], path: str) -> None:
    """Raise ConfigError naming ``path``, the value and what would work if a limit in ``meta`` fails."""
    doc, lengths = meta["doc"], meta["lengths"]
    if lengths and len(value) not in lengths:
        allowed = " or ".join(str(n) for n in lengths)
        raise ConfigError(f"{path}: {value!r} has {len(value)} values; use {allowed} ({doc})")
    bounds = [(meta["ge"], ">=", operator.ge), (meta["gt"], ">", operator.gt)]
    bounds += [(meta["le"], "<=", operator.le), (meta["lt"], "<", operator.lt)]
    rule = " and ".join(f"{op} {limit}" for limit, op, _ in bounds if limit is not None)
    for where, number in _numbers(value, path):
        if not all(holds(number, limit) for limit, _, holds in bounds if limit is not None):  # False for NaN
            raise ConfigError(f"{where}: {number!r} is out of range; use a value {rule} ({doc})")
    problem = meta["check"](value) if meta["check"] else None
    if problem:
        raise ConfigError(f"{path}: {value!r} {problem} ({doc})")


def _build(cls: type, values: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{path + '.' if path else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{dotted}'{hint} (valid: {', '.join(fields)})")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping of its keys, got {value!r}")
            kwargs[key] = _build(hints[key], value, dotted)
        else:
            kwargs[key] = _check_type(value, hints[key], dotted)
    section = cls(**kwargs)
    for name, spec in fields.items():
        if "doc" in spec.metadata:
            _check_limits(getattr(section, name), spec.metadata, f"{path}.{name}")
    return section


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section")
        node = child
    node[leaf] = value


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what the YAML parser found wrong and where (line and column, 1-based)."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def parse_override(text: str) -> tuple[str, Any]:
    """``'optim.lr=1e-4'`` -> ``('optim.lr', 0.0001)``; the value is parsed as YAML (1.2 floats)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""  # a SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({yaml_problem(err)})") from err
    return key.strip(), value


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, base: dict[str, Any] | None = None
) -> Config:
    """Load a YAML file (or a ``base`` dict, e.g. a checkpoint's config), then apply
    ``key.sub=value`` overrides; missing keys take the defaults."""
    tree: dict[str, Any] = copy.deepcopy(base) if base else {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
        try:
            tree = yaml.load(text, Loader=_Loader) or {}  # a SafeLoader
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(err)}") from err
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    from_file = copy.deepcopy(tree) if path is not None else None
    for item in overrides or []:
        _set_dotted(tree, *parse_override(item))
    try:
        config = _build(Config, tree, "")
        validate(config)
    except ConfigError as err:
        if from_file is not None and _fails_alone(from_file, str(err)):
            raise ConfigError(f"{err} (in {path})") from err  # the key is in the file: name it
        raise
    return config


def _fails_alone(tree: dict[str, Any], message: str) -> bool:
    """Whether the settings of a config file alone give the error ``message``."""
    try:
        validate(_build(Config, copy.deepcopy(tree), ""))
    except ConfigError as err:
        return str(err) == message
    return False


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    """Write the config as YAML, atomically (a refused write leaves the previous file)."""
    write_atomically(Path(path), yaml.dump(config_to_dict(config), Dumper=_Dumper, sort_keys=False).encode())


def _flow_yaml(value: Any) -> str:
    """``value`` as one line of flow-style YAML (wrapped in a list so scalars need no end marker)."""
    text = yaml.dump([value], Dumper=_Dumper, default_flow_style=True, width=1 << 30, allow_unicode=True)
    return text.strip()[1:-1]


def describe_config(config: Config) -> str:
    """The resolved config as YAML with each field's documentation as a comment beside it.

    What ``segohem train --print-config`` prints; ``load_config`` of it gives back ``config``.
    """
    lines: list[str] = []
    for section_field in dataclasses.fields(config):
        section = getattr(config, section_field.name)
        lines.append(f"{section_field.name}:  # {type(section).__doc__}")
        for spec in dataclasses.fields(section):
            lines.append(f"  {spec.name}: {_flow_yaml(getattr(section, spec.name))}  # {spec.metadata['doc']}")
        lines.append("")
    return "\n".join(lines)


def validate(config: Config) -> None:
    """Checks that span several fields (one field's limits sit in its `setting`)."""
    optim = config.optim
    _validate_data(config.data)
    if optim.min_lr > optim.lr:
        raise ConfigError(
            f"optim.min_lr: {optim.min_lr} is above optim.lr={optim.lr}; use a min_lr <= lr (the end of the decay)"
        )
    _validate_eval(config.eval)
    _validate_mining(config)
    _validate_multilabel(config)


def _validate_multilabel(config: Config) -> None:
    """Multi-label masks train a sigmoid per class (`segohem.ohem.PackedMultiLabel`); the options that
    assume one class per pixel (softmax weights, quotas, region losses, class-located crops) are refused."""
    if config.data.mask_format != "multilabel":
        return
    if config.data.kind != "folder":
        raise ConfigError(f"data.mask_format=multilabel reads data.kind=folder masks, not data.kind={config.data.kind}")
    ohem, mining, refine = config.ohem, config.mining, config.refine
    single_label = {
        "ohem.class_weight": bool(ohem.class_weight), "ohem.class_min_kept": bool(ohem.class_min_kept),
        "ohem.class_weight_predicted": ohem.class_weight_predicted, "ohem.scope=batch": ohem.scope != "image",
        "ohem.warmup_steps": bool(ohem.warmup_steps),
        "ohem.region_loss": ohem.region_loss != "none", "ohem.ce_weight": ohem.ce_weight != 1.0,
        "mining.hard_crop_prob / rare_crop_prob / paste_prob / candidates": mining.places_crops,
        "mining.sampler": mining.sampler != "none", "refine.sampler=class": refine.sampler == "class",
        "refine.class_weight_power": bool(refine.class_weight_power),
        "mining.class_weight_power": bool(mining.class_weight_power),
        "model.refine_head": bool(config.model.refine_head),
    }  # fmt: skip
    given = [key for key, on in single_label.items() if on]
    if given:
        raise ConfigError(
            f"{', '.join(given)}: not available with data.mask_format=multilabel (a pixel may hold several classes "
            f"or none); remove them"
        )


def _validate_mining(config: Config) -> None:
    """Dictionary crops need crops, a dictionary and probabilities that add up to at most 1."""
    mining = config.mining
    if mining.hard_crop_prob + mining.rare_crop_prob > 1.0:
        raise ConfigError(
            f"mining.hard_crop_prob + mining.rare_crop_prob = {mining.hard_crop_prob + mining.rare_crop_prob:g} "
            f"is above 1; they are shares of the training crops"
        )
    if mining.places_crops and not config.augment.crop:
        raise ConfigError(
            "mining.hard_crop_prob / rare_crop_prob / paste_prob / candidates choose training crops: set "
            "augment.crop=[H, W] as well"
        )
    driven = [f"mining.{key}" for key, on in (("hard_crop_prob", mining.hard_crop_prob > 0),
              ("rare_crop_prob", mining.rare_crop_prob > 0), ("paste_prob", mining.paste_prob > 0),
              ("sampler", mining.sampler != "none"),
              ("class_weight_power", mining.class_weight_power > 0)) if on]  # fmt: skip
    if driven and not config.bank.enabled:
        raise ConfigError(f"{', '.join(driven)} is driven by the hard-pixel dictionary: set bank.enabled=true")
    if config.ohem.class_weight_predicted and not (
        config.ohem.class_weight or mining.class_weight_power > 0 or config.refine.class_weight_power > 0
    ):
        raise ConfigError(
            "ohem.class_weight_predicted weighs a pixel by its true and its predicted class's weights, and there are "
            "none: set ohem.class_weight, mining.class_weight_power or refine.class_weight_power"
        )
    for key, value, does in (("class_weight_momentum", mining.class_weight_momentum, "smooths"),
                             ("class_weight_floor", mining.class_weight_floor, "floors")):  # fmt: skip
        if value > 0 and not mining.class_weight_power > 0:
            raise ConfigError(
                f"mining.{key}={value:g} {does} the recall weights, which are off: set mining.class_weight_power "
                f"as well (e.g. 1)"
            )
    if mining.candidates > 1 and config.ohem.scope != "image":
        raise ConfigError(
            "mining.candidates scores each crop by its own kept pixels: ohem.scope=batch would let the other "
            "images of the batch decide; use ohem.scope=image"
        )
    if mining.sampler != "none" and config.refine.sampler != "none":
        raise ConfigError("mining.sampler and refine.sampler both draw the training images; set one of them to none")


def _validate_eval(cfg: EvalConfig) -> None:
    """Slide inference needs a window and a stride that leaves no pixel uncovered."""
    if cfg.mode != "slide":
        return
    for key in ("crop", "stride"):
        if not getattr(cfg, key):
            raise ConfigError(
                f"eval.{key} is required for eval.mode=slide; set [H, W], e.g. eval.crop=[512,1024] "
                f"eval.stride=[341,682]"
            )
    if any(step > size for step, size in zip(cfg.stride, cfg.crop, strict=True)):
        raise ConfigError(
            f"eval.stride: {cfg.stride} is larger than eval.crop={cfg.crop}, which leaves pixels no window covers; "
            f"use a stride <= crop in each dimension (e.g. two thirds of the crop)"
        )
