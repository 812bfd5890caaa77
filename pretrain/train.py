"""Pretraining run: ``train(config)`` sets up data, model, optimizer and the run folder, then
loops over epochs with checkpoints, logs and (MAE) reconstruction grids.

``config.method`` chooses what is pretrained, with the same data, budget and run folder: ``mae``,
or the controlled baseline ``mocov3`` (``pretrain.moco``, same loop: two crops, momentum update
after each step).  The third baseline, ``supervised``, is the classification trainer on the class
folders' labels: ``mae_transfer.baselines.train_baseline`` runs any method.

Run folder (``config.output``):
    config.json          the resolved options (usable again with ``--config``)
    log.jsonl            run / step / epoch records (``training.monitor``)
    tensorboard/         TensorBoard scalars
    checkpoint.pth       full model + training state, every ``save_every`` epochs and at the end
    encoder.safetensors  the encoder alone, in the mae_backbone format, at the end
    vis/epoch_XXXX.png   reconstruction grids every ``vis_every`` epochs (MAE)

The encoder's metadata names the ``method``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from pretrain.config import PretrainConfig
from pretrain.data import ImageFiles, build_transform, collate
from pretrain.engine import MaeStep
from pretrain.masking import check_masking, mask_noise
from pretrain.model import MAE_ARCHS, MaskedAutoencoderViT, create_mae
from pretrain.moco import MoCoV3, MocoStep, build_moco_optimizer, build_moco_transform, create_moco
from pretrain.optim import build_optimizer
from pretrain.state import (
    ENCODER_NAME,
    export_encoder,
    load_training_state,
    restore_training_state,
    save_training_state,
)
from training.data import list_images, load_rgb, mix_seed
from training.distributed import all_reduce_sum
from training.loop import Counters, EpochStats
from training.precision import AMP_DTYPES, resolve_precision
from training.run import RunParts, Trainer, data_loader, effective_batch, epoch_sampler
from training.run import RunResult as BaseRunResult
from training.run import run
from training.schedule import absolute_lr, cosine_schedule

logger = logging.getLogger(__name__)

VIS_DIR = "vis"
# options that may change between a run and its resumption without a warning
_RESUMABLE_CHANGES = {"resume", "auto_resume", "epochs", "num_workers", "progress", "tensorboard", "log_every",
                      "save_every", "vis_every", "vis_images", "device", "dist_backend", "output", "data",
                      "max_nonfinite", "working_weights"}  # working weights: the same run, bit for bit


@dataclass
class RunResult(BaseRunResult):
    """What ``train`` did (``history``: the epoch records of this call)."""

    encoder: Path | None = None


def build_model(cfg: PretrainConfig) -> MaskedAutoencoderViT | MoCoV3:
    """The MAE (or, with ``method`` mocov3, the MoCo v3 model) the options describe."""
    if cfg.method == "mocov3":
        return create_moco(MAE_ARCHS[cfg.model], img_size=cfg.img_size, proj_hidden=cfg.moco_proj_hidden,
                           dim=cfg.moco_dim, pred_hidden=cfg.moco_pred_hidden, temperature=cfg.moco_temperature,
                           grad_checkpointing=cfg.grad_checkpointing, **cfg.model_kwargs)
    if cfg.method != "mae":
        raise ValueError(f"build_model: method {cfg.method!r} has no pretraining model")
    return create_mae(
        cfg.model,
        img_size=cfg.img_size,
        decoder_embed_dim=cfg.decoder_dim,
        decoder_depth=cfg.decoder_depth,
        decoder_num_heads=cfg.decoder_heads,
        target=cfg.target,
        masking=cfg.masking,
        encoder_mask_tokens=cfg.encoder_mask_tokens,
        grad_checkpointing=cfg.grad_checkpointing,
        **cfg.model_kwargs,
    )


def _vis_batch(files: list[Path], img_size: int, count: int) -> torch.Tensor | None:
    """The first ``count`` readable images, center-cropped (the same for the whole run)."""
    transform = build_transform("none", img_size)
    keep = []
    for path in files:
        if len(keep) == count:
            break
        try:
            keep.append(transform(load_rgb(path)))
        except Exception:  # unreadable: the training loop reports it
            continue
    return torch.stack(keep) if keep else None


def _save_grid(model: MaskedAutoencoderViT, imgs: torch.Tensor, cfg: PretrainConfig, epoch: int, path: Path) -> None:
    from pretrain.visualize import reconstruct, render_figure, save_figure

    was_training = model.training
    noise = mask_noise(cfg.masking, model.grid_size, cfg.mask_ratio,
                       seeds=[mix_seed(cfg.seed, 0x715, i) for i in range(len(imgs))])
    rec = reconstruct(model, imgs, cfg.mask_ratio, noise)
    model.train(was_training)
    title = f"epoch {epoch}: loss {rec.loss:.4f} on masked patches"
    save_figure(render_figure(rec, title, scale=max(1, 128 // cfg.img_size)), rec, path, title)


def _encoder_meta(cfg: PretrainConfig) -> dict[str, Any]:
    """What the exported encoder's metadata says about how it was pretrained."""
    meta: dict[str, Any] = {"method": cfg.method, "pretrain_model": cfg.model}
    if cfg.method == "mae":
        meta.update(mask_ratio=cfg.mask_ratio, masking=cfg.masking, target=cfg.target)
    elif cfg.method == "mocov3":
        meta.update(moco_temperature=cfg.moco_temperature, moco_momentum=cfg.moco_momentum,
                    moco_proj_hidden=cfg.moco_proj_hidden, moco_dim=cfg.moco_dim,
                    moco_pred_hidden=cfg.moco_pred_hidden)
    return meta


