"""Optimizers and the schedule of the two recipes.

- fine-tuning (full or partial): AdamW (0.9, 0.999; the fused kernel, ``training.fastpath.fused_adamw``) over ``mae_backbone.layer_decay_param_groups``
  (each group's ``lr_scale`` = layer_decay ** (num_layers - 1 - layer_id), from the ViT's
  ``layer_id`` hook; no weight decay on norms, biases, ``pos_embed``, ``cls_token``); frozen
  parameters are not in any group;
- linear probing: LARS (timm ``Lars``, momentum 0.9, trust coefficient 0.001) on the head, with
  the trust ratio on the weight only and no weight decay (the official MAE ``util/lars.py``);
- schedule: the one of every trainer (``training.schedule``), per optimizer step: linear warmup
  from 0, then half-cosine to ``min_lr`` (the official MAE ``adjust_learning_rate``), times each
  group's ``lr_scale``; a pure function of the step.
"""
from __future__ import annotations

import torch
from torch import nn

from mae_backbone import layer_decay_param_groups
from training.fastpath import fused_adamw


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
    return fused_adamw(layer_decay_param_groups(model, weight_decay, layer_decay), lr, (0.9, 0.999))
