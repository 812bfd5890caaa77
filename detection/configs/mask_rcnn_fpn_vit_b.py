"""Mask R-CNN, ViT-B/16 + FPN: the MAE paper's detection backbone (Table 4: 50.3 AP box /
44.9 AP mask from MAE ViT-B).

The ViT is cut into four equal groups of blocks; the last map of each (blocks 2, 5, 8, 11) is
brought to stride 4, 8, 16 or 32 and fed to Detectron2's own FPN. The same ViT (windows with
global attention in those four blocks, rel-pos), data and 100-epoch schedule as the ViTDet configs.
"""
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from detection.backbone import ViTMultiScale
from detection.layers import LayerNorm2d

from .mask_rcnn_vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone = L(FPN)(
    bottom_up=L(ViTMultiScale)(
        net=model.backbone.net,
        out_blocks=None,  # evenly spaced: 2, 5, 8, 11 for ViT-B
        norm="LN",
        square_pad="${.net.img_size}",
        pretrained="",  # the ViT checkpoint (any format mae_backbone reads)
    ),
    in_features=["res2", "res3", "res4", "res5"],
    out_channels=256,
    norm=LayerNorm2d,
    top_block=L(LastLevelMaxPool)(),
)
