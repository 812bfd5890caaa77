"""Run state on disk, what every trainer's resumable checkpoint shares.

A checkpoint holds the weights (on the CPU), optimizer and grad-scaler state, ``epoch`` (epochs
completed), ``step`` (optimizer steps completed, i.e. the schedule position), ``counters`` and
``config`` (the run's options), plus what its trainer adds (``resumable_state``).  It holds only
tensors, numbers, strings and containers, so it is read with ``safe_torch_load`` (weights_only)
and carries a sha256 of its whole content (``mae_backbone.io.add_checksum``), verified on every
load; it is written atomically (temporary files of a write that was killed are removed by the
next successful one), and never from a model with a non-finite weight.

Checkpoints are taken at epoch boundaries.  All randomness of an epoch (data order,
augmentations, masks, and torch / numpy / python generators, re-seeded at each epoch start by
``seed_epoch_rngs``) is a pure function of ``(seed, epoch, rank)``, so the model, optimizer,
scaler and schedule position are the whole state: a resumed run ends bit for bit where the
uninterrupted run ends (on CPU).
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Collection, Mapping

import numpy as np
import torch
from torch import nn

from mae_backbone.io import CHECKSUM_KEY, CheckpointError, add_checksum, atomic_torch_save, remove_stale_temporaries
from training.data import mix_seed

logger = logging.getLogger(__name__)


class NonFiniteModelError(RuntimeError):
    """The model holds NaN/inf weights; it is not written over a good checkpoint."""


def seed_epoch_rngs(seed: int, epoch: int, rank: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python ``random`` as a function of (seed, epoch, rank)."""
    s = mix_seed(seed, epoch, rank, 0xA11)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of parameters / buffers with a NaN or inf entry."""
    return [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def resumable_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, epoch: int, step: int, counters: Mapping[str, int],
                    config: Mapping[str, Any]) -> dict[str, Any]:
    """What every resumable checkpoint holds (pretraining's and classification's): the weights
    on the CPU, optimizer and grad-scaler state, ``epoch`` and ``step`` completed, the counters and
    the run's options.

    Raises:
        NonFiniteModelError: a weight is NaN/inf; ``path``, about to be written, keeps the last good state.
    """
    bad = nonfinite_parameters(model)
    if bad:
        raise NonFiniteModelError(
            f"the model has non-finite weights after epoch {epoch} ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}); not writing {path}, which keeps the last good state"
        )
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
        "epoch": int(epoch),
        "step": int(step),
        "counters": {k: int(v) for k, v in counters.items()},
        "config": dict(config),
    }


def check_finite_weights(model: nn.Module, epoch: int, checkpoint: str | Path) -> None:
    """Raise ``NonFiniteModelError`` when a weight became NaN/inf in ``epoch``; ``checkpoint`` keeps
    the last good state.  Called on every process before a save, so that all of them stop."""
    bad = nonfinite_parameters(model)
    if bad:
        raise NonFiniteModelError(f"the weights became non-finite in epoch {epoch} ({bad[0]} ...); "
                                  f"{checkpoint} keeps the last good state")


def write_state(state: dict[str, Any], path: str | Path) -> Path:
    """Write a training state with its checksum, atomically; then remove what killed writes of
    ``path`` left behind (only the main process writes it)."""
    written = atomic_torch_save(add_checksum(state), path)
    for stale in remove_stale_temporaries(path):
        logger.info("removed %s, left by an interrupted write", stale)
    return written


def check_state_checksum(state: Mapping[str, Any], path: str | Path) -> None:
    """A state of version 2 or later must carry its checksum (``safe_torch_load`` verified it)."""
    if int(state.get("version", 1)) >= 2 and CHECKSUM_KEY not in state:
        raise CheckpointError(f"{path}: has no checksum although its version ({state.get('version')}) "
                              "writes one; the file is damaged; it was not loaded")


def load_model_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` whose error names the file and the keys that differ."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append("shapes differ: " + "; ".join(shapes[:4]))
        raise CheckpointError(f"{source}: does not fit this model ({' | '.join(parts)})")
    model.load_state_dict(state_dict, strict=True)


def restore_model_and_optimizer(state: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                                scaler: torch.amp.GradScaler | None, source: str, hint: str = "") -> None:
    """Load a resumable checkpoint's weights (strictly), optimizer and grad-scaler state.

    Raises:
        CheckpointError: the weights or the optimizer state do not fit (``hint`` is added to the latter).
    """
    load_model_strict(model, state["model"], source)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{source}: optimizer state does not fit ({exc}){hint}") from None
    if scaler is not None and scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


def warn_config_changes(saved: Mapping[str, Any], now: Mapping[str, Any], source: str | Path,
                        resumable: Collection[str]) -> None:
    """Warn when a run resumes with options (other than ``resumable`` ones) that differ from the
    ``saved`` ones: it will not match an uninterrupted run."""
    changed = sorted(k for k in now if k not in resumable and k in saved and saved[k] != now[k])
    if changed:
        details = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        logger.warning("resuming %s with changed options (%s); the run will not match an uninterrupted one",
                       source, details)
