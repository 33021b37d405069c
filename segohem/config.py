"""Typed, documented, validated configuration: YAML plus dotted ``key.sub=value`` overrides.

Each section is a dataclass; each field's comment is its documentation. Unknown keys and
wrong types are errors that name the dotted path and suggest the closest valid key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value, key or file is wrong; the message says where and what would work."""


@dataclass
class RunConfig:
    name: str = "synthetic-ohem"  # run folder name under output_dir
    output_dir: str = "runs"  # parent folder of run folders
    seed: int = 0  # seeds model init, batch order and augmentation
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class DataConfig:
    kind: str = "synthetic"  # synthetic | folder | camvid
    root: str = ""  # dataset root for folder / camvid
    train_images: str = "train"  # folder kind: image folder of the train split, relative to root
    train_masks: str = "trainannot"  # folder kind: label PNG folder of the train split
    val_images: str = "val"
    val_masks: str = "valannot"
    class_names: list[str] = field(default_factory=list)  # empty: preset's names
    palette: list[list[int]] = field(default_factory=list)  # RGB per class; empty: preset's
    ignore_index: int = 255  # label id that is never trained on nor scored
    num_train: int = 320  # synthetic: images in the train split
    num_val: int = 64  # synthetic: images in the val split
    image_size: list[int] = field(default_factory=lambda: [96, 128])  # synthetic: H, W
    resize: list[int] = field(default_factory=list)  # [H, W] to resize every sample to; empty: keep
    batch_size: int = 8
    val_batch_size: int = 8
    num_workers: int = 0


@dataclass
class AugmentConfig:
    hflip: float = 0.5  # probability of a horizontal flip
    scale: list[float] = field(default_factory=lambda: [1.0, 1.0])  # random scale range
    crop: list[int] = field(default_factory=list)  # [H, W] random crop (padded with ignore); empty: none
    color_jitter: float = 0.0  # probability of brightness/contrast jitter
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # RGB in [0,1], per channel
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    pad_divisor: int = 32  # eval images are padded to a multiple of this (with the ignore id)


@dataclass
class ModelConfig:
    arch: str = "Unet"  # any segmentation_models_pytorch architecture
    encoder: str = "resnet18"  # any smp encoder name
    encoder_weights: str | None = None  # None | smp weight set name | local state-dict path
    encoder_depth: int = 5
    refine_head: int = 0  # width of a small logit-correcting refinement head on top of the model; 0: none


@dataclass
class OhemConfig:
    mode: str = "threshold"  # threshold | topk | none (plain cross-entropy)
    thresh: float = 0.7  # threshold mode: keep pixels whose true-class probability is below
    min_kept: int | float = 0.1  # threshold mode: int = pixels per image, float = fraction of valid
    top_k: int | float = 0.2  # topk mode: int = pixels per image, float = fraction of valid
    scope: str = "image"  # image (per-image selection) | batch (mmseg/HRNet behaviour)
    warmup_steps: int = 0  # ramp the kept fraction from 100% to the target over N steps
    class_weight: list[float] = field(default_factory=list)  # per-class loss weights; empty: none


@dataclass
class BankConfig:
    enabled: bool = True  # keep the hard-pixel dictionary (hard_pixels.sqlite in the run folder)
    cell_size: int = 8  # spatial hardness maps use cells of this many original-image pixels
    momentum: float = 0.5  # weight of the past in per-image EMAs and per-cell decayed sums


@dataclass
class RefineConfig:
    init: str = ""  # checkpoint to continue from (e.g. runs/x/epoch015.pt); empty: no refinement stage
    bank: str = ""  # hard-pixel store driving the stage (e.g. from `segohem mine`); empty: the checkpoint's
    sampler: str = "none"  # none | image (EMA kept fraction x hard loss) | class (equal mass per class)
    sampler_floor: float = 0.3  # no image is drawn less than this fraction of the mean rate
    hard_crop_prob: float = 0.0  # probability a sample is a crop centred on a hard region
    crop_scale: float = 1.0  # hard crops come from the image resized by this (2.0 on half-res = full-res)
    crop_sharpness: float = 2.0  # crop centres are drawn in proportion to hardness ** this
    pixel_weight: float = 0.0  # alpha: kept pixels weigh 1 + alpha * their cell's stored hardness
    class_weight_power: float = 0.0  # gamma: class c weighs (its hard fraction in the bank) ** gamma, mean 1


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto (online with credentials, else offline) | online | offline | disabled; WANDB_MODE wins
    project: str = "segohem"
    entity: str = ""
    name: str = ""  # empty: run.name
    group: str = ""
    tags: list[str] = field(default_factory=list)
    log_checkpoints: bool = True  # checkpoints and the dictionary as artifacts (aliases latest / best)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    warmup_iters: int = 0  # linear LR warm-up, in optimizer steps
    poly_power: float = 0.9  # poly decay exponent over the whole run
    min_lr: float = 0.0
    accumulate: int = 1  # gradient accumulation: batches per optimizer step
    clip_grad_norm: float = 0.0  # 0 disables clipping


