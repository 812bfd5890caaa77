"""Cascade Mask R-CNN, ViT-H (patch 16), ViTDet's 75-epoch COCO recipe (backbone, optimizer and
schedule of ``mask_rcnn_vitdet_h_75ep``). ViTDet reports 58.7 AP box / 50.9 AP mask from MAE ViT-H."""
from .cascade_mask_rcnn_vitdet_b_100ep import dataloader, model
from .mask_rcnn_vitdet_h_75ep import lr_multiplier, optimizer, train
from .mask_rcnn_vitdet_h_75ep import model as _mask_rcnn

model.backbone = _mask_rcnn.backbone
