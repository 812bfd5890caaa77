"""Layer-wise lr decay through the ViT's layer-id hook, weight decay groups, the ViTDet schedule."""
from __future__ import annotations

import pytest
import torch
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from torch import nn

from detection import (
    SimpleFeaturePyramid,
    ViTMultiScale,
    find_vit,
    get_vit_param_groups,
    step_lr_multiplier,
    vit_lr_factor_func,
)
from mae_backbone import create_vit

DEPTH, DECAY = 4, 0.5


class Detector(nn.Module):
    """Stands in for GeneralizedRCNN: a ``backbone`` and a head."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(256, 3)


def vit():
    return create_vit("vit_tiny_patch16", depth=DEPTH, img_size=64, window_size=2, global_blocks=(3,), rel_pos=True,
                      pos_embed_learnable=True)


def vitdet_factor(name: str) -> float:
    """ViTDet's rule, written out: stem = depth + 1 steps of decay, block i = depth - i, rest 1."""
    if ".net." not in name:
        return 1.0
    if ".pos_embed" in name or ".patch_embed" in name:
        return DECAY ** (DEPTH + 1)
    if ".blocks." in name:
        i = int(name.split(".blocks.")[1].split(".")[0])
        return DECAY ** (DEPTH - i)
    return 1.0


@pytest.mark.parametrize("pyramid", ["simple", "fpn"])
def test_lr_factor_per_block_follows_the_layer_id_hook(pyramid):
    backbone = (SimpleFeaturePyramid(vit(), top_block=LastLevelMaxPool()) if pyramid == "simple" else
                FPN(ViTMultiScale(vit()), in_features=["res2", "res3", "res4", "res5"], out_channels=256))
    model = Detector(backbone)
    prefix, _ = find_vit(model)
    assert prefix == ("backbone.net." if pyramid == "simple" else "backbone.bottom_up.net.")
    factor = vit_lr_factor_func(model, DECAY)
    groups = get_vit_param_groups(model, base_lr=2.0, weight_decay=0.1, layer_decay=DECAY)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(lr_of) == len([p for p in names.values() if p.requires_grad])
    for name, p in names.items():
        assert factor(name) == pytest.approx(vitdet_factor(name)), name
        assert lr_of[id(p)] == pytest.approx(2.0 * vitdet_factor(name)), name
    # spot checks, spelled out for ViT depth 4 and decay 0.5
    assert factor(prefix + "patch_embed.proj.weight") == pytest.approx(0.5**5)
    assert factor(prefix + "blocks.0.attn.qkv.weight") == pytest.approx(0.5**4)
    assert factor(prefix + "blocks.3.mlp.fc2.weight") == pytest.approx(0.5)
    assert factor("head.weight") == 1.0
    # weight decay: none for norms, biases, pos-embed and rel-pos tables
    for name, p in names.items():
        no_decay = p.ndim <= 1 or name.endswith(("pos_embed", "rel_pos_h", "rel_pos_w"))
        assert wd_of[id(p)] == (0.0 if no_decay else 0.1), name


def test_groups_drive_adamw_and_detectron2s_lr_multiplier():
    from detectron2.solver import LRMultiplier

    model = Detector(SimpleFeaturePyramid(vit()))
    opt = torch.optim.AdamW(get_vit_param_groups(model, 1e-4, 0.1, 0.7), lr=1e-4)
    sched = LRMultiplier(opt, step_lr_multiplier(max_iter=90, warmup_iters=0), max_iter=90)
    start = [g["lr"] for g in opt.param_groups]
    assert min(start) == pytest.approx(1e-4 * 0.7**5) and max(start) == pytest.approx(1e-4)  # depth 4: 0.7**(4+1)
    for _ in range(89):  # past both milestones (80 and 87 of 90)
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr * 0.01 for lr in start])


def test_step_schedule_is_vitdets_100_epochs():
    n = 184375
    sched = step_lr_multiplier(max_iter=n)
    at = {it: sched(it / n) for it in (163888, 163889, 177545, 177546)}  # ViTDet's milestones
    assert at == pytest.approx({163888: 1.0, 163889: 0.1, 177545: 0.1, 177546: 0.01})
    assert sched(249 / n) < 1.0 and sched(251 / n) == 1.0  # 250 warmup iterations
    assert sched(0.0) == pytest.approx(0.001)
    assert sched(0.5) == 1.0 and sched(0.95) == pytest.approx(0.1) and sched(0.99) == pytest.approx(0.01)
    short = step_lr_multiplier(max_iter=2)  # a tiny run keeps a valid schedule
    assert short(0.9) > 0
