"""The pretraining methods' part of the shared epoch loop (``training.loop.train_one_epoch``):
their ``StepRecipe``s.  ``PretrainSteps`` (a ``training.loop.ScheduledStep``: the schedule
``lr_at``, autocast, the loop's limits) is what they share; ``MaeStep`` adds the MAE's masked-patch loss (``pretrain.moco.MocoStep`` the
contrastive one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from pretrain.masking import mask_noise
from training.data import mix_seed
from training.loop import MicroBatch, ScheduledStep
from training.precision import amp_autocast


@dataclass
class PretrainSteps(ScheduledStep):
    """What the pretraining methods' ``StepRecipe``s share besides ``ScheduledStep``: the hint."""

    diverged_hint: ClassVar[str] = "Try a lower --blr, --clip-grad 3.0, or --precision bf16/fp32 instead of fp16."


@dataclass
class MaeStep(PretrainSteps):
    """The MAE's ``StepRecipe``: masked-patch reconstruction loss, cosine schedule via ``lr_at``."""

    mask_ratio: float
    masking: str
    grid: tuple[int, int]

    def micro_batch(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> MicroBatch:
        """``batch`` from ``pretrain.data.collate``; each image's mask comes from its seed."""

        def loss() -> torch.Tensor:
            imgs = batch["images"].to(device, non_blocking=True)
            seeds = [mix_seed(int(s), 1) for s in batch["seeds"]]
            noise = mask_noise(self.masking, self.grid, self.mask_ratio, seeds=seeds, device=device)
            with amp_autocast(device, self.amp_dtype):
                value, _, _ = model(imgs, self.mask_ratio, noise=noise)
            return value

        return len(batch["seeds"]), loss
