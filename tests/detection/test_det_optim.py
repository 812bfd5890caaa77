"""Layer-wise lr decay through the ViT's layer-id hook, weight decay groups, the ViTDet schedule;
the groups of every shipped config against Detectron2's own ``get_default_optimizer_params`` as
ViTDet configures it, and against ViTDet's ``get_vit_lr_decay_rate`` written out."""
from __future__ import annotations

import pytest
import torch
from detectron2.config import instantiate
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.solver import get_default_optimizer_params
from torch import nn

from det_helpers import tiny_overrides

from detection import (
    LayerNorm2d,
    SimpleFeaturePyramid,
    ViTMultiScale,
    find_vit,
    get_vit_param_groups,
    load_config,
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
    # weight decay (ViTDet B/L): none for torch LayerNorms (the ViT's) and pos_embed; biases, rel-pos
    # tables and the pyramid's channels-first LayerNorm2d are decayed
    for name, p in names.items():
        no_decay = ".norm1." in name or ".norm2." in name or name.endswith("pos_embed")
        assert wd_of[id(p)] == (0.0 if no_decay else 0.1), name
    assert wd_of[id(names[prefix + "blocks.0.attn.qkv.bias"])] == 0.1
    assert wd_of[id(names[prefix + "blocks.3.attn.rel_pos_h"])] == 0.1


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


# --------------------------------------------------------------------------- against Detectron2 / ViTDet
# ViTDet's optimizer (projects/ViTDet/configs/COCO/mask_rcnn_vitdet_{b_100ep,h_75ep}.py): Detectron2's
# get_default_optimizer_params with these arguments, weight decay 0.1 (configs/common/optim.py AdamW)
VITDET_BL = dict(weight_decay_norm=0.0, overrides={"pos_embed": {"weight_decay": 0.0}})
VITDET_H = dict(weight_decay_norm=None, overrides={})


def vitdet_lr_decay_rate(name: str, lr_decay_rate: float, num_layers: int) -> float:
    """ViTDet's ``get_vit_lr_decay_rate`` (detectron2/modeling/backbone/vit.py), written out: layer 0 for
    the patch embedding and pos_embed, i + 1 for blocks.i, num_layers + 1 for everything else."""
    layer_id = num_layers + 1
    if name.startswith("backbone"):
        if ".pos_embed" in name or ".patch_embed" in name:
            layer_id = 0
        elif ".blocks." in name and ".residual." not in name:
            layer_id = int(name[name.find(".blocks."):].split(".")[2]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


@pytest.mark.parametrize("name, vitdet", [
    ("mask_rcnn_vitdet_b_100ep", VITDET_BL),
    ("cascade_mask_rcnn_vitdet_l_100ep", VITDET_BL),
    ("mask_rcnn_vitdet_h_75ep", VITDET_H),
    ("mask_rcnn_fpn_vit_b", VITDET_BL),
])
def test_shipped_optimizer_equals_vitdets_param_by_param(name, vitdet):
    depth = 4 if "fpn" in name else 2
    net = "model.backbone.bottom_up.net" if "fpn" in name else "model.backbone.net"
    cfg = load_config(name, tiny_overrides(net=net, depth=depth))
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    base_lr, decay = cfg.optimizer.lr, cfg.optimizer.params.layer_decay
    ours = {id(p): (g["weight_decay"], g["lr"]) for g in optimizer.param_groups for p in g["params"]}
    theirs = {id(p): g.get("weight_decay", cfg.optimizer.weight_decay)
              for g in get_default_optimizer_params(model, weight_decay=0.1, **vitdet) for p in g["params"]}
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(ours) == len(theirs) == len(params)
    for n, p in params:
        assert ours[id(p)][0] == theirs[id(p)], n
        assert ours[id(p)][1] == pytest.approx(base_lr * vitdet_lr_decay_rate(n, decay, depth), rel=1e-12), n
    # what the rule means here: LayerNorm2d (ViTDet's "LN") is not a torch LayerNorm, so it is decayed
    assert not issubclass(LayerNorm2d, nn.LayerNorm)
    wd = {n: ours[id(p)][0] for n, p in params}
    prefix = net[len("model."):] + "."
    h = vitdet is VITDET_H
    assert wd[prefix + "pos_embed"] == (0.1 if h else 0.0)
    assert wd[prefix + "blocks.0.norm1.weight"] == (0.1 if h else 0.0)
    assert wd[prefix + "blocks.0.attn.qkv.bias"] == 0.1 and wd[prefix + "blocks.0.attn.rel_pos_h"] == 0.1
    assert any(n.endswith("norm.weight") and wd[n] == 0.1 for n in wd if "roi_heads" in n)  # head LayerNorm2d
