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
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

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
from classification.engine import ClassifierStep, evaluate
from classification.models import (
    FreezeReport,
    build_classifier,
    checkpoint_arch,
    freeze,
    linear_probe_head,
    load_pretrained,
)
from classification.optim import build_optimizer
from classification.state import (
    EMA_MODEL_NAME,
    MODEL_NAME,
    export_model,
    load_training_state,
    model_for_eval,
    model_meta,
    restore_training_state,
    save_training_state,
)
from mae_backbone import CheckpointError
from training.data import DataError, EvalBatchSampler
from training.distributed import DistInfo, cleanup, init_distributed
from training.loop import Counters, EpochStats
from training.monitor import Monitor
from training.run import RunParts, Trainer, data_loader, effective_batch, epoch_sampler, run, write_json
from training.run import RunResult as BaseRunResult
from training.precision import resolve_amp, resolve_precision
from training.schedule import absolute_lr, cosine_schedule

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.json"
EVAL_NAME = "eval.json"
# options that may change between a run and its resumption without a warning
_RESUMABLE_CHANGES = {"resume", "auto_resume", "num_workers", "progress", "tensorboard", "log_every", "save_every",
                      "eval_every", "device", "dist_backend", "output", "data", "train", "val", "checkpoint",
                      "max_nonfinite", "eval", "working_weights"}  # working weights: the same run, bit for bit
# ViT arguments a checkpoint's stored overrides may hold that the protocol sets itself
_PROTOCOL_KWARGS = {"img_size", "num_classes", "global_pool", "drop_path_rate", "pos_embed_learnable",
                    "grad_checkpointing"}


@dataclass(kw_only=True)
class RunResult(BaseRunResult):
    """What ``train`` did (``history``: every epoch so far, resumed ones too)."""

    config: ClassifyConfig
    freeze: FreezeReport
    best: dict[str, Any] | None = None
    model: Path | None = None
    ema_model: Path | None = None


def _val_loader(root: Path, classes: list[str], cfg: ClassifyConfig, info: DistInfo) -> Any:
    dataset = ClassFolder(root, build_transform(cfg, is_training=False), classes)
    return data_loader(dataset, EvalBatchSampler(len(dataset), cfg.batch_size, info.rank, info.world_size), collate,
                       cfg, info)


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


