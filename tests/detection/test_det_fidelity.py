"""Every shipped detection config against the published ViTDet recipe, value by value.

The expected values are written here, each with its source: REFERENCE.md's "Detectron2 ViTDet"
section (read from ``projects/ViTDet/configs`` of Detectron2), and the ViTDet paper (Li et al.,
arXiv 2203.16527). The schedule is compared with the scheduler ViTDet's config builds, made
from Detectron2's own classes with ViTDet's numbers.
"""
from __future__ import annotations

import pytest
import torch
from detectron2.config import instantiate
from detectron2.data import transforms as T
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detection import list_configs, load_config

# ViTDet per size (REFERENCE.md "Detectron2 ViTDet"; ViTDet paper Sec. 4 / Table A.1):
# architecture, patch, global blocks, drop path, layer decay, weight decay of norms, no-decay names
SIZES = {
    "b": ("vit_base_patch16", 16, [2, 5, 8, 11], 0.1, 0.7, 0.0, ["pos_embed"]),
    "l": ("vit_large_patch16", 16, [5, 11, 17, 23], 0.4, 0.8, 0.0, ["pos_embed"]),
    # ViT-H: patch 16 (ViTDet's mae_pretrain_vit_huge_p14to16), weight_decay_norm=None, overrides={}
    "h": ("vit_huge_patch14", 16, [7, 15, 23, 31], 0.5, 0.9, None, []),
}
# ViTDet's 100-epoch schedule (mask_rcnn_vitdet_b_100ep.py): 184375 iterations at batch 64,
# steps 163889 / 177546, warmup_length = 250 / 184375 from 0.001. ViT-H (mask_rcnn_vitdet_h_75ep.py):
# max_iter and milestones x3 // 4, warmup_length unchanged (250 / 184375 of the run).
SCHEDULE = {
    "100ep": (184375, [163889, 177546]),
    "75ep": (184375 * 3 // 4, [163889 * 3 // 4, 177546 * 3 // 4]),
}
WARMUP_LENGTH, WARMUP_FACTOR = 250 / 184375, 0.001

LAZY = {  # every shipped LazyConfig: (size, kind, schedule)
    "mask_rcnn_vitdet_b_100ep": ("b", "simple", "100ep"),
    "mask_rcnn_vitdet_l_100ep": ("l", "simple", "100ep"),
    "mask_rcnn_vitdet_h_75ep": ("h", "simple", "75ep"),
    "cascade_mask_rcnn_vitdet_b_100ep": ("b", "simple", "100ep"),
    "cascade_mask_rcnn_vitdet_l_100ep": ("l", "simple", "100ep"),
    "cascade_mask_rcnn_vitdet_h_75ep": ("h", "simple", "75ep"),
    "mask_rcnn_fpn_vit_b": ("b", "fpn", "100ep"),  # MAE paper Table 4's ViT + FPN, on ViTDet's recipe
}


def test_every_shipped_config_is_in_the_table():
    assert set(LAZY) == {c for c in list_configs() if not c.endswith(".yaml")}
    assert [c for c in list_configs() if c.endswith(".yaml")] == ["mask_rcnn_vit_b_vitdet.yaml"]


def _vitdet_scheduler(max_iter: int, milestones: list[int]) -> WarmupParamScheduler:
    """ViTDet's ``lr_multiplier``, as its config builds it, from Detectron2's and fvcore's classes."""
    return WarmupParamScheduler(
        MultiStepParamScheduler(values=[1.0, 0.1, 0.01], milestones=milestones, num_updates=max_iter),
        warmup_length=WARMUP_LENGTH, warmup_factor=WARMUP_FACTOR)


@pytest.mark.parametrize("name", list(LAZY))
def test_lazyconfig_equals_the_vitdet_recipe(name):
    size, kind, schedule = LAZY[name]
    arch, patch, global_blocks, drop_path, layer_decay, wd_norm, no_wd = SIZES[size]
    cfg = load_config(name)
    backbone = cfg.model.backbone.bottom_up if kind == "fpn" else cfg.model.backbone
    net = backbone.net
    # backbone (REFERENCE.md: window 14, global blocks, rel-pos, drop path; table at 224, input 1024)
    assert net.name == arch and net.get("patch_size", 16) == patch
    assert net.window_size == 14 and list(net.global_blocks) == global_blocks and net.rel_pos is True
    assert net.drop_path_rate == drop_path
    assert net.img_size == 1024 and net.pretrain_img_size == 224
    assert backbone.square_pad == 1024 and backbone.norm == "LN"  # the model pads to a 1024 square itself
    if kind == "simple":
        assert list(backbone.scale_factors) == [4.0, 2.0, 1.0, 0.5] and backbone.out_channels == 256
    # RGB input, ImageNet statistics in RGB order (ViTDet's common/models/mask_rcnn_vitdet.py)
    assert cfg.model.input_format == "RGB"
    assert list(cfg.model.pixel_mean) == [123.675, 116.28, 103.53]
    assert list(cfg.model.pixel_std) == [58.395, 57.12, 57.375]
    # optimizer (REFERENCE.md: AdamW lr 1e-4, betas (0.9, 0.999), wd 0.1; layer decay per size;
    # no decay for torch norm layers and pos_embed, ViT-H: everything decayed)
    opt = cfg.optimizer
    assert opt._target_ is torch.optim.AdamW
    assert (opt.lr, tuple(opt.betas), opt.weight_decay) == (1e-4, (0.9, 0.999), 0.1)
    assert opt.params.layer_decay == layer_decay
    assert opt.params.weight_decay_norm == wd_norm and list(opt.params.no_weight_decay) == no_wd
    # data (REFERENCE.md: LSJ = RandomFlip, ResizeScale(0.1, 2.0, 1024, 1024), FixedSizeCrop((1024, 1024),
    # pad=False); recompute_boxes; RGB; batch 64; test ResizeShortestEdge(1024, max 1024))
    train = cfg.dataloader.train
    assert train.total_batch_size == 64
    assert train.mapper.image_format == "RGB" and train.mapper.recompute_boxes is True
    assert train.mapper.use_instance_mask is True
    flip, resize, crop = instantiate(train.mapper.augmentations)
    assert type(flip) is T.RandomFlip and flip.horizontal and not flip.vertical and flip.prob == 0.5
    assert type(resize) is T.ResizeScale
    assert (resize.min_scale, resize.max_scale, resize.target_height, resize.target_width) == (0.1, 2.0, 1024, 1024)
    assert type(crop) is T.FixedSizeCrop and tuple(crop.crop_size) == (1024, 1024) and crop.pad is False
    (test_resize,) = instantiate(cfg.dataloader.test.mapper.augmentations)
    assert type(test_resize) is T.ResizeShortestEdge
    assert (tuple(test_resize.short_edge_length), test_resize.max_size) == ((1024, 1024), 1024)
    assert cfg.dataloader.test.mapper.image_format == "RGB"
    # schedule and trainer (REFERENCE.md: 184375 iterations, steps 163889 / 177546, warmup 250 from
    # 0.001; ViT-H x3 // 4; AMP on, DDP fp16 gradient compression)
    max_iter, milestones = SCHEDULE[schedule]
    assert cfg.train.max_iter == max_iter
    assert cfg.train.amp.enabled is True and cfg.train.ddp.fp16_compression is True
    ours, theirs = instantiate(cfg.lr_multiplier), _vitdet_scheduler(max_iter, milestones)
    probes = sorted({*range(0, 300), *(m + d for m in milestones for d in (-1, 0, 1)), max_iter // 2, max_iter - 1})
    for it in probes:
        assert ours(it / max_iter) == pytest.approx(theirs(it / max_iter), rel=1e-9, abs=1e-12), it
    for m in milestones:  # the steps land on ViTDet's iterations exactly
        assert ours((m - 1) / max_iter) > ours(m / max_iter)


def test_the_vit_h_schedule_is_75_epochs():
    """ViTDet: ``train.max_iter * 3 // 4`` and ``milestone * 3 // 4``, spelled out."""
    assert SCHEDULE["75ep"] == (138281, [122916, 133159])


def test_yacs_config_carries_the_vitdet_values():
    """The yacs file trains a multi-scale 1x recipe (yacs has no LSJ, as its header says), with
    ViTDet's backbone, optimizer, warmup, input format and test resizing."""
    cfg = load_config("mask_rcnn_vit_b_vitdet.yaml")
    v = cfg.MODEL.VIT
    assert (v.NAME, v.WINDOW_SIZE, list(v.GLOBAL_BLOCKS), v.REL_POS, v.DROP_PATH_RATE) == (
        "vit_base_patch16", 14, [2, 5, 8, 11], True, 0.1)
    assert (v.IMG_SIZE, v.PRETRAIN_IMG_SIZE, v.SQUARE_PAD, v.NORM, v.PYRAMID) == (1024, 224, 1024, "LN", "simple")
    assert (v.LAYER_DECAY, list(v.NO_WEIGHT_DECAY)) == (0.7, ["pos_embed"])
    s = cfg.SOLVER
    assert (s.OPTIMIZER, s.BASE_LR, s.WEIGHT_DECAY, s.WEIGHT_DECAY_NORM) == ("ADAMW", 1e-4, 0.1, 0.0)
    assert (s.WARMUP_ITERS, s.WARMUP_FACTOR, s.WARMUP_METHOD, s.AMP.ENABLED) == (250, 0.001, "linear", True)
    assert cfg.INPUT.FORMAT == "RGB" and (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (1024, 1024)
    assert list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53] and list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12,
                                                                                                     57.375]
