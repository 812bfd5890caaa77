"""Checkpoint formats: one reader (foreign layout -> ours) and one writer (ours -> foreign) each.

"Ours" is the official MAE / timm key layout (``patch_embed.proj.*``, ``cls_token``,
``pos_embed``, ``blocks.{i}.norm1|attn.qkv|attn.proj|norm2|mlp.fc1|mlp.fc2``, ``norm``,
``fc_norm``, ``head``, and ViTDet's ``blocks.{i}.attn.rel_pos_h|w``).  A reader returns the state
dict in that layout plus notes on everything it dropped; nothing is dropped silently. A writer
leaves out only what the target layout has no place for (Detectron2's and HF VitDet's ViT have no
class token, final norm or head: ``VITDET_ABSENT``); ``mae-transfer convert`` reads the written
file back and names every tensor it does not carry.

| format      | file                                             | reader drops (with a note)            |
|-------------|--------------------------------------------------|---------------------------------------|
| ours        | ``.safetensors`` with mae-transfer metadata      | nothing                               |
| timm        | plain state dict (``.pth``/``.bin``/``.safetensors``) | nothing                          |
| mae         | ``{"model": sd}``: official MAE pretrain/finetune, DeiT | decoder, mask token, distill token |
| mocov3      | ``{"state_dict": {"module.base_encoder.*"}}``    | projection head, momentum encoder, predictor |
| hf          | HF ``ViTModel`` / ``ViTMAEModel`` (+ ``vit.`` prefix), file or folder | MAE decoder, pooler |
| hf-vitdet   | HF ``VitDetModel`` / ``VitDetBackbone`` state dict (``embeddings.projection``) | nothing |
| detectron2  | ``{"model": {"backbone.net.*"}}`` (ViTDet)       | everything outside ``backbone.net.``  |
| mmseg       | MMSeg ``VisionTransformer`` (``layers.{i}.ln1`` ...), optionally under ``state_dict``/``backbone.`` | decode heads |
| mmseg-mae   | MMSeg ``MAE`` / ``BEiT`` (``layers.{i}.gamma_1``, ``attn.relative_position_bias_table``), same containers | decode heads, ``relative_position_index`` |
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import torch

from mae_backbone.io import CheckpointError

StateDict = dict[str, torch.Tensor]
Notes = list[str]


def _tensors(obj: Any, where: str) -> StateDict:
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{where}: expected a mapping of names to tensors")
    return dict(obj)


def _drop(sd: StateDict, pattern: str, why: str, notes: Notes) -> StateDict:
    rx = re.compile(pattern)
    dropped = [k for k in sd if rx.match(k)]
    if dropped:
        notes.append(f"dropped {len(dropped)} {why} keys ({', '.join(sorted(dropped)[:3])}{', ...' if len(dropped) > 3 else ''})")
    return {k: v for k, v in sd.items() if k not in dropped}


def _take_prefix(sd: StateDict, prefix: str, others: str, notes: Notes) -> StateDict:
    """The keys under ``prefix``, without it; the rest are dropped with a note naming them."""
    dropped = [k for k in sd if not k.startswith(prefix)]
    if dropped:
        notes.append(f"dropped {len(dropped)} {others} keys outside {prefix!r}")
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- timm / ours / mae
def read_timm(obj: Any, notes: Notes) -> StateDict:
    return _tensors(obj, "timm state dict")


def write_timm(sd: StateDict, meta: dict[str, Any]) -> Any:
    return dict(sd)


def read_mae(obj: Any, notes: Notes) -> StateDict:
    sd = _tensors(obj["model"], "official MAE/DeiT checkpoint['model']")
    sd = _drop(sd, r"^(decoder_|mask_token|encoder_mask_token)", "MAE decoder / mask token", notes)
    if "dist_token" in sd:  # DeiT distilled: two prefix tokens; keep the class token's slot only
        pe = sd["pos_embed"]
        sd["pos_embed"] = torch.cat([pe[:, :1], pe[:, 2:]], dim=1)
        sd = _drop(sd, r"^(dist_token|head_dist)", "DeiT distillation", notes)
        notes.append("removed the distillation token's position from pos_embed")
    return sd


def write_mae(sd: StateDict, meta: dict[str, Any]) -> Any:
    return {"model": dict(sd)}


# --------------------------------------------------------------------------- MoCo v3
MOCO_PREFIX = "module.base_encoder."


def read_mocov3(obj: Any, notes: Notes) -> StateDict:
    full = _tensors(obj["state_dict"], "MoCo v3 checkpoint['state_dict']")
    sd = _take_prefix(full, MOCO_PREFIX, "momentum-encoder/predictor", notes)
    return _drop(sd, r"^head\.", "MoCo v3 projection head", notes)


def write_mocov3(sd: StateDict, meta: dict[str, Any]) -> Any:
    return {"state_dict": {MOCO_PREFIX + k: v for k, v in sd.items()}, "arch": meta.get("arch", "vit")}


# --------------------------------------------------------------------------- Hugging Face
_HF_BLOCK = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
# transformers >= 5 names the block's tensors differently in memory (``state_dict()``, under
# ``layers.{i}.``); its ``save_pretrained`` and the hub's files use the names above
_HF5_QKV = {"attention.q_proj": "query", "attention.k_proj": "key", "attention.v_proj": "value"}
_HF5_BLOCK = {"attention.o_proj": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}


def read_hf(obj: Any, notes: Notes) -> StateDict:
    sd = _tensors(obj, "Hugging Face state dict")
    if any(k.startswith(_VITDET_PATCH) for k in sd):  # a VitDet model folder reads as "hf" too
        notes.append("HF VitDet layout (embeddings.projection, attention.qkv): read as 'hf-vitdet'")
        return read_hf_vitdet(sd, notes)
    if any(k.startswith("vit.") for k in sd):
        sd = {k[4:] if k.startswith("vit.") else k: v for k, v in sd.items()}
    sd = _drop(sd, r"^(decoder\.|pooler\.)", "HF decoder/pooler", notes)
    out: StateDict = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    leftovers = []
    for k, v in sd.items():
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
            continue
        m = re.match(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$", k)
        if not m:
            leftovers.append(k)
            continue
        i, mod, kind = int(m.group(1)), m.group(2), m.group(3)
        if mod in ("attention.attention.query", "attention.attention.key", "attention.attention.value"):
            qkv.setdefault(i, {})[f"{mod.split('.')[-1]}.{kind}"] = v
        elif mod in _HF5_QKV:
            qkv.setdefault(i, {})[f"{_HF5_QKV[mod]}.{kind}"] = v
        elif mod in _HF_BLOCK:
            out[f"blocks.{i}.{_HF_BLOCK[mod]}.{kind}"] = v
        elif mod in _HF5_BLOCK:
            out[f"blocks.{i}.{_HF5_BLOCK[mod]}.{kind}"] = v
        else:
            leftovers.append(k)
    for i, parts in qkv.items():
        for kind in ("weight", "bias"):
            trio = [parts.get(f"{n}.{kind}") for n in ("query", "key", "value")]
            if all(t is not None for t in trio):
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(trio, dim=0)
            elif any(t is not None for t in trio):
                raise CheckpointError(f"HF checkpoint: layer {i} has an incomplete query/key/value {kind}")
    if leftovers:
        raise CheckpointError(f"HF checkpoint: keys with no ViT equivalent: {sorted(leftovers)[:8]}")
    if "pos_embed" in out and out["pos_embed"].ndim == 2:
        out["pos_embed"] = out["pos_embed"].unsqueeze(0)
    return out


def write_hf(sd: StateDict, meta: dict[str, Any]) -> Any:
    inv_top = {v: k for k, v in _HF_TOP.items()}
    inv_block = {v: k for k, v in _HF_BLOCK.items()}
    has_head = "head.weight" in sd
    prefix = "vit." if has_head else ""
    out: StateDict = {}
    for k, v in sd.items():
        if k in inv_top:
            name = inv_top[k]
            out[name if name.startswith("classifier") else prefix + name] = v
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m and m.group(2) == "attn.qkv":
            for n, t in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                out[f"{prefix}encoder.layer.{m.group(1)}.attention.attention.{n}.{m.group(3)}"] = t.clone()
        elif m and m.group(2) in inv_block:
            out[f"{prefix}encoder.layer.{m.group(1)}.{inv_block[m.group(2)]}.{m.group(3)}"] = v
        elif k.startswith("fc_norm."):
            raise CheckpointError("HF ViT has no fc_norm (global-pool head); export the encoder without it")
        else:
            raise CheckpointError(f"HF ViT has no equivalent of {k!r}")
    return out


def hf_config(meta: dict[str, Any], sd: StateDict) -> dict[str, Any]:
    """A ``transformers`` ``ViTConfig`` dict for the exported weights."""
    for key in ("embed_dim", "depth", "num_heads", "patch_size", "img_size"):
        if meta.get(key) is None:
            raise CheckpointError(f"HF export needs '{key}' (name the architecture with --arch)")
    cfg = {
        "model_type": "vit",
        "architectures": ["ViTForImageClassification" if "head.weight" in sd else "ViTModel"],
        "hidden_size": meta["embed_dim"],
        "num_hidden_layers": meta["depth"],
        "num_attention_heads": meta["num_heads"],
        "intermediate_size": int(meta["embed_dim"] * meta.get("mlp_ratio", 4.0)),
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "image_size": meta["img_size"][0] if isinstance(meta["img_size"], list) else meta["img_size"],
        "patch_size": meta["patch_size"],
        "num_channels": meta.get("in_chans", 3),
        "qkv_bias": True,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    if "head.weight" in sd:
        cfg["num_labels"] = int(sd["head.weight"].shape[0])
    return cfg


# --------------------------------------------------------------------------- Hugging Face VitDet
# transformers' VitDetModel / VitDetBackbone: no class token, final norm or head; the absolute table
# keeps the class token's slot ([1, 1 + (pretrain_image_size / patch)^2, D]), as ViTDet's.
_VITDET_PATCH = "embeddings.projection."
_VITDET_TOP = {
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.projection.bias": "patch_embed.proj.bias",
}
_VITDET_BLOCK = {  # inside encoder.layer.{i}. / blocks.{i}.
    "norm1": "norm1",
    "attention.qkv": "attn.qkv",
    "attention.proj": "attn.proj",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_VITDET_REL_POS = {"attention.rel_pos_h": "attn.rel_pos_h", "attention.rel_pos_w": "attn.rel_pos_w"}
# what a VitDet model has no place for: dropped by the writer (``mae-transfer convert`` lists them)
VITDET_ABSENT = r"^(cls_token$|norm\.|fc_norm\.|head\.)"


def read_hf_vitdet(obj: Any, notes: Notes) -> StateDict:
    """HF ``VitDetModel`` / ``VitDetBackbone`` state dict -> ours (nothing dropped).

    Residual bottleneck blocks (``encoder.layer.{i}.residual.*``) have no equivalent: an error.
    """
    sd = _tensors(obj, "HF VitDet state dict")
    out: StateDict = {}
    leftovers = []
    for k, v in sd.items():
        if k in _VITDET_TOP:
            out[_VITDET_TOP[k]] = v
            continue
        m = re.match(r"^encoder\.layer\.(\d+)\.(.+)$", k)
        name = None
        if m:
            rest = m.group(2)
            if rest in _VITDET_REL_POS:
                name = _VITDET_REL_POS[rest]
            else:
                mm = re.match(r"^(.+)\.(weight|bias)$", rest)
                if mm and mm.group(1) in _VITDET_BLOCK:
                    name = f"{_VITDET_BLOCK[mm.group(1)]}.{mm.group(2)}"
        if name is None:
            leftovers.append(k)
        else:
            out[f"blocks.{m.group(1)}.{name}"] = v
    if leftovers:
        raise CheckpointError(f"HF VitDet checkpoint: keys with no ViT equivalent (residual blocks are not "
                              f"supported): {sorted(leftovers)[:8]}")
    return out


def write_hf_vitdet(sd: StateDict, meta: dict[str, Any]) -> Any:
    """Ours -> an HF ``VitDetModel`` state dict (load it with ``load_state_dict(strict=True)``).

    VitDet has no class token, final norm, ``fc_norm`` or head: those keys are left out
    (``VITDET_ABSENT``; ``mae-transfer convert`` names them). Anything else without an equivalent
    (layer scale, BEiT relative position tables) is an error, since leaving it out would change the
    network. The config (window size, window blocks, image sizes) is not in a state dict: build a
    ``VitDetConfig`` with ``window_block_indices`` = the blocks that are not global.
    """
    inv_top = {v: k for k, v in _VITDET_TOP.items()}
    inv_rel = {v: k for k, v in _VITDET_REL_POS.items()}
    inv_block = {v: k for k, v in _VITDET_BLOCK.items()}
    out: StateDict = {}
    for k, v in sd.items():
        if k in inv_top:
            if k == "pos_embed" and math.isqrt(v.shape[1] - 1) ** 2 != v.shape[1] - 1:
                raise CheckpointError(f"HF VitDet wants pos_embed as [1, 1 + H*W, D] (a square grid after the class "
                                      f"token's slot), got {list(v.shape)}")
            out[inv_top[k]] = v
            continue
        if re.match(VITDET_ABSENT, k):
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)$", k)
        name = None
        if m:
            rest = m.group(2)
            if rest in inv_rel:
                name = inv_rel[rest]
            else:
                mm = re.match(r"^(.+)\.(weight|bias)$", rest)
                if mm and mm.group(1) in inv_block:
                    name = f"{inv_block[mm.group(1)]}.{mm.group(2)}"
        if name is None:
            raise CheckpointError(f"HF VitDet has no equivalent of {k!r}")
        out[f"encoder.layer.{m.group(1)}.{name}"] = v
    return out


# --------------------------------------------------------------------------- Detectron2 (ViTDet)
D2_PREFIX = "backbone.net."


def read_detectron2(obj: Any, notes: Notes) -> StateDict:
    full = _tensors(obj["model"], "Detectron2 checkpoint['model']")
    return _take_prefix(full, D2_PREFIX, "detector (pyramid, RPN, ROI heads)", notes)


def write_detectron2(sd: StateDict, meta: dict[str, Any]) -> Any:
    """ViTDet's ``ViT`` has no class token, final norm or head (``VITDET_ABSENT``: left out, and
    ``mae-transfer convert`` names them); its pos_embed keeps the cls slot."""
    keep = {k: v for k, v in sd.items() if not re.match(VITDET_ABSENT, k)}
    return {"model": {D2_PREFIX + k: v for k, v in keep.items()}, "__author__": "mae-transfer",
            "matching_heuristics": False}


# --------------------------------------------------------------------------- MMSeg VisionTransformer / MAE
# Inside ``layers.{i}.``: MMSeg's plain ``VisionTransformer`` (nn.MultiheadAttention) ...
_MMSEG_BLOCK = [
    ("norm1.", "ln1."),
    ("attn.qkv.weight", "attn.attn.in_proj_weight"),
    ("attn.qkv.bias", "attn.attn.in_proj_bias"),
    ("attn.proj.", "attn.attn.out_proj."),
    ("norm2.", "ln2."),
    ("mlp.fc1.", "ffn.layers.0.0."),
    ("mlp.fc2.", "ffn.layers.1."),
]
# ... and MMSeg's ``MAE`` (a ``BEiT`` subclass, the backbone of ``mae-base_upernet_8xb2-amp-160k``):
# ``BEiTAttention`` with a full qkv bias, a relative position bias table per layer (and its
# ``relative_position_index`` buffer, which MMSeg stores), layer scale ``gamma_1`` / ``gamma_2``.
_MMSEG_MAE_BLOCK = [
    ("norm1.", "ln1."),
    ("attn.qkv.", "attn.qkv."),
    ("attn.proj.", "attn.proj."),
    ("attn.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("ls1.gamma", "gamma_1"),
    ("ls2.gamma", "gamma_2"),
    ("norm2.", "ln2."),
    ("mlp.fc1.", "ffn.layers.0.0."),
    ("mlp.fc2.", "ffn.layers.1."),
]
# the final norm: ``ln1`` at the top (MMSeg builds it only with ``final_norm=True``)
_MMSEG_TOP = [("patch_embed.proj.", "patch_embed.projection."), ("norm.", "ln1.")]
_MMSEG_MAE_KEY = re.compile(r"(^|\.)layers\.\d+\.(attn\.qkv\.|attn\.[qv]_bias$|gamma_[12]$|attn\.relative_position_)")


def _rename(key: str, pairs: list[tuple[str, str]], forward: bool) -> str | None:
    for a, b in pairs:
        src, dst = (a, b) if forward else (b, a)
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def read_mmseg(obj: Any, notes: Notes) -> StateDict:
    """MMSeg ``VisionTransformer``, ``MAE`` or ``BEiT`` backbone weights -> ours.

    The file may be a segmentor checkpoint (``state_dict`` with ``backbone.*``: the heads are
    dropped with a note) or a bare backbone state dict. ``MAE``/``BEiT`` layers: ``gamma_1/2`` ->
    ``ls1/ls2.gamma``, ``relative_position_bias_table`` kept per block, ``relative_position_index``
    dropped with a note (our blocks derive it from the table's grid). ``BEiT``'s ``q_bias`` /
    ``v_bias`` become ``attn.qkv.bias`` with a zero key part (BEiT has no key bias; a key bias
    adds the same logit to every key of a query, which the softmax ignores).
    """
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    sd = _tensors(sd, "MMSeg checkpoint")
    if any(k.startswith("backbone.") for k in sd):
        sd = _take_prefix(sd, "backbone.", "decode/auxiliary head", notes)
    sd = _drop(sd, r"^layers\.\d+\.attn\.relative_position_index$",
               "relative_position_index (derived from the table's grid by our blocks)", notes)
    out: StateDict = {}
    qv_bias: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = re.match(r"^layers\.(\d+)\.(.+)$", k)
        if m and m.group(2) in ("attn.q_bias", "attn.v_bias"):
            qv_bias.setdefault(m.group(1), {})[m.group(2)[5]] = v
            continue
        if m:
            rest = m.group(2)
            new = _rename(rest, _MMSEG_BLOCK, forward=False) or _rename(rest, _MMSEG_MAE_BLOCK, forward=False)
            name = f"blocks.{m.group(1)}.{new}" if new else None
        elif k in ("cls_token", "pos_embed"):
            name = k
        else:
            name = _rename(k, _MMSEG_TOP, forward=False)
        if name is None:
            raise CheckpointError(f"MMSeg checkpoint: no ViT equivalent for {k!r}")
        out[name] = v
    for i, parts in qv_bias.items():
        both = f"blocks.{i}.attn.qkv.bias" in out
        if set(parts) != {"q", "v"} or both:
            raise CheckpointError(f"MMSeg BEiT checkpoint: layer {i} needs both q_bias and v_bias and no qkv.bias, "
                                  f"got {sorted(parts)}{' and a qkv.bias' if both else ''}")
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([parts["q"], torch.zeros_like(parts["q"]), parts["v"]])
    if qv_bias:
        notes.append(f"BEiT q_bias/v_bias of {len(qv_bias)} layers -> attn.qkv.bias with a zero key part "
                     "(BEiT has no key bias)")
    return out


def _to_mmseg_layers(sd: StateDict, block_pairs: list[tuple[str, str]], target: str, hint: str = "") -> StateDict:
    """Our keys -> MMSeg's ``layers.{i}...`` / ``patch_embed.projection`` / ``ln1`` layout; the
    classifier (``head``, ``fc_norm``) is left out (MMSeg backbones have none); anything else
    without an equivalent in ``target`` is an error."""
    out: StateDict = {}
    for k, v in sd.items():
        m = re.match(r"^blocks\.(\d+)\.(.+)$", k)
        if m:
            new = _rename(m.group(2), block_pairs, forward=True)
            name = f"layers.{m.group(1)}.{new}" if new else None
        elif k in ("cls_token", "pos_embed"):
            name = k
        elif k.startswith(("head.", "fc_norm.")):
            continue
        else:
            name = _rename(k, _MMSEG_TOP, forward=True)
        if name is None:
            raise CheckpointError(f"{target} has no equivalent of {k!r}" + (hint if "relative_position" in k
                                                                            or ".ls" in k else ""))
        out[name] = v
    return out


def write_mmseg(sd: StateDict, meta: dict[str, Any]) -> Any:
    out = _to_mmseg_layers(sd, _MMSEG_BLOCK, "MMSeg VisionTransformer",
                           " (BEiT relative position tables and layer scale: write 'mmseg-mae')")
    return {"state_dict": out, "meta": {"converted_by": "mae-transfer"}}


def _beit_grid(rows: int, meta: dict[str, Any], key: str) -> tuple[int, int]:
    """The token grid of a BEiT table with ``rows`` = (2H-1)(2W-1)+3 rows: the metadata's
    ``img_size`` / ``patch_size`` when they fit, else the square grid that fits."""
    img, patch = meta.get("img_size"), meta.get("patch_size")
    if img is not None and patch:
        hw = (img, img) if isinstance(img, int) else tuple(img)
        grid = (hw[0] // patch, hw[1] // patch)
        if (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3 == rows:
            return grid
    side = math.isqrt(rows - 3)
    if side * side == rows - 3 and side % 2 == 1:
        return ((side + 1) // 2,) * 2
    raise CheckpointError(f"{key}: {rows} rows is not (2H-1)(2W-1)+3 for a square grid, and the metadata's "
                          f"img_size/patch_size ({img}, {patch}) does not fit it either")


def write_mmseg_mae(sd: StateDict, meta: dict[str, Any]) -> Any:
    """Ours -> MMSeg ``MAE`` backbone weights (``{"state_dict": ...}``, as MMSeg's tools write).

    With the BEiT options (``rel_pos="beit"``, ``init_values``) the result loads into
    ``mmseg.models.backbones.MAE`` with ``strict=True``: ``relative_position_index`` (a stored
    buffer there) is written for every table, computed from its grid; the final ``norm`` becomes
    ``ln1`` (``final_norm=True``; MMSeg's ADE20K config has ``final_norm=False`` and loads
    non-strictly, ignoring it). A plain ViT (no tables / layer scale) gives the file MMSeg's MAE
    config starts from: its loader leaves the tables at zero and the gammas at ``init_values``.
    The classifier (``head``, ``fc_norm``) is left out; decomposed ``rel_pos_h/w`` is an error.
    """
    from mae_backbone.layers import beit_rel_pos_index

    out = _to_mmseg_layers(sd, _MMSEG_MAE_BLOCK, "MMSeg MAE")
    for name, v in list(out.items()):
        if name.endswith("attn.relative_position_bias_table"):
            grid = _beit_grid(v.shape[0], meta, name)
            out[name.replace("relative_position_bias_table", "relative_position_index")] = beit_rel_pos_index(grid)
    return {"state_dict": out, "meta": {"converted_by": "mae-transfer"}}


# --------------------------------------------------------------------------- registry
READERS: dict[str, Callable[[Any, Notes], StateDict]] = {
    "timm": read_timm,
    "mae": read_mae,
    "deit": read_mae,
    "mocov3": read_mocov3,
    "hf": read_hf,
    "hf-vitdet": read_hf_vitdet,
    "detectron2": read_detectron2,
    "mmseg": read_mmseg,
    "mmseg-mae": read_mmseg,
}
WRITERS: dict[str, Callable[[StateDict, dict[str, Any]], Any]] = {
    "timm": write_timm,
    "mae": write_mae,
    "mocov3": write_mocov3,
    "hf": write_hf,
    "hf-vitdet": write_hf_vitdet,
    "detectron2": write_detectron2,
    "mmseg": write_mmseg,
    "mmseg-mae": write_mmseg_mae,
}
FORMATS = ("ours", *READERS)


def detect_format(obj: Any) -> str | None:
    """Tell the format of a loaded checkpoint object from its keys; None when unknown."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("state_dict"), dict):
        keys = list(obj["state_dict"])
        if any(k.startswith(MOCO_PREFIX) for k in keys):
            return "mocov3"
        if any(_MMSEG_MAE_KEY.search(k) for k in keys):
            return "mmseg-mae"
        if any(".ln1." in k or k.startswith(("patch_embed.projection", "backbone.patch_embed.projection")) for k in keys):
            return "mmseg"
    if isinstance(obj.get("model"), dict):
        keys = list(obj["model"])
        if any(k.startswith(D2_PREFIX) for k in keys):
            return "detectron2"
        if "patch_embed.proj.weight" in keys:
            return "mae"
    keys = [k for k in obj if isinstance(k, str)]
    if any(k.startswith(_VITDET_PATCH) for k in keys):  # HF ViT's is embeddings.patch_embeddings.projection
        return "hf-vitdet"
    if any("embeddings.patch_embeddings" in k for k in keys):
        return "hf"
    if any(_MMSEG_MAE_KEY.search(k) for k in keys):
        return "mmseg-mae"
    if any(k.startswith(("patch_embed.projection", "layers.0.ln1")) for k in keys):
        return "mmseg"
    if "patch_embed.proj.weight" in keys:
        return "timm"
    return None


def describe(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = list(obj)[:6]
        return f"top-level keys {keys}{' ...' if len(obj) > 6 else ''}"
    return f"a {type(obj).__name__}"


def read_hf_folder(path: Path) -> tuple[Any, dict[str, Any]]:
    """Weights and config of a Hugging Face model folder."""
    from safetensors.torch import load_file

    from mae_backbone.io import safe_torch_load

    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    if (path / "model.safetensors").exists():
        return load_file(str(path / "model.safetensors")), cfg
    if (path / "pytorch_model.bin").exists():
        return safe_torch_load(path / "pytorch_model.bin"), cfg
    raise CheckpointError(f"{path}: a folder, but no model.safetensors or pytorch_model.bin in it")
