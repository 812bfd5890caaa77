"""The classifier: the mae_backbone ViT with a task head, loaded from any checkpoint, and frozen
as each protocol says.

- ``build_classifier``: ``ClassifierViT`` = ``mae_backbone.VisionTransformer`` (same layout, same
  forward) whose frozen sub-modules stay in eval mode through ``train()``.  Linear probing puts
  ``BatchNorm1d(affine=False, eps=1e-6)`` before the linear head (the official MAE
  ``main_linprobe.py``): ``head = Sequential(BatchNorm1d, Linear)``.
- ``load_pretrained``: strict loading through ``mae_backbone.checkpoint.load_checkpoint``; only the
  task head (and ``fc_norm`` / ``norm``, depending on the pooling) may be missing or left over;
  the head is then initialized as the recipe says (trunc-normal, std 2e-5 fine-tuning, 0.01 linear
  probing).
- ``freeze``: what trains; everything else gets ``requires_grad=False`` and eval mode.
- ``fold_bn_head``: the linear probe's BN + Linear as one Linear (for export as a plain ViT).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mae_backbone import VIT_ARCHS, CheckpointError, VisionTransformer
from mae_backbone.checkpoint import HEAD_KEYS, LoadReport, infer_arch, load_checkpoint, read_checkpoint

HEAD_INIT_STD = {"finetune": 2e-5, "linprobe": 0.01}


class ClassifierViT(VisionTransformer):
    """``VisionTransformer`` whose modules named in ``frozen_modules`` stay in eval mode.

    ``train(True)`` puts the model in training mode and then the frozen modules back in eval mode,
    so that frozen blocks run without drop path and frozen BatchNorms keep their statistics.
    """

    frozen_modules: tuple[str, ...] = ()

    def train(self, mode: bool = True) -> "ClassifierViT":
        super().train(mode)
        for name in self.frozen_modules:
            self.get_submodule(name).eval()
        return self


def linear_probe_head(embed_dim: int, num_classes: int) -> nn.Sequential:
    """``BatchNorm1d(D, affine=False, eps=1e-6)`` then ``Linear(D, num_classes)`` (trunc-normal 0.01)."""
    linear = nn.Linear(embed_dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=HEAD_INIT_STD["linprobe"])
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6), linear)


def vit_kwargs(arch: str, **overrides: Any) -> dict[str, Any]:
    """``VisionTransformer`` arguments of a registered architecture with overrides."""
    if arch not in VIT_ARCHS:
        close = difflib.get_close_matches(arch, VIT_ARCHS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown ViT {arch!r}{hint} (known: {', '.join(VIT_ARCHS)})")
    return {**VIT_ARCHS[arch], **overrides}


def build_classifier(
    arch: str,
    num_classes: int,
    protocol: str = "finetune",
    global_pool: bool = True,
    img_size: int = 224,
    drop_path: float = 0.0,
    model_kwargs: Mapping[str, Any] | None = None,
    bn_head: bool | None = None,
) -> ClassifierViT:
    """A ViT classifier for a protocol (weights at their initialization).

    Args:
        arch: a ``mae_backbone.VIT_ARCHS`` name.
        num_classes: size of the head.
        protocol: ``finetune`` (learnable position embedding, linear head) or ``linprobe``.
        global_pool: average the patch tokens + ``fc_norm`` (else the class token after ``norm``).
        model_kwargs: further ``VisionTransformer`` overrides (depth, patch_size, ...).
        bn_head: BatchNorm before the head (default: for ``linprobe``).
    """
    kwargs = vit_kwargs(arch, **dict(model_kwargs or {}))
    kwargs.update(img_size=img_size, num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path,
                  pos_embed_learnable=protocol == "finetune")
    model = ClassifierViT(**kwargs)
    if bn_head if bn_head is not None else protocol == "linprobe":
        model.head = linear_probe_head(model.embed_dim, num_classes)
    return model


def init_head(model: VisionTransformer, protocol: str) -> None:
    """The recipe's head initialization: trunc-normal weight (std 2e-5 / 0.01), zero bias."""
    linear = model.head[-1] if isinstance(model.head, nn.Sequential) else model.head
    nn.init.trunc_normal_(linear.weight, std=HEAD_INIT_STD[protocol])
    nn.init.zeros_(linear.bias)


def checkpoint_arch(path: str | Path, format: str = "auto") -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """What a checkpoint says about its architecture: ``(arch, overrides, meta)``.

    Our format stores ``arch`` (+ ``arch_overrides``); for others the architecture is inferred
    from the weights' shapes (``None`` when no registered ViT matches).
    """
    sd, meta = read_checkpoint(path, format)
    arch = meta.get("arch")
    overrides = dict(meta.get("arch_overrides") or {})
    if arch is None:
        arch = infer_arch(sd).get("arch")
    return arch, overrides, {**meta, "keys": sorted(sd)}


def describe_model(model: VisionTransformer, arch: str | None = None) -> str:
    """``vit_base_patch16 (embed_dim 768, depth 12, heads 12, patch 16)``."""
    facts = f"embed_dim {model.embed_dim}, depth {model.depth}, heads {model.num_heads}, patch {model.patch_size}"
    return f"{arch} ({facts})" if arch else facts


