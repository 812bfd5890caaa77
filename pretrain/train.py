"""Pretraining run: ``train(config)`` sets up data, model, optimizer and the run folder, then
loops over epochs with checkpoints, logs and (MAE) reconstruction grids.

``config.method`` chooses what is pretrained, with the same data, budget and run folder: ``mae``,
or the controlled baselines ``mocov3`` (``pretrain.moco``, same loop: two crops, momentum update
after each step) and ``supervised`` (``pretrain.supervised``: the classification trainer on the
class folders' labels).

Run folder (``config.output``):
    config.json          the resolved options (usable again with ``--config``)
    log.jsonl            run / step / epoch records (``pretrain.monitor``)
    tensorboard/         TensorBoard scalars
    checkpoint.pth       full model + training state, every ``save_every`` epochs and at the end
    encoder.safetensors  the encoder alone, in the mae_backbone format, at the end
    vis/epoch_XXXX.png   reconstruction grids every ``vis_every`` epochs (MAE)

The encoder's metadata names the ``method``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from mae_backbone import atomic_write
from pretrain.config import PretrainConfig
from pretrain.data import ImageFiles, build_transform, collate
from pretrain.engine import StepSetup
from pretrain.masking import check_masking, mask_noise
from pretrain.model import MAE_ARCHS, MaskedAutoencoderViT, create_mae
from pretrain.moco import MoCoV3, MocoStepSetup, build_moco_optimizer, build_moco_transform, create_moco
from pretrain.optim import build_optimizer
from pretrain.state import (
    CHECKPOINT_NAME,
    ENCODER_NAME,
    export_encoder,
    load_training_state,
    restore_training_state,
    save_training_state,
)
from training.data import DataError, EpochBatchSampler, list_images, load_rgb, mix_seed
from training.distributed import all_reduce_sum, barrier, cleanup, init_distributed
from training.loop import Counters, train_one_epoch
from training.monitor import Monitor
from training.precision import AMP_DTYPES, resolve_precision
from training.schedule import absolute_lr, lr_at
from training.state import check_finite_weights, seed_epoch_rngs, warn_config_changes

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
VIS_DIR = "vis"
# options that may change between a run and its resumption without a warning
_RESUMABLE_CHANGES = {"resume", "auto_resume", "epochs", "num_workers", "progress", "tensorboard", "log_every",
                      "save_every", "vis_every", "vis_images", "device", "dist_backend", "output", "data",
                      "max_nonfinite"}


@dataclass
class RunResult:
    """What ``train`` did."""

    output: Path
    epochs_done: int
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)  # epoch records of this call
    checkpoint: Path | None = None
    encoder: Path | None = None
    resumed_from: Path | None = None


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


def train(cfg: PretrainConfig, model: MaskedAutoencoderViT | MoCoV3 | None = None) -> RunResult:
    """Pretrain as ``cfg`` says (MAE, or the ``method``'s baseline), resuming from a checkpoint
    when there is one.

    Run it directly or under ``torchrun`` (one process per device, any number of nodes).

    Args:
        cfg: the options.
        model: a prebuilt model (default: ``build_model(cfg)``; not with ``supervised``).
    Raises:
        DataError: no readable image, or fewer images than one global batch.
        TrainingDiverged: too many non-finite losses in a row.
        NonFiniteModelError: the weights became non-finite (the checkpoint keeps the last good state).
    """
    cfg.validate()
    if cfg.method == "supervised":
        if model is not None:
            raise ValueError("train: the supervised baseline builds its own classifier; do not pass a model")
        from pretrain.supervised import train_supervised

        return train_supervised(cfg)
    moco = cfg.method == "mocov3"
    info = init_distributed(cfg.device, cfg.dist_backend)
    monitor = Monitor(Path(cfg.output), enabled=False)
    try:
        out = Path(cfg.output)
        files = list_images(cfg.data)
        transform = build_moco_transform(cfg.img_size) if moco else build_transform(cfg.aug, cfg.img_size)
        dataset = ImageFiles(files, transform)
        dataset.first_readable()  # raises DataError before anything else when nothing decodes

        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        model = model if model is not None else build_model(cfg)
        if not moco:
            check_masking(cfg.masking, cfg.mask_ratio, model.grid_size)
        model.to(info.device)

        sampler = EpochBatchSampler(len(dataset), cfg.batch_size, cfg.seed, info.rank, info.world_size, cfg.accum_iter)
        effective_batch = cfg.batch_size * cfg.accum_iter * info.world_size
        if sampler.steps_per_epoch == 0:
            raise DataError(f"{cfg.data}: {len(dataset)} images, fewer than one optimizer step needs "
                            f"({effective_batch} = batch {cfg.batch_size} x accum {cfg.accum_iter} x "
                            f"{info.world_size} processes)")
        steps_per_epoch = sampler.steps_per_epoch
        lr = cfg.lr if cfg.lr is not None else absolute_lr(cfg.blr, effective_batch)
        optimizer = (build_moco_optimizer(model, lr, cfg.weight_decay) if moco  # type: ignore[arg-type]
                     else build_optimizer(model, lr, cfg.weight_decay))
        precision = resolve_precision(cfg.precision, info.device)
        amp_dtype = AMP_DTYPES[precision]
        scaler = torch.amp.GradScaler(info.device.type, enabled=precision == "fp16")

        counters = Counters()
        start_epoch = 0
        ckpt_path = out / CHECKPOINT_NAME
        resume = Path(cfg.resume) if cfg.resume else (ckpt_path if cfg.auto_resume and ckpt_path.exists() else None)
        if resume is not None:
            state = load_training_state(resume)
            warn_config_changes(state.get("config", {}), cfg.to_dict(), resume, _RESUMABLE_CHANGES)
            start_epoch, step, saved = restore_training_state(state, model, optimizer, scaler, str(resume))
            counters = Counters(**{k: int(v) for k, v in saved.items() if k in Counters().as_dict()})
            counters.step = step
            del state
            logger.info("resumed from %s: %d epochs, %d steps done", resume, start_epoch, step)

        monitor = Monitor(out, enabled=info.is_main, tensorboard=cfg.tensorboard, progress=cfg.progress)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            text = json.dumps(cfg.to_dict(), indent=2) + "\n"
            atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
            monitor.log({"type": "run", "method": cfg.method, "resumed_from": str(resume) if resume else None,
                         "start_epoch": start_epoch,
                         "world_size": info.world_size, "effective_batch": effective_batch, "lr": lr,
                         "images": len(dataset), "steps_per_epoch": steps_per_epoch,
                         "precision": precision, "device": str(info.device)})
        show = info.is_main and cfg.vis_every and not moco
        vis_imgs = _vis_batch(files, cfg.img_size, cfg.vis_images) if show else None

        if info.distributed:
            ddp_model: torch.nn.Module = DistributedDataParallel(
                model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
        else:
            ddp_model = model
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate,
                            pin_memory=info.device.type == "cuda", persistent_workers=cfg.num_workers > 0)
        total_steps = cfg.epochs * steps_per_epoch
        warmup_steps = cfg.warmup_epochs * steps_per_epoch
        setup: StepSetup | MocoStepSetup
        if moco:
            setup = MocoStepSetup(
                lr_at=lambda step: lr_at(step, lr, cfg.min_lr, warmup_steps, total_steps),
                momentum=cfg.moco_momentum, total_steps=total_steps, accum_iter=cfg.accum_iter, amp_dtype=amp_dtype,
                clip_grad=cfg.clip_grad, max_nonfinite=cfg.max_nonfinite, log_every=cfg.log_every, epochs=cfg.epochs,
            )
        else:
            setup = StepSetup(
                mask_ratio=cfg.mask_ratio, masking=cfg.masking, grid=model.grid_size, accum_iter=cfg.accum_iter,
                lr_at=lambda step: lr_at(step, lr, cfg.min_lr, warmup_steps, total_steps),
                amp_dtype=amp_dtype, clip_grad=cfg.clip_grad, max_nonfinite=cfg.max_nonfinite,
                log_every=cfg.log_every, epochs=cfg.epochs,
            )
        result = RunResult(output=out, epochs_done=start_epoch, steps=counters.step,
                           resumed_from=resume)
        seen_failures: set[str] = set()
        for epoch in range(start_epoch, cfg.epochs):
            seed_epoch_rngs(cfg.seed, epoch, info.rank)
            sampler.set_epoch(epoch)
            stats = train_one_epoch(ddp_model, loader, steps_per_epoch, optimizer, scaler, setup, counters, epoch,
                                    info, monitor, seen_failures)
            skipped, images = (int(v) for v in all_reduce_sum([stats.skipped_images, stats.images], info))
            counters.skipped_images += skipped
            done = epoch + 1
            record = {
                "type": "epoch", "epoch": done, "step": counters.step, "loss": stats.mean_loss,
                "lr": setup.lr_at(counters.step - 1), "img_per_s": images / max(stats.seconds, 1e-9),
                "seconds": stats.seconds, "images": images, "skipped_images": skipped,
                "skipped_files": stats.failures, "nonfinite_steps": stats.nonfinite_steps,
                "empty_steps": stats.empty_steps,
            }
            monitor.log(record)
            monitor.scalars(done, "epoch", {k: record[k] for k in ("loss", "img_per_s", "skipped_images",
                                                                   "nonfinite_steps")})
            result.history.append(record)
            if skipped:
                logger.warning("epoch %d: skipped %d unreadable images", done, skipped)
            if done % cfg.save_every == 0 or done == cfg.epochs:
                check_finite_weights(model, done, ckpt_path)
                if info.is_main:
                    save_training_state(ckpt_path, model, optimizer, scaler, done, counters.step,
                                        counters.as_dict(), cfg.to_dict())
                    result.checkpoint = ckpt_path
                barrier(info)
            if vis_imgs is not None and (done % cfg.vis_every == 0 or done == cfg.epochs):
                _save_grid(model, vis_imgs.to(info.device), cfg, done,  # type: ignore[arg-type]
                           out / VIS_DIR / f"epoch_{done:04d}.png")
            result.epochs_done, result.steps = done, counters.step

        if info.is_main:
            meta = {"epochs": result.epochs_done, **_encoder_meta(cfg)}
            result.encoder = export_encoder(model, out / ENCODER_NAME, meta)
            if result.checkpoint is None and ckpt_path.exists():
                result.checkpoint = ckpt_path
        barrier(info)
        return result
    finally:
        monitor.close()
        cleanup()
