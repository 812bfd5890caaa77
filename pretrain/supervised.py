"""The supervised baseline: a ViT trained from random initialization on the labels of the class
folders, with the pretraining run's budget (epochs, image size, batch, seed), by the
classification trainer (``classification.train``); its output is an encoder like MAE's.

The recipe is ``classification``'s end-to-end fine-tuning recipe without a checkpoint, which is
DeiT's (AdamW 0.9 / 0.999, wd 0.05, lr 5e-4 per 512 images = base lr 2.5e-4 per 256, warmup +
cosine, RandAug (9, 0.5), mixup 0.8 / cutmix 1.0, label smoothing 0.1, random erasing 0.25, drop
path 0.1), with no layer-wise lr decay (nothing is pretrained) and DeiT's class-token feature, so
that the trained ViT is exactly an encoder (``cls_token``, ``pos_embed``, ``patch_embed``,
``blocks``, ``norm``) plus a head, which the export drops.  Unlike the MAE and MoCo encoders, the
position embedding is learned (DeiT).

Data: ``cfg.data`` is a dataset root holding ``train/`` (and ``val/``) class folders, or a class
folder itself; without a ``val/`` folder the end-of-run accuracy is measured on the training
images (logged as such).  The run folder is a classification run folder (``config.json`` holds
the classification options, ``checkpoint.pth`` resumes, ``model.safetensors`` is the classifier)
plus ``encoder.safetensors``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pretrain.config import PretrainConfig
from pretrain.model import MAE_ARCHS
from pretrain.state import ENCODER_NAME

logger = logging.getLogger(__name__)

# classification options of the supervised baseline that are not taken from the pretraining options
SUPERVISED_RECIPE: dict[str, Any] = dict(pool="cls", layer_decay=1.0, drop_path=0.1)


def class_folders(data: str | Path) -> tuple[Path, Path]:
    """(train, val) class folders of ``data``: ``data/train`` and ``data/val`` when ``data/train``
    exists (val falls back to train when missing), else ``data`` for both."""
    root = Path(data)
    train = root / "train" if (root / "train").is_dir() else root
    val = root / "val" if train != root and (root / "val").is_dir() else train
    if val == train:
        logger.warning("%s: no val/ class folder; the supervised baseline's accuracy is measured on its "
                       "training images", root)
    return train, val


def supervised_options(cfg: PretrainConfig) -> dict[str, Any]:
    """The ``classification.make_config("finetune", ...)`` values of a supervised pretraining run."""
    train, val = class_folders(cfg.data)
    kwargs = dict(cfg.model_kwargs)
    drop_path = kwargs.pop("drop_path_rate", SUPERVISED_RECIPE["drop_path"])
    values: dict[str, Any] = dict(
        SUPERVISED_RECIPE, drop_path=drop_path,
        train=str(train), val=str(val), output=cfg.output, model=MAE_ARCHS[cfg.model], model_kwargs=kwargs,
        img_size=cfg.img_size, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, batch_size=cfg.batch_size,
        accum_iter=cfg.accum_iter, blr=cfg.blr, lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        clip_grad=cfg.clip_grad, precision=cfg.precision, seed=cfg.seed, num_workers=cfg.num_workers,
        device=cfg.device, dist_backend=cfg.dist_backend, eval_every=cfg.epochs, save_every=cfg.save_every,
        log_every=cfg.log_every, tensorboard=cfg.tensorboard, progress=cfg.progress, resume=cfg.resume,
        auto_resume=cfg.auto_resume, max_nonfinite=cfg.max_nonfinite,
    )
    return values


def export_supervised_encoder(model_path: str | Path, path: str | Path, meta: dict[str, Any]) -> Path:
    """The classifier ``model_path`` (a classification ``model.safetensors`` with a class-token
    head) without its head, in the ``mae_backbone`` format with ``meta`` added."""
    from mae_backbone.checkpoint import read_checkpoint, save_checkpoint

    sd, stored = read_checkpoint(model_path)
    if "fc_norm.weight" in sd or "norm.weight" not in sd:
        raise ValueError(f"{model_path}: not a class-token classifier (expected norm.* and no fc_norm.*)")
    encoder = {k: v for k, v in sd.items() if not k.startswith("head.")}
    info = {k: stored[k] for k in ("arch", "embed_dim", "depth", "num_heads", "patch_size", "in_chans", "img_size")
            if k in stored}
    overrides = dict(stored.get("arch_overrides") or {})
    info.update(arch_overrides=overrides, source="mae-transfer pretrain", **meta)
    return save_checkpoint(encoder, path, info)


def train_supervised(cfg: PretrainConfig):  # -> pretrain.train.RunResult
    """Train the supervised baseline as ``cfg`` says (see the module docstring); resumes like any
    classification run.

    Returns:
        ``pretrain.train.RunResult`` with ``encoder`` = ``OUTPUT/encoder.safetensors``, ``checkpoint``
        the classification checkpoint, ``history`` the classification epoch records.
    """
    from classification import make_config, train
    from pretrain.train import RunResult

    result = train(make_config("finetune", supervised_options(cfg)))
    encoder = None
    if result.model is not None:  # the main process exported the classifier
        last = result.history[-1].get("val", {}) if result.history else {}
        meta = {"method": "supervised", "pretrain_model": cfg.model, "epochs": result.epochs_done,
                "supervised_top1": last.get("top1")}
        encoder = export_supervised_encoder(result.model, Path(cfg.output) / ENCODER_NAME, meta)
    steps = int(result.history[-1]["step"]) if result.history else 0
    return RunResult(output=Path(cfg.output), epochs_done=result.epochs_done, steps=steps,
                     history=list(result.history), checkpoint=result.checkpoint, encoder=encoder,
                     resumed_from=result.resumed_from)
