"""Run state on disk: the resumable checkpoint, the exported classifier, and loading a model to
evaluate.

- ``checkpoint.pth`` (``save_training_state``): model, optimizer, grad scaler, EMA weights,
  ``epoch`` (epochs completed), ``step`` (optimizer steps completed = the schedule position),
  counters, the per-epoch history, the class names and the resolved config.  Tensors, numbers,
  strings and containers only (read with ``safe_torch_load``, which verifies its sha256), written
  atomically, never from a model with non-finite weights.  With all randomness of an epoch a pure function of
  ``(seed, epoch)``, this is the whole state: a resumed run ends bit for bit where the
  uninterrupted one ends (on CPU).
- ``model.safetensors`` (``export_model``): the classifier in the mae_backbone format, a plain
  ViT with a linear head (a linear probe's BatchNorm is folded into it), with metadata
  (``arch``, ``arch_overrides``, ``num_classes``, ``global_pool``, ``classes``, ``img_size``,
  ``protocol``, final metrics), enough for ``--eval`` to rebuild it.
- ``model_for_eval``: our export, our training checkpoint, or a foreign classifier checkpoint
  (official MAE / DeiT fine-tuned, timm, HF ...), whose head size and pooling are read from the
  weights.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from classification.models import ClassifierViT, build_classifier, describe_model, fold_bn_head
from mae_backbone import CheckpointError, safe_torch_load
from mae_backbone.checkpoint import infer_arch, load_checkpoint, read_checkpoint, save_checkpoint
from training.state import (
    NonFiniteModelError,
    load_model_strict,
    nonfinite_parameters,
    restore_model_and_optimizer,
    check_state_checksum,
    resumable_state,
    write_state,
)

CHECKPOINT_NAME = "checkpoint.pth"
MODEL_NAME = "model.safetensors"
EMA_MODEL_NAME = "model_ema.safetensors"
STATE_FORMAT = "mae-transfer/classify"
STATE_VERSION = 2  # 2: with a checksum (mae_backbone.io.CHECKSUM_KEY)


def _cpu(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in sd.items()}


def save_training_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    ema: Any,
    epoch: int,
    step: int,
    counters: Mapping[str, int],
    history: Sequence[Mapping[str, Any]],
    classes: Sequence[str],
    config: Mapping[str, Any],
) -> Path:
    """Write ``checkpoint.pth`` atomically.

    Raises:
        NonFiniteModelError: a weight is NaN/inf (the existing file is left untouched).
    """
    state = resumable_state(path, model, optimizer, scaler, epoch, step, counters, config)
    state.update(ema=_cpu(ema.module.state_dict()) if ema is not None else None, history=[dict(r) for r in history],
                 classes=list(classes), format=STATE_FORMAT, version=STATE_VERSION)
    return write_state(state, path)


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Read a ``checkpoint.pth`` written by ``save_training_state``."""
    state = safe_torch_load(path)  # verifies the checksum
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or "optimizer" not in state:
        raise CheckpointError(f"{path}: not a classification training checkpoint (written by mae-transfer "
                              "finetune/linprobe); to start from pretrained weights use --checkpoint")
    check_state_checksum(state, path)
    return state


def restore_training_state(state: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                           scaler: torch.amp.GradScaler | None, ema: Any, source: str) -> None:
    """Put a checkpoint's model, optimizer, scaler and EMA state in place (strictly)."""
    restore_model_and_optimizer(state, model, optimizer, scaler, source,
                                "; was it written for another protocol or --tune-blocks?")
    if ema is not None:
        if state.get("ema") is None:
            raise CheckpointError(f"{source}: has no EMA weights, but --ema-decay is set")
        load_model_strict(ema.module, state["ema"], source + " (EMA)")


