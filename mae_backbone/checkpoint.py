"""Reading, writing and strictly loading ViT checkpoints in every supported format.

- ``read_checkpoint(path, format="auto") -> (state_dict, meta)``: any format (see
  ``mae_backbone.formats``) to our layout; ``meta["notes"]`` lists what the reader dropped.
- ``save_checkpoint(sd, path, meta)``: our format, one ``.safetensors`` file whose header holds
  the metadata JSON (architecture, source, image size, licence), a sha256 of the tensors and one
  of the metadata.
- ``write_checkpoint(sd, path, format, meta)``: any writer format.
- ``load_checkpoint(model, src, allow_missing=..., allow_unexpected=...) -> LoadReport``: fits the
  weights to the model (pos-embed / patch kernel / rel-pos resampling) and raises a
  ``CheckpointError`` naming keys for anything that does not fit and was not allowed.

Loading never executes code: torch files go through ``safe_torch_load`` (weights_only), the
rest is safetensors.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from mae_backbone.formats import READERS, WRITERS, describe, detect_format, hf_config, read_hf_folder
from mae_backbone.io import CheckpointError, atomic_write, atomic_write_bytes, atomic_torch_save, safe_torch_load
from mae_backbone.pos_embed import (
    resample_abs_pos_embed,
    resample_beit_rel_pos,
    resample_patch_embed,
    resample_rel_pos,
)
from mae_backbone.vit import VIT_ARCHS, VisionTransformer

logger = logging.getLogger(__name__)

FORMAT_TAG = "mae-transfer"
FORMAT_VERSION = 1

# Keys a dense-task model adds on top of a plain ViT; callers usually allow them to be missing
# (zero-initialized relative position biases: the model then behaves as without them).
REL_POS_KEYS = ("blocks.*.attn.rel_pos_h", "blocks.*.attn.rel_pos_w", "blocks.*.attn.relative_position_bias_table")
# Layer scale (BEiT-style transfer, MMSeg's MAE config): absent from MAE's pretrained encoders.
LAYER_SCALE_KEYS = ("blocks.*.ls1.gamma", "blocks.*.ls2.gamma")
HEAD_KEYS = ("head.*", "fc_norm.*")


# --------------------------------------------------------------------------- checksum / ours
def tensor_checksum(sd: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of the tensors, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def infer_arch(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture facts readable from the weights (heads only via the registry)."""
    facts: dict[str, Any] = {}
    w = sd.get("patch_embed.proj.weight")
    if w is not None:
        facts.update(embed_dim=int(w.shape[0]), in_chans=int(w.shape[1]), patch_size=int(w.shape[-1]))
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    if blocks:
        facts["depth"] = max(blocks) + 1
    pe = sd.get("pos_embed")
    if pe is not None and "patch_size" in facts:
        n = pe.shape[1]
        side = math.isqrt(n - 1) if math.isqrt(n - 1) ** 2 == n - 1 else math.isqrt(n)
        facts["img_size"] = [side * facts["patch_size"]] * 2
    for name, arch in VIT_ARCHS.items():
        if all(facts.get(k) == arch[k] for k in ("embed_dim", "depth", "patch_size")):
            facts.update(arch=name, num_heads=arch["num_heads"])
            break
    if "head.weight" in sd:
        facts["num_classes"] = int(sd["head.weight"].shape[0])
    return facts


