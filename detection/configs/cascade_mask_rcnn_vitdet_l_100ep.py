"""Cascade Mask R-CNN, ViT-L/16, ViTDet's 100-epoch COCO recipe (backbone and layer decay of
``mask_rcnn_vitdet_l_100ep``). ViTDet reports 57.6 AP box / 49.8 AP mask from MAE ViT-L."""
from .cascade_mask_rcnn_vitdet_b_100ep import dataloader, lr_multiplier, model, train
from .mask_rcnn_vitdet_l_100ep import model as _mask_rcnn
from .mask_rcnn_vitdet_l_100ep import optimizer

model.backbone = _mask_rcnn.backbone
