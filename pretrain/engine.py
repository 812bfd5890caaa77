"""The pretraining methods' part of the shared epoch loop (``training.loop.train_one_epoch``):
their ``StepRecipe``s.  ``PretrainSteps`` holds what they share (the schedule ``lr_at``, autocast,
the loop's limits); ``MaeStep`` adds the MAE's masked-patch loss (``pretrain.moco.MocoStep`` the
contrastive one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from pretrain.masking import mask_noise
from training.data import mix_seed
from training.loop import MicroBatch
from training.precision import amp_autocast
from training.schedule import set_lr


@dataclass
class PretrainSteps:
    """What the pretraining methods' ``StepRecipe``s share: the schedule ``lr_at``, autocast and the
    loop's limits.  Subclasses add ``micro_batch`` (their loss) and ``after_step``."""

    accum_iter: int
    lr_at: Callable[[int], float]
    amp_dtype: torch.dtype | None
    clip_grad: float | None
    max_nonfinite: int
    log_every: int
    epochs: int
    diverged_hint: ClassVar[str] = "Try a lower --blr, --clip-grad 3.0, or --precision bf16/fp32 instead of fp16."

    def apply_lr(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr_at(step)
        set_lr(optimizer, lr)
        return lr


@dataclass
class StepSetup(PretrainSteps):
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

    def after_step(self, model: nn.Module, step: int) -> None:
        pass
