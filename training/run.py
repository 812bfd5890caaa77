"""The run skeleton every trainer shares: ``run(trainer)``.

    init the process group -> find the checkpoint to resume -> the trainer builds its data, model,
    optimizer and step (``Trainer.build``) -> restore the state -> write config.json and the
    ``run`` record -> the step's fast path (``training.fastpath``: bf16 working weights,
    ``torch.compile``; logged) -> for each remaining epoch: re-seed, one epoch of ``train_one_epoch``, the
    epoch record and its log line (``log_epoch``, whatever the terminal), the checkpoint every
    ``save_every`` epochs and at the end (never from non-finite weights), the trainer's after-epoch
    work -> the trainer's exports -> clean-up.

A trainer is a ``Trainer`` subclass: it supplies the method's parts through the hooks below and
its options (an ``Options`` with ``output``, ``epochs``, ``seed``, ``save_every``, ``resume``,
``auto_resume``, ``device``, ``dist_backend``, ``tensorboard``, ``progress``, ``batch_size``,
``accum_iter``, ``num_workers``).  Everything a resumed run needs is in the checkpoint and every
epoch's randomness is a pure function of ``(seed, epoch, rank)``, so a run killed at any point
and resumed ends bit for bit where the uninterrupted run ends (on CPU).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Collection, Iterable, Mapping

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from mae_backbone import atomic_write
from training.data import DataError, EpochBatchSampler
from training.distributed import DistInfo, barrier, cleanup, init_distributed
from training.fastpath import fast_path
from training.loop import Counters, EpochStats, StepRecipe, train_one_epoch
from training.monitor import Monitor
from training.state import check_finite_weights, seed_epoch_rngs, warn_config_changes

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pth"
CONFIG_NAME = "config.json"


@dataclass
class RunResult:
    """What a run did (a trainer's result may add its exports)."""

    output: Path
    epochs_done: int
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)  # epoch records
    checkpoint: Path | None = None
    resumed_from: Path | None = None


@dataclass
class RunParts:
    """What ``Trainer.build`` hands the skeleton: the model (not wrapped in DDP), its optimizer and
    grad scaler, the epoch order and its loader, the step recipe, and the ``run`` record's values."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: EpochBatchSampler
    loader: Iterable[dict[str, Any]]
    recipe: StepRecipe
    record: dict[str, Any]  # the run record (``type: run``) besides what the skeleton adds
    precision: str = "fp32"  # resolved (fp32 / bf16 / fp16): with bf16 the step runs on bf16 working weights


class Trainer:
    """A method's part of a run; ``run(trainer)`` calls the hooks in the order they are listed.

    Attributes:
        cfg: the options (may be replaced by ``build``, e.g. with the recipe's values resolved).
        info: this process (set by ``run`` before ``build``).
        resumed_from: the checkpoint the run resumes from, if any (set by ``run`` before ``build``).
        monitor: the run's monitor (set by ``run`` before the first epoch).
    """

    resumable_changes: ClassVar[Collection[str]] = ()  # options a resumed run may change without a warning
    compile_on_cpu: bool = False  # --compile auto may compile this step on the CPU (training.fastpath.resolve_compile)

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.info: DistInfo | None = None
        self.resumed_from: Path | None = None
        self.monitor: Monitor | None = None

    def check_inputs(self) -> None:
        """Check the inputs (the data folders) before anything else, the resume checkpoint
        included, is read: a wrong folder is reported as such, not as a checkpoint problem."""

    def load_state(self, path: Path) -> dict[str, Any]:
        """Read the checkpoint to resume from (checks its format)."""
        raise NotImplementedError

    def build(self, state: Mapping[str, Any] | None) -> RunParts:
        """Data, model (initialized with ``torch.manual_seed(cfg.seed)``), optimizer, step recipe;
        ``state`` is the checkpoint being resumed, if any (its weights are put in place later)."""
        raise NotImplementedError

    def restore(self, state: Mapping[str, Any], parts: RunParts, source: str) -> int:
        """Put the checkpoint's (file ``source``) weights, optimizer and scaler state (and the
        method's own) in place; return the epochs it completed."""
        raise NotImplementedError

    def new_result(self, output: Path, epochs_done: int, steps: int, resumed_from: Path | None) -> RunResult:
        return RunResult(output=output, epochs_done=epochs_done, steps=steps, resumed_from=resumed_from)

    def epoch_record(self, epoch: int, stats: EpochStats, counters: Counters, parts: RunParts) -> dict[str, Any]:
        """The ``epoch`` record of epoch ``epoch`` (1-based, just done); logged and kept in the history."""
        raise NotImplementedError

    def save(self, path: Path, epoch: int, counters: Counters, parts: RunParts) -> None:
        """Write the resumable checkpoint (main process only)."""
        raise NotImplementedError

    def after_epoch(self, record: dict[str, Any], parts: RunParts, result: RunResult) -> None:
        """Anything after the epoch's checkpoint (figures, metrics files, callbacks)."""

    def finish(self, result: RunResult, parts: RunParts) -> None:
        """The end-of-run exports (main process only)."""


def epoch_sampler(num_samples: int, where: Any, cfg: Any, info: DistInfo) -> EpochBatchSampler:
    """This process's ``EpochBatchSampler`` over ``num_samples`` images of ``where``.

    Raises:
        DataError: fewer images than one optimizer step takes.
    """
    sampler = EpochBatchSampler(num_samples, cfg.batch_size, cfg.seed, info.rank, info.world_size, cfg.accum_iter)
    if sampler.steps_per_epoch == 0:
        raise DataError(f"{where}: {num_samples} images, fewer than one optimizer step needs "
                        f"({effective_batch(cfg, info)} = batch {cfg.batch_size} x accum {cfg.accum_iter} x "
                        f"{info.world_size} processes)")
    return sampler


def effective_batch(cfg: Any, info: DistInfo) -> int:
    """Images per optimizer step over all processes."""
    return cfg.batch_size * cfg.accum_iter * info.world_size


def data_loader(dataset: Dataset, batch_sampler: Any, collate: Callable[[list[Any]], dict[str, Any]], cfg: Any,
                info: DistInfo) -> DataLoader:
    """A loader of ``batch_sampler``'s micro-batches (``cfg.num_workers`` worker processes)."""
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=cfg.num_workers, collate_fn=collate,
                      pin_memory=info.device.type == "cuda", persistent_workers=cfg.num_workers > 0)


