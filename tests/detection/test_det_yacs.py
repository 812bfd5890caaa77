"""The registered backbone in yacs configs: built by name, and trained by the DefaultTrainer pipeline."""
from __future__ import annotations

import json

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone, build_model
from detectron2.modeling.backbone import FPN

from detection import SafeDetectionCheckpointer, SimpleFeaturePyramid, ViTMultiScale, add_vit_config, get_config_file
from detection.backbone import build_mae_vit_backbone
from mae_transfer.cli import main

YAML = get_config_file("mask_rcnn_vit_b_vitdet.yaml")
TINY = {"MODEL.VIT.NAME": "vit_tiny_patch16", "MODEL.VIT.DEPTH": 2, "MODEL.VIT.IMG_SIZE": 64,
        "MODEL.VIT.WINDOW_SIZE": 2, "MODEL.VIT.GLOBAL_BLOCKS": [1], "MODEL.VIT.SQUARE_PAD": 64, "MODEL.DEVICE": "cpu",
        "MODEL.RPN.POST_NMS_TOPK_TEST": 20, "TEST.DETECTIONS_PER_IMAGE": 5}


def tiny_cfg(**extra):
    cfg = add_vit_config(get_cfg())
    cfg.merge_from_file(str(YAML))
    items = {**TINY, **extra}
    cfg.merge_from_list([str(x) for kv in items.items() for x in kv])
    return cfg


@pytest.mark.parametrize("pyramid", ["simple", "fpn"])
def test_the_registered_name_builds_from_a_yacs_config(pyramid):
    assert BACKBONE_REGISTRY.get("build_mae_vit_backbone") is build_mae_vit_backbone
    extra = {"MODEL.VIT.PYRAMID": pyramid}
    if pyramid == "fpn":
        extra.update({"MODEL.VIT.DEPTH": 4, "MODEL.VIT.GLOBAL_BLOCKS": [3], "MODEL.FPN.NORM": "LN"})
    cfg = tiny_cfg()
    cfg.merge_from_list([str(x) for kv in extra.items() for x in kv])
    backbone = build_backbone(cfg)
    if pyramid == "simple":
        assert isinstance(backbone, SimpleFeaturePyramid)
    else:
        assert isinstance(backbone, FPN) and isinstance(backbone.bottom_up, ViTMultiScale)
        assert backbone.bottom_up.out_blocks == [0, 1, 2, 3]
    assert {k: s.stride for k, s in backbone.output_shape().items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32,
                                                                          "p6": 64}
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 64, 96)).float(), "height": 64, "width": 96}])
    assert out[0]["instances"].image_size == (64, 96)


def test_the_yaml_trains_in_the_default_trainer_pipeline(tiny_coco, tmp_path):
    json_file, images = (str(p) for p in tiny_coco)
    overrides = {**TINY, "DATASETS.TRAIN": '("tiny_train",)', "DATASETS.TEST": "()", "SOLVER.IMS_PER_BATCH": 2,
                 "SOLVER.MAX_ITER": 2, "SOLVER.STEPS": "(1,)", "SOLVER.WARMUP_ITERS": 1, "DATALOADER.NUM_WORKERS": 0,
                 "INPUT.MIN_SIZE_TRAIN": "(64,)", "INPUT.MAX_SIZE_TRAIN": 64, "MODEL.ROI_HEADS.NUM_CLASSES": 2,
                 "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 16, "MODEL.RPN.POST_NMS_TOPK_TRAIN": 50,
                 "MODEL.ROI_BOX_HEAD.NUM_CONV": 0, "MODEL.ROI_MASK_HEAD.NUM_CONV": 1}
    args = [f"{k}={v}" for k, v in overrides.items()]
    assert main(["detect", "train", str(YAML), *args, "--output", str(tmp_path),
                 "--register-coco", "tiny_train", json_file, images]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "total_loss" in r][-1] == 1
    cfg = tiny_cfg(**{"MODEL.ROI_HEADS.NUM_CLASSES": 2, "MODEL.ROI_BOX_HEAD.NUM_CONV": 0,
                      "MODEL.ROI_MASK_HEAD.NUM_CONV": 1})
    model = build_model(cfg)
    SafeDetectionCheckpointer(model).load(str(tmp_path / "model_final.pth"))  # weights_only, all keys match


@pytest.mark.parametrize("pretrain, tokens", [(224, 1 + 14 * 14), (0, 1 + 4 * 4)])
def test_pretrain_img_size_keeps_vitdets_position_table(pretrain, tokens):
    """MODEL.VIT.PRETRAIN_IMG_SIZE 224 (the yaml's, ViTDet's): pos_embed stays [1, 197, D], interpolated
    to the input's grid on every forward; 0 keeps the table at IMG_SIZE."""
    backbone = build_backbone(tiny_cfg(**{"MODEL.VIT.PRETRAIN_IMG_SIZE": pretrain}))
    assert backbone.net.pos_embed.shape == (1, tokens, 192)
    assert tiny_cfg().MODEL.VIT.PRETRAIN_IMG_SIZE == 224


def test_yacs_optimizer_equals_detectron2s_rule_as_vitdet_configures_it():
    """build_vit_optimizer: Detectron2's get_default_optimizer_params(weight_decay_norm=SOLVER.WEIGHT_DECAY_NORM,
    overrides={"pos_embed": {"weight_decay": 0}}) with ViTDet's layer decay; AdamW betas (0.9, 0.999)."""
    from detectron2.solver import get_default_optimizer_params

    from detection.config import ConfigError
    from detection.engine import build_vit_optimizer

    cfg = tiny_cfg()
    model = build_model(cfg)
    opt = build_vit_optimizer(cfg, model)
    assert type(opt).__name__ == "AdamW" and all(g["betas"] == (0.9, 0.999) for g in opt.param_groups)
    ours = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    theirs = {id(p): g["weight_decay"] for g in get_default_optimizer_params(
        model, weight_decay=0.1, weight_decay_norm=0.0, overrides={"pos_embed": {"weight_decay": 0.0}})
        for p in g["params"]}
    for name, p in model.named_parameters():
        assert ours[id(p)] == theirs[id(p)], name
    cfg.merge_from_list(["SOLVER.WEIGHT_DECAY_BIAS", "0.0"])
    with pytest.raises(ConfigError, match="WEIGHT_DECAY_BIAS is not read"):
        build_vit_optimizer(cfg, model)
