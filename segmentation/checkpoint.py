"""Whole-segmentor checkpoints load strictly: ``segment test``, ``infer``, ``load_from`` and resume.

MMEngine's ``Runner.load_checkpoint`` and MMSeg's ``init_model`` load with ``strict=False``: a
tensor whose shape does not fit is skipped, and a missing or unexpected key only logged, so a
checkpoint of another model was evaluated with random heads and a warning.  Here every load goes
through ``load_segmentor_state``:

- a tensor whose shape does not fit, a model tensor the file lacks, or a file tensor the model
  lacks raises ``CheckpointError`` naming the file and the keys, before any weight changes;
- except the grid-sized tensors of an ``mae_backbone`` ViT (``backbone.vit.``), which
  ``mae_backbone.checkpoint.fit_model_state`` (the one whole-model check, shared with the
  Detectron2 adapter) fits by its resampling rules (absolute position table, patch kernel,
  relative position tables) and reports (``LoadReport.resampled``), e.g. a model
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
from mae_backbone.checkpoint import LoadReport, fit_model_state
from mae_backbone.formats import READERS, detect_format

# Segmentor keys a file may lack without error (torch fills them in)
SEGMENTOR_IGNORED = ("*num_batches_tracked",)
REVISE_KEYS = ((r"^module\.", ""),)  # a DDP-wrapped model's names, as MMEngine strips them


def from_mmseg_backbone(sd: dict[str, torch.Tensor], model: nn.Module, source: str
                        ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A segmentor trained with MMSeg's own ViT backbone, in our segmentor's names.

    MMSeg's ``MAE`` / ``BEiT`` / ``VisionTransformer`` backbones store ``backbone.layers.N...``;
    our ``MAEViT`` holds the ViT as ``backbone.vit.<our layout>``. When the model has the latter and
    the file the former, the file's ``backbone.*`` tensors go through ``mae_backbone``'s MMSeg
    reader (every key mapped or an error; what it drops is noted); neck and heads keep their names.

    Returns:
        (the state dict, notes for the report); unchanged when the layouts already agree.
    """
    has_ours = any(name == "backbone.vit" and isinstance(m, VisionTransformer) for name, m in model.named_modules())
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    fmt = detect_format(backbone) if backbone else None
    if not has_ours or any(k.startswith("vit.") for k in backbone) or fmt not in ("mmseg", "mmseg-mae"):
        return sd, []
    notes: list[str] = []
    try:
        vit = READERS[fmt](backbone, notes)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: backbone.*: {exc}") from None
    out = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
    out.update({"backbone.vit." + k: v for k, v in vit.items()})
    return out, [f"backbone.* read from MMSeg's {fmt!r} layout"] + notes


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
    tops = {name.split(".")[0] for name, _ in model.named_parameters()}
    if isinstance(sd, dict) and not any(str(k).split(".")[0] in tops for k in sd):
        fmt = detect_format(checkpoint)
        if fmt is not None or any(str(k).startswith(("blocks.", "patch_embed.")) for k in sd):
            raise CheckpointError(
                f"{source}: an encoder checkpoint ({fmt or 'ViT'} layout), not a whole segmentor (no "
                f"{', '.join(sorted(t + '.*' for t in tops))} tensors); segment test and infer need a checkpoint of "
                "segment train; to train from this encoder, give it as model.pretrained=FILE")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{source}: not a segmentor checkpoint (no state_dict of tensors)")
    for pattern, repl in revise_keys:
        sd = {re.sub(pattern, repl, k): v for k, v in sd.items()}
    sd, notes = from_mmseg_backbone(sd, model, source)
    fitted, report = fit_model_state(model, sd, source, format="segmentor", ignored=SEGMENTOR_IGNORED,
                                     resample=resample, hint="Is it a checkpoint of this config?")
    report.notes += notes
    result = model.load_state_dict(fitted, strict=False)
    left = [k for k in result.missing_keys if not any(fnmatch.fnmatchcase(k, p) for p in SEGMENTOR_IGNORED)]
    if left or result.unexpected_keys:
        raise CheckpointError(f"{source}: internal mismatch while loading ({result})")
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
