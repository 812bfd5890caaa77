"""detection: a thin Detectron2 adapter over the mae_backbone ViT.

Importing it registers ``build_mae_vit_backbone`` in Detectron2's ``BACKBONE_REGISTRY``
(``MODEL.BACKBONE.NAME`` in yacs; ``add_vit_config`` adds its keys). In LazyConfig files use the
classes directly: ``SimpleFeaturePyramid`` (ViTDet) or ``FPN(bottom_up=ViTMultiScale(...))``
(MAE paper). Recipes: ``detection/configs/``; command line: ``mae-transfer detect``.
"""
from detection.backbone import (
    SimpleFeaturePyramid,
    ViTMultiScale,
    build_mae_vit_backbone,
    evenly_spaced_blocks,
    prepare_vit,
)
from detection.checkpoint import PRETRAINED_UNEXPECTED, SafeDetectionCheckpointer, load_pretrained
from detection.config import CONFIG_DIR, ConfigError, add_vit_config, get_config_file, list_configs, load_config
from detection.data import (
    DatasetError,
    build_coco_evaluator,
    check_dataset,
    register_coco_dataset,
    validate_coco_json,
)
from detection.layers import LayerNorm2d
from detection.optim import find_vit, get_vit_param_groups, step_lr_multiplier, vit_lr_factor_func

__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "DatasetError",
    "LayerNorm2d",
    "PRETRAINED_UNEXPECTED",
    "SafeDetectionCheckpointer",
    "SimpleFeaturePyramid",
    "ViTMultiScale",
    "add_vit_config",
    "build_coco_evaluator",
    "build_mae_vit_backbone",
    "check_dataset",
    "evenly_spaced_blocks",
    "find_vit",
    "get_config_file",
    "get_vit_param_groups",
    "list_configs",
    "load_config",
    "load_pretrained",
    "prepare_vit",
    "register_coco_dataset",
    "step_lr_multiplier",
    "validate_coco_json",
    "vit_lr_factor_func",
]
