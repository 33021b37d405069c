"""Build segmentation-models-pytorch models by name; load encoder weights from a local file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from segohem.config import ConfigError, ModelConfig


class RefinedModel(nn.Module):
    """A base smp model plus a small head that corrects its logits (PointRend's idea, dense).

    The head sees, at the output resolution, the base model's class probabilities, the
    decoder features its segmentation head reads and the input image, and adds a residual to
    the base logits. Its last layer starts at zero, so a freshly attached head leaves the
    base model's predictions unchanged; trained with the OHEM loss (and the dictionary's pixel
    weights) it only ever receives gradient from the pixels that are hard.
    """

    def __init__(self, base: nn.Module, *, num_classes: int, width: int) -> None:
        super().__init__()
        self.base = base
        head_input = base.segmentation_head[0]  # type: ignore[index]
        if not isinstance(head_input, nn.Conv2d):
            raise ConfigError(f"model.refine_head: {type(base).__name__} has no convolutional segmentation head")
        in_channels = num_classes + head_input.in_channels + 3
        correction = nn.Conv2d(width, num_classes, 1)
        nn.init.zeros_(correction.weight)
        nn.init.zeros_(correction.bias)  # type: ignore[arg-type]
        self.head = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            correction,
        )  # fmt: skip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        base: Any = self.base
        decoded = base.decoder(base.encoder(images))
        logits: torch.Tensor = base.segmentation_head(decoded)
        size = logits.shape[-2:]
        if decoded.shape[-2:] != size:
            decoded = F.interpolate(decoded, size=size, mode="bilinear", align_corners=False)
        if images.shape[-2:] != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        correction = self.head(torch.cat([logits.softmax(1), decoded, images], dim=1))
        return logits + correction


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """Load ``state`` into ``model``; a base model's weights may go into a `RefinedModel`.

    Returns ``"full"`` or ``"base"`` (a fresh refinement head on top of a base checkpoint).
    """
    if isinstance(model, RefinedModel) and not any(key.startswith("head.") for key in state):
        model.base.load_state_dict(state)
        return "base"
    model.load_state_dict(state)
    return "full"


def build_model(cfg: ModelConfig, *, num_classes: int) -> nn.Module:
    """smp ``create_model`` from config; ``encoder_weights`` may be a local state-dict path.

    A path (anything containing a path separator or ending in .pth/.pt) is loaded strictly
    into ``model.encoder``, for machines that cannot reach a model hub. ``refine_head`` > 0
    wraps the model in a `RefinedModel` with a head of that width.
    """
    if cfg.refine_head < 0:
        raise ConfigError(f"model.refine_head must be 0 (none) or a positive width, got {cfg.refine_head}")
    weights = cfg.encoder_weights
    is_path = weights is not None and ("/" in weights or weights.endswith((".pth", ".pt")))
    try:
        model = smp.create_model(
            cfg.arch, encoder_name=cfg.encoder, encoder_weights=None if is_path else weights,
            encoder_depth=cfg.encoder_depth, classes=num_classes, in_channels=3,
        )  # fmt: skip
    except (KeyError, ValueError) as err:
        raise ConfigError(f"model: cannot build {cfg.arch} with encoder {cfg.encoder!r}: {err}") from err
    if is_path:
        assert weights is not None
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"model.encoder_weights: no file at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            model.encoder.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ConfigError(
                f"model.encoder_weights: {path} does not match encoder {cfg.encoder!r}: {str(err)[:300]}"
            ) from err
    if cfg.refine_head:
        return RefinedModel(model, num_classes=num_classes, width=cfg.refine_head)
    return model
