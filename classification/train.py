"""Classification runs: ``train(cfg)`` (fine-tune, partial fine-tune, linear probe) and
``evaluate_checkpoint(cfg)`` (``--eval``).

Run folder (``cfg.output``):
    config.json          the resolved options (usable again with ``--config``)
    log.jsonl            run / step / epoch records
    metrics.json         per-epoch validation top-1 / top-5 / loss, best and last (rewritten each epoch)
    tensorboard/         TensorBoard scalars
    checkpoint.pth       full training state, every ``save_every`` epochs and at the end
    model.safetensors    the classifier (mae_backbone format + metadata), at the end
    model_ema.safetensors  its EMA, with ``--ema-decay``
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from classification.config import ClassifyConfig
from classification.data import (
    ClassFolder,
    build_criterion,
    build_mixup,
    build_transform,
    check_same_classes,
    collate,
    find_classes,
)
from classification.engine import StepSetup, evaluate, resolve_amp, train_one_epoch
from classification.models import (
    FreezeReport,
    build_classifier,
    checkpoint_arch,
    freeze,
    linear_probe_head,
    load_pretrained,
)
from classification.optim import build_optimizer, build_scheduler
from classification.state import (
    CHECKPOINT_NAME,
    EMA_MODEL_NAME,
    MODEL_NAME,
    export_model,
    load_training_state,
    model_for_eval,
    model_meta,
    restore_training_state,
    save_training_state,
)
from mae_backbone import CheckpointError, atomic_write
from training.data import DataError, EpochBatchSampler, EvalBatchSampler
from training.distributed import DistInfo, barrier, cleanup, init_distributed
from training.loop import Counters
from training.monitor import Monitor
from training.schedule import absolute_lr
from training.state import check_finite_weights, seed_epoch_rngs, warn_config_changes

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.json"
EVAL_NAME = "eval.json"
# options that may change between a run and its resumption without a warning
_RESUMABLE_CHANGES = {"resume", "auto_resume", "num_workers", "progress", "tensorboard", "log_every", "save_every",
                      "eval_every", "device", "dist_backend", "output", "data", "train", "val", "checkpoint",
                      "max_nonfinite", "eval"}
# ViT arguments a checkpoint's stored overrides may hold that the protocol sets itself
_PROTOCOL_KWARGS = {"img_size", "num_classes", "global_pool", "drop_path_rate", "pos_embed_learnable",
                    "grad_checkpointing"}


@dataclass
class RunResult:
    """What ``train`` did."""

    output: Path
    epochs_done: int
    steps: int
    config: ClassifyConfig
    freeze: FreezeReport
    history: list[dict[str, Any]] = field(default_factory=list)  # every epoch so far (resumed ones too)
    best: dict[str, Any] | None = None
    checkpoint: Path | None = None
    model: Path | None = None
    ema_model: Path | None = None
    resumed_from: Path | None = None


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _loader(dataset: ClassFolder, sampler: Any, cfg: ClassifyConfig, info: DistInfo) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate,
                      pin_memory=info.device.type == "cuda", persistent_workers=cfg.num_workers > 0)


def _val_loader(root: Path, classes: list[str], cfg: ClassifyConfig, info: DistInfo) -> DataLoader:
    dataset = ClassFolder(root, build_transform(cfg, is_training=False), classes)
    return _loader(dataset, EvalBatchSampler(len(dataset), cfg.batch_size, info.rank, info.world_size), cfg, info)


def _architecture(cfg: ClassifyConfig, state: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """The architecture and ViT overrides: the flags', else the resumed run's, else the checkpoint's."""
    if state is not None:
        saved = state["config"]
        return cfg.model or saved["model"], dict(cfg.model_kwargs or saved["model_kwargs"])
    if cfg.checkpoint and cfg.model is None:
        arch, overrides, _ = checkpoint_arch(cfg.checkpoint, cfg.checkpoint_format)
        if arch is None:
            raise CheckpointError(f"{cfg.checkpoint}: cannot tell which ViT this is; name it with --model")
        overrides = {k: v for k, v in overrides.items() if k not in _PROTOCOL_KWARGS}
        return arch, dict(cfg.model_kwargs or overrides)
    if cfg.model is None:
        raise ValueError("checkpoint: give the pretrained weights (--checkpoint FILE), or --model to train from scratch")
    return cfg.model, dict(cfg.model_kwargs)


