"""Detectron2 backbones over the mae_backbone ViT: ViTDet's simple feature pyramid and the MAE
paper's multi-scale ViT for Detectron2's ``FPN``.

- ``SimpleFeaturePyramid``: the last block's stride-16 map -> ``p2..p5`` (strides 4, 8, 16, 32)
  by deconvolution / identity / max-pool, each followed by a 1x1 and a 3x3 conv with
  channels-first LayerNorm, plus ``p6`` (stride 64) from an optional ``top_block``
  (ViTDet, Li et al. 2022).
- ``ViTMultiScale``: four evenly spaced blocks brought to strides 4, 8, 16, 32 as ``res2..res5``
  (named like ResNet's stages so an existing FPN config's ``IN_FEATURES`` keeps working), to be
  wrapped by Detectron2's own ``FPN`` (MAE paper, after Li et al. 2021).

Both keep the ViT under the attribute ``net`` (checkpoint keys ``backbone.net.*``, as ViTDet)
and pad their input to a square inside ``forward`` (see ``pad_input``).
"""
from __future__ import annotations

import math
from typing import Sequence

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from torch import nn

from detection.checkpoint import load_pretrained
from detection.layers import NormSpec, norm_layer, resolve_norm
from mae_backbone import VisionTransformer, create_vit


def prepare_vit(net: VisionTransformer) -> VisionTransformer:
    """Make a ViT a dense feature extractor, as ViTDet's ``ViT`` is: spatial tokens only.

    Window attention cannot carry a class token, and the final ``norm`` / ``fc_norm`` / ``head``
    act on pooled or class tokens, which dense features never use. Removing them (rather than
    leaving them unused) keeps every parameter in the backward graph (DDP without
    ``find_unused_parameters``) and keeps the state dict in ViTDet's ``backbone.net.*`` layout.
    The class token's slot in ``pos_embed`` stays, as in ViTDet.
    """
    net.dense_cls = False
    net.register_parameter("cls_token", None)
    net.norm = nn.Identity()
    net.fc_norm = nn.Identity()
    net.head = nn.Identity()
    return net


def pad_input(x: torch.Tensor, square: int, divisor: int) -> torch.Tensor:
    """Zero-pad ``[B, C, H, W]`` at the bottom/right to a square of side ``max(square, H, W)``
    (when ``square`` > 0), then to multiples of ``divisor``.

    Detectron2 >= 0.7 does the square padding itself from ``padding_constraints``; 0.6 has no such
    hook, so the backbones call this in ``forward``: on newer versions it is then a no-op. Zeros
    are what Detectron2's ``ImageList`` pads normalized images with.
    """
    h, w = x.shape[-2:]
    th, tw = (max(square, h, w),) * 2 if square > 0 else (h, w)
    if divisor > 1:
        th, tw = math.ceil(th / divisor) * divisor, math.ceil(tw / divisor) * divisor
    if (th, tw) == (h, w):
        return x
    return F.pad(x, (0, tw - w, 0, th - h))


