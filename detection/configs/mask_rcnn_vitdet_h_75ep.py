"""Mask R-CNN, ViT-H + simple feature pyramid, ViTDet's 75-epoch COCO recipe
(``projects/ViTDet/configs/COCO/mask_rcnn_vitdet_h_75ep.py``).

Global blocks 7, 15, 23, 31, drop path 0.5, layer decay 0.9, weight decay on every parameter
(ViTDet's ViT-H: ``weight_decay_norm=None``, ``overrides={}``). 75 epochs: ``max_iter`` and the
milestones are 3/4 of the 100-epoch ones (138281 iterations, steps at 122916 and 133159). As in
ViTDet, ViT-H runs with 16x16 patches (stride 16 for the pyramid): the 14x14 patch kernel of
ViT-H/14 checkpoints is resampled on load. ViTDet reports 56.7 AP box / 50.1 AP mask from MAE ViT-H.
"""
from .mask_rcnn_vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.name = "vit_huge_patch14"
model.backbone.net.patch_size = 16
model.backbone.net.drop_path_rate = 0.5
model.backbone.net.global_blocks = (7, 15, 23, 31)
optimizer.params.layer_decay = 0.9
optimizer.params.weight_decay_norm = None
optimizer.params.no_weight_decay = []

train.max_iter = 184375 * 3 // 4  # 100 ep -> 75 ep; the milestones follow (decay_at fractions)
# ViTDet's ViT-H config keeps the 100-epoch warmup_length (250 / 184375 of the run): 187.5 iterations
lr_multiplier.warmup_iters = 250 * train.max_iter / 184375
