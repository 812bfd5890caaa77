"""Cascade Mask R-CNN, ViT-B/16 + simple feature pyramid, ViTDet's 100-epoch COCO recipe.

The ViT-B backbone, data and schedule of ``mask_rcnn_vitdet_b_100ep``; three box stages (IoU 0.5,
0.6, 0.7). ViTDet reports 54.0 AP box / 46.7 AP mask from MAE ViT-B.
"""
from .common.models import cascade_mask_rcnn_vitdet as model
from .mask_rcnn_vitdet_b_100ep import dataloader, lr_multiplier, optimizer, train
from .mask_rcnn_vitdet_b_100ep import model as _mask_rcnn

model.backbone = _mask_rcnn.backbone
