"""MMEngine checkpoints that resume under torch's ``weights_only`` default, without an unsafe allow-list.

MMEngine 0.10.7 stores its message hub in every checkpoint: ``HistoryBuffer`` objects (numpy
arrays, and bound methods pickled through ``builtins.getattr``) and numpy scalars.  Since torch
2.6, ``torch.load`` defaults to ``weights_only=True``, so ``resume=True`` fails with
``Unsupported global``.  Allow-listing those globals is not an option: ``getattr`` on any object
reachable from the file would let a crafted checkpoint call methods such as ``ndarray.tofile``.

``SafeCheckpointHook`` instead writes the message hub as plain data (tensors, numbers, strings)
before MMEngine saves, and rebuilds the ``HistoryBuffer`` objects after MMEngine loads, so our
checkpoints load with ``weights_only=True`` and nothing else; a foreign checkpoint that needs any
other global is still refused by torch.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.registry import HOOKS

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

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        for key in ("message_hub", "meta"):
            if key in checkpoint:
                checkpoint[key] = from_plain(checkpoint[key])
