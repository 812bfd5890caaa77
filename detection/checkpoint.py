"""Weights in and out of the detectors, strictly and without running code from files.

Two kinds of file, two paths:

- a **ViT encoder** checkpoint (ours, official MAE, timm, DeiT, MoCo v3, HF, ViTDet ...) goes into
  the backbone's ``net`` through ``load_pretrained``: ``mae_backbone``'s strict loader, with the
  pos-embed resampled to the detection grid and the report logged. The builders call it from
  their ``pretrained`` argument (``MODEL.VIT.PRETRAINED`` in yacs).
- a **full detector** checkpoint (resume, evaluation, ``train.init_checkpoint`` /
  ``MODEL.WEIGHTS``) goes through ``SafeDetectionCheckpointer``: Detectron2's own checkpointer,
  except that torch files are read with ``weights_only`` and ``.pkl`` files (plain pickle, which
  can run code) are refused unless the caller trusts them explicitly; and that it loads strictly:
  a tensor whose shape does not fit, a tensor the model lacks or a model tensor the file lacks
  is a ``CheckpointError`` naming the keys (Detectron2 would skip them with a warning and run
  with those weights at their initialization). Only grid-sized ViT tensors are fitted, and
  reported: the absolute position table (bicubic, to the table's grid) and the decomposed
  relative-position tables (linear). A partial load is explicit (``skip_keys``,
  ``train.init_checkpoint_skip``) and reported. Its writes are atomic
  (``mae_backbone.io.atomic_write``): a checkpoint and ``last_checkpoint`` are each either the
  previous file or the whole new one, even when the process is killed mid-write, and every
  checkpoint carries a sha256 of its content (``mae_backbone.io.add_checksum``) that loading
  verifies, so a truncated or bit-flipped file is refused with its name.
"""
from __future__ import annotations

import fnmatch
import logging
import os
from typing import IO, Any, Callable, Iterable, Mapping, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from mae_backbone import CheckpointError, UnsafeCheckpointError, VisionTransformer, safe_torch_load
from mae_backbone.io import add_checksum, atomic_write
from mae_backbone.checkpoint import REL_POS_KEYS, LoadReport, fit_model_state, load_checkpoint

logger = logging.getLogger(f"detectron2.{__name__}")  # shown by Detectron2's setup_logger()

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

