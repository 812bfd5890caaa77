"""Mask R-CNN and Cascade Mask R-CNN on the mae_backbone ViT-B/16 with ViTDet's simple pyramid.

Detectron2's Mask R-CNN (model zoo ``common/models/mask_rcnn_fpn.py``) with ViTDet's changes: the
backbone, RGB normalization, a two-conv RPN head, a 4-conv + 1-fc box head and LayerNorm in the
box and mask heads.
"""
from copy import deepcopy

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import CascadeROIHeads, FastRCNNConvFCHead, FastRCNNOutputLayers

from detection.backbone import SimpleFeaturePyramid
from detection.layers import LayerNorm2d
from mae_backbone import create_vit

mask_rcnn_vitdet = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
mask_rcnn_vitdet.backbone = L(SimpleFeaturePyramid)(
    net=L(create_vit)(
        name="vit_base_patch16",
        img_size=1024,  # the input size: the global blocks' rel-pos tables are sized for it
        pretrain_img_size=224,  # ViTDet: pos_embed stays 14x14 (+ class slot), interpolated every forward
        window_size=14,
        global_blocks=(2, 5, 8, 11),
        rel_pos=True,
        drop_path_rate=0.1,
        grad_checkpointing=False,
        pos_embed_learnable=True,
        dense_cls=False,
    ),
    out_channels=256,
    scale_factors=(4.0, 2.0, 1.0, 0.5),
    top_block=L(LastLevelMaxPool)(),  # p6
    norm="LN",
    square_pad="${.net.img_size}",
    pretrained="",  # a ViT checkpoint in any format mae_backbone reads (MAE, timm, DeiT, MoCo v3, ours)
)
mask_rcnn_vitdet.pixel_mean = [123.675, 116.28, 103.53]
mask_rcnn_vitdet.pixel_std = [58.395, 57.12, 57.375]
mask_rcnn_vitdet.input_format = "RGB"
mask_rcnn_vitdet.proposal_generator.head.conv_dims = [-1, -1]
mask_rcnn_vitdet.roi_heads.box_head.conv_dims = [256, 256, 256, 256]
mask_rcnn_vitdet.roi_heads.box_head.fc_dims = [1024]
mask_rcnn_vitdet.roi_heads.box_head.conv_norm = LayerNorm2d  # ViTDet's "LN" (not in 0.6's get_norm)
mask_rcnn_vitdet.roi_heads.mask_head.conv_norm = LayerNorm2d

# Cascade: three box stages at IoU 0.5 / 0.6 / 0.7, class-agnostic regression
cascade_mask_rcnn_vitdet = deepcopy(mask_rcnn_vitdet)
[cascade_mask_rcnn_vitdet.roi_heads.pop(k) for k in ("box_head", "box_predictor", "proposal_matcher")]
cascade_mask_rcnn_vitdet.roi_heads.update(
    _target_=CascadeROIHeads,
    box_heads=[
        L(FastRCNNConvFCHead)(
            input_shape=ShapeSpec(channels=256, height=7, width=7),
            conv_dims=[256, 256, 256, 256],
            fc_dims=[1024],
            conv_norm=LayerNorm2d,
        )
        for _ in range(3)
    ],
    box_predictors=[
        L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=1024),
            test_score_thresh=0.05,
            box2box_transform=L(Box2BoxTransform)(weights=(w1, w1, w2, w2)),
            cls_agnostic_bbox_reg=True,
            num_classes="${...num_classes}",
        )
        for (w1, w2) in [(10, 5), (20, 10), (30, 15)]
    ],
    proposal_matchers=[
        L(Matcher)(thresholds=[th], labels=[0, 1], allow_low_quality_matches=False) for th in [0.5, 0.6, 0.7]
    ],
)
