"""The shipped ViTDet Mask R-CNN recipe shrunk for CPU tests: a user's own config built on ours.

ViT-tiny with 2 blocks at 64 px, a 64-channel pyramid and light heads, LSJ at 64 px on the
datasets registered as ``tiny_train`` / ``tiny_val``, 12 iterations on the CPU.
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig
from detectron2.layers import ShapeSpec

from detection.config import get_config_file

_base = LazyConfig.load(str(get_config_file("mask_rcnn_vitdet_b_100ep")))
dataloader, lr_multiplier, model, optimizer, train = (
    _base.dataloader, _base.lr_multiplier, _base.model, _base.optimizer, _base.train)

_size, _width = 64, 64
model.backbone.net.update(name="vit_tiny_patch16", depth=2, img_size=_size, window_size=2, global_blocks=[1])
model.backbone.out_channels = _width
model.proposal_generator.head.in_channels = _width
model.proposal_generator.pre_nms_topk = (200, 100)
model.proposal_generator.post_nms_topk = (100, 50)
model.roi_heads.num_classes = 2
model.roi_heads.batch_size_per_image = 32
model.roi_heads.box_head.input_shape = ShapeSpec(channels=_width, height=7, width=7)
model.roi_heads.box_head.conv_dims = []
model.roi_heads.box_head.fc_dims = [256]
model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=256)
model.roi_heads.box_predictor.test_score_thresh = 0.0  # score every detection, for a real AP
model.roi_heads.box_predictor.test_topk_per_image = 20
model.roi_heads.mask_head.input_shape = ShapeSpec(channels=_width, height=14, width=14)
model.roi_heads.mask_head.conv_dims = [_width, _width]

dataloader.train.dataset.names = "tiny_train"
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(min_scale=0.8, max_scale=1.2, target_height=_size, target_width=_size),
    L(T.FixedSizeCrop)(crop_size=(_size, _size), pad=False),  # as the recipe (ViTDet)
]
dataloader.test.dataset.names = "tiny_val"
dataloader.test.num_workers = 0
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=_size, max_size=_size)]

optimizer.lr = 3e-4
lr_multiplier.warmup_iters = 1
train.update(max_iter=12, log_period=1, eval_period=0, device="cpu", seed=0)
train.checkpointer.period = 6
