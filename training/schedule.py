"""The learning-rate schedule of every trainer: the linear scaling rule, linear warmup from 0 and a
half-cosine to ``min_lr`` (the official MAE ``adjust_learning_rate``), per optimizer step.

The learning rate is a pure function of the optimizer step (``lr_at``), so a resumed run continues
the schedule exactly where it stopped; ``set_lr`` puts it in place, times each parameter group's
``lr_scale`` (layer-wise lr decay).
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def absolute_lr(blr: float, effective_batch: int) -> float:
    """The linear scaling rule: ``blr * effective_batch / 256``."""
    return blr * effective_batch / 256


def lr_at(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warmup from 0, then half-cosine to ``min_lr``."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """``step -> lr_at(step, base_lr, min_lr, warmup_steps, total_steps)``: a run's schedule."""

    def at(step: int) -> float:
        return lr_at(step, base_lr, min_lr, warmup_steps, total_steps)

    return at


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr * group['lr_scale']``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
