"""training: the runtime every trainer shares (``pretrain`` and ``classification`` are built on it;
it imports neither, nor any framework besides torch).

- ``training.options``: a dataclass of options <-> command-line flags / YAML / JSON files;
- ``training.distributed``: the ``torchrun`` process group and the few collectives a run needs;
- ``training.precision``: ``--precision`` -> autocast dtype and grad scaler;
- ``training.fastpath``: the step's fast path: bf16 working weights over fp32 masters, ``torch.compile``;
- ``training.loop``: one epoch (accumulation, autocast, non-finite steps skipped) over a
  ``StepRecipe``, the method's part of a step;
- ``training.schedule``: the learning rate, a pure function of the optimizer step;
- ``training.state``: resumable checkpoints (checksummed, atomic, never non-finite);
- ``training.monitor``: progress bar, TensorBoard, ``log.jsonl``;
- ``training.data``: image decoding, file lists, the reproducible epoch samplers.
"""
from training.data import (DataError, EpochBatchSampler, EvalBatchSampler, image_files, list_images, load_rgb, mix_seed,
                           read_image)
from training.distributed import DistInfo, init_distributed
from training.fastpath import FastPath, WorkingWeights, fast_path
from training.loop import Counters, EpochStats, MicroBatch, StepRecipe, TrainingDiverged, train_one_epoch
from training.monitor import Monitor
from training.precision import amp_autocast, resolve_amp
from training.schedule import absolute_lr, lr_at, set_lr
from training.state import NonFiniteModelError

__all__ = [
    "Counters",
    "DataError",
    "DistInfo",
    "EpochBatchSampler",
    "EpochStats",
    "EvalBatchSampler",
    "FastPath",
    "MicroBatch",
    "Monitor",
    "NonFiniteModelError",
    "StepRecipe",
    "TrainingDiverged",
    "WorkingWeights",
    "absolute_lr",
    "amp_autocast",
    "fast_path",
    "image_files",
    "init_distributed",
    "list_images",
    "load_rgb",
    "lr_at",
    "mix_seed",
    "read_image",
    "resolve_amp",
    "set_lr",
    "train_one_epoch",
]
