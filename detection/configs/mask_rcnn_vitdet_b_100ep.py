"""Mask R-CNN, ViT-B/16 + simple feature pyramid, ViTDet's 100-epoch COCO recipe.

Window attention (14) with global blocks 2, 5, 8, 11, relative position bias, drop path 0.1,
layer decay 0.7, AdamW lr 1e-4, LSJ 1024. ViTDet reports 51.6 AP box / 45.9 AP mask from MAE
ViT-B. Set the encoder: ``model.backbone.pretrained=mae_pretrain_vit_base.pth``.
"""
from .common.data import dataloader
from .common.models import mask_rcnn_vitdet as model
from .common.optim import AdamW as optimizer
from .common.schedule import lr_multiplier, train

model.backbone.net.name = "vit_base_patch16"
model.backbone.net.drop_path_rate = 0.1
model.backbone.net.global_blocks = (2, 5, 8, 11)
optimizer.params.layer_decay = 0.7
