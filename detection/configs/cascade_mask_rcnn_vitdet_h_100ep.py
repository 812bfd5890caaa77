"""Cascade Mask R-CNN, ViT-H (patch 16), ViTDet's 100-epoch COCO recipe (backbone and layer decay
of ``mask_rcnn_vitdet_h_100ep``). ViTDet reports 58.7 AP box / 50.9 AP mask from MAE ViT-H."""
from .cascade_mask_rcnn_vitdet_b_100ep import dataloader, lr_multiplier, model, train
from .mask_rcnn_vitdet_h_100ep import model as _mask_rcnn
from .mask_rcnn_vitdet_h_100ep import optimizer

model.backbone = _mask_rcnn.backbone