def log_epoch(epoch: int, epochs: int, stats: EpochStats, record: Mapping[str, Any], info: DistInfo) -> None:
    """One INFO line per epoch on the main process, e.g. ``epoch 3/10: loss 0.4121, lr 1.2e-04,
    118 img/s, 9.4 s``: the line a user sees under nohup, SLURM or ``| tee``, where no progress
    bar is drawn (stderr is not a terminal)."""
    if not info.is_main:
        return
    extra = ""
    if record.get("skipped_images"):
        extra += f", {record['skipped_images']} unreadable images skipped"
    if stats.nonfinite_steps:
        extra += f", {stats.nonfinite_steps} non-finite steps skipped"
    logger.info("epoch %d/%d: loss %.4f, lr %.3g, %.0f img/s, %.1f s%s", epoch, epochs, stats.mean_loss,
                float(record.get("lr", float("nan"))), float(record.get("img_per_s", 0.0)), stats.seconds, extra)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def run(trainer: Trainer) -> RunResult:
    """Train as ``trainer`` says (see the module docstring), resuming from ``cfg.resume`` or, with
    ``auto_resume``, from ``OUTPUT/checkpoint.pth`` when it exists.

    Raises:
        DataError, TrainingDiverged, NonFiniteModelError, CheckpointError: as the trainer's hooks
        and the epoch loop raise them; the last checkpoint keeps the last good state.
    """
    cfg = trainer.cfg
    info = init_distributed(cfg.device, cfg.dist_backend)
    trainer.info = info
    monitor = Monitor(Path(cfg.output), enabled=False)
    try:
        out = Path(cfg.output)
        ckpt_path = out / CHECKPOINT_NAME
        resume = Path(cfg.resume) if cfg.resume else (ckpt_path if cfg.auto_resume and ckpt_path.exists() else None)
        trainer.resumed_from = resume
        trainer.check_inputs()
        state = trainer.load_state(resume) if resume is not None else None
        parts = trainer.build(state)
        cfg = trainer.cfg  # build may resolve it
        counters, start_epoch = Counters(), 0
        if state is not None:
            warn_config_changes(state.get("config", {}), cfg.to_dict(), resume, trainer.resumable_changes)  # type: ignore[arg-type]
            start_epoch = trainer.restore(state, parts, str(resume))
            counters = Counters(**{k: int(v) for k, v in state.get("counters", {}).items() if k in Counters().as_dict()})
            counters.step = int(state["step"])
            del state
            logger.info("resumed from %s: %d epochs, %d steps done", resume, start_epoch, counters.step)

        # after the weights are in place: bf16 working copies are taken from the restored masters
        fast = fast_path(parts.model, parts.precision, info.device, cfg.working_weights, cfg.compile,
                         cfg.epochs * parts.sampler.steps_per_epoch, info.distributed, trainer.compile_on_cpu)
        if info.is_main:
            logger.info("%s", fast.describe())
        monitor = Monitor(out, enabled=info.is_main, tensorboard=cfg.tensorboard, progress=cfg.progress)
        trainer.monitor = monitor
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / CONFIG_NAME, cfg.to_dict())
            monitor.log({"type": "run", **parts.record, "resumed_from": str(resume) if resume else None,
                         "start_epoch": start_epoch, "world_size": info.world_size,
                         "effective_batch": effective_batch(cfg, info), "steps_per_epoch": parts.sampler.steps_per_epoch,
                         "device": str(info.device), "fast_path": fast.describe()})

        model = fast.step_model
        if info.distributed:
            model = DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
        result = trainer.new_result(out, start_epoch, counters.step, resume)
        seen_failures: set[str] = set()
        for epoch in range(start_epoch, cfg.epochs):
            seed_epoch_rngs(cfg.seed, epoch, info.rank)
            parts.sampler.set_epoch(epoch)
            stats = train_one_epoch(model, parts.loader, parts.sampler.steps_per_epoch, parts.optimizer, parts.scaler,
                                    parts.recipe, counters, epoch, info, monitor, seen_failures, fast.working)
            done = epoch + 1
            record = trainer.epoch_record(done, stats, counters, parts)
            result.history.append(record)
            monitor.log(record)
            log_epoch(done, cfg.epochs, stats, record, info)
            if done % cfg.save_every == 0 or done == cfg.epochs:
                check_finite_weights(parts.model, done, ckpt_path)
                if info.is_main:
                    trainer.save(ckpt_path, done, counters, parts)
                    result.checkpoint = ckpt_path
                barrier(info)
            result.epochs_done, result.steps = done, counters.step
            trainer.after_epoch(record, parts, result)

        if info.is_main:
            trainer.finish(result, parts)
            if result.checkpoint is None and ckpt_path.exists():
                result.checkpoint = ckpt_path
        barrier(info)
        return result
    finally:
        monitor.close()
        cleanup()