def save_checkpoint(
    weights: nn.Module | Mapping[str, torch.Tensor], path: str | Path, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write our format: safetensors with metadata (architecture, source, checksum), atomically.

    Args:
        weights: a model or a state dict in our layout.
        path: destination (``.safetensors``).
        meta: extra metadata (e.g. ``source``, ``licence``, ``arch``, ``img_size``); architecture
            facts missing from it are inferred from the weights.
    """
    sd = weights.state_dict() if isinstance(weights, nn.Module) else dict(weights)
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    if isinstance(weights, nn.Module):
        arch_meta = {k: getattr(weights, k) for k in ("embed_dim", "depth", "num_heads", "patch_size", "in_chans")
                     if hasattr(weights, k)}
        if hasattr(weights, "img_size"):  # the size the stored pos_embed is made for
            arch_meta["img_size"] = list(getattr(weights, "pretrain_img_size", weights.img_size))
    else:
        arch_meta = {}
    full_meta = {**infer_arch(sd), **arch_meta, **dict(meta or {})}
    full_meta.pop("notes", None)
    meta_text = json.dumps(full_meta, sort_keys=True, default=str)
    header = {
        "format": FORMAT_TAG,
        "format_version": str(FORMAT_VERSION),
        "meta": meta_text,
        "sha256": tensor_checksum(sd),
        "meta_sha256": hashlib.sha256(meta_text.encode()).hexdigest(),  # the metadata too (not in older files)
    }
    return atomic_write_bytes(safetensors_save(sd, metadata=header), path)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({exc})") from None
    return sd, header


# --------------------------------------------------------------------------- read / write
def read_checkpoint(path: str | Path, format: str = "auto") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read any supported checkpoint into our layout.

    Args:
        path: a file, or a Hugging Face model folder.
        format: ``auto`` or one of ``mae_backbone.formats.FORMATS``.
    Returns:
        (state_dict, meta); ``meta`` has ``format``, ``path``, ``source`` (provenance) and
        ``notes`` (what was dropped), plus the stored metadata for our format.
    """
    path = Path(path)
    if format != "auto" and format not in ("ours", *READERS):
        raise CheckpointError(f"unknown checkpoint format {format!r}; known: ours, {', '.join(READERS)}")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    notes: list[str] = []
    meta: dict[str, Any] = {}
    if path.is_dir():
        obj, cfg = read_hf_folder(path)
        fmt = "hf" if format == "auto" else format
        meta["hf_config"] = cfg
    elif path.suffix == ".safetensors":
        obj, header = _read_safetensors(path)
        if header.get("format") != FORMAT_TAG and len({"format_version", "sha256", "meta_sha256"} & set(header)) >= 2:
            raise CheckpointError(f"{path}: corrupt header (format tag {header.get('format')!r}); it was not loaded")
        if header.get("format") == FORMAT_TAG:
            expected = header.get("sha256")
            actual = tensor_checksum(obj)
            if expected != actual:
                raise CheckpointError(
                    f"{path}: checksum mismatch (stored {str(expected)[:12]}..., computed {actual[:12]}...): "
                    "the file is corrupt; it was not loaded"
                )
            stored_meta = header.get("meta", "{}")
            if "meta_sha256" in header and hashlib.sha256(stored_meta.encode()).hexdigest() != header["meta_sha256"]:
                raise CheckpointError(f"{path}: checksum mismatch in the metadata: the file is corrupt; it was not loaded")
            try:
                meta.update(json.loads(stored_meta))
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{path}: corrupt metadata ({exc}); it was not loaded") from None
            fmt = "ours" if format == "auto" else format
        else:
            fmt = detect_format(obj) if format == "auto" else format
    else:
        obj = safe_torch_load(path)
        fmt = detect_format(obj) if format == "auto" else format
    if fmt is None:
        raise CheckpointError(
            f"{path}: cannot tell the checkpoint format ({describe(obj)}); name it with "
            f"format= / --from (one of: ours, {', '.join(READERS)})"
        )
    try:
        sd = dict(obj) if fmt == "ours" else READERS[fmt](obj, notes)
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: does not look like a {fmt!r} checkpoint (missing {exc})") from None
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    meta.update(format=fmt, path=str(path), notes=notes)
    meta.setdefault("source", str(path))  # provenance: stored by our format, else the file itself
    return sd, meta


def write_checkpoint(
    sd: Mapping[str, torch.Tensor], path: str | Path, format: str = "ours", meta: Mapping[str, Any] | None = None
) -> Path:
    """Write a state dict (our layout) in a given format, atomically.

    ``hf`` writes a folder (``model.safetensors`` + ``config.json``); torch formats write ``.pth``.
    """
    path = Path(path)
    meta = {**infer_arch(sd), **dict(meta or {})}
    if format == "ours":
        return save_checkpoint(sd, path, meta)
    if format not in WRITERS:
        raise CheckpointError(f"no writer for format {format!r}; writers: ours, {', '.join(WRITERS)}")
    obj = WRITERS[format](dict(sd), meta)
    if format == "hf":
        cfg = hf_config(meta, sd)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(safetensors_save({k: v.contiguous() for k, v in obj.items()}, metadata={"format": "pt"}),
                           path / "model.safetensors")
        atomic_write_bytes(json.dumps(cfg, indent=2).encode(), path / "config.json")
        return path
    if path.suffix == ".safetensors" and format == "timm":
        return atomic_write_bytes(safetensors_save({k: v.contiguous() for k, v in obj.items()}), path)
    return atomic_torch_save(obj, path)


# --------------------------------------------------------------------------- strict loading
@dataclass
class LoadReport:
    """What ``load_checkpoint`` did, key by key."""

    source: str
    format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resampled: dict[str, str] = field(default_factory=dict)
    skipped_by_shape: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.source} (format {self.format})"]
        for title, items in (
            ("resampled", [f"{k}: {v}" for k, v in self.resampled.items()]),
            ("skipped (shape)", [f"{k}: {v}" for k, v in self.skipped_by_shape.items()]),
            ("missing (allowed, left at init)", _summarize(self.missing)),
            ("unexpected (allowed, ignored)", _summarize(self.unexpected)),
            ("notes", self.notes),
        ):
            if items:
                lines.append(f"  {title}: " + "; ".join(items))
        return "\n".join(lines)


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _fit_pos_embed(ckpt: torch.Tensor, grid: tuple[int, int], old_grid: Any) -> torch.Tensor:
    n = ckpt.shape[1]
    if math.isqrt(n - 1) ** 2 == n - 1:
        prefix = 1
    elif math.isqrt(n) ** 2 == n:
        prefix = 0
    else:
        prefix = 1 if old_grid is None else n - old_grid[0] * old_grid[1]
    old = None if old_grid is None else tuple(old_grid)
    out = resample_abs_pos_embed(ckpt, grid, old_size=old, num_prefix_tokens=prefix)
    if prefix == 0:  # add an (all-zero, as in MAE) class-token slot
        out = torch.cat([torch.zeros_like(out[:, :1]), out], dim=1)
    return out


