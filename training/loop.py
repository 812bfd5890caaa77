"""One training epoch, shared by pretraining and classification: mixed precision, gradient
accumulation, non-finite loss handling.

Each optimizer step takes ``accum_iter`` micro-batches.  After each micro-batch's forward, the
processes agree (one small all-reduce) on whether every loss was finite; if not, the step is
skipped everywhere (no backward, gradients dropped, no optimizer update), counted, and the run
stops after ``max_nonfinite`` such steps in a row.  A finite loss whose gradient is not finite
(an overflow in the backward pass) is treated the same way in fp32 / bf16, so a NaN never reaches
the weights; with fp16 the grad scaler already skips such steps and lowers its scale (that is its
calibration, not counted).  The schedule position advances either way.

What differs between the tasks (the learning-rate schedule, how a micro-batch becomes a loss,
what follows a good step) comes from the ``setup`` (a ``StepRecipe``): ``pretrain.engine.MaeStep``,
``pretrain.moco.MocoStep``, ``classification.engine.ClassifierStep``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Protocol

import torch
from torch import nn

from training.distributed import DistInfo, all_reduce_sum
from training.fastpath import WorkingWeights
from training.monitor import Monitor
from training.schedule import set_lr

logger = logging.getLogger(__name__)

# (images in the micro-batch, a function that forwards them and returns their mean loss)
MicroBatch = tuple[int, Callable[[], torch.Tensor]]


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss."""


@dataclass
class Counters:
    """Run-long counts, saved with the checkpoint."""

    step: int = 0  # optimizer steps taken or skipped (the schedule position)
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    empty_steps: int = 0
    skipped_images: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class EpochStats:
    """What one epoch did, summed over processes where it says so."""

    loss_sum: float = 0.0  # of per-step global mean losses, over good steps
    good_steps: int = 0
    nonfinite_steps: int = 0
    empty_steps: int = 0
    images: int = 0  # this process
    skipped_images: int = 0  # this process
    failures: list[str] = field(default_factory=list)  # this process's unreadable files
    seconds: float = 0.0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.good_steps if self.good_steps else float("nan")


