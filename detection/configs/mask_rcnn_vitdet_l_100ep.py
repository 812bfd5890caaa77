"""Mask R-CNN, ViT-L/16 + simple feature pyramid, ViTDet's 100-epoch COCO recipe.

Global blocks 5, 11, 17, 23, drop path 0.4, layer decay 0.8; the rest as ViT-B. ViTDet reports
55.6 AP box / 49.2 AP mask from MAE ViT-L.
"""
from .mask_rcnn_vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.name = "vit_large_patch16"
model.backbone.net.drop_path_rate = 0.4
model.backbone.net.global_blocks = (5, 11, 17, 23)
optimizer.params.layer_decay = 0.8
