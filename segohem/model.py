"""Build segmentation-models-pytorch models by name; load encoder weights from a local file."""

from __future__ import annotations

from pathlib import Path

import segmentation_models_pytorch as smp
import torch
from torch import nn

from segohem.config import ConfigError, ModelConfig


def build_model(cfg: ModelConfig, *, num_classes: int) -> nn.Module:
    """smp ``create_model`` from config; ``encoder_weights`` may be a local state-dict path.

    A path (anything containing a path separator or ending in .pth/.pt) is loaded strictly
    into ``model.encoder``, for machines that cannot reach a model hub.
    """
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
    return model