class ClassifierTrainer(Trainer):
    """Fine-tuning / linear probing as the shared run skeleton's (``training.run``) hooks."""

    resumable_changes = _RESUMABLE_CHANGES

    def __init__(self, cfg: ClassifyConfig, on_epoch_end: Callable[[dict[str, Any]], None] | None = None):
        super().__init__(cfg)
        self.on_epoch_end = on_epoch_end
        self.classes: list[str] = []
        self.history: list[dict[str, Any]] = []
        self.ema: Any = None
        self.amp_dtype: torch.dtype | None = None
        self.val_loader: Any = None
        self.report: FreezeReport | None = None

    def load_state(self, path: Path) -> dict[str, Any]:
        return load_training_state(path)

    def check_inputs(self) -> None:
        cfg = self.cfg
        self.classes = find_classes(cfg.train_dir)
        check_same_classes(self.classes, find_classes(cfg.val_dir), cfg.train_dir, cfg.val_dir)

    def build(self, state: Mapping[str, Any] | None) -> RunParts:
        cfg, info = self.cfg, self.info
        assert info is not None
        classes = self.classes
        if state is not None and list(state["classes"]) != classes:
            check_same_classes(state["classes"], classes, self.resumed_from, cfg.train_dir)
        arch, overrides = _architecture(cfg, state)
        cfg = self.cfg = dataclasses.replace(cfg.resolve(arch), model_kwargs=overrides)

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
        report = self.report = freeze(model, cfg.tune())
        model.to(info.device)

        train_set = ClassFolder(cfg.train_dir, build_transform(cfg, is_training=True), classes)
        sampler = epoch_sampler(len(train_set), cfg.train_dir, cfg, info)
        steps_per_epoch = sampler.steps_per_epoch
        train_loader = data_loader(train_set, sampler, collate, cfg, info)
        self.val_loader = _val_loader(cfg.val_dir, classes, cfg, info)

        lr = cfg.lr if cfg.lr is not None else absolute_lr(cfg.blr, effective_batch(cfg, info))
        optimizer = build_optimizer(model, cfg.protocol, lr, cfg.weight_decay, cfg.layer_decay)
        schedule = cosine_schedule(lr, cfg.min_lr, cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch)
        amp_dtype, use_scaler = resolve_amp(cfg.precision, info.device)
        self.amp_dtype = amp_dtype
        scaler = torch.amp.GradScaler(info.device.type, enabled=use_scaler)
        if cfg.ema_decay is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.ema_decay)
        mixup = build_mixup(cfg, len(classes))
        recipe = ClassifierStep(criterion=build_criterion(cfg, mixup), lr_at=schedule, accum_iter=cfg.accum_iter,
                           mixup=mixup, amp_dtype=amp_dtype, clip_grad=cfg.clip_grad, ema=self.ema,
                           max_nonfinite=cfg.max_nonfinite, log_every=cfg.log_every, epochs=cfg.epochs)
        if info.is_main:
            logger.info("%s", report)
        record = {"protocol": cfg.protocol, "model": arch, "tune_blocks": str(cfg.tune()),
                  "trained_parameters": report.trained, "total_parameters": report.total,
                  "checkpoint_load": str(load_report) if load_report else None, "lr": lr,
                  "images": len(train_set), "val_images": len(self.val_loader.dataset), "classes": len(classes),
                  "precision": str(amp_dtype or "fp32")}
        return RunParts(model, optimizer, scaler, sampler, train_loader, recipe, record,
                        resolve_precision(cfg.precision, info.device))

    def restore(self, state: Mapping[str, Any], parts: RunParts, source: str) -> int:
        restore_training_state(state, parts.model, parts.optimizer, parts.scaler, self.ema, source)
        self.history = list(state["history"])
        return int(state["epoch"])

    def new_result(self, output: Path, epochs_done: int, steps: int, resumed_from: Path | None) -> RunResult:
        assert self.report is not None
        return RunResult(output=output, epochs_done=epochs_done, steps=steps, config=self.cfg, freeze=self.report,
                         history=self.history, resumed_from=resumed_from)

    def epoch_record(self, epoch: int, stats: EpochStats, counters: Counters, parts: RunParts) -> dict[str, Any]:
        cfg, info, monitor = self.cfg, self.info, self.monitor
        assert info is not None and monitor is not None
        record: dict[str, Any] = {
            "type": "epoch", "epoch": epoch, "step": counters.step, "train_loss": stats.mean_loss,
            "lr": max(g["lr"] for g in parts.optimizer.param_groups), "seconds": stats.seconds,
            "img_per_s": stats.images * info.world_size / max(stats.seconds, 1e-9),
            "skipped_images": stats.skipped_images, "nonfinite_steps": stats.nonfinite_steps,
        }
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            n = len(self.classes)
            record["val"] = evaluate(parts.model, self.val_loader, n, info, monitor, self.amp_dtype, "val")
            if self.ema is not None:
                record["val_ema"] = evaluate(self.ema.module, self.val_loader, n, info, monitor, self.amp_dtype,
                                             "val (EMA)")
        monitor.scalars(epoch, "epoch", {"train_loss": stats.mean_loss, "lr": record["lr"]})
        for key in ("val", "val_ema"):
            if key in record:
                monitor.scalars(epoch, key, {k: record[key][k] for k in ("top1", "top5", "loss")})
        if "val" in record:
            logger.info("epoch %d: val top-1 %.2f top-5 %.2f loss %.4f", epoch, record["val"]["top1"],
                        record["val"]["top5"], record["val"]["loss"])
        return record

    def save(self, path: Path, epoch: int, counters: Counters, parts: RunParts) -> None:
        save_training_state(path, parts.model, parts.optimizer, parts.scaler, self.ema, epoch, counters.step,
                            counters.as_dict(), self.history, self.classes, self.cfg.to_dict())

    def after_epoch(self, record: dict[str, Any], parts: RunParts, result: BaseRunResult) -> None:
        assert self.info is not None and self.report is not None
        if self.info.is_main:
            write_json(Path(self.cfg.output) / METRICS_NAME, _metrics_doc(self.cfg, self.classes, self.report,
                                                                          self.history))
        if self.on_epoch_end is not None:
            self.on_epoch_end(record)

    def finish(self, result: BaseRunResult, parts: RunParts) -> None:
        assert isinstance(result, RunResult) and self.report is not None
        cfg = self.cfg
        doc = _metrics_doc(cfg, self.classes, self.report, self.history)
        meta = model_meta(parts.model, cfg, self.classes, epochs=result.epochs_done, val=doc["last"],
                          trained_parameters=self.report.trained, checkpoint=cfg.checkpoint)
        result.model = export_model(parts.model, Path(cfg.output) / MODEL_NAME, meta)
        if self.ema is not None:
            result.ema_model = export_model(self.ema.module, Path(cfg.output) / EMA_MODEL_NAME,
                                            {**meta, "ema_decay": cfg.ema_decay})


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
    trainer = ClassifierTrainer(cfg, on_epoch_end)
    result = run(trainer)
    assert isinstance(result, RunResult)
    result.best = _metrics_doc(trainer.cfg, trainer.classes, result.freeze, result.history)["best"]
    return result


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
            write_json(Path(cfg.output) / EVAL_NAME, metrics)
        return metrics
    finally:
        monitor.close()
        cleanup()
