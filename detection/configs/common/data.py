"""COCO 2017 with ViTDet's large-scale jitter at 1024 px (LSJ: flip, resize x0.1-2.0, crop 1024, no padding).

Dataset names resolve through Detectron2's catalog: ``coco_2017_*`` under ``$DETECTRON2_DATASETS``,
or a name registered with ``mae-transfer detect ... --register-coco NAME JSON IMAGE_DIR``.
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from omegaconf import OmegaConf

from detection.data import build_coco_evaluator

image_size = 1024  # the LSJ crop; the model's ViT img_size and square_pad match it

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.RandomFlip)(horizontal=True),
            L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=image_size, target_width=image_size),
            L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),  # ViTDet: no padding
        ],
        image_format="RGB",
        use_instance_mask=True,
        recompute_boxes=True,  # boxes from the cropped masks
    ),
    total_batch_size=64,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size)],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=4,
)

# box and mask AP through pycocotools (Detectron2's fast COCOeval when its C++ ops are installed)
dataloader.evaluator = L(build_coco_evaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${train.output_dir}/inference",
)
