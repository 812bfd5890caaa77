"""Weights in and out of the detectors, strictly and without running code from files.

Two kinds of file, two paths:

- a **ViT encoder** checkpoint (ours, official MAE, timm, DeiT, MoCo v3, HF, ViTDet ...) goes into
  the backbone's ``net`` through ``load_pretrained``: ``mae_backbone``'s strict loader, with the
  pos-embed resampled to the detection grid and the report logged. The builders call it from
  their ``pretrained`` argument (``MODEL.VIT.PRETRAINED`` in yacs).
- a **full detector** checkpoint (resume, evaluation, ``train.init_checkpoint`` /
  ``MODEL.WEIGHTS``) goes through ``SafeDetectionCheckpointer``: Detectron2's own checkpointer,
  except that torch files are read with ``weights_only`` and ``.pkl`` files (plain pickle, which
  can run code) are refused unless the caller trusts them explicitly. Its writes are atomic
  (``mae_backbone.io.atomic_write``): a checkpoint and ``last_checkpoint`` are each either the
  previous file or the whole new one, even when the process is killed mid-write, and every
  checkpoint carries a sha256 of its content (``mae_backbone.io.add_checksum``) that loading
  verifies, so a truncated or bit-flipped file is refused with its name.
"""
from __future__ import annotations

import logging
import os
from typing import IO, Any, Callable, Mapping

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from mae_backbone import CheckpointError, UnsafeCheckpointError, VisionTransformer, safe_torch_load
from mae_backbone.io import add_checksum, atomic_write
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
    - Writes (``save``, ``last_checkpoint``) are atomic on local folders and the checkpoint holds
      its own sha256; a write that fails (no space, permission denied) raises
      ``CheckpointWriteError`` naming the file, and the previous checkpoint and ``last_checkpoint``
      stay as they were. Remote folders (``s3://`` ...) go through Detectron2's ``PathManager``.
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

    def _local(self) -> bool:
        return "://" not in str(self.save_dir)

    def _write(self, path: str, fill: Callable[[IO[bytes]], None]) -> None:
        def writer(tmp: str) -> None:
            with open(tmp, "wb") as f:
                fill(f)

        atomic_write(path, writer)

    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``SAVE_DIR/{name}.pth`` (model, checkpointables, ``kwargs``, sha256) atomically, then
        point ``last_checkpoint`` at it, as Detectron2's ``Checkpointer.save`` does."""
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._local():
            return super().save(name, **kwargs)
        data: dict[str, Any] = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        path = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info("Saving checkpoint to %s", path)
        state = add_checksum(data)
        self._write(path, lambda f: torch.save(state, f))
        self.tag_last_checkpoint(os.path.basename(path))

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._local():
            return super().tag_last_checkpoint(last_filename_basename)
        self._write(os.path.join(self.save_dir, "last_checkpoint"),
                    lambda f: f.write(last_filename_basename.encode()))

    def remove_stale_temporaries(self) -> list[str]:
        """Delete the temporary files that writes killed midway left in ``save_dir`` (``.NAME.*.tmp``
        of checkpoints and ``last_checkpoint``); call before resuming, in the writing process only."""
        if not self.save_dir or not self._local() or not os.path.isdir(self.save_dir):
            return []
        stale = [os.path.join(self.save_dir, n) for n in os.listdir(self.save_dir)
                 if n.startswith(".") and n.endswith(".tmp") and (".pth." in n or n.startswith(".last_checkpoint."))]
        for path in stale:
            os.unlink(path)
            self.logger.info("removed %s, left by an interrupted checkpoint write", path)
        return stale

    def get_checkpoint_file(self) -> str:
        """The checkpoint ``last_checkpoint`` names; an error naming both files when it is missing
        (Detectron2 would go on with the folder itself as the checkpoint path)."""
        path = super().get_checkpoint_file()
        if self._local() and self.has_checkpoint() and not os.path.isfile(path):
            raise CheckpointError(
                f"{os.path.join(self.save_dir, 'last_checkpoint')}: names {path!r}, which is not a file; "
                "resume from a checkpoint explicitly (train.init_checkpoint=PATH without --resume) or "
                "remove last_checkpoint to start over")
        return path

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

