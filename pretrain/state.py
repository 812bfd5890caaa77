"""The pretraining run's state on disk: the resumable checkpoint and the encoder-only export.

The checkpoint (``checkpoint.pth``) is the official MAE layout ``{"model": state_dict}`` (encoder
+ decoder, official key names) plus what resuming needs (``training.state.resumable_state``:
``optimizer``, ``scaler``, ``epoch``, ``step``, ``counters``, ``config``) and ``model_config``
(``MaskedAutoencoderViT`` arguments); checksummed, written atomically, never from a model with a
non-finite weight (see ``training.state``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mae_backbone.io import CheckpointError, safe_torch_load
from training.state import (
    NonFiniteModelError,
    check_state_checksum,
    nonfinite_parameters,
    restore_model_and_optimizer,
    resumable_state,
    write_state,
)

CHECKPOINT_NAME = "checkpoint.pth"
ENCODER_NAME = "encoder.safetensors"
STATE_FORMAT = "mae-transfer/pretrain"
STATE_VERSION = 2  # 2: with a checksum (CHECKSUM_KEY)


def save_training_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    epoch: int,
    step: int,
    counters: Mapping[str, int],
    config: Mapping[str, Any],
) -> Path:
    """Write the resumable checkpoint atomically.

    Raises:
        NonFiniteModelError: a weight is NaN/inf (the existing file is left untouched).
    """
    state = resumable_state(path, model, optimizer, scaler, epoch, step, counters, config)
    state.update(model_config=model.config() if hasattr(model, "config") else {}, format=STATE_FORMAT,
                 version=STATE_VERSION)
    return write_state(state, path)


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_training_state`` (or an official ``{"model": sd}``)."""
    state = safe_torch_load(path)  # verifies the checksum
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path}: not a pretraining checkpoint (no 'model' state dict)")
    if state.get("format") == STATE_FORMAT:
        check_state_checksum(state, path)
    return state


def restore_training_state(
    state: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    source: str,
) -> tuple[int, int, dict[str, int]]:
    """Put a checkpoint's model, optimizer and scaler state in place.

    Returns:
        (epochs completed, optimizer steps completed, counters).
    """
    if state.get("format") != STATE_FORMAT or "optimizer" not in state:
        raise CheckpointError(
            f"{source}: holds model weights but no training state (optimizer, epoch); "
            "it cannot be resumed"
        )
    restore_model_and_optimizer(state, model, optimizer, scaler, source)
    return int(state["epoch"]), int(state["step"]), dict(state.get("counters", {}))


def export_encoder(model: nn.Module, path: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Write the encoder alone in the ``mae_backbone`` format (safetensors + metadata).

    The file loads with ``mae_backbone.checkpoint.load_checkpoint`` into
    ``create_vit(arch, img_size=..., ...)``; the metadata names the architecture.
    """
    from mae_backbone.checkpoint import save_checkpoint

    bad = nonfinite_parameters(model)
    if bad:
        raise NonFiniteModelError(f"the model has non-finite weights ({', '.join(bad[:5])}); not exporting {path}")
    sd = {k: v.detach().cpu() for k, v in model.encoder_state_dict().items()}  # type: ignore[operator]
    info = {
        "arch": model.encoder_name,
        "embed_dim": model.embed_dim,
        "depth": model.depth,
        "num_heads": model.num_heads,
        "patch_size": model.patch_size,
        "in_chans": model.in_chans,
        "img_size": list(model.img_size),
        "arch_overrides": {k: v for k, v in model.encoder_overrides.items() if k != "grad_checkpointing"},
        "source": "mae-transfer pretrain",
    }
    info.update(meta or {})
    return save_checkpoint(sd, path, info)
