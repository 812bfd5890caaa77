"""The controlled baselines, on top of both trainers (so that neither imports the other).

One call pretrains a backbone by any method on an image set, with a given budget:
``pretrain_backbone("mae" | "mocov3" | "supervised", data, out, epochs=..., batch_size=...)``;
``train_baseline(cfg)`` runs ``mae-transfer pretrain``'s options for any ``--method``.

Every method gets the same encoder, image size, epochs, batch, warmup (a tenth of the epochs, at
least one) and seed, and otherwise its own published recipe: MAE's (``pretrain.config``
defaults), MoCo v3's (``pretrain.moco``: wd 0.1, tau 0.2, m0 0.99, 4096-wide heads) and the
DeiT-style supervised one (below).  ``options`` changes any other option of ``mae-transfer
pretrain`` (e.g. a lighter MAE decoder, a learning rate fitted to a tiny budget).  The result is
an encoder file in the ``mae_backbone`` format whose metadata names the method.

The supervised baseline: a ViT trained from random initialization on the labels of the class
folders, with the pretraining run's budget (epochs, image size, batch, seed), by the
classification trainer (``classification.train``); its output is an encoder like MAE's.  The
recipe is ``classification``'s end-to-end fine-tuning recipe without a checkpoint, which is
DeiT's (AdamW 0.9 / 0.999, wd 0.05, lr 5e-4 per 512 images = base lr 2.5e-4 per 256, warmup +
cosine, RandAug (9, 0.5), mixup 0.8 / cutmix 1.0, label smoothing 0.1, random erasing 0.25, drop
path 0.1), with no layer-wise lr decay (nothing is pretrained) and DeiT's class-token feature, so
that the trained ViT is exactly an encoder (``cls_token``, ``pos_embed``, ``patch_embed``,
``blocks``, ``norm``) plus a head, which the export drops.  Unlike the MAE and MoCo encoders, the
position embedding is learned (DeiT).  Its data: ``cfg.data`` is a dataset root holding
``train/`` (and ``val/``) class folders, or a class folder itself; without a ``val/`` folder the
end-of-run accuracy is measured on the training images (logged as such).  Its run folder is a
classification run folder (``config.json`` holds the classification options, ``checkpoint.pth``
resumes, ``model.safetensors`` is the classifier) plus ``encoder.safetensors``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from classification import make_config as classify_config
from classification import train as classify
from pretrain import ENCODER_NAME, MAE_ARCHS, METHODS, PretrainConfig, RunResult, make_config
from pretrain import train as pretrain

logger = logging.getLogger(__name__)

# what pretrain_backbone sets itself; ``options`` may not change it
_BUDGET = ("method", "data", "output", "model", "model_kwargs", "img_size", "epochs", "batch_size", "seed")


def data_folder(method: str, data: str | Path) -> Path:
    """The images a method reads from an ImageNet-style root: ``data/train`` for the
    self-supervised methods when it exists (else ``data``), the root itself for ``supervised``
    (which finds ``train/`` and ``val/`` in it)."""
    root = Path(data)
    if method != "supervised" and (root / "train").is_dir():
        return root / "train"
    return root


def pretrain_backbone(
    method: str,
    data: str | Path,
    out: str | Path,
    *,
    encoder: str = "vit_tiny_patch16",
    encoder_kwargs: dict | None = None,
    img_size: int = 64,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    log: Callable[[str], Any] = print,
    options: Mapping[str, Any] | None = None,
) -> Path:
    """Pretrain an ``encoder`` by ``method`` on ``data`` into the run folder ``out``.

    Args:
        method: ``mae``, ``mocov3`` or ``supervised``.
        data: an ImageNet-style root with ``train/`` (and ``val/``) class folders, as
            ``mae-transfer data sample`` writes under ``classification/``; the self-supervised
            methods read ``train/`` only, without its labels.
        out: the run folder (re-running resumes from its checkpoint).
        encoder: a ``mae_backbone.VIT_ARCHS`` name; ``encoder_kwargs`` its overrides (depth, patch_size, ...).
        img_size, epochs, batch_size, seed: the budget, the same for every method.
        log: receives one line when the run starts and one when it ends.
        options: further ``mae-transfer pretrain`` options (not the budget above).
    Returns:
        the encoder checkpoint (``out/encoder.safetensors``), readable by ``mae_backbone.read_checkpoint``.
    Raises:
        ValueError: unknown method, encoder or option.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    model = "mae_" + encoder
    if model not in MAE_ARCHS:
        known = ", ".join(a.removeprefix("mae_") for a in MAE_ARCHS)
        raise ValueError(f"unknown encoder {encoder!r}; known: {known}")
    extra = dict(options or {})
    fixed = sorted(set(k.replace("-", "_") for k in extra) & set(_BUDGET))
    if fixed:
        raise ValueError(f"options: {', '.join(fixed)} are pretrain_backbone's own arguments")
    values: dict[str, Any] = dict(
        warmup_epochs=max(1, epochs // 10), num_workers=0, progress=False, tensorboard=False,
        save_every=max(1, epochs), log_every=50,
    )
    if method == "mae":
        values.update(vis_every=max(1, epochs), vis_images=4)
    values.update(extra)
    values.update(method=method, data=str(data_folder(method, data)), output=str(out), model=model,
                  model_kwargs=dict(encoder_kwargs or {}), img_size=img_size, epochs=epochs, batch_size=batch_size,
                  seed=seed)
    cfg = make_config(values)
    log(f"pretrain {method}: {encoder} {dict(encoder_kwargs or {})} at {img_size} px, {epochs} epochs, "
        f"batch {batch_size}, seed {seed} -> {out}")
    start = time.perf_counter()
    result = train_baseline(cfg)
    if result.encoder is None:
        raise RuntimeError(f"pretrain {method}: the run in {out} wrote no encoder")
    losses = [r.get("loss", r.get("train_loss")) for r in result.history]
    shown = f", loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses and None not in losses else ""
    log(f"pretrain {method}: {result.epochs_done} epochs in {time.perf_counter() - start:.0f} s{shown}; "
        f"encoder {result.encoder}")
    return Path(result.encoder)


def train_baseline(cfg: PretrainConfig) -> RunResult:
    """Pretrain as ``cfg`` says, by any ``method``: ``mae`` and ``mocov3`` with ``pretrain.train``,
    ``supervised`` with the classification trainer (``train_supervised``)."""
    cfg.validate()
    return train_supervised(cfg) if cfg.method == "supervised" else pretrain(cfg)


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


def train_supervised(cfg: PretrainConfig) -> RunResult:
    """Train the supervised baseline as ``cfg`` says (see the module docstring); resumes like any
    classification run.

    Returns:
        a pretraining ``RunResult`` with ``encoder`` = ``OUTPUT/encoder.safetensors``, ``checkpoint``
        the classification checkpoint, ``history`` the classification epoch records.
    """
    result = classify(classify_config("finetune", supervised_options(cfg)))
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
