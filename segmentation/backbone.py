"""``MAEViT``: our ViT as an MMSegmentation backbone, registered in ``mmseg.registry.MODELS``.

The module holds a ``mae_backbone.VisionTransformer`` as ``self.vit``, so the segmentor's
checkpoint keys are ``backbone.vit.<our ViT key>`` (``backbone.vit.blocks.3.attn.qkv.weight``):
the part after ``backbone.vit.`` is exactly the layout every ``mae_backbone`` reader produces.

Outputs are one [B, D, H/p, W/p] map per ``out_indices`` entry, the input of MMSeg's
``Feature2Pyramid`` (rescales 4, 2, 1, 0.5) or ``MultiLevelNeck``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import nn

from mae_backbone import VIT_ARCHS, VisionTransformer
from mae_backbone.checkpoint import HEAD_KEYS, LAYER_SCALE_KEYS, REL_POS_KEYS, LoadReport, load_checkpoint

# short names, as MMSeg / MMPretrain spell them
ARCH_ALIASES: dict[str, str] = {
    "tiny": "vit_tiny_patch16",
    "small": "vit_small_patch16",
    "base": "vit_base_patch16",
    "large": "vit_large_patch16",
    "huge": "vit_huge_patch14",
}
_ARCH_KEYS = ("embed_dim", "depth", "num_heads", "patch_size")


def resolve_arch(arch: str | dict[str, int]) -> tuple[str, dict[str, int]]:
    """``'base'`` / ``'vit_base_patch16'`` / ``dict(embed_dim, depth, num_heads[, patch_size])``.

    Returns:
        (a printable name, the ``VisionTransformer`` size arguments).
    """
    if isinstance(arch, str):
        name = ARCH_ALIASES.get(arch, arch)
        if name not in VIT_ARCHS:
            raise KeyError(f"MAEViT: unknown arch {arch!r}; use one of {', '.join(ARCH_ALIASES)}, "
                           f"a registry name ({', '.join(VIT_ARCHS)}) or a dict with {_ARCH_KEYS[:3]}")
        return name, dict(VIT_ARCHS[name])
    spec = dict(arch)
    unknown = sorted(set(spec) - set(_ARCH_KEYS))
    missing = [k for k in _ARCH_KEYS[:3] if k not in spec]
    if unknown or missing:
        raise KeyError(f"MAEViT: arch dict needs {_ARCH_KEYS[:3]} (patch_size optional, default 16); "
                       f"unknown keys {unknown}, missing keys {missing}")
    spec.setdefault("patch_size", 16)
    return "custom", spec


@MODELS.register_module()
class MAEViT(BaseModule):
    """An MAE-pretrainable ViT for MMSeg, with the dense-task options of ``mae_backbone``.

    Args:
        arch: ``'tiny' | 'small' | 'base' | 'large' | 'huge'``, a ``VIT_ARCHS`` name, or a dict
            ``dict(embed_dim=, depth=, num_heads=, patch_size=16)`` (in a config inheriting a
            string ``arch``, write ``arch=dict(_delete_=True, ...)``).
        img_size: the size the absolute position embedding is kept at (int or (H, W)); the
            checkpoint's embedding is resampled to it once when loading, other input sizes are
            resampled on the fly (non-square included).
        in_channels: input channels.
        out_indices: blocks whose outputs are returned (negative counts from the end).
        drop_path_rate: stochastic depth, linear over the blocks.
        use_rel_pos: relative position bias in every block, zero-initialized: ``"beit"`` (BEiT's
            table per block with the class-token entries, as MMSeg's ``MAE`` backbone and the MAE
            paper's ADE20K recipe), ``"decomposed"`` or True (ViTDet's ``rel_pos_h/w``), False.
        init_values: layer scale (``ls1.gamma`` / ``ls2.gamma``, BEiT's ``gamma_1/2``) filled
            with this value; None for none. MMSeg's MAE ADE20K config uses 1.0.
        window_size: 0 for global attention; else window attention of this many patches in every
            block not in ``global_blocks`` (ViTDet).
        global_blocks: blocks that keep global attention when ``window_size`` > 0.
        frozen_stages: -1 trains everything; 0 freezes the patch embedding, class token and
            position embedding; k > 0 also the first k blocks.  Frozen parameters get
            ``requires_grad=False`` and frozen modules stay in eval mode in ``train()``.
        with_cp: activation checkpointing of the blocks (less memory, one more forward).
        norm_out: apply the ViT's final LayerNorm to every output map; when False the ``norm``
            is removed from the model (its checkpoint keys are then ignored, with a report line).
        pos_embed_learnable: fine-tune the absolute position embedding.
        pretrained: a checkpoint path in any format ``mae_backbone`` reads (ours, timm, official
            MAE, DeiT, MoCo v3, HF, Detectron2, MMSeg).  Same as
            ``init_cfg=dict(type='Pretrained', checkpoint=path)``.  Loaded in ``init_weights()``.
        init_cfg: MMEngine's init config; a ``Pretrained`` entry is loaded by ``mae_backbone``
            (strict, safe, with a report), never by MMEngine's unchecked loader.
    """

    def __init__(
        self,
        arch: str | dict[str, int] = "base",
        img_size: int | Sequence[int] = 512,
        in_channels: int = 3,
        out_indices: Sequence[int] = (3, 5, 7, 11),
        drop_path_rate: float = 0.0,
        use_rel_pos: bool | str = False,
        init_values: float | None = None,
        window_size: int = 0,
        global_blocks: Sequence[int] = (),
        frozen_stages: int = -1,
        with_cp: bool = False,
        norm_out: bool = False,
        pos_embed_learnable: bool = True,
        pretrained: str | None = None,
        init_cfg: dict[str, Any] | list[dict[str, Any]] | None = None,
    ):
        pretrained, init_cfg = _split_pretrained(pretrained, init_cfg)
        super().__init__(init_cfg=init_cfg)
        self.arch_name, size = resolve_arch(arch)
        self.vit = VisionTransformer(
            **size,
            img_size=img_size,
            in_chans=in_channels,
            drop_path_rate=drop_path_rate,
            rel_pos=use_rel_pos,
            init_values=init_values,
            window_size=window_size,
            global_blocks=global_blocks,
            grad_checkpointing=with_cp,
            pos_embed_learnable=pos_embed_learnable,
        )
        self.out_indices = list(out_indices)
        self.vit.output_shape(self.out_indices)  # raises on an index out of range
        self.norm_out = norm_out
        if not norm_out:
            self.vit.norm = nn.Identity()  # unused: no dead parameters in the optimizer or DDP
        depth = self.vit.depth
        if not -1 <= frozen_stages <= depth:
            raise ValueError(f"MAEViT: frozen_stages must be in [-1, {depth}], got {frozen_stages}")
        self.frozen_stages = frozen_stages
        self.pretrained = pretrained
        self.load_report: LoadReport | None = None
        self._freeze_stages()

    # ------------------------------------------------------------------ hooks (optimizer, shapes)
    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def patch_size(self) -> int:
        return self.vit.patch_size

    @property
    def num_layers(self) -> int:
        """Number of layer ids for layer-wise lr decay (depth + 2)."""
        return self.vit.num_layers

    def layer_id(self, name: str) -> int:
        """Layer id of a parameter named inside this module (``vit.blocks.3.mlp.fc1.weight`` -> 4)."""
        return self.vit.layer_id(name)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (last component) timm / the official MAE code keep out of weight decay,
        besides all 1-D parameters: used by ``ViTLayerDecayOptimizerConstructor`` with
        ``weight_decay_rule='hooks'`` (its default follows MMSeg, which decays these)."""
        return set(self.vit.no_weight_decay()) | {"rel_pos_h", "rel_pos_w", "relative_position_bias_table"}

    def output_channels(self) -> list[int]:
        """Channels of each output map (all ``embed_dim``), e.g. for a neck's ``in_channels``."""
        return [self.vit.embed_dim] * len(self.out_indices)

    # ------------------------------------------------------------------ weights
    def init_weights(self) -> None:
        """Load ``pretrained`` if given (the ViT already has MAE's initialization)."""
        if self.pretrained is not None:
            self.load_report = self.load_pretrained(self.pretrained)
            self._is_init = True
        else:
            super().init_weights()

    def load_pretrained(self, path: str) -> LoadReport:
        """Strictly load any ``mae_backbone`` checkpoint into ``self.vit`` and log the report.

        Allowed to be missing: the relative-position tables (zero-init) and the layer scales
        (``init_values``), which pretraining checkpoints do not have.  Allowed to be unexpected:
        the classifier (``head``, ``fc_norm``) and, when ``norm_out`` is False, the final
        ``norm``.  Anything else missing or unexpected raises ``CheckpointError``.
        """
        allow_unexpected = HEAD_KEYS + (() if self.norm_out else ("norm.*",))
        report = load_checkpoint(self.vit, path, allow_missing=REL_POS_KEYS + LAYER_SCALE_KEYS,
                                 allow_unexpected=allow_unexpected)
        print_log(f"MAEViT pretrained weights: {report}", logger="current")
        return report

    # ------------------------------------------------------------------ freezing
    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.vit.patch_embed, *self.vit.blocks[: self.frozen_stages]]

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        self.vit.cls_token.requires_grad_(False)
        self.vit.pos_embed.requires_grad_(False)
        for module in self._frozen_modules():
            module.eval()
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> "MAEViT":
        """Set the mode, keeping frozen stages in eval (no drop path in them)."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Multi-level features.

        Args:
            x: [B, C, H, W]; H, W are zero-padded (bottom/right) up to multiples of the patch size.
        Returns:
            one [B, D, ceil(H/p), ceil(W/p)] map per ``out_indices`` entry, in that order.
        """
        p = self.vit.patch_size
        pad_h, pad_w = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return tuple(self.vit.forward_intermediates(x, self.out_indices, norm=self.norm_out))


def _split_pretrained(
    pretrained: str | None, init_cfg: dict[str, Any] | list[dict[str, Any]] | None
) -> tuple[str | None, dict[str, Any] | list[dict[str, Any]] | None]:
    """Take the checkpoint of a ``Pretrained`` init_cfg out, so that we load it, not MMEngine."""
    cfgs = [init_cfg] if isinstance(init_cfg, dict) else list(init_cfg or [])
    others = []
    for cfg in cfgs:
        if cfg.get("type") == "Pretrained":
            extra = sorted(set(cfg) - {"type", "checkpoint"})
            if extra:
                raise ValueError(f"MAEViT: init_cfg Pretrained supports only 'checkpoint', got {extra} "
                                 "(the checkpoint format and prefixes are detected by mae_backbone)")
            if pretrained is not None and pretrained != cfg["checkpoint"]:
                raise ValueError("MAEViT: give the checkpoint once, as `pretrained` or as an init_cfg "
                                 f"Pretrained entry, not both ({pretrained!r} vs {cfg['checkpoint']!r})")
            pretrained = cfg["checkpoint"]
        else:
            others.append(cfg)
    return pretrained, (others or None)
