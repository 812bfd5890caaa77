"""Whole-segmentor checkpoints load strictly: ``segment test``, ``infer``, ``load_from`` and resume.

MMEngine's ``Runner.load_checkpoint`` and MMSeg's ``init_model`` load with ``strict=False``: a
tensor whose shape does not fit is skipped, and a missing or unexpected key only logged, so a
checkpoint of another model was evaluated with random heads and a warning.  Here every load goes
through ``load_segmentor_state``:

- a tensor whose shape does not fit, a model tensor the file lacks, or a file tensor the model
  lacks raises ``CheckpointError`` naming the file and the keys, before any weight changes;
- except the grid-sized tensors of an ``mae_backbone`` ViT (``backbone.vit.``), which
  ``mae_backbone.load_checkpoint`` fits by its resampling rules (absolute position table,
  patch kernel, relative position tables) and reports (``LoadReport.resampled``), e.g. a model
  trained at 512 px tested with a 640 px config;  a resume checkpoint must fit exactly (its
  optimizer state follows the shapes);
- BatchNorm's step counters (``num_batches_tracked``) may be absent, as torch allows.

``CheckedRunner`` is MMEngine's ``Runner`` with that load (``segmentation.engine`` builds it);
files are read safely and their sha256 verified before (``engine.verify_checkpoint``).
"""
from __future__ import annotations

import fnmatch
import re
from typing import Any, Sequence

import torch
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import RUNNERS
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint
from torch import nn

from mae_backbone import CheckpointError, VisionTransformer
from mae_backbone.checkpoint import LoadReport, load_checkpoint

# Segmentor keys a file may lack without error (torch fills them in)
SEGMENTOR_IGNORED = ("*num_batches_tracked",)
REVISE_KEYS = ((r"^module\.", ""),)  # a DDP-wrapped model's names, as MMEngine strips them


def _abbrev(items: Sequence[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def load_segmentor_state(
    model: nn.Module,
    checkpoint: Any,
    source: str,
    revise_keys: Sequence[tuple[str, str]] = REVISE_KEYS,
    resample: bool = True,
) -> LoadReport:
    """Load a segmentor checkpoint into ``model`` strictly (see the module docstring).

    Args:
        model: the segmentor (not a DDP wrapper).
        checkpoint: the loaded file: ``{"state_dict": ...}`` (MMEngine) or a bare state dict.
        source: the file's name, for messages.
        revise_keys: (pattern, replacement) pairs applied to the file's keys, as MMEngine's.
        resample: let the ViT's grid-sized tensors be resampled; False: every shape must fit.
    Returns:
        the ``LoadReport`` (keys loaded, resampled), also logged.
    Raises:
        CheckpointError: naming the file and every key that does not fit.
    """
    sd = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{source}: not a segmentor checkpoint (no state_dict of tensors)")
    for pattern, repl in revise_keys:
        sd = {re.sub(pattern, repl, k): v for k, v in sd.items()}
    target = model.state_dict()
    vits = [name + "." for name, m in model.named_modules() if isinstance(m, VisionTransformer) and name]

    def in_vit(key: str) -> bool:
        return any(key.startswith(p) for p in vits)

    def ignored(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, p) for p in SEGMENTOR_IGNORED)

    shapes = [f"{k}: file {tuple(v.shape)}, model {tuple(target[k].shape)}" for k, v in sd.items()
              if k in target and v.shape != target[k].shape and (not resample or not in_vit(k))]
    missing = sorted(k for k in target if k not in sd and not in_vit(k) and not ignored(k))
    unexpected = sorted(k for k in sd if k not in target and not in_vit(k) and not ignored(k))
    if shapes or missing or unexpected:
        parts = []
        if shapes:
            parts.append("shapes that do not fit: " + "; ".join(shapes[:5])
                         + (f"; ... ({len(shapes)} in all)" if len(shapes) > 5 else ""))
        if missing:
            parts.append(f"missing from the file: {_abbrev(missing)}")
        if unexpected:
            parts.append(f"in the file but not in the model: {_abbrev(unexpected)}")
        raise CheckpointError(f"{source}: does not fit the model of this config ({type(model).__name__}); nothing "
                              "was loaded: " + " | ".join(parts))

    report = LoadReport(source=source, format="segmentor")
    for prefix in vits:  # the ViT's own strict loader, with its resampling rules and report
        part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        try:
            vit_report = load_checkpoint(model, part, prefix=prefix)
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {prefix}*: {str(exc).split(': ', 1)[-1]}") from None
        report.loaded += [prefix + k for k in vit_report.loaded]
        report.resampled.update({prefix + k: v for k, v in vit_report.resampled.items()})
    rest = {k: v for k, v in sd.items() if not in_vit(k)}
    result = model.load_state_dict(rest, strict=False)
    left = [k for k in result.missing_keys if not in_vit(k) and not ignored(k)]
    if left or result.unexpected_keys:
        raise CheckpointError(f"{source}: internal mismatch while loading ({result})")
    report.loaded += sorted(rest)
    print_log(f"segmentor weights: {report}", logger="current")
    return report


@RUNNERS.register_module()
class CheckedRunner(Runner):
    """MMEngine's ``Runner`` whose checkpoint loads (``load_from``, resume, test) are strict.

    ``load_checkpoint`` ignores MMEngine's ``strict=False``: see ``load_segmentor_state``.  The
    last load's report is ``checkpoint_report``.  A resume checkpoint must fit without resampling.
    """

    checkpoint_report: LoadReport | None = None

    def load_checkpoint(self, filename: str, map_location: Any = "cpu", strict: bool = False,
                        revise_keys: list = [(r"^module\.", "")]) -> dict:  # noqa: B006 (MMEngine's signature)
        checkpoint = _load_checkpoint(filename, map_location=map_location)
        self.call_hook("after_load_checkpoint", checkpoint=checkpoint)
        model = self.model.module if is_model_wrapper(self.model) else self.model
        self.checkpoint_report = load_segmentor_state(model, checkpoint, str(filename), revise_keys,
                                                      resample=not self._resume)
        self._has_loaded = True
        self.logger.info(f"Load checkpoint from {filename}")
        return checkpoint
