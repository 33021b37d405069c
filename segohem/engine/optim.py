"""Optimizers and the poly learning-rate schedule with linear warm-up."""

from __future__ import annotations

import torch
from torch import nn

from segohem.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    builders = {
        "adamw": lambda: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
        "sgd": lambda: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
    }
    if cfg.name not in builders:
        raise ValueError(f"optim.name {cfg.name!r} is unknown; valid: {', '.join(builders)}")
    return builders[cfg.name]()


def poly_lr_factor(step: int, *, total_steps: int, warmup_steps: int, power: float, min_factor: float) -> float:
    """Multiplier of the base LR at optimizer ``step``: linear warm-up, then poly decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, step / max(1, total_steps))
    return min_factor + (1.0 - min_factor) * (1.0 - progress) ** power


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    min_factor = cfg.min_lr / cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: poly_lr_factor(
            step, total_steps=total_steps, warmup_steps=cfg.warmup_iters, power=cfg.poly_power, min_factor=min_factor
        ),
    )