def _fit_beit_table(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A BEiT table of a square grid (the only kind its row count identifies) to ``grid``."""
    side = (math.isqrt(table.shape[0] - 3) + 1) // 2
    if (2 * side - 1) ** 2 + 3 != table.shape[0]:
        raise CheckpointError(f"a BEiT relative position table of {table.shape[0]} rows is not made for a square grid")
    return resample_beit_rel_pos(table, (side, side), grid)


def fit_vit_tensor(
    vit: nn.Module, key: str, value: torch.Tensor, want: Sequence[int], old_grid: Any = None
) -> tuple[torch.Tensor, str] | None:
    """The resampling rule for one ViT tensor whose size follows a grid, or None when none applies.

    - ``pos_embed`` [1, (1+)N, D]: bicubic to the table grid ``vit.pos_grid_size`` (class slot
      kept; an all-zero one added when the file has none); ``old_grid`` names a non-square source.
    - ``patch_embed.proj.weight`` [D, C, p, p]: to another patch size (pseudo-inverse resize).
    - ``blocks.i.attn.rel_pos_h|w`` [2S-1, C]: linear to the model's length.
    - ``blocks.i.attn.relative_position_bias_table`` (BEiT): bicubic over the offset grid.

    Args:
        vit: the ``VisionTransformer`` the key (relative to it) belongs to; want: the model's shape.
    Returns:
        (the fitted tensor, a line for ``LoadReport.resampled``).
    Raises:
        CheckpointError, ValueError: the tensor has a rule but cannot be fitted (e.g. a BEiT table
            of no square grid, a non-square position table without ``old_grid``).
    """
    what = f"{tuple(value.shape)} -> {tuple(want)}"
    if key == "pos_embed" and value.ndim == 3 and len(want) == 3 and value.shape[-1] == want[-1]:
        return _fit_pos_embed(value, getattr(vit, "pos_grid_size", vit.grid_size), old_grid), what + " (bicubic)"
    if key == "patch_embed.proj.weight" and value.ndim == 4 and tuple(value.shape[:2]) == tuple(want[:2]):
        return resample_patch_embed(value, tuple(want[-2:])), what + " (pseudo-inverse resize)"
    if key.endswith(("attn.rel_pos_h", "attn.rel_pos_w")) and value.ndim == 2 and value.shape[1:] == want[1:]:
        return resample_rel_pos(value, want[0]), what + " (linear)"
    if key.endswith("attn.relative_position_bias_table") and value.ndim == 2 and value.shape[1:] == want[1:]:
        grid = vit.get_submodule(key.rsplit(".", 1)[0]).rel_pos_grid
        return _fit_beit_table(value, grid), what + " (bicubic over the offset grid)"
    return None


def fit_model_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str = "<state dict>",
    *,
    format: str = "model",
    skip: Iterable[str] = (),
    ignored: Iterable[str] = (),
    resample: bool = True,
    hint: str = "",
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Check a whole model's state dict (a detector, a segmentor) strictly against ``model``.

    Every tensor must fit by name and shape, except the grid-sized tensors of the
    ``VisionTransformer``s inside, which ``fit_vit_tensor`` resamples (and the report names).

    Args:
        model: the whole model (not a DDP wrapper); state: the file's tensors by the model's names.
        source: the file, for messages; format: the report's format name.
        skip: glob patterns that may be left out or mis-shaped (an explicit partial load; the
            report lists them as missing / skipped / unexpected).
        ignored: glob patterns that are never an error (e.g. ``*num_batches_tracked``).
        resample: False: grid-sized tensors must fit too (a resume).
        hint: appended to the error message.
    Returns:
        (the tensors to load, the ``LoadReport``).
    Raises:
        CheckpointError: naming the file and every key that does not fit, that the model lacks or
            that the file lacks; nothing is loaded.
    """
    skip, ignored = tuple(skip), tuple(ignored)
    report = LoadReport(source=source, format=format)
    target = model.state_dict()
    vits = sorted(((name + "." if name else "", m) for name, m in model.named_modules()
                   if isinstance(m, VisionTransformer)), key=lambda item: -len(item[0]))
    fitted: dict[str, torch.Tensor] = {}
    bad_shapes: list[str] = []
    for key, value in state.items():
        if key not in target:
            continue
        want = target[key].shape
        if tuple(value.shape) == tuple(want):
            fitted[key] = value
            continue
        what = f"checkpoint {tuple(value.shape)}, model {tuple(want)}"
        owner = next(((p, m) for p, m in vits if key.startswith(p)), None) if resample else None
        try:
            rule = fit_vit_tensor(owner[1], key[len(owner[0]):], value, want) if owner else None
        except (CheckpointError, ValueError) as exc:
            rule, what = None, f"{what} ({exc})"
        if rule is not None:
            fitted[key], report.resampled[key] = rule
        elif _matches(key, skip):
            report.skipped_by_shape[key] = what
        else:
            bad_shapes.append(f"{key}: {what}")
    missing = sorted(k for k in target if k not in state and not _matches(k, ignored))
    unexpected = sorted(k for k in state if k not in target and not _matches(k, ignored))
    bad_missing = [k for k in missing if not _matches(k, skip)]
    bad_unexpected = [k for k in unexpected if not _matches(k, skip)]
    if bad_shapes or bad_missing or bad_unexpected:
        raise CheckpointError(f"{source}: does not fit this {type(model).__name__}; nothing was loaded: "
                              + _misfit(bad_shapes, bad_missing, bad_unexpected) + (f". {hint}" if hint else ""))
    report.loaded = sorted(fitted)
    report.missing = missing
    report.unexpected = unexpected
    return fitted, report


def load_checkpoint(
    model: nn.Module,
    src: str | Path | Mapping[str, torch.Tensor],
    format: str = "auto",
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    prefix: str = "",
) -> LoadReport:
    """Load weights into a ``VisionTransformer`` strictly, resampling what differs only in grid size.

    Args:
        model: our ViT (or a module holding it under ``prefix``).
        src: a checkpoint path (any format) or a state dict in our layout.
        format: see ``read_checkpoint``.
        allow_missing: glob patterns of model keys that may stay at their initialization
            (e.g. ``HEAD_KEYS``, ``REL_POS_KEYS``); a shape mismatch on such a key skips it.
        allow_unexpected: glob patterns of checkpoint keys the model may ignore (e.g. ``norm.*``
            when fine-tuning with global pooling).
        prefix: the ViT's name prefix inside ``model`` (``"backbone."`` ...).
    Returns:
        the ``LoadReport`` (also logged at INFO).
    Raises:
        CheckpointError: listing every missing, unexpected or mis-shaped key that was not allowed.
    """
    if isinstance(src, Mapping):
        sd, meta = dict(src), {"format": "state dict", "path": "<state dict>", "notes": []}
    else:
        sd, meta = read_checkpoint(src, format)
    report = LoadReport(source=meta["path"], format=meta["format"], notes=list(meta.get("notes", [])))
    allow_missing, allow_unexpected = tuple(allow_missing), tuple(allow_unexpected)
    vit = model.get_submodule(prefix.rstrip(".")) if prefix else model
    target = {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    # BatchNorm's step counter is not a weight: torch fills it in when absent and never reports it
    target = {k: v for k, v in target.items() if not k.endswith("num_batches_tracked") or k in sd}
    old_grid = meta.get("img_size")
    if old_grid is not None and "patch_size" in meta:
        old_grid = [s // meta["patch_size"] for s in old_grid]

    fitted: dict[str, torch.Tensor] = {}
    bad_shapes: list[str] = []
    for key, value in sd.items():
        if key not in target:
            continue
        want = target[key].shape
        if value.shape == want:
            fitted[key] = value
            continue
        what = f"{tuple(value.shape)} -> {tuple(want)}"
        try:
            rule = fit_vit_tensor(vit, key, value, want, old_grid)
        except (CheckpointError, ValueError) as exc:
            bad_shapes.append(f"{key}: {exc}")
            continue
        if rule is not None:
            fitted[key], report.resampled[key] = rule
        elif _matches(key, allow_missing):
            report.skipped_by_shape[key] = what
        else:
            bad_shapes.append(f"{key}: checkpoint {tuple(value.shape)}, model {tuple(want)}")

    missing = sorted(k for k in target if k not in fitted)
    unexpected = sorted(k for k in sd if k not in target)
    bad_missing = [k for k in missing if not _matches(k, allow_missing) and k not in report.skipped_by_shape]
    bad_unexpected = [k for k in unexpected if not _matches(k, allow_unexpected)]
    if bad_shapes or bad_missing or bad_unexpected:
        arch = infer_arch(sd)
        hint = f" (the checkpoint looks like {arch.get('arch') or arch})" if arch else ""
        raise CheckpointError(f"{report.source}: cannot load into {type(vit).__name__}{hint}: "
                              + _misfit(bad_shapes, bad_missing, bad_unexpected))

    result = model.load_state_dict({prefix + k: v for k, v in fitted.items()}, strict=False)
    got_missing = sorted(k[len(prefix):] for k in result.missing_keys if k.startswith(prefix))
    if got_missing != missing or result.unexpected_keys:
        raise CheckpointError(f"{report.source}: internal mismatch while loading ({result})")
    report.loaded = sorted(fitted)
    report.missing = missing
    report.unexpected = unexpected
    logger.info("%s", report)
    return report


def _summarize(keys: list[str]) -> list[str]:
    """Fold per-block keys: ``blocks.*.attn.rel_pos_h (x12)`` instead of twelve lines."""
    counts: dict[str, int] = {}
    for k in keys:
        folded = re.sub(r"^blocks\.\d+\.", "blocks.*.", k)
        counts[folded] = counts.get(folded, 0) + 1
    return [k if n == 1 else f"{k} (x{n})" for k, n in counts.items()]


def _misfit(bad_shapes: list[str], bad_missing: list[str], bad_unexpected: list[str]) -> str:
    """What does not fit, for an error message: shapes | missing keys | unexpected keys."""
    parts = []
    if bad_shapes:
        parts.append("shapes that do not fit: " + _abbrev(bad_shapes, 5, "; "))
    if bad_missing:
        parts.append(f"missing from the checkpoint: {_abbrev(bad_missing)}")
    if bad_unexpected:
        parts.append(f"in the checkpoint but not in the model: {_abbrev(bad_unexpected)}")
    return " | ".join(parts)


def _abbrev(keys: list[str], n: int = 10, sep: str = ", ") -> str:
    return sep.join(keys[:n]) + (f"{sep}... ({len(keys)} in all)" if len(keys) > n else "")