def export_model(model: nn.Module, path: str | Path, meta: Mapping[str, Any]) -> Path:
    """Write the classifier as a plain ViT (BN head folded) in the mae_backbone format."""
    bad = nonfinite_parameters(model)
    if bad:
        raise NonFiniteModelError(f"the model has non-finite weights ({', '.join(bad[:5])}); not exporting {path}")
    plain = fold_bn_head(copy.deepcopy(model).cpu().eval())
    return save_checkpoint(plain, path, dict(meta))


def model_meta(model: ClassifierViT, cfg: Any, classes: Sequence[str], **extra: Any) -> dict[str, Any]:
    """Metadata that ``model_for_eval`` rebuilds an exported classifier from."""
    return {
        "arch": cfg.model,
        "arch_overrides": dict(cfg.model_kwargs),
        "num_classes": len(classes),
        "global_pool": model.global_pool,
        "classes": list(classes),
        "img_size": list(model.img_size),
        "protocol": cfg.protocol,
        "tune_blocks": str(cfg.tune()),
        "source": "mae-transfer " + cfg.protocol,
        **extra,
    }


def model_for_eval(path: str | Path, cfg: Any) -> tuple[ClassifierViT, list[str] | None, str]:
    """Build and load the classifier stored in ``path`` for evaluation.

    Args:
        path: ``model.safetensors`` (ours, with metadata), ``checkpoint.pth`` (a training state,
            its EMA weights are not used), or a foreign classifier (architecture from ``cfg.model``
            or inferred; head size and pooling read from the weights).
        cfg: the options (``img_size``, default the checkpoint's; ``model``, ``model_kwargs``,
            ``checkpoint_format``).
    Returns:
        (model in eval mode, its class names when the file names them, a one-line description).
    Raises:
        CheckpointError: the file holds no classifier, or its weights do not fit.
    """
    path = Path(path)
    if path.suffix in (".pth", ".pt", ".tar") or path.name == CHECKPOINT_NAME:
        raw = safe_torch_load(path)
        if isinstance(raw, dict) and raw.get("format") == STATE_FORMAT:
            saved = raw["config"]
            model = build_classifier(saved["model"], len(raw["classes"]), saved["protocol"],
                                     global_pool=(saved["pool"] == "avg"), img_size=cfg.img_size or saved["img_size"],
                                     model_kwargs=saved["model_kwargs"])
            try:
                load_checkpoint(model, raw["model"])  # strict; resamples pos_embed for another --img-size
            except CheckpointError as exc:
                raise CheckpointError(f"{path}: {exc}") from None
            return model.eval(), list(raw["classes"]), f"{saved['model']} ({saved['protocol']}, epoch {raw['epoch']})"
    sd, meta = read_checkpoint(path, cfg.checkpoint_format)
    arch = cfg.model or meta.get("arch") or infer_arch(sd).get("arch")
    if arch is None:
        raise CheckpointError(f"{path}: cannot tell the architecture ({infer_arch(sd)}); name it with --model")
    head = sd.get("head.weight")
    if head is None or head.ndim != 2:
        raise CheckpointError(f"{path}: has no classification head (head.weight); it is a backbone, not a "
                              "classifier: fine-tune or linear-probe it first")
    overrides = dict(cfg.model_kwargs or meta.get("arch_overrides") or {})
    global_pool = bool(meta["global_pool"]) if "global_pool" in meta else ("fc_norm.weight" in sd and "norm.weight" not in sd)
    stored = meta.get("img_size")
    img_size = cfg.img_size or (stored[0] if isinstance(stored, list) else stored) or 224
    model = build_classifier(arch, int(head.shape[0]), "finetune", global_pool=global_pool, img_size=img_size,
                             model_kwargs=overrides)
    try:
        load_checkpoint(model, path, format=cfg.checkpoint_format)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} | expected {describe_model(model, arch)}") from None
    classes = meta.get("classes")
    pool = "avg" if global_pool else "cls"
    return model.eval(), (list(classes) if classes else None), f"{arch} ({meta.get('format')}, {pool} pooling)"
