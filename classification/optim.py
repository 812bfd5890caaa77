"""Optimizers and the schedule of the two recipes.

- fine-tuning (full or partial): AdamW (0.9, 0.999) over ``mae_backbone.layer_decay_param_groups``
  (each group's ``lr_scale`` = layer_decay ** (num_layers - 1 - layer_id), from the ViT's
  ``layer_id`` hook; no weight decay on norms, biases, ``pos_embed``, ``cls_token``); frozen
  parameters are not in any group;
- linear probing: LARS (timm ``Lars``, momentum 0.9, trust coefficient 0.001) on the head, with
  the trust ratio on the weight only and no weight decay (the official MAE ``util/lars.py``);
- schedule: timm ``CosineLRScheduler`` per optimizer step: linear warmup from 0, then half-cosine
  to ``min_lr`` (the official MAE ``adjust_learning_rate``); a pure function of the step.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mae_backbone import layer_decay_param_groups


def build_optimizer(model: nn.Module, protocol: str, lr: float, weight_decay: float,
                    layer_decay: float = 1.0) -> torch.optim.Optimizer:
    """The recipe's optimizer over the trainable parameters of ``model`` (see the module doc)."""
    if protocol == "linprobe":
        from timm.optim import Lars

        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        weights = [p for _, p in params if p.ndim > 1]
        others = [p for _, p in params if p.ndim <= 1]
        groups = [dict(params=weights, always_adapt=True, weight_decay=weight_decay, lr_scale=1.0,
                       param_names=[n for n, p in params if p.ndim > 1])]
        if others:
            groups.append(dict(params=others, always_adapt=False, weight_decay=0.0, lr_scale=1.0,
                               param_names=[n for n, p in params if p.ndim <= 1]))
        return Lars(groups, lr=lr, momentum=0.9, weight_decay=weight_decay, trust_coeff=0.001)
    groups = layer_decay_param_groups(model, weight_decay, layer_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


def build_scheduler(optimizer: torch.optim.Optimizer, min_lr: float, warmup_steps: int, total_steps: int) -> Any:
    """timm ``CosineLRScheduler`` in optimizer steps: call ``step_update(step)`` before each step.

    lr(step) = lr * step / warmup for step < warmup, then
    min_lr + (lr - min_lr) * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2,
    times each group's ``lr_scale``.
    """
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup_steps), lr_min=min_lr,
                             warmup_t=warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