def _crop(features: dict[str, torch.Tensor], strides: dict[str, int], hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Cut each map back to the extent of the unpadded input: ``ceil(H/stride) x ceil(W/stride)``."""
    h, w = hw
    return {k: v[..., : math.ceil(h / strides[k]), : math.ceil(w / strides[k])] for k, v in features.items()}


def _stride(patch: int, scale: float) -> int:
    """The stride of a level: ``patch / scale``, which must be a power of two (Detectron2's levels)."""
    stride = patch / scale
    if stride != int(stride) or int(stride) & (int(stride) - 1):
        raise ValueError(
            f"patch size {patch} at scale {scale} gives stride {stride:g}, not a power of two; build the ViT "
            "with patch_size=16 (ViT-H/14 checkpoints are resampled to it on load, as in ViTDet)"
        )
    return int(stride)


def evenly_spaced_blocks(depth: int, n: int = 4) -> list[int]:
    """The last block of each of ``n`` equal groups: depth 12 -> [2, 5, 8, 11], 24 -> [5, 11, 17, 23]."""
    if depth < n:
        raise ValueError(f"cannot take {n} evenly spaced blocks from a ViT of depth {depth}")
    return [depth * (k + 1) // n - 1 for k in range(n)]


def _resampler(dim: int, scale: float, norm: NormSpec, keep_channels: bool) -> tuple[list[nn.Module], int]:
    """Layers taking a stride-p map to stride p/scale, and their output channels.

    ``keep_channels`` False halves the channels at each 2x deconvolution (ViTDet's pyramid);
    True keeps ``dim`` (the MAE paper's FPN variant, where the FPN's lateral convs reduce it).
    """
    half = dim if keep_channels else dim // 2
    quarter = dim if keep_channels else dim // 4
    if scale == 4.0:
        mid = norm_layer(norm, half)
        layers = [nn.ConvTranspose2d(dim, half, 2, stride=2), *([mid] if mid is not None else []), nn.GELU(),
                  nn.ConvTranspose2d(half, quarter, 2, stride=2)]
        return layers, quarter
    if scale == 2.0:
        return [nn.ConvTranspose2d(dim, half, 2, stride=2)], half
    if scale == 1.0:
        return [], dim
    if scale in (0.5, 0.25):  # 0.25: a patch-8 ViT's map down to stride 32
        k = int(round(1 / scale))
        return [nn.MaxPool2d(kernel_size=k, stride=k)], dim
    raise ValueError(f"scale factor {scale} is not supported (use 4.0, 2.0, 1.0, 0.5 or 0.25)")


class _PaddedViTBackbone(Backbone):
    """What both pyramids share: Detectron2's padding contract and the optional pretrained load."""

    _size_divisibility: int
    _square_pad: int

    def _finish(self, square_pad: int, pretrained: str) -> None:
        self._square_pad = int(square_pad)
        if pretrained:
            load_pretrained(self, pretrained)

    @property
    def size_divisibility(self) -> int:
        """Detectron2 pads inputs to multiples of this (the coarsest output stride)."""
        return self._size_divisibility

    @property
    def padding_constraints(self) -> dict[str, int]:
        """Detectron2 >= 0.7's padding hook: divisibility and the square side."""
        return {"size_divisibility": self._size_divisibility, "square_size": self._square_pad}


class SimpleFeaturePyramid(_PaddedViTBackbone):
    """ViTDet's simple feature pyramid on the last block of a (windowed) ViT.

    Args:
        net: the ViT (``create_vit(...)``); it becomes ``self.net`` (see ``prepare_vit``).
        out_channels: channels of every output map (256).
        scale_factors: resampling of the stride-16 map per level; (4, 2, 1, 0.5) -> strides 4..32.
        top_block: extra levels from the last one (Detectron2's ``LastLevelMaxPool`` -> ``p6``).
        norm: norm after each pyramid conv: ``"LN"`` (channels-first LayerNorm), a Detectron2 norm
            name, a callable, or ``""`` for none (then the convs get biases).
        square_pad: pad inputs to a square of this side (ViTDet: 1024, the LSJ crop); 0 for none.
        pretrained: a ViT checkpoint in any format ``mae_backbone`` reads, loaded into ``net``
            with ``load_pretrained`` (empty: keep the initialization).

    ``forward(x)``: ``[B, 3, H, W]`` -> ``{"p2": [B, C, H/4, W/4], ..., "p6": [B, C, H/64, W/64]}``
    (sizes rounded up), computed on the square-padded image and cut back to the input's extent.
    """

    def __init__(
        self,
        net: VisionTransformer,
        out_channels: int = 256,
        scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        top_block: nn.Module | None = None,
        norm: NormSpec = "LN",
        square_pad: int = 0,
        pretrained: str = "",
    ):
        super().__init__()
        self.net = prepare_vit(net)
        dim, patch = net.embed_dim, net.patch_size
        use_bias = norm in ("", None)
        self.scale_factors = tuple(float(s) for s in scale_factors)
        self.stage_names: list[str] = []
        self._out_feature_strides: dict[str, int] = {}
        for scale in self.scale_factors:
            stride = _stride(patch, scale)
            stage = int(math.log2(stride))
            layers, in_dim = _resampler(dim, scale, norm, keep_channels=False)
            lateral = Conv2d(in_dim, out_channels, 1, bias=use_bias, norm=norm_layer(norm, out_channels))
            output = Conv2d(out_channels, out_channels, 3, padding=1, bias=use_bias,
                            norm=norm_layer(norm, out_channels))
            weight_init.c2_xavier_fill(lateral)
            weight_init.c2_xavier_fill(output)
            # ViTDet's module names, so its pyramid weights load: simfp_2 ... simfp_5
            self.add_module(f"simfp_{stage}", nn.Sequential(*layers, lateral, output))
            self.stage_names.append(f"simfp_{stage}")
            self._out_feature_strides[f"p{stage}"] = stride
        self.top_block = top_block
        if top_block is not None:
            last = int(math.log2(stride))
            for k in range(top_block.num_levels):
                self._out_feature_strides[f"p{last + k + 1}"] = 2 ** (last + k + 1)
        self._out_features = list(self._out_feature_strides)
        self._out_feature_channels = {k: out_channels for k in self._out_features}
        self._size_divisibility = max(int(patch / s) for s in self.scale_factors)
        self._finish(square_pad, pretrained)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        hw = tuple(x.shape[-2:])
        x = pad_input(x, self._square_pad, self._size_divisibility)
        feat = self.net.forward_intermediates(x, [self.net.depth - 1])[0]  # [B, D, H/16, W/16]
        levels = [getattr(self, name)(feat) for name in self.stage_names]
        if self.top_block is not None:
            source = levels[self._out_features.index(self.top_block.in_feature)]
            levels.extend(self.top_block(source))
        return _crop(dict(zip(self._out_features, levels)), self._out_feature_strides, hw)

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {k: ShapeSpec(channels=self._out_feature_channels[k], stride=self._out_feature_strides[k])
                for k in self._out_features}


class ViTMultiScale(_PaddedViTBackbone):
    """Four evenly spaced ViT blocks as a stride 4/8/16/32 pyramid, the bottom-up of an ``FPN``.

    The MAE paper's detection backbone: the ViT is cut into four equal groups of blocks and the
    last map of each is upsampled 4x (two 2x2 deconvolutions with a norm and GELU between),
    upsampled 2x, kept, or max-pooled 2x. Outputs keep the ViT's width; the FPN reduces it.

    Args:
        net: the ViT (``create_vit(...)``), kept as ``self.net``.
        out_blocks: block indices, shallow to deep (default: ``evenly_spaced_blocks(depth)``).
        scale_factors: per output, as in ``SimpleFeaturePyramid``.
        norm: the norm between the two deconvolutions (``"LN"``, a Detectron2 norm, ``""``).
        square_pad, pretrained: as in ``SimpleFeaturePyramid``.

    ``forward(x)``: ``[B, 3, H, W]`` -> ``{"res2": [B, D, H/4, W/4], ..., "res5": [B, D, H/32, W/32]}``.
    """

    def __init__(
        self,
        net: VisionTransformer,
        out_blocks: Sequence[int] | None = None,
        scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        norm: NormSpec = "LN",
        square_pad: int = 0,
        pretrained: str = "",
    ):
        super().__init__()
        self.net = prepare_vit(net)
        blocks = list(out_blocks) if out_blocks else evenly_spaced_blocks(net.depth, len(scale_factors))
        if len(blocks) != len(scale_factors):
            raise ValueError(f"{len(blocks)} out_blocks for {len(scale_factors)} scale factors")
        self.out_blocks = [int(b) for b in blocks]
        dim, patch = net.embed_dim, net.patch_size
        self.resample = nn.ModuleDict()
        self._out_feature_strides = {}
        for scale in scale_factors:
            stride = _stride(patch, float(scale))
            name = f"res{int(math.log2(stride))}"
            layers, _ = _resampler(dim, float(scale), norm, keep_channels=True)
            self.resample[name] = nn.Sequential(*layers)
            self._out_feature_strides[name] = stride
        self._out_features = list(self._out_feature_strides)
        self._out_feature_channels = {k: dim for k in self._out_features}
        self._size_divisibility = max(self._out_feature_strides.values())
        self._finish(square_pad, pretrained)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        hw = tuple(x.shape[-2:])
        x = pad_input(x, self._square_pad, self._size_divisibility)
        maps = self.net.forward_intermediates(x, self.out_blocks)  # 4 x [B, D, H/16, W/16]
        out = {name: self.resample[name](m) for name, m in zip(self._out_features, maps)}
        return _crop(out, self._out_feature_strides, hw)

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {k: ShapeSpec(channels=self._out_feature_channels[k], stride=self._out_feature_strides[k])
                for k in self._out_features}


def vit_from_cfg(cfg, in_chans: int = 3) -> VisionTransformer:
    """The ViT that ``cfg.MODEL.VIT`` describes (see ``detection.config.add_vit_config``)."""
    v = cfg.MODEL.VIT
    overrides = dict(
        img_size=v.IMG_SIZE,
        pretrain_img_size=v.PRETRAIN_IMG_SIZE or None,
        in_chans=in_chans,
        window_size=v.WINDOW_SIZE,
        global_blocks=tuple(v.GLOBAL_BLOCKS),
        rel_pos=v.REL_POS,
        drop_path_rate=v.DROP_PATH_RATE,
        grad_checkpointing=v.GRAD_CHECKPOINTING,
        dense_cls=False,
        pos_embed_learnable=True,
    )
    if v.PATCH_SIZE:
        overrides["patch_size"] = v.PATCH_SIZE
    if v.DEPTH:
        overrides["depth"] = v.DEPTH
    return create_vit(v.NAME, **overrides)


@BACKBONE_REGISTRY.register()
def build_mae_vit_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2 builder for ``MODEL.BACKBONE.NAME: "build_mae_vit_backbone"``.

    ``MODEL.VIT.PYRAMID`` picks ``"simple"`` (``SimpleFeaturePyramid`` + ``p6``, outputs
    ``p2..p6``) or ``"fpn"`` (``ViTMultiScale`` under Detectron2's ``FPN`` with ``MODEL.FPN.*``,
    outputs ``p2..p6``). ``MODEL.FPN.OUT_CHANNELS`` sets the width of both.
    """
    v = cfg.MODEL.VIT
    net = vit_from_cfg(cfg, in_chans=input_shape.channels)
    if v.PYRAMID == "simple":
        return SimpleFeaturePyramid(net, out_channels=cfg.MODEL.FPN.OUT_CHANNELS, top_block=LastLevelMaxPool(),
                                    norm=v.NORM, square_pad=v.SQUARE_PAD, pretrained=v.PRETRAINED)
    if v.PYRAMID == "fpn":
        bottom_up = ViTMultiScale(net, out_blocks=v.OUT_BLOCKS or None, norm=v.NORM, square_pad=v.SQUARE_PAD,
                                  pretrained=v.PRETRAINED)
        return FPN(bottom_up, in_features=list(cfg.MODEL.FPN.IN_FEATURES) or bottom_up._out_features,
                   out_channels=cfg.MODEL.FPN.OUT_CHANNELS, norm=resolve_norm(cfg.MODEL.FPN.NORM),
                   top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
    raise ValueError(f"MODEL.VIT.PYRAMID must be 'simple' or 'fpn', not {v.PYRAMID!r}")
