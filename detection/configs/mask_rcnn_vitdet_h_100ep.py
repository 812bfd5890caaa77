"""Mask R-CNN, ViT-H + simple feature pyramid, ViTDet's 100-epoch COCO recipe.

Global blocks 7, 15, 23, 31, drop path 0.5, layer decay 0.9. As in ViTDet, ViT-H runs with
16x16 patches (stride 16 for the pyramid): the 14x14 patch kernel of ViT-H/14 checkpoints is
resampled on load. ViTDet reports 56.7 AP box / 50.1 AP mask from MAE ViT-H.
"""
from .mask_rcnn_vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.name = "vit_huge_patch14"
model.backbone.net.patch_size = 16
model.backbone.net.drop_path_rate = 0.5
model.backbone.net.global_blocks = (7, 15, 23, 31)
optimizer.params.layer_decay = 0.9
