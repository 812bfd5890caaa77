"""Layer-wise lr decay through ``ViTLayerDecayOptimizerConstructor``, as the Runner builds it."""
from __future__ import annotations

import re

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS, PARAM_SCHEDULERS

from segmentation import MAEViT, load_config

from seg_helpers import TINY_VIT


def expected_layer_id(name: str, depth: int) -> int:
    if name.startswith(("backbone.vit.patch_embed", "backbone.vit.cls_token", "backbone.vit.pos_embed")):
        return 0
    m = re.match(r"backbone\.vit\.blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else depth + 1  # heads and neck: the last id


def test_lr_decay_per_block_and_weight_decay(tiny_config):
    cfg = load_config(tiny_config, ["model.backbone.use_rel_pos=True", "model.backbone.frozen_stages=1"])
    init_default_scope("mmseg")
    model = MODELS.build(cfg.model)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    base_lr, wd, decay = 1e-3, 0.05, 0.65  # the tiny config's lr; the shipped recipe's wd and decay
    depth = TINY_VIT["depth"]
    params = dict(model.named_parameters())
    seen = []
    for group in wrapper.optimizer.param_groups:
        for name, p in zip(group["param_names"], group["params"]):
            assert p is params[name]
            layer = expected_layer_id(name, depth)
            assert group["lr"] == pytest.approx(base_lr * decay ** (depth + 1 - layer)), name
            # MMSeg's rule (test_oracle_mmseg_optim.py): 1-D and `.bias` only; pos_embed, tables decayed
            no_wd = p.ndim == 1 or name.endswith(".bias")
            assert group["weight_decay"] == (0.0 if no_wd else wd), name
            seen.append(name)
    # every trainable parameter exactly once; frozen ones (patch embed, tokens, block 0) not at all
    assert sorted(seen) == sorted(n for n, p in params.items() if p.requires_grad)
    assert not any(n.startswith(("backbone.vit.blocks.0.", "backbone.vit.patch_embed")) for n in seen)
    lrs = {n: g["lr"] for g in wrapper.optimizer.param_groups for n in g["param_names"]}
    assert lrs["backbone.vit.blocks.1.attn.qkv.weight"] == pytest.approx(base_lr * decay ** 3)
    assert lrs["backbone.vit.blocks.3.mlp.fc2.weight"] == pytest.approx(base_lr * decay)
    assert lrs["decode_head.conv_seg.weight"] == lrs["neck.upsample_4x.0.weight"] == pytest.approx(base_lr)

    # the warmup scheduler scales every group alike: the decay ratios survive
    before = [g["lr"] for g in wrapper.optimizer.param_groups]
    PARAM_SCHEDULERS.build(dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=10),
                           default_args=dict(optimizer=wrapper))
    after = [g["lr"] for g in wrapper.optimizer.param_groups]
    assert after == pytest.approx([0.1 * b for b in before])


def test_constructor_refuses_unknown_keys_and_backbones_without_the_hook(tiny_config):
    init_default_scope("mmseg")
    cfg = load_config(tiny_config)
    model = MODELS.build(cfg.model)
    bad = dict(cfg.optim_wrapper, paramwise_cfg=dict(layer_decay_rate=0.65))  # MMSeg's spelling
    with pytest.raises(KeyError, match="layer_decay_rate"):
        build_optim_wrapper(model, bad)
    other = MODELS.build(dict(
        type="EncoderDecoder",
        backbone=dict(type="VisionTransformer", img_size=(32, 32), embed_dims=32, num_layers=2, num_heads=2),
        decode_head=dict(type="FCNHead", in_channels=32, channels=8, num_convs=1, num_classes=3,
                         loss_decode=dict(type="CrossEntropyLoss"))))
    with pytest.raises(TypeError, match="layer_id"):
        build_optim_wrapper(other, cfg.optim_wrapper)


def test_backbone_in_an_existing_mmseg_config(tmp_path):
    """The README recipe: MMSeg's own MAE config with our backbone and optimizer constructor."""
    path = tmp_path / "mae-vit-b_upernet_ours.py"
    path.write_text(
        "_base_ = 'mmseg::mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py'\n"
        "custom_imports = dict(imports=['segmentation'], allow_failed_imports=False)\n"
        "model = dict(\n"
        "    pretrained='checkpoints/mae_pretrain_vit_base.pth',\n"
        "    backbone=dict(_delete_=True, type='MAEViT', arch='base', img_size=512,\n"
        "                  out_indices=[3, 5, 7, 11], drop_path_rate=0.1))\n"
        "optim_wrapper = dict(constructor='ViTLayerDecayOptimizerConstructor',\n"
        "                     paramwise_cfg=dict(_delete_=True, layer_decay=0.65))\n"
        "custom_hooks = [dict(type='SafeCheckpointHook')]\n")
    cfg = load_config(path)
    assert cfg.model.pretrained == "checkpoints/mae_pretrain_vit_base.pth"
    init_default_scope("mmseg")
    model = MODELS.build(cfg.model)
    assert isinstance(model.backbone, MAEViT) and model.backbone.pretrained == cfg.model.pretrained
    with torch.no_grad():
        feats = model.extract_feat(torch.zeros(1, 3, 64, 64))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    lrs = {n: g["lr"] for g in wrapper.optimizer.param_groups for n in g["param_names"]}
    assert lrs["backbone.vit.patch_embed.proj.weight"] == pytest.approx(1e-4 * 0.65 ** 13)
    assert lrs["backbone.vit.blocks.11.attn.qkv.weight"] == pytest.approx(1e-4 * 0.65)
    assert lrs["decode_head.conv_seg.weight"] == pytest.approx(1e-4)
