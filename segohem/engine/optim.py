"""Optimizers and the poly learning-rate schedule with linear warm-up."""

from __future__ import annotations

from typing import Any

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


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any], *, allow_new: bool = False) -> int:
    """Load a saved optimizer state; with ``allow_new``, parameters added since (a new
    refinement head) start with fresh state.

    The new parameters must come after the saved ones in a single parameter group, which is
    how `build_optimizer` orders a `RefinedModel`. Returns how many parameters were added.
    """
    current = [len(group["params"]) for group in optimizer.param_groups]
    stored = [len(group["params"]) for group in saved["param_groups"]]
    if current == stored:
        optimizer.load_state_dict(saved)
        return 0
    if not allow_new or len(current) != 1 or len(stored) != 1 or current[0] < stored[0]:
        raise ValueError(
            f"the checkpoint's optimizer holds parameter groups of sizes {stored}; this model needs {current}"
        )
    added = current[0] - stored[0]
    group = dict(saved["param_groups"][0])
    first_new = max(group["params"], default=-1) + 1
    group["params"] = [*group["params"], *range(first_new, first_new + added)]
    optimizer.load_state_dict({"state": saved["state"], "param_groups": [group]})
    return added


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
