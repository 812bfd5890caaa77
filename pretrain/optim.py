"""MAE's optimizer and schedule: AdamW (0.9, 0.95), lr = base lr x batch / 256, warmup + cosine.

The learning rate is a pure function of the optimizer step (``lr_at``), so a resumed run continues
the schedule exactly where it stopped.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mae_backbone import layer_decay_param_groups


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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr * group['lr_scale']``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05) -> torch.optim.AdamW:
    """AdamW(betas=(0.9, 0.95)); no weight decay on norms, biases, tokens and position embeddings.

    The groups come from ``mae_backbone.layer_decay_param_groups`` (no layer decay) with the
    model's ``no_weight_decay()`` names.  The fused kernel is used where torch has one for all
    parameters' devices (CPU, CUDA): same results, fewer passes over memory.
    """
    groups = layer_decay_param_groups(model, weight_decay, layer_decay=1.0)
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = devices <= {"cpu", "cuda"} and all(p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused)
