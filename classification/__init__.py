"""classification: fine-tuning, partial fine-tuning and linear probing of any ViT checkpoint
that ``mae_backbone`` reads, on ImageNet-style class folders (torch + timm only).

    from classification import make_config, train, evaluate_checkpoint
    cfg = make_config("finetune", {"data": "imagenet/", "output": "runs/ft",
                                   "checkpoint": "mae_pretrain_vit_base.pth"})
    result = train(cfg)                    # the paper's recipe; resumes from runs/ft/checkpoint.pth
    print(result.freeze, result.best)      # "trained N of M parameters", best val top-1 / top-5
    evaluate_checkpoint(make_config("finetune", {"eval": True, "data": "imagenet/",
                                                 "checkpoint": "runs/ft/model.safetensors"}))
"""
from classification.config import PROTOCOLS, ClassifyConfig, make_config, parse_tune_blocks, recipe_defaults
from classification.data import (
    ClassFolder,
    build_criterion,
    build_mixup,
    build_transform,
    check_same_classes,
    find_classes,
)
from classification.engine import evaluate, train_one_epoch
from classification.metrics import AccuracyMeter, topk_correct
from classification.models import (
    ClassifierViT,
    FreezeReport,
    build_classifier,
    fold_bn_head,
    freeze,
    linear_probe_head,
    load_pretrained,
)
from classification.optim import build_optimizer
from classification.state import CHECKPOINT_NAME, MODEL_NAME, export_model, model_for_eval
from classification.train import RunResult, evaluate_checkpoint, train

__all__ = [
    "AccuracyMeter",
    "CHECKPOINT_NAME",
    "ClassFolder",
    "ClassifierViT",
    "ClassifyConfig",
    "FreezeReport",
    "MODEL_NAME",
    "PROTOCOLS",
    "RunResult",
    "build_classifier",
    "build_criterion",
    "build_mixup",
    "build_optimizer",
    "build_transform",
    "check_same_classes",
    "evaluate",
    "evaluate_checkpoint",
    "export_model",
    "find_classes",
    "fold_bn_head",
    "freeze",
    "linear_probe_head",
    "load_pretrained",
    "make_config",
    "model_for_eval",
    "parse_tune_blocks",
    "recipe_defaults",
    "topk_correct",
    "train",
    "train_one_epoch",
]
