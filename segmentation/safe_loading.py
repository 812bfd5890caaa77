"""MMEngine checkpoints that resume under torch's ``weights_only`` default, without an unsafe allow-list.

MMEngine 0.10.7 stores its message hub in every checkpoint: ``HistoryBuffer`` objects (numpy
arrays, and bound methods pickled through ``builtins.getattr``) and numpy scalars.  Since torch
2.6, ``torch.load`` defaults to ``weights_only=True``, so ``resume=True`` fails with
``Unsupported global``.  Allow-listing those globals is not an option: ``getattr`` on any object
reachable from the file would let a crafted checkpoint call methods such as ``ndarray.tofile``.

``SafeCheckpointHook`` instead writes the message hub as plain data (tensors, numbers, strings)
before MMEngine saves, and rebuilds the ``HistoryBuffer`` objects after MMEngine loads, so our
checkpoints load with ``weights_only=True`` and nothing else; a foreign checkpoint that needs any
other global is still refused by torch.  It also stores a sha256 of the checkpoint's content in it
(``mae_backbone.io.add_checksum``), which ``segmentation.engine`` verifies before resuming, testing
or inferring, so a truncated or bit-flipped file is refused with its name.

``AtomicLocalBackend`` (file backend ``atomic_local``) writes each checkpoint to a temporary file
and renames it into place: a run killed mid-write leaves the previous checkpoint and never a
partial one; a failed write (no space, permission denied) raises ``CheckpointWriteError`` naming
the file.  ``FiniteLossHook`` stops training at the first non-finite loss, before any checkpoint
of that iteration is written.  ``segmentation.engine.prepare`` adds all three to every run.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import Hook
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.registry import HOOKS

from mae_backbone.io import CHECKSUM_KEY, atomic_write, state_checksum

PLAIN_TAG = "__mae_transfer_plain__"


def to_plain(obj: Any) -> Any:
    """Numpy arrays -> tensors, numpy scalars -> Python numbers, HistoryBuffer -> a tagged dict."""
    if isinstance(obj, HistoryBuffer):
        log, count = obj.data
        return {PLAIN_TAG: "HistoryBuffer", "log": torch.as_tensor(np.asarray(log, dtype=np.float64)),
                "count": torch.as_tensor(np.asarray(count, dtype=np.int64)), "max_length": int(obj.max_length)}
    if isinstance(obj, np.ndarray):
        return {PLAIN_TAG: "ndarray", "data": torch.from_numpy(np.ascontiguousarray(obj))} if obj.dtype != object \
            else [to_plain(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return type(obj)((k, to_plain(v)) for k, v in obj.items()) if type(obj) is not dict else {
            k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    return obj


def from_plain(obj: Any) -> Any:
    """Inverse of ``to_plain``."""
    if isinstance(obj, dict):
        tag = obj.get(PLAIN_TAG)
        if tag == "HistoryBuffer":
            return HistoryBuffer(obj["log"].tolist(), obj["count"].tolist(), obj["max_length"])
        if tag == "ndarray":
            return obj["data"].numpy()
        return type(obj)((k, from_plain(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(from_plain(v) for v in obj)
    return obj


@HOOKS.register_module()
class SafeCheckpointHook(Hook):
    """Keep MMEngine checkpoints loadable with ``torch.load(weights_only=True)``.

    Add it to a config's ``custom_hooks`` (our configs do): ``dict(type='SafeCheckpointHook')``.
    """

    priority = "VERY_LOW"  # after every other hook has added its part to the checkpoint

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        for key in ("message_hub", "meta"):
            if key in checkpoint:
                checkpoint[key] = to_plain(checkpoint[key])
        checkpoint.pop(CHECKSUM_KEY, None)
        checkpoint[CHECKSUM_KEY] = state_checksum(checkpoint)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        for key in ("message_hub", "meta"):
            if key in checkpoint:
                checkpoint[key] = from_plain(checkpoint[key])


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss; the message names the iteration and the loss terms."""


@HOOKS.register_module()
class FiniteLossHook(Hook):
    """Stop training at the first iteration whose loss terms are not all finite.

    MMEngine would go on (and its optimizer has already stepped with the non-finite gradients):
    the weights in memory are then garbage, and the next ``CheckpointHook`` save would write them
    over the run's good checkpoints.  This hook runs after the iteration and before
    ``CheckpointHook`` (priority ``ABOVE_NORMAL`` vs ``VERY_LOW``), so the run stops with
    ``NonFiniteLossError`` and the last checkpoint on disk is the last good one; resume from it
    (with a lower learning rate, or ``AmpOptimWrapper``'s loss scaling) to go on.
    """

    priority = "ABOVE_NORMAL"

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None, outputs: dict | None = None) -> None:
        bad = {}
        for name, value in (outputs or {}).items():
            v = value.detach().float() if isinstance(value, torch.Tensor) else value
            if isinstance(v, torch.Tensor) and not bool(torch.isfinite(v).all()):
                bad[name] = v.tolist()
            elif isinstance(v, float) and not math.isfinite(v):
                bad[name] = v
        if _any_process(bool(bad)):  # every process stops, also those whose own loss was finite
            raise NonFiniteLossError(
                f"non-finite loss at iteration {runner.iter + 1} "
                f"({', '.join(f'{k}={v}' for k, v in bad.items()) or 'in another process'}): "
                "training stopped before writing a checkpoint of this iteration; the last checkpoint in "
                f"{runner.work_dir} is the last good one")


def _any_process(flag: bool) -> bool:
    """``flag`` OR-ed over the processes of a distributed run (MMEngine averages gradients, not
    ``log_vars``: one process's NaN loss reaches every process's weights)."""
    from mmengine import dist

    if dist.get_world_size() == 1:
        return flag
    t = torch.tensor(float(flag), device=dist.get_comm_device())
    dist.all_reduce(t, op="sum")
    return bool(t.item() > 0)


@register_backend("atomic_local")
class AtomicLocalBackend(LocalBackend):
    """MMEngine's local file backend whose ``put`` is atomic (``mae_backbone.io.atomic_write``)."""

    def put(self, obj: bytes, filepath: str | Path) -> None:
        def writer(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(obj)

        atomic_write(filepath, writer)

    def put_text(self, obj: str, filepath: str | Path, encoding: str = "utf-8") -> None:
        self.put(obj.encode(encoding), filepath)