# Detector keys a checkpoint may lack or carry without error, as Detectron2's DetectionCheckpointer
# allows: the pixel normalization comes from the config; old checkpoints hold anchor buffers that
# are no longer saved; BatchNorm's step counter is not a weight.
DETECTOR_IGNORED = ("pixel_mean", "pixel_std", "*anchor_generator.cell_anchors*", "*num_batches_tracked")


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
    grid = getattr(vit, "pos_grid_size", vit.grid_size)
    logger.info("pretrained ViT for detection (position table %dx%d):\n%s", *grid, report)
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
    - Model weights load strictly (``fit_detector_state``): anything that does not fit raises
      ``CheckpointError`` naming the keys, before any weight is changed. The absolute position
      table and the decomposed relative-position tables of the ViT are resampled to the model's
      sizes instead. The report (``last_report``, a ``LoadReport``) is logged through fvcore's
      checkpoint logger, which Detectron2's ``default_setup`` shows with its own.

    Args:
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
        trust_pickle: allow ``.pkl`` files.
        skip_keys: glob patterns of keys (of the model or the file) that may be left out: a model
            tensor they match that the file lacks, or whose shape does not fit, stays at its
            initialization; a file tensor they match that the model lacks is ignored. For
            fine-tuning from a detector with other classes (``roi_heads.box_predictor.*`` ...);
            reported. Default: none (strict).
    """

    def __init__(self, model: nn.Module, save_dir: str = "", *, trust_pickle: bool = False,
                 save_to_disk: bool | None = None, skip_keys: Sequence[str] = (), **checkpointables: Any):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.trust_pickle = trust_pickle
        self.skip_keys = tuple(skip_keys)
        self.last_report: LoadReport | None = None
        self._loading: str = ""

    @classmethod
    def replacing(cls, other: DetectionCheckpointer, trust_pickle: bool = False,
                  skip_keys: Sequence[str] = ()) -> "SafeDetectionCheckpointer":
        """The same checkpointer (model, folder, checkpointables), made safe; for ``DefaultTrainer``."""
        return cls(other.model, other.save_dir, trust_pickle=trust_pickle, save_to_disk=other.save_to_disk,
                   skip_keys=skip_keys, **other.checkpointables)

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
        source = self._loading or "checkpoint"
        if isinstance(state, Mapping) and state:
            state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
            self._convert_ndarray_to_tensor(state)
            if checkpoint.get("matching_heuristics", False):  # Caffe2 / pycls files: match names first
                from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

                state = align_and_update_state_dicts(self.model.state_dict(), state,
                                                     c2_conversion=checkpoint.get("__author__") == "Caffe2")
                checkpoint["matching_heuristics"] = False
            else:
                ours = set(self.model.state_dict())
                if not ours & set(state):
                    sample = ", ".join(sorted(state)[:3])
                    raise CheckpointError(
                        f"{source}: none of its {len(state)} tensors ({sample}, ...) is a "
                        "parameter of this detector. A ViT encoder checkpoint goes into the backbone instead: "
                        "model.backbone.pretrained=PATH (LazyConfig; model.backbone.bottom_up.pretrained for the "
                        "FPN variant) or MODEL.VIT.PRETRAINED PATH (yacs)."
                    )
            fitted, report = fit_detector_state(self.model, state, source, self.skip_keys)
            checkpoint["model"] = fitted
            self.last_report = report
            log = self.logger.warning if report.skipped_by_shape or report.missing or report.unexpected else \
                self.logger.info
            log("detector weights: %s", report)
        incompatible = super()._load_model(checkpoint)
        if isinstance(state, Mapping) and state:
            left = set(report.missing) | set(report.skipped_by_shape)
            odd = ([k for k in incompatible.missing_keys if k not in left and not _matches(k, DETECTOR_IGNORED)]
                   + [k for k in incompatible.unexpected_keys if not _matches(k, DETECTOR_IGNORED)]
                   + [k for k, *_ in incompatible.incorrect_shapes])
            if odd:
                raise CheckpointError(f"{source}: internal mismatch while loading: {', '.join(odd)}")
            # everything left out is in the report logged above: no second list of warnings
            incompatible = incompatible._replace(missing_keys=[], unexpected_keys=[], incorrect_shapes=[])
        return incompatible


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def fit_detector_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint",
                       skip_keys: Sequence[str] = ()) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Check a detector state dict against ``model`` strictly; fit the ViT's grid-sized tensors.

    ``mae_backbone.checkpoint.fit_model_state`` (the one whole-model check, shared with the MMSeg
    adapter) with Detectron2's exceptions: ``DETECTOR_IGNORED`` (normalization constants, old
    anchor buffers, BatchNorm step counters) and the partial-load hint.

    Args:
        model: the detector (not wrapped in DDP).
        state: the file's tensors, by the model's names.
        source: the file, for messages.
        skip_keys: glob patterns that may be left out (see ``SafeDetectionCheckpointer``).
    Returns:
        (the tensors to load, the ``LoadReport``: ``resampled`` keys, and with ``skip_keys``
        ``skipped_by_shape`` / ``missing`` (left at initialization) / ``unexpected`` (ignored)).
    Raises:
        CheckpointError: naming every key that does not fit (shape), that the model lacks, or
            that the file lacks, unless a resampling rule, ``skip_keys`` or ``DETECTOR_IGNORED``
            covers it.
    """
    return fit_model_state(
        model, state, source, format="detectron2", skip=skip_keys, ignored=DETECTOR_IGNORED,
        hint="Is it a checkpoint of this config? To fine-tune from a detector with other classes or heads, "
             "name the keys to leave at their initialization: train.init_checkpoint_skip="
             "['roi_heads.box_predictor.*', ...] (detect train) or SafeDetectionCheckpointer(..., skip_keys=...).")
