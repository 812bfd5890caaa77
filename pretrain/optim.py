"""MAE's optimizer: AdamW (0.9, 0.95) (its lr: ``training.schedule``, base lr x batch / 256,
warmup + cosine).  With bf16 the run keeps bf16 working copies of the weights and this optimizer
steps the model's fp32 parameters, the masters (``training.fastpath.WorkingWeights``)."""
from __future__ import annotations

import torch
from torch import nn

from mae_backbone import layer_decay_param_groups
from training.fastpath import fused_adamw


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05) -> torch.optim.AdamW:
    """AdamW(betas=(0.9, 0.95)); no weight decay on norms, biases, tokens and position embeddings.

    The groups come from ``mae_backbone.layer_decay_param_groups`` (no layer decay) with the
    model's ``no_weight_decay()`` names.  The fused kernel is used where torch has one for all
    parameters' devices (CPU, CUDA): same results, fewer passes over memory.
    """
    return fused_adamw(layer_decay_param_groups(model, weight_decay, layer_decay=1.0), lr, (0.9, 0.95))