class PretrainTrainer(Trainer):
    """The MAE's (or MoCo v3's) part of the shared run skeleton (``training.run``)."""

    resumable_changes = _RESUMABLE_CHANGES

    def __init__(self, cfg: PretrainConfig, model: MaskedAutoencoderViT | MoCoV3 | None = None):
        super().__init__(cfg)
        self.prebuilt = model
        self.moco = cfg.method == "mocov3"
        self.compile_on_cpu = not self.moco  # the MAE step was measured compiled on the CPU
        self.lr = 0.0
        self.vis_imgs: torch.Tensor | None = None

    def load_state(self, path: Path) -> dict[str, Any]:
        return load_training_state(path)

    def check_inputs(self) -> None:
        cfg = self.cfg
        files = list_images(cfg.data)
        transform = build_moco_transform(cfg.img_size) if self.moco else build_transform(cfg.aug, cfg.img_size)
        self.dataset = ImageFiles(files, transform)
        self.dataset.first_readable()  # raises DataError before anything else when nothing decodes

    def build(self, state: Mapping[str, Any] | None) -> RunParts:
        cfg, info = self.cfg, self.info
        assert info is not None
        dataset = self.dataset

        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        model = self.prebuilt if self.prebuilt is not None else build_model(cfg)
        if not self.moco:
            check_masking(cfg.masking, cfg.mask_ratio, model.grid_size)
        model.to(info.device)

        sampler = epoch_sampler(len(dataset), cfg.data, cfg, info)
        steps_per_epoch = sampler.steps_per_epoch
        lr = self.lr = cfg.lr if cfg.lr is not None else absolute_lr(cfg.blr, effective_batch(cfg, info))
        optimizer = (build_moco_optimizer(model, lr, cfg.weight_decay) if self.moco  # type: ignore[arg-type]
                     else build_optimizer(model, lr, cfg.weight_decay))
        precision = resolve_precision(cfg.precision, info.device)
        amp_dtype = AMP_DTYPES[precision]
        scaler = torch.amp.GradScaler(info.device.type, enabled=precision == "fp16")
        if info.is_main and cfg.vis_every and not self.moco:
            self.vis_imgs = _vis_batch(dataset.files, cfg.img_size, cfg.vis_images)

        total_steps = cfg.epochs * steps_per_epoch
        warmup_steps = cfg.warmup_epochs * steps_per_epoch
        limits = dict(lr_at=cosine_schedule(lr, cfg.min_lr, warmup_steps, total_steps), accum_iter=cfg.accum_iter,
                      amp_dtype=amp_dtype, clip_grad=cfg.clip_grad, max_nonfinite=cfg.max_nonfinite, log_every=cfg.log_every, epochs=cfg.epochs)
        recipe: MaeStep | MocoStep
        if self.moco:
            recipe = MocoStep(momentum=cfg.moco_momentum, total_steps=total_steps, **limits)
        else:
            recipe = MaeStep(mask_ratio=cfg.mask_ratio, masking=cfg.masking, grid=model.grid_size, **limits)
        loader = data_loader(dataset, sampler, collate, cfg, info)
        record = {"method": cfg.method, "lr": lr, "images": len(dataset), "precision": precision}
        return RunParts(model, optimizer, scaler, sampler, loader, recipe, record, precision)

    def restore(self, state: Mapping[str, Any], parts: RunParts, source: str) -> int:
        epochs_done, _, _ = restore_training_state(state, parts.model, parts.optimizer, parts.scaler, source)
        return epochs_done

    def new_result(self, output: Path, epochs_done: int, steps: int, resumed_from: Path | None) -> RunResult:
        return RunResult(output=output, epochs_done=epochs_done, steps=steps, resumed_from=resumed_from)

    def epoch_record(self, epoch: int, stats: EpochStats, counters: Counters, parts: RunParts) -> dict[str, Any]:
        assert self.info is not None and self.monitor is not None
        skipped, images = (int(v) for v in all_reduce_sum([stats.skipped_images, stats.images], self.info))
        counters.skipped_images += skipped
        record = {
            "type": "epoch", "epoch": epoch, "step": counters.step, "loss": stats.mean_loss,
            "lr": parts.recipe.lr_at(counters.step - 1), "img_per_s": images / max(stats.seconds, 1e-9),  # type: ignore[attr-defined]
            "seconds": stats.seconds, "images": images, "skipped_images": skipped,
            "skipped_files": stats.failures, "nonfinite_steps": stats.nonfinite_steps,
            "empty_steps": stats.empty_steps,
        }
        self.monitor.scalars(epoch, "epoch", {k: record[k] for k in ("loss", "img_per_s", "skipped_images",
                                                                     "nonfinite_steps")})
        if skipped:
            logger.warning("epoch %d: skipped %d unreadable images", epoch, skipped)
        return record

    def save(self, path: Path, epoch: int, counters: Counters, parts: RunParts) -> None:
        save_training_state(path, parts.model, parts.optimizer, parts.scaler, epoch, counters.step,
                            counters.as_dict(), self.cfg.to_dict())

    def after_epoch(self, record: dict[str, Any], parts: RunParts, result: BaseRunResult) -> None:
        cfg, done = self.cfg, record["epoch"]
        if self.vis_imgs is not None and (done % cfg.vis_every == 0 or done == cfg.epochs):
            _save_grid(parts.model, self.vis_imgs.to(self.info.device), cfg, done,  # type: ignore[arg-type, union-attr]
                       Path(cfg.output) / VIS_DIR / f"epoch_{done:04d}.png")

    def finish(self, result: BaseRunResult, parts: RunParts) -> None:
        meta = {"epochs": result.epochs_done, **_encoder_meta(self.cfg)}
        result.encoder = export_encoder(parts.model, Path(self.cfg.output) / ENCODER_NAME, meta)  # type: ignore[attr-defined]


def train(cfg: PretrainConfig, model: MaskedAutoencoderViT | MoCoV3 | None = None) -> RunResult:
    """Pretrain as ``cfg`` says (MAE, or MoCo v3 with ``method`` mocov3), resuming from a checkpoint
    when there is one.

    Run it directly or under ``torchrun`` (one process per device, any number of nodes).

    Args:
        cfg: the options.
        model: a prebuilt model (default: ``build_model(cfg)``).
    Raises:
        ValueError: ``method`` supervised (see ``mae_transfer.baselines``).
        DataError: no readable image, or fewer images than one global batch.
        TrainingDiverged: too many non-finite losses in a row.
        NonFiniteModelError: the weights became non-finite (the checkpoint keeps the last good state).
    """
    cfg.validate()
    if cfg.method == "supervised":
        raise ValueError("method supervised: the supervised baseline is the classification trainer's; run it with "
                         "mae_transfer.baselines.train_baseline(cfg) or `mae-transfer pretrain --method supervised`")
    return run(PretrainTrainer(cfg, model))  # type: ignore[return-value]