class StepRecipe(Protocol):
    """What a task gives ``train_one_epoch`` besides the model, the data and the optimizer."""

    accum_iter: int
    clip_grad: float | None
    max_nonfinite: int
    log_every: int
    epochs: int
    diverged_hint: ClassVar[str]  # what to try when the loss keeps being non-finite

    def apply_lr(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Put the schedule's learning rate for optimizer step ``step`` in place; return it (for logs)."""
        ...

    def micro_batch(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> MicroBatch:
        """The images ``batch`` holds and its loss function (called only when there is an image,
        under DDP's ``no_sync`` for all but the last micro-batch of a step)."""
        ...

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after the optimizer took step ``step`` (not after a skipped one)."""
        ...


@dataclass
class ScheduledStep:
    """What every ``StepRecipe`` shares: the lr schedule ``lr_at`` (a pure function of the step,
    put in place times each group's ``lr_scale``), autocast and the loop's limits.  A method's
    step adds ``micro_batch`` (its loss) and, if it needs one, ``after_step``."""

    accum_iter: int
    lr_at: Callable[[int], float]
    amp_dtype: torch.dtype | None
    clip_grad: float | None
    max_nonfinite: int
    log_every: int
    epochs: int
    diverged_hint: ClassVar[str] = "Try a lower --blr, --clip-grad, or --precision bf16/fp32 instead of fp16."

    def apply_lr(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr_at(step)
        set_lr(optimizer, lr)
        return lr

    def after_step(self, model: nn.Module, step: int) -> None:
        pass


def note_failures(batch: dict[str, Any], stats: EpochStats, seen: set[str]) -> None:
    """Count the batch's unreadable files in ``stats``; warn once per file (``seen``), keep up to 100."""
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
    setup: StepRecipe,
    counters: Counters,
    epoch: int,
    info: DistInfo,
    monitor: Monitor,
    seen_failures: set[str] | None = None,
    working: WorkingWeights | None = None,
) -> EpochStats:
    """Train ``steps`` optimizer steps from ``loader`` (``steps * accum_iter`` micro-batches).

    Args:
        model: the MAE or the classifier, wrapped in DDP when distributed; ``model.train()`` is
            called (a classifier keeps its frozen modules in eval mode).
        loader: micro-batches (dicts with a ``failures`` list) that ``setup.micro_batch`` reads.
        setup: the task's part (a ``StepRecipe``).
        counters: updated in place (schedule position, non-finite and skip counts).
        seen_failures: unreadable files already warned about (each is warned about once).
        working: the bf16 working weights ``model`` runs on (``training.fastpath``), or None: each
            micro-batch's gradients go onto the fp32 masters (the optimizer's parameters), which
            are written back into the working copies after each optimizer step.
    Raises:
        TrainingDiverged: ``setup.max_nonfinite`` steps in a row with a non-finite loss.
    """
    stats = EpochStats()
    seen = seen_failures if seen_failures is not None else set()
    device = info.device
    model.train()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    data = iter(loader)
    bar = monitor.bar(steps, f"epoch {epoch + 1}/{setup.epochs}")
    start = time.perf_counter()
    try:
        for _ in range(steps):
            lr = setup.apply_lr(optimizer, counters.step)
            ok, empty, step_loss = True, False, 0.0
            for micro in range(setup.accum_iter):
                batch = next(data)
                note_failures(batch, stats, seen)
                if not ok:
                    continue  # this step is already skipped; drain its micro-batches
                n, compute_loss = setup.micro_batch(model, batch, device)
                stats.images += n
                sync = micro == setup.accum_iter - 1
                no_sync = getattr(model, "no_sync", None)
                ctx = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
                with ctx:
                    loss = None
                    local = [0.0, 1.0, 0.0]  # [non-finite, empty, loss]
                    if n > 0:
                        loss = compute_loss()
                        value = float(loss.detach())
                        finite = math.isfinite(value)
                        local = [0.0 if finite else 1.0, 0.0, value if finite else 0.0]
                    bad, nempty, loss_sum = all_reduce_sum(local, info)
                    if bad or nempty:
                        ok, empty = False, not bad
                    else:
                        scaler.scale(loss / setup.accum_iter).backward()  # type: ignore[operator]
                        if working is not None:
                            working.grads_to_masters()
                        step_loss += loss_sum / info.world_size / setup.accum_iter
            bad_grad = False
            if ok:
                if setup.clip_grad:
                    scaler.unscale_(optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(params, setup.clip_grad)
                elif not scaler.is_enabled():
                    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                else:
                    norm = None
                # after DDP's all-reduce every process holds the same gradient: the same decision
                bad_grad = norm is not None and not scaler.is_enabled() and not bool(torch.isfinite(norm))
                ok = not bad_grad
            if ok:
                scaler.step(optimizer)
                scaler.update()
                if working is not None:
                    working.refresh()
                setup.after_step(model if working is None else working.model, counters.step)
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
                logger.warning("step %d skipped: non-finite %s (%d in a row)", counters.step,
                               "gradient" if bad_grad else "loss", counters.nonfinite_in_a_row)
            optimizer.zero_grad(set_to_none=True)
            counters.step += 1
            if counters.nonfinite_in_a_row >= setup.max_nonfinite:
                raise TrainingDiverged(
                    f"stopping: {counters.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss "
                    "or gradient "
                    f"(epoch {epoch + 1}, step {counters.step}, lr {lr:.3g}). The last checkpoint was not "
                    f"overwritten. {setup.diverged_hint}"
                )
            elapsed = time.perf_counter() - start
            img_s = stats.images * info.world_size / max(elapsed, 1e-9)
            bar.set_postfix(loss=f"{step_loss:.4f}" if ok else "skip", lr=f"{lr:.2e}", img_s=f"{img_s:.1f}",
                            refresh=False)
            bar.update(1)
            if counters.step % setup.log_every == 0 and ok:
                monitor.log({"type": "step", "epoch": epoch, "step": counters.step, "loss": step_loss, "lr": lr})
                monitor.scalars(counters.step, "train", {"loss": step_loss, "lr": lr})
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats
