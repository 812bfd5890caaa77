"""Every shipped config instantiates (shrunk), and the recipes are ViTDet's / the MAE paper's."""
from __future__ import annotations

import pytest
from detectron2.config import instantiate
from detectron2.data import transforms as T
from detectron2.modeling.backbone import FPN

from detection import ConfigError, SimpleFeaturePyramid, ViTMultiScale, get_config_file, list_configs, load_config

from det_helpers import tiny_overrides

LAZY = [c for c in list_configs() if not c.endswith(".yaml")]

# ViTDet (REFERENCE.md): architecture, patch, global blocks, drop path, layer decay
RECIPES = {
    "b": ("vit_base_patch16", None, [2, 5, 8, 11], 0.1, 0.7),
    "l": ("vit_large_patch16", None, [5, 11, 17, 23], 0.4, 0.8),
    "h": ("vit_huge_patch14", 16, [7, 15, 23, 31], 0.5, 0.9),
}


def test_the_shipped_configs():
    assert set(LAZY) == {
        "mask_rcnn_vitdet_b_100ep", "mask_rcnn_vitdet_l_100ep", "mask_rcnn_vitdet_h_75ep",
        "cascade_mask_rcnn_vitdet_b_100ep", "cascade_mask_rcnn_vitdet_l_100ep", "cascade_mask_rcnn_vitdet_h_75ep",
        "mask_rcnn_fpn_vit_b",
    }
    assert "mask_rcnn_vit_b_vitdet.yaml" in list_configs()


def _net_key(name: str) -> str:
    return "model.backbone.bottom_up.net" if "fpn" in name else "model.backbone.net"


@pytest.mark.parametrize("name", LAZY)
def test_each_lazyconfig_instantiates(name):
    cfg = load_config(name, tiny_overrides(net=_net_key(name), depth=4 if "fpn" in name else 2))
    model = instantiate(cfg.model)
    backbone = model.backbone
    if "fpn" in name:
        assert isinstance(backbone, FPN) and isinstance(backbone.bottom_up, ViTMultiScale)
    else:
        assert isinstance(backbone, SimpleFeaturePyramid) and backbone.padding_constraints["square_size"] == 64
    assert list(backbone.output_shape()) == ["p2", "p3", "p4", "p5", "p6"]
    assert ("Cascade" in type(model.roi_heads).__name__) == name.startswith("cascade")
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    assert type(optimizer).__name__ == "AdamW"
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(
        [p for p in model.parameters() if p.requires_grad])
    assert instantiate(cfg.lr_multiplier)(0.5) == 1.0
    mapper = instantiate(cfg.dataloader.train.mapper)
    assert [type(a).__name__ for a in mapper.augmentations.augs] == ["RandomFlip", "ResizeScale", "FixedSizeCrop"]


@pytest.mark.parametrize("name", LAZY)
def test_recipes_match_the_reference(name):
    cfg = load_config(name)
    size = "b" if "fpn" in name else name.split("_")[-2]
    arch, patch, global_blocks, drop_path, layer_decay = RECIPES[size]
    vit = cfg.model.backbone.bottom_up.net if "fpn" in name else cfg.model.backbone.net
    assert vit.name == arch and vit.get("patch_size") == patch
    assert list(vit.global_blocks) == global_blocks and vit.window_size == 14 and vit.rel_pos
    assert vit.drop_path_rate == drop_path and vit.img_size == 1024
    assert cfg.optimizer.params.layer_decay == layer_decay
    max_iter = 184375 * 3 // 4 if size == "h" else 184375  # ViTDet's ViT-H recipe is 75 epochs
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.train.max_iter) == (1e-4, 0.1, max_iter)
    assert cfg.dataloader.train.total_batch_size == 64  # 184375 x 64 = 100 epochs of COCO train2017
    resize, crop = cfg.dataloader.train.mapper.augmentations[1:]
    assert (resize.min_scale, resize.max_scale, resize.target_height) == (0.1, 2.0, 1024)
    assert crop._target_ is T.FixedSizeCrop and list(crop.crop_size) == [1024, 1024]
    square = cfg.model.backbone.bottom_up.square_pad if "fpn" in name else cfg.model.backbone.square_pad
    assert square == 1024
    if "fpn" in name:
        assert cfg.model.backbone.bottom_up.out_blocks is None  # evenly spaced: 2, 5, 8, 11


def test_config_names_resolve_and_typos_are_errors():
    assert get_config_file("mask_rcnn_vitdet_b_100ep").name == "mask_rcnn_vitdet_b_100ep.py"
    with pytest.raises(FileNotFoundError, match="did you mean 'mask_rcnn_vitdet_b_100ep'"):
        get_config_file("mask_rcnn_vitdet_b_100")
    for old in ("mask_rcnn_vitdet_h_100ep", "cascade_mask_rcnn_vitdet_h_100ep.py"):  # renamed: 75 epochs, as ViTDet
        new = old.replace("100ep", "75ep").removesuffix(".py")
        with pytest.raises(FileNotFoundError, match=f"renamed: did you mean '{new}'.*75 epochs"):
            get_config_file(old)
    with pytest.raises(ConfigError, match="no config key 'train.max_iters'"):
        load_config("mask_rcnn_vitdet_b_100ep", ["train.max_iters=10"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config("mask_rcnn_vitdet_b_100ep", ["train.max_iter"])
    cfg = load_config("mask_rcnn_vitdet_b_100ep", ["train.max_iter=90", "model.backbone.net.depth=2"])
    assert cfg.train.max_iter == 90 and cfg.model.backbone.net.depth == 2  # call arguments may be added