def load_pretrained(model: ClassifierViT, path: str | Path, protocol: str, arch: str | None = None,
                    format: str = "auto") -> LoadReport:
    """Load a pretrained backbone strictly, then initialize the head as the recipe says.

    Allowed to be missing: the head, and ``fc_norm`` with global pooling (a pretrained MAE encoder
    has neither); allowed to be left over: a head of another task, the final ``norm`` with global
    pooling, ``fc_norm`` with the class token.  Anything else that does not fit is an error.

    Raises:
        CheckpointError: naming the file, the keys, what the checkpoint looks like and which
            architecture was expected.
    """
    pooled = model.global_pool
    allow_missing = HEAD_KEYS if pooled else ("head.*",)
    allow_unexpected = ("head.*", "norm.*") if pooled else ("head.*", "fc_norm.*")
    try:
        report = load_checkpoint(model, path, format=format, allow_missing=allow_missing,
                                 allow_unexpected=allow_unexpected)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} | expected {describe_model(model, arch)}") from None
    init_head(model, protocol)
    report.notes.append(f"head initialized for {protocol} (trunc-normal std {HEAD_INIT_STD[protocol]})")
    return report


# --------------------------------------------------------------------------- freezing
@dataclass
class FreezeReport:
    """What trains: ``trained`` of ``total`` parameters (elements), and the trainable names."""

    tune: str | int
    trained: int
    total: int
    trainable: list[str] = field(default_factory=list)
    frozen_modules: tuple[str, ...] = ()

    def __str__(self) -> str:
        pct = 100.0 * self.trained / max(self.total, 1)
        return f"trained {self.trained:,} of {self.total:,} parameters ({pct:.2f}%; tune: {self.tune})"


def freeze(model: ClassifierViT, tune: str | int) -> FreezeReport:
    """Choose what trains; freeze the rest (``requires_grad=False``, eval mode through ``train()``).

    Args:
        tune: ``'all'`` (full fine-tuning); ``'head'`` (linear probe: the head alone, BN included);
            K (partial fine-tuning: the last K blocks, ``norm``, ``fc_norm`` and the head; K = 0
            leaves norms + head); ``'mlp'`` (the paper's "MLP half of the last block": its
            ``norm2`` + ``mlp``, plus ``norm`` / ``fc_norm`` / head).
    Returns:
        the ``FreezeReport``.
    """
    depth = model.depth
    if tune == "all":
        trainable_modules: list[str] = [""]
        frozen: list[str] = []
    elif tune == "head":
        trainable_modules = ["head"]
        frozen = [n for n, _ in model.named_children() if n != "head"]
    elif tune == "mlp":
        last = f"blocks.{depth - 1}"
        trainable_modules = [f"{last}.norm2", f"{last}.mlp", "norm", "fc_norm", "head"]
        frozen = ["patch_embed", f"{last}.norm1", f"{last}.attn"] + [f"blocks.{i}" for i in range(depth - 1)]
    elif isinstance(tune, int):
        if not 0 <= tune <= depth:
            raise ValueError(f"tune_blocks {tune} out of range: the model has {depth} blocks")
        trainable_modules = [f"blocks.{i}" for i in range(depth - tune, depth)] + ["norm", "fc_norm", "head"]
        frozen = ["patch_embed"] + [f"blocks.{i}" for i in range(depth - tune)]
    else:
        raise ValueError(f"tune must be 'all', 'head', 'mlp' or a number of blocks, got {tune!r}")

    def trains(name: str) -> bool:
        return any(m == "" or name == m or name.startswith(m + ".") for m in trainable_modules)

    names = []
    total = trained = 0
    for name, p in model.named_parameters():
        p.requires_grad_(trains(name) and (tune != "all" or p.requires_grad))
        total += p.numel()
        if p.requires_grad:
            trained += p.numel()
            names.append(name)
    model.frozen_modules = tuple(frozen)
    model.train(model.training)
    return FreezeReport(tune, trained, total, names, tuple(frozen))


# --------------------------------------------------------------------------- export
@torch.no_grad()
def fold_bn_head(model: VisionTransformer) -> VisionTransformer:
    """Replace a ``Sequential(BatchNorm1d(affine=False), Linear)`` head by the equivalent Linear.

    In eval mode ``W (x - mu) / s + b = (W / s) x + (b - (W / s) mu)``, with ``s = sqrt(var + eps)``;
    the result is a plain ViT classifier that any reader of the format understands.  In place.
    """
    head = model.head
    if not isinstance(head, nn.Sequential):
        return model
    bn, linear = head
    if not isinstance(bn, nn.BatchNorm1d) or bn.affine or not isinstance(linear, nn.Linear):
        raise ValueError(f"fold_bn_head expects Sequential(BatchNorm1d(affine=False), Linear), got {head}")
    scale = (bn.running_var + bn.eps).rsqrt()
    folded = nn.Linear(linear.in_features, linear.out_features).to(linear.weight)
    folded.weight.copy_(linear.weight * scale)
    folded.bias.copy_(linear.bias - folded.weight @ bn.running_mean)
    model.head = folded
    return model
