"""Our layer-decay optimizer groups against MMSeg 1.2.2's own ``LayerDecayOptimizerConstructor``.

The reference is the recipe of MMSeg's ``mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py``: its
``MAE`` backbone in an ``EncoderDecoder`` with ``Feature2Pyramid``, ``UPerHead`` and an ``FCNHead``,
AdamW lr 1e-4 / wd 0.05, ``paramwise_cfg=dict(num_layers=..., layer_decay_rate=0.65)``.  Ours: the
same segmentor with ``MAEViT`` (BEiT options) and ``ViTLayerDecayOptimizerConstructor``.  Every
parameter must get the same lr and weight decay, names mapped by the ``mmseg-mae`` reader.
"""
from __future__ import annotations

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
from mmseg.engine.optimizers import LayerDecayOptimizerConstructor
from mmseg.registry import MODELS

from mae_backbone.formats import read_mmseg

DIM, DEPTH, HEADS = 32, 4, 2
BASE_LR, WD, DECAY = 1e-4, 0.05, 0.65
OPTIM = dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=BASE_LR, betas=(0.9, 0.999), weight_decay=WD))


def segmentor(backbone: dict) -> torch.nn.Module:
    bn = dict(type="BN", requires_grad=True)
    init_default_scope("mmseg")
    return MODELS.build(dict(
        type="EncoderDecoder",
        backbone=backbone,
        neck=dict(type="Feature2Pyramid", embed_dim=DIM, rescales=[4, 2, 1, 0.5], norm_cfg=bn),
        decode_head=dict(type="UPerHead", in_channels=[DIM] * 4, in_index=[0, 1, 2, 3], pool_scales=(1, 2),
                         channels=16, num_classes=3, norm_cfg=bn, loss_decode=dict(type="CrossEntropyLoss")),
        auxiliary_head=dict(type="FCNHead", in_channels=DIM, in_index=2, channels=8, num_convs=1, num_classes=3,
                            norm_cfg=bn, loss_decode=dict(type="CrossEntropyLoss", loss_weight=0.4))))


def mmseg_segmentor() -> torch.nn.Module:
    return segmentor(dict(type="MAE", img_size=(64, 64), patch_size=16, embed_dims=DIM, num_layers=DEPTH,
                          num_heads=HEADS, out_indices=[0, 1, 2, 3], norm_cfg=dict(type="LN", eps=1e-6),
                          init_values=1.0, drop_path_rate=0.1))


def our_segmentor() -> torch.nn.Module:
    return segmentor(dict(type="MAEViT", arch=dict(embed_dim=DIM, depth=DEPTH, num_heads=HEADS), img_size=64,
                          out_indices=[0, 1, 2, 3], use_rel_pos="beit", init_values=1.0, drop_path_rate=0.1))


def per_parameter(model: torch.nn.Module, wrapper) -> dict[str, tuple[float, float]]:
    """name -> (lr, weight decay) of every parameter the optimizer holds (each exactly once)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, tuple[float, float]] = {}
    for group in wrapper.optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            assert name not in out, f"{name} in two groups"
            out[name] = (group["lr"], group["weight_decay"])
    return out


def to_our_name(name: str, param: torch.Tensor) -> str:
    if not name.startswith("backbone."):
        return name  # neck and heads: the same modules, the same names
    (ours,) = read_mmseg({name[len("backbone."):]: param.detach()}, [])
    return "backbone.vit." + ours


def test_lr_and_weight_decay_equal_mmseg_parameter_by_parameter():
    ref_model = mmseg_segmentor()
    ref = per_parameter(ref_model, LayerDecayOptimizerConstructor(
        dict(OPTIM), dict(num_layers=DEPTH, layer_decay_rate=DECAY))(ref_model))
    model = our_segmentor()
    got = per_parameter(model, build_optim_wrapper(model, dict(
        OPTIM, constructor="ViTLayerDecayOptimizerConstructor", paramwise_cfg=dict(layer_decay=DECAY))))
    params = dict(ref_model.named_parameters())
    expected = {to_our_name(n, params[n]): v for n, v in ref.items()}
    assert sorted(got) == sorted(expected)  # the same parameters (MAE's qkv has a full bias, as ours)...
    for name, (lr, wd) in expected.items():  # ...with the same lr and weight decay
        assert got[name][0] == pytest.approx(lr, rel=1e-12), name
        assert got[name][1] == wd, name
    # MMSeg's published quirk, reproduced: its `name in ('pos_embed', 'cls_token')` never matches the
    # segmentor's 'backbone.pos_embed', so the position embedding, class token and tables are decayed
    for name in ("backbone.vit.pos_embed", "backbone.vit.cls_token",
                 "backbone.vit.blocks.0.attn.relative_position_bias_table"):
        assert got[name] == (pytest.approx(BASE_LR * DECAY ** (DEPTH + 1 - (0 if "blocks" not in name else 1))), WD)
    assert got["backbone.vit.blocks.2.ls1.gamma"][1] == 0.0
    assert got["decode_head.conv_seg.weight"] == (pytest.approx(BASE_LR), WD)


def test_the_hooks_rule_exempts_tokens_and_tables():
    model = our_segmentor()
    got = per_parameter(model, build_optim_wrapper(model, dict(
        OPTIM, constructor="ViTLayerDecayOptimizerConstructor",
        paramwise_cfg=dict(layer_decay=DECAY, weight_decay_rule="hooks"))))
    for name in ("backbone.vit.pos_embed", "backbone.vit.cls_token",
                 "backbone.vit.blocks.3.attn.relative_position_bias_table", "backbone.vit.blocks.3.norm1.weight"):
        assert got[name][1] == 0.0, name
    assert got["backbone.vit.blocks.3.attn.qkv.weight"][1] == WD
    with pytest.raises(ValueError, match="weight_decay_rule must be one of"):
        build_optim_wrapper(model, dict(OPTIM, constructor="ViTLayerDecayOptimizerConstructor",
                                        paramwise_cfg=dict(weight_decay_rule="timm")))
