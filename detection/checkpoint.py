"""Weights in and out of the detectors, strictly and without running code from files.

Two kinds of file, two paths:

- a **ViT encoder** checkpoint (ours, official MAE, timm, DeiT, MoCo v3, HF, ViTDet ...) goes into
  the backbone's ``net`` through ``load_pretrained``: ``mae_backbone``'s strict loader, with the
  pos-embed resampled to the detection grid and the report logged. The builders call it from
  their ``pretrained`` argument (``MODEL.VIT.PRETRAINED`` in yacs).
- a **full detector** checkpoint (resume, evaluation, ``train.init_checkpoint`` /
  ``MODEL.WEIGHTS``) goes through ``SafeDetectionCheckpointer``: Detectron2's own checkpointer,
  except that torch files are read with ``weights_only`` and ``.pkl`` files (plain pickle, which
  can run code) are refused unless the caller trusts them explicitly.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from mae_backbone import CheckpointError, UnsafeCheckpointError, VisionTransformer, safe_torch_load
from mae_backbone.checkpoint import REL_POS_KEYS, LoadReport, load_checkpoint

logger = logging.getLogger(__name__)

# Encoder keys the detection ViT has no use for (see ``detection.backbone.prepare_vit``):
# - cls_token: window attention cannot carry a class token and ViTDet drops it (its slot in
#   pos_embed is kept and loaded);
# - norm.*: the final LayerNorm; the pyramids read the raw block output and norm it themselves;
# - fc_norm.*, head.*: the classifier of fine-tuned checkpoints (DeiT, MAE fine-tuned).
# Anything else the checkpoint has and the model lacks is an error, as is any missing key but
# the relative-position tables, which pretrained ViTs do not have (zero-initialized: the model
# then behaves exactly as without them).
PRETRAINED_UNEXPECTED = ("cls_token", "norm.*", "fc_norm.*", "head.*")
PRETRAINED_MISSING = REL_POS_KEYS


def load_pretrained(
    module: nn.Module, src: str | os.PathLike | Mapping[str, torch.Tensor], format: str = "auto"
) -> LoadReport:
    """Load ViT encoder weights into a detection backbone's ``net`` (or a ViT itself), strictly.

    Args:
        module: ``SimpleFeaturePyramid`` / ``ViTMultiScale`` (anything with ``.net``) or the ViT.
        src: a checkpoint in any format ``mae_backbone`` reads, or a state dict in our layout.
        format: ``auto`` or a ``mae_backbone.formats`` name.
    Returns:
        the ``LoadReport`` (also logged at INFO): loaded, resampled (pos-embed to the detection
        grid, patch kernel to the patch size), missing (only rel-pos), unexpected (only
        ``PRETRAINED_UNEXPECTED``).
    Raises:
        CheckpointError: any other missing, unexpected or mis-shaped key, naming them.
    """
    vit = module if isinstance(module, VisionTransformer) else getattr(module, "net", None)
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"load_pretrained needs a mae_backbone ViT or a backbone with .net, not {type(module).__name__}")
    report = load_checkpoint(vit, src, format=format, allow_missing=PRETRAINED_MISSING,
                             allow_unexpected=PRETRAINED_UNEXPECTED)
    logger.info("pretrained ViT for detection (grid %dx%d):\n%s", *vit.grid_size, report)
    return report


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """Detectron2's ``DetectionCheckpointer`` that never unpickles untrusted code.

    - ``.pth`` and other torch files: ``mae_backbone.io.safe_torch_load`` (``weights_only``).
      Checkpoints Detectron2 writes (model, optimizer, scheduler, iteration, grad scaler) hold only
      tensors and plain data, so resume works unchanged.
    - ``.pkl`` (Detectron2 / Caffe2 model zoo): plain ``pickle.load``, which can run code; refused
      with ``UnsafeCheckpointError`` unless ``trust_pickle=True`` (CLI ``--trust-pickle``).
    - A file none of whose tensors name a parameter of the model (typically a ViT encoder
      checkpoint given as detector weights) is an error instead of a warning: encoder weights
      belong in the backbone's ``pretrained``.

    Args:
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
        trust_pickle: allow ``.pkl`` files.
    """

    def __init__(self, model: nn.Module, save_dir: str = "", *, trust_pickle: bool = False,
                 save_to_disk: bool | None = None, **checkpointables: Any):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.trust_pickle = trust_pickle
        self._loading: str = ""

    @classmethod
    def replacing(cls, other: DetectionCheckpointer, trust_pickle: bool = False) -> "SafeDetectionCheckpointer":
        """The same checkpointer (model, folder, checkpointables), made safe; for ``DefaultTrainer``."""
        return cls(other.model, other.save_dir, trust_pickle=trust_pickle, save_to_disk=other.save_to_disk,
                   **other.checkpointables)

    def _load_file(self, filename: str) -> dict[str, Any]:
        self._loading = filename
        if filename.endswith(".pkl"):
            if not self.trust_pickle:
                raise UnsafeCheckpointError(
                    f"{filename}: refused to load a .pkl file: it is a plain pickle, which can run arbitrary "
                    "code when read. Load it only if you trust its source (mae-transfer detect ... "
                    "--trust-pickle, or SafeDetectionCheckpointer(..., trust_pickle=True)); or convert it "
                    "once to a state-dict .pth."
                )
            return super()._load_file(filename)
        data = safe_torch_load(filename)
        if filename.endswith(".pyth"):  # pycls, as Detectron2 reads it
            if not isinstance(data, dict) or "model_state" not in data:
                raise CheckpointError(f"{filename}: a .pyth (pycls) checkpoint must contain 'model_state'")
            state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        if not isinstance(data, dict) or "model" not in data:
            data = {"model": data}
        return data

    def _load_model(self, checkpoint: dict[str, Any]) -> Any:
        state = checkpoint.get("model")
        if isinstance(state, Mapping) and state and not checkpoint.get("matching_heuristics", False):
            ours = set(self.model.state_dict())
            theirs = {k[len("module."):] if k.startswith("module.") else k for k in state}
            if not ours & theirs:
                sample = ", ".join(sorted(theirs)[:3])
                raise CheckpointError(
                    f"{self._loading or 'checkpoint'}: none of its {len(theirs)} tensors ({sample}, ...) is a "
                    "parameter of this detector. A ViT encoder checkpoint goes into the backbone instead: "
                    "model.backbone.pretrained=PATH (LazyConfig; model.backbone.bottom_up.pretrained for the "
                    "FPN variant) or MODEL.VIT.PRETRAINED PATH (yacs)."
                )
        return super()._load_model(checkpoint)