@dataclass
class TrainConfig:
    epochs: int = 8
    max_steps: int = 0  # stop after this many optimizer steps in total; 0: no limit
    amp: str = "none"  # none | bf16 | fp16 (CUDA only; ignored with a warning on CPU)
    eval_every: int = 1  # epochs between evaluations
    log_every: int = 10  # steps between metric log lines
    progress: bool = True  # show progress bars
    snapshot_epochs: list[int] = field(default_factory=list)  # also keep epochNNN.pt after these epochs
    num_panels: int = 4  # fixed, seeded validation images drawn at each evaluation (0: none)
    num_bank_rows: int = 16  # hardest training images shown from the dictionary at each evaluation


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ohem: OhemConfig = field(default_factory=OhemConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.kind": ("synthetic", "folder", "camvid"),
    "ohem.mode": ("threshold", "topk", "none"),
    "ohem.scope": ("image", "batch"),
    "optim.name": ("adamw", "sgd"),
    "refine.sampler": ("none", "image", "class"),
    "train.amp": ("none", "bf16", "fp16"),
    "wandb.mode": ("auto", "online", "offline", "disabled"),
}


def _check_type(value: Any, annotation: Any, path: str) -> Any:
    """Return ``value`` converted to ``annotation`` (int -> float allowed), or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _check_type(value, option, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} is not a {annotation}")
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


def _build(cls: type, values: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{path + '.' if path else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{dotted}'{hint} (valid: {', '.join(names)})")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping of its keys, got {value!r}")
            kwargs[key] = _build(hints[key], value, dotted)
        else:
            kwargs[key] = _check_type(value, hints[key], dotted)
            if dotted in CHOICES and kwargs[key] not in CHOICES[dotted]:
                raise ConfigError(f"{dotted}: {value!r} is not one of {', '.join(CHOICES[dotted])}")
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``'optim.lr=0.01'`` -> ``('optim.lr', 0.01)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


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
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    for item in overrides or []:
        _set_dotted(tree, *parse_override(item))
    config = _build(Config, tree, "")
    validate(config)
    return config


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def validate(config: Config) -> None:
    """Cross-field checks that a type alone cannot express."""
    ohem, data, optim, augment = config.ohem, config.data, config.optim, config.augment
    if not 0.0 < ohem.thresh <= 1.0:
        raise ConfigError(f"ohem.thresh: {ohem.thresh} is a probability in (0, 1]")
    for key, amount in (("ohem.min_kept", ohem.min_kept), ("ohem.top_k", ohem.top_k)):
        if amount < 0 or (isinstance(amount, float) and amount > 1):
            raise ConfigError(f"{key}: {amount} must be a count >= 0 or a fraction in [0, 1]")
    for key, size in (
        ("data.image_size", data.image_size),
        ("data.resize", data.resize),
        ("augment.crop", augment.crop),
    ):
        if size and (len(size) != 2 or min(size) <= 0):
            raise ConfigError(f"{key}: {size} must be [height, width] with positive values")
    if len(augment.scale) != 2 or not 0 < augment.scale[0] <= augment.scale[1]:
        raise ConfigError(f"augment.scale: {augment.scale} must be [low, high] with 0 < low <= high")
    if len(augment.mean) != 3 or len(augment.std) != 3 or min(augment.std) <= 0:
        raise ConfigError("augment.mean and augment.std need 3 values each, std > 0")
    if data.kind in ("folder", "camvid") and not data.root:
        raise ConfigError(f"data.root is required for data.kind={data.kind}")
    if data.batch_size < 1 or data.val_batch_size < 1 or optim.accumulate < 1:
        raise ConfigError("data.batch_size, data.val_batch_size and optim.accumulate must be >= 1")
    if optim.lr <= 0:
        raise ConfigError(f"optim.lr: {optim.lr} must be > 0")
    if config.bank.cell_size < 1 or not 0.0 <= config.bank.momentum < 1.0:
        raise ConfigError("bank.cell_size must be >= 1 and bank.momentum in [0, 1)")
    if config.train.epochs < 1:
        raise ConfigError(f"train.epochs: {config.train.epochs} must be >= 1")
