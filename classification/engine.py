"""One training epoch and one evaluation pass.

Training: per optimizer step, the learning rate comes from the schedule at the global step
(``scheduler.step_update(step)``, which applies each group's ``lr_scale``), then ``accum_iter``
micro-batches are mixed (mixup / cutmix), forwarded under autocast and back-propagated, then
the optimizer steps and the EMA (if any) follows.  A step whose loss is non-finite on any process
is skipped everywhere and counted; ``max_nonfinite`` such steps in a row stop the run.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from classification.metrics import AccuracyMeter
from pretrain.distributed import DistInfo, all_reduce_sum
from pretrain.engine import Counters, TrainingDiverged
from pretrain.monitor import Monitor

logger = logging.getLogger(__name__)


@dataclass
class StepSetup:
    """What the training loop needs besides the model, the data and the optimizer."""

    criterion: nn.Module
    scheduler: Any  # timm scheduler: step_update(num_updates) sets every group's lr
    accum_iter: int = 1
    mixup: Any = None  # timm Mixup or None
    amp_dtype: torch.dtype | None = None
    clip_grad: float | None = None
    ema: Any = None  # timm ModelEmaV3 or None
    max_nonfinite: int = 10
    log_every: int = 20
    epochs: int = 1


@dataclass
class EpochStats:
    """What one training epoch did."""

    loss_sum: float = 0.0
    good_steps: int = 0
    nonfinite_steps: int = 0
    empty_steps: int = 0
    images: int = 0  # this process
    skipped_images: int = 0  # this process
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.good_steps if self.good_steps else float("nan")


def resolve_amp(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a grad scaler is needed); ``auto`` is bf16 on a
    GPU that supports it, else fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return {"fp32": (None, False), "bf16": (torch.bfloat16, False), "fp16": (torch.float16, True)}[precision]


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _note_failures(batch: dict[str, Any], stats: Any, seen: set[str]) -> None:
    for msg in batch["failures"]:
        stats.skipped_images += 1
        if msg not in seen:
            seen.add(msg)
            logger.warning("skipped an unreadable image: %s", msg)
            if len(stats.failures) < 100:
                stats.failures.append(msg)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    steps: int,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    setup: StepSetup,
    counters: Counters,
    epoch: int,
    info: DistInfo,
    monitor: Monitor,
    seen_failures: set[str] | None = None,
) -> EpochStats:
    """Train ``steps`` optimizer steps (``steps * accum_iter`` micro-batches from ``loader``).

    Args:
        model: the classifier (DDP-wrapped when distributed); ``model.train()`` is called, which
            keeps frozen modules in eval mode.
        loader: micro-batches from ``classification.data.collate``.
        counters: updated in place (``step`` is the schedule position).
    Raises:
        TrainingDiverged: ``setup.max_nonfinite`` steps in a row had a non-finite loss.
    """
    stats = EpochStats()
    seen = seen_failures if seen_failures is not None else set()
    device = info.device
    model.train()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ema_target = model.module if hasattr(model, "module") else model
    data = iter(loader)
    bar = monitor.bar(steps, f"epoch {epoch + 1}/{setup.epochs}")
    start = time.perf_counter()
    try:
        for _ in range(steps):
            setup.scheduler.step_update(counters.step)
            lr = max(g["lr"] for g in optimizer.param_groups)
            ok, empty, step_loss = True, False, 0.0
            for micro in range(setup.accum_iter):
                batch = next(data)
                _note_failures(batch, stats, seen)
                if not ok:
                    continue  # the step is already skipped; drain its micro-batches
                imgs, targets = batch["images"], batch["targets"]
                if setup.mixup is not None and len(targets) % 2:  # timm's mixup pairs samples up
                    imgs, targets = imgs[:-1], targets[:-1]
                n = len(targets)
                stats.images += n
                no_sync = getattr(model, "no_sync", None)
                last = micro == setup.accum_iter - 1
                with no_sync() if (no_sync is not None and not last) else contextlib.nullcontext():
                    local = [0.0, 1.0, 0.0]  # [non-finite, empty, loss]
                    loss = None
                    if n > 0:
                        imgs = imgs.to(device, non_blocking=True)
                        targets = targets.to(device, non_blocking=True)
                        if setup.mixup is not None:
                            imgs, targets = setup.mixup(imgs, targets)
                        with _autocast(device, setup.amp_dtype):
                            loss = setup.criterion(model(imgs), targets)
                        value = float(loss.detach())
                        finite = math.isfinite(value)
                        local = [0.0 if finite else 1.0, 0.0, value if finite else 0.0]
                    bad, nempty, loss_sum = all_reduce_sum(local, info)
                    if bad or nempty:
                        ok, empty = False, not bad
                    else:
                        scaler.scale(loss / setup.accum_iter).backward()  # type: ignore[operator]
                        step_loss += loss_sum / info.world_size / setup.accum_iter
            if ok:
                if setup.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, setup.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                if setup.ema is not None:
                    setup.ema.update(ema_target, step=counters.step)
                counters.nonfinite_in_a_row = 0
                stats.loss_sum += step_loss
                stats.good_steps += 1
            elif empty:
                counters.empty_steps += 1
                stats.empty_steps += 1
                logger.warning("step %d skipped: a process got a micro-batch with no readable image", counters.step)
            else:
                counters.nonfinite_steps += 1
                counters.nonfinite_in_a_row += 1
                stats.nonfinite_steps += 1
                logger.warning("step %d skipped: non-finite loss (%d in a row)", counters.step,
                               counters.nonfinite_in_a_row)
            optimizer.zero_grad(set_to_none=True)
            counters.step += 1
            if counters.nonfinite_in_a_row >= setup.max_nonfinite:
                raise TrainingDiverged(
                    f"stopping: {counters.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss "
                    f"(epoch {epoch + 1}, step {counters.step}, lr {lr:.3g}); the last checkpoint was not "
                    "overwritten. Try a lower --blr, --clip-grad 5.0, or --precision bf16/fp32 instead of fp16."
                )
            bar.set_postfix(loss=f"{step_loss:.4f}" if ok else "skip", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            if counters.step % setup.log_every == 0 and ok:
                monitor.log({"type": "step", "epoch": epoch, "step": counters.step, "loss": step_loss, "lr": lr})
                monitor.scalars(counters.step, "train", {"loss": step_loss, "lr": lr})
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


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
            _note_failures(batch, stats, seen)
            if len(batch["targets"]):
                imgs = batch["images"].to(info.device, non_blocking=True)
                targets = batch["targets"].to(info.device, non_blocking=True)
                with _autocast(info.device, amp_dtype):
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
