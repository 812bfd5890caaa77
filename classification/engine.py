"""The classifier's training step and one evaluation pass.

Training runs in the shared epoch loop, ``training.loop.train_one_epoch`` (accumulation,
autocast, non-finite steps skipped everywhere and counted, ``max_nonfinite`` in a row stop the
run); ``ClassifierStep`` is what a classifier adds to it: per optimizer step, the learning rate
comes from the schedule at the global step (``training.schedule``, times each group's
``lr_scale``), micro-batches are mixed (mixup / cutmix) before the forward, and the EMA (if any)
follows each optimizer step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from classification.metrics import AccuracyMeter
from training.distributed import DistInfo, all_reduce_sum
from training.loop import EpochStats, MicroBatch, ScheduledStep, note_failures, train_one_epoch
from training.monitor import Monitor
from training.precision import amp_autocast, resolve_amp

__all__ = ["ClassifierStep", "EpochStats", "evaluate", "resolve_amp", "train_one_epoch"]


@dataclass
class ClassifierStep(ScheduledStep):
    """The classifier's ``training.loop.StepRecipe``: mixup / cutmix before the forward, the
    criterion after it, the EMA (if any) after each optimizer step."""

    criterion: nn.Module
    mixup: Any = None  # timm Mixup or None
    ema: Any = None  # timm ModelEmaV3 or None
    diverged_hint: ClassVar[str] = "Try a lower --blr, --clip-grad 5.0, or --precision bf16/fp32 instead of fp16."

    def micro_batch(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> MicroBatch:
        """``batch`` from ``classification.data.collate``; with mixup an odd batch drops its last
        image (timm's mixup pairs samples up)."""
        imgs, targets = batch["images"], batch["targets"]
        if self.mixup is not None and len(targets) % 2:
            imgs, targets = imgs[:-1], targets[:-1]

        def loss() -> torch.Tensor:
            x = imgs.to(device, non_blocking=True)
            y = targets.to(device, non_blocking=True)
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            with amp_autocast(device, self.amp_dtype):
                return self.criterion(model(x), y)

        return len(targets), loss

    def after_step(self, model: nn.Module, step: int) -> None:
        if self.ema is not None:
            self.ema.update(model.module if hasattr(model, "module") else model, step=step)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    num_classes: int,
    info: DistInfo,
    monitor: Monitor | None = None,
    amp_dtype: torch.dtype | None = None,
    desc: str = "eval",
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy and cross-entropy over the whole loader (summed over processes).

    Returns:
        ``top1``, ``top5`` (percent; top-5 is top-min(5, C)), ``loss``, ``images``,
        ``mean_class_acc``, ``skipped_images`` (unreadable files, not counted).
    """
    was_training = model.training
    model.eval()
    meter = AccuracyMeter(num_classes)
    stats = EpochStats()
    seen: set[str] = set()
    bar = monitor.bar(len(loader), desc) if monitor is not None and hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    try:
        for batch in loader:
            note_failures(batch, stats, seen)
            if len(batch["targets"]):
                imgs = batch["images"].to(info.device, non_blocking=True)
                targets = batch["targets"].to(info.device, non_blocking=True)
                with amp_autocast(info.device, amp_dtype):
                    logits = model(imgs)
                logits = logits.float()
                meter.update(logits, targets, float(F.cross_entropy(logits, targets)))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    summed = all_reduce_sum(meter.as_list() + [float(stats.skipped_images)], info)
    result: dict[str, Any] = AccuracyMeter.from_list(summed[:-1]).result()
    result["skipped_images"] = int(summed[-1])
    return result