def _metrics_doc(cfg: ClassifyConfig, classes: list[str], report: FreezeReport, history: list[dict[str, Any]],
                 ) -> dict[str, Any]:
    evaluated = [r for r in history if "val" in r]
    best = max(evaluated, key=lambda r: r["val"]["top1"], default=None)
    return {
        "protocol": cfg.protocol, "model": cfg.model, "tune_blocks": str(cfg.tune()), "num_classes": len(classes),
        "trained_parameters": report.trained, "total_parameters": report.total,
        "epochs": history,
        "best": {"epoch": best["epoch"], **best["val"]} if best else None,
        "last": {"epoch": evaluated[-1]["epoch"], **evaluated[-1]["val"]} if evaluated else None,
    }


def train(cfg: ClassifyConfig, on_epoch_end: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Fine-tune, partially fine-tune or linear-probe as ``cfg`` says; resume when there is a checkpoint.

    Args:
        cfg: the options (``make_config``); run it directly or under ``torchrun``.
        on_epoch_end: called with each epoch's record after its checkpoint is written (an
            exception raised there stops the run; the checkpoint keeps that epoch).
    Raises:
        DataError: a folder is missing or empty, or the train and val classes differ.
        CheckpointError: the weights do not fit the architecture (the message says what was expected).
        TrainingDiverged / NonFiniteModelError: the loss or the weights became non-finite.
    """
    cfg.validate()
    if cfg.eval:
        raise ValueError("eval: use evaluate_checkpoint(cfg) to only evaluate")
    info = init_distributed(cfg.device, cfg.dist_backend)
    monitor = Monitor(Path(cfg.output), enabled=False)
    try:
        out = Path(cfg.output)
        classes = find_classes(cfg.train_dir)
        check_same_classes(classes, find_classes(cfg.val_dir), cfg.train_dir, cfg.val_dir)

        ckpt_path = out / CHECKPOINT_NAME
        resume = Path(cfg.resume) if cfg.resume else (ckpt_path if cfg.auto_resume and ckpt_path.exists() else None)
        state = load_training_state(resume) if resume is not None else None
        if state is not None and list(state["classes"]) != classes:
            check_same_classes(state["classes"], classes, resume, cfg.train_dir)
        arch, overrides = _architecture(cfg, state)
        cfg = dataclasses.replace(cfg.resolve(arch), model_kwargs=overrides)
        if state is not None:
            warn_config_changes(state["config"], cfg.to_dict(), resume, _RESUMABLE_CHANGES)  # type: ignore[arg-type]

        torch.manual_seed(cfg.seed)  # the same head initialization in every process
        model = build_classifier(arch, len(classes), cfg.protocol, global_pool=cfg.global_pool, img_size=cfg.img_size,
                                 drop_path=cfg.drop_path, model_kwargs=overrides, bn_head=False)
        load_report = None
        if state is None and cfg.checkpoint:
            load_report = load_pretrained(model, cfg.checkpoint, cfg.protocol, arch, cfg.checkpoint_format)
        elif state is None:
            logger.warning("no --checkpoint: training %s from random initialization", arch)
        if cfg.protocol == "linprobe":  # after loading: mae_backbone's strict loader does not expect BN buffers
            model.head = linear_probe_head(model.embed_dim, len(classes))
        report = freeze(model, cfg.tune())
        model.to(info.device)

        train_set = ClassFolder(cfg.train_dir, build_transform(cfg, is_training=True), classes)
        sampler = EpochBatchSampler(len(train_set), cfg.batch_size, cfg.seed, info.rank, info.world_size,
                                    cfg.accum_iter)
        effective_batch = cfg.batch_size * cfg.accum_iter * info.world_size
        steps_per_epoch = sampler.steps_per_epoch
        if steps_per_epoch == 0:
            raise DataError(f"{cfg.train_dir}: {len(train_set)} images, fewer than one optimizer step needs "
                            f"({effective_batch} = batch {cfg.batch_size} x accum {cfg.accum_iter} x "
                            f"{info.world_size} processes)")
        train_loader = _loader(train_set, sampler, cfg, info)
        val_loader = _val_loader(cfg.val_dir, classes, cfg, info)

        lr = cfg.lr if cfg.lr is not None else absolute_lr(cfg.blr, effective_batch)
        optimizer = build_optimizer(model, cfg.protocol, lr, cfg.weight_decay, cfg.layer_decay)
        scheduler = build_scheduler(optimizer, cfg.min_lr, cfg.warmup_epochs * steps_per_epoch,
                                    cfg.epochs * steps_per_epoch)
        amp_dtype, use_scaler = resolve_amp(cfg.precision, info.device)
        scaler = torch.amp.GradScaler(info.device.type, enabled=use_scaler)
        ema = None
        if cfg.ema_decay is not None:
            from timm.utils import ModelEmaV3

            ema = ModelEmaV3(model, decay=cfg.ema_decay)
        mixup = build_mixup(cfg, len(classes))

        counters, start_epoch, history = Counters(), 0, []
        if state is not None:
            restore_training_state(state, model, optimizer, scaler, ema, str(resume))
            start_epoch, history = int(state["epoch"]), list(state["history"])
            counters = Counters(**{k: int(v) for k, v in state["counters"].items() if k in Counters().as_dict()})
            counters.step = int(state["step"])
            del state
            logger.info("resumed from %s: %d epochs, %d steps done", resume, start_epoch, counters.step)

        monitor = Monitor(out, enabled=info.is_main, tensorboard=cfg.tensorboard, progress=cfg.progress)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            _write_json(out / CONFIG_NAME, cfg.to_dict())
            logger.info("%s", report)
            monitor.log({"type": "run", "protocol": cfg.protocol, "model": arch, "tune_blocks": str(cfg.tune()),
                         "trained_parameters": report.trained, "total_parameters": report.total,
                         "resumed_from": str(resume) if resume else None, "start_epoch": start_epoch,
                         "checkpoint_load": str(load_report) if load_report else None,
                         "world_size": info.world_size, "effective_batch": effective_batch, "lr": lr,
                         "images": len(train_set), "val_images": len(val_loader.dataset),  # type: ignore[arg-type]
                         "classes": len(classes), "steps_per_epoch": steps_per_epoch,
                         "precision": str(amp_dtype or "fp32"), "device": str(info.device)})

        ddp_model: torch.nn.Module = model
        if info.distributed:
            ddp_model = DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda"
                                                else None)
        setup = StepSetup(criterion=build_criterion(cfg, mixup), scheduler=scheduler, accum_iter=cfg.accum_iter,
                          mixup=mixup, amp_dtype=amp_dtype, clip_grad=cfg.clip_grad, ema=ema,
                          max_nonfinite=cfg.max_nonfinite, log_every=cfg.log_every, epochs=cfg.epochs)
        result = RunResult(output=out, epochs_done=start_epoch, steps=counters.step, config=cfg, freeze=report,
                           history=history, resumed_from=resume)
        seen_failures: set[str] = set()
        for epoch in range(start_epoch, cfg.epochs):
            seed_epoch_rngs(cfg.seed, epoch, info.rank)
            sampler.set_epoch(epoch)
            stats = train_one_epoch(ddp_model, train_loader, steps_per_epoch, optimizer, scaler, setup, counters,
                                    epoch, info, monitor, seen_failures)
            done = epoch + 1
            record: dict[str, Any] = {
                "type": "epoch", "epoch": done, "step": counters.step, "train_loss": stats.mean_loss,
                "lr": max(g["lr"] for g in optimizer.param_groups), "seconds": stats.seconds,
                "img_per_s": stats.images * info.world_size / max(stats.seconds, 1e-9),
                "skipped_images": stats.skipped_images, "nonfinite_steps": stats.nonfinite_steps,
            }
            if done % cfg.eval_every == 0 or done == cfg.epochs:
                record["val"] = evaluate(model, val_loader, len(classes), info, monitor, amp_dtype, "val")
                if ema is not None:
                    record["val_ema"] = evaluate(ema.module, val_loader, len(classes), info, monitor, amp_dtype,
                                                 "val (EMA)")
            history.append(record)
            monitor.log(record)
            monitor.scalars(done, "epoch", {"train_loss": stats.mean_loss, "lr": record["lr"]})
            for key in ("val", "val_ema"):
                if key in record:
                    monitor.scalars(done, key, {k: record[key][k] for k in ("top1", "top5", "loss")})
            if "val" in record:
                logger.info("epoch %d: val top-1 %.2f top-5 %.2f loss %.4f", done, record["val"]["top1"],
                            record["val"]["top5"], record["val"]["loss"])
            if done % cfg.save_every == 0 or done == cfg.epochs:
                check_finite_weights(model, done, ckpt_path)
                if info.is_main:
                    save_training_state(ckpt_path, model, optimizer, scaler, ema, done, counters.step,
                                        counters.as_dict(), history, classes, cfg.to_dict())
                    result.checkpoint = ckpt_path
                barrier(info)
            if info.is_main:
                _write_json(out / METRICS_NAME, _metrics_doc(cfg, classes, report, history))
            result.epochs_done, result.steps = done, counters.step
            if on_epoch_end is not None:
                on_epoch_end(record)

        doc = _metrics_doc(cfg, classes, report, history)
        result.best = doc["best"]
        if info.is_main:
            meta = model_meta(model, cfg, classes, epochs=result.epochs_done, val=doc["last"],
                              trained_parameters=report.trained, checkpoint=cfg.checkpoint)
            result.model = export_model(model, out / MODEL_NAME, meta)
            if ema is not None:
                result.ema_model = export_model(ema.module, out / EMA_MODEL_NAME, {**meta, "ema_decay": cfg.ema_decay})
            if result.checkpoint is None and ckpt_path.exists():
                result.checkpoint = ckpt_path
        barrier(info)
        return result
    finally:
        monitor.close()
        cleanup()


def evaluate_checkpoint(cfg: ClassifyConfig) -> dict[str, Any]:
    """``--eval``: top-1 / top-5 of ``cfg.checkpoint`` on the validation folder.

    The class folders must be the ones the model was trained on when the file names them (our
    exports and training checkpoints do); otherwise their number must equal the head's size.
    Writes ``eval.json`` into ``cfg.output`` when given.

    Raises:
        DataError: the validation classes differ from the checkpoint's.
        CheckpointError: the file holds no classifier or does not fit.
    """
    cfg.validate()
    info = init_distributed(cfg.device, cfg.dist_backend)
    monitor = Monitor(Path(cfg.output or "."), enabled=info.is_main, tensorboard=False, progress=cfg.progress)
    try:
        path = Path(cfg.checkpoint or cfg.resume)  # type: ignore[arg-type]
        model, ckpt_classes, what = model_for_eval(path, cfg)
        cfg = dataclasses.replace(cfg, img_size=model.img_size[0])
        cfg = cfg.resolve(cfg.model)
        val_classes = find_classes(cfg.val_dir)
        num_classes = model.head.out_features if isinstance(model.head, torch.nn.Linear) else model.head[-1].out_features
        if ckpt_classes is not None:
            check_same_classes(ckpt_classes, val_classes, path, cfg.val_dir)
        elif len(val_classes) != num_classes:
            raise DataError(f"{cfg.val_dir}: {len(val_classes)} classes, but {path} has a {num_classes}-class head")
        model.to(info.device)
        amp_dtype, _ = resolve_amp(cfg.precision, info.device)
        metrics = evaluate(model, _val_loader(cfg.val_dir, val_classes, cfg, info), len(val_classes), info, monitor,
                           amp_dtype)
        metrics = {"checkpoint": str(path), "model": what, "num_classes": len(val_classes), **metrics}
        if cfg.output and info.is_main:
            Path(cfg.output).mkdir(parents=True, exist_ok=True)
            _write_json(Path(cfg.output) / EVAL_NAME, metrics)
        return metrics
    finally:
        monitor.close()
        cleanup()
