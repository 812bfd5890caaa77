"""Datasets by name, with errors naming the path and what was expected; LSJ cropping by Detectron2's FixedSizeCrop."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from detection import DatasetError, check_dataset, register_coco_dataset
from detection.config import ConfigError, load_config
from detection.engine import check_config

TINY_CONFIG = "tests/detection/configs/tiny_mask_rcnn_vitdet.py"


@pytest.fixture
def registered():
    names = []
    yield names
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_register_a_coco_format_dataset(tmp_path, tiny_coco, registered):
    json_file, images = tiny_coco
    summary = register_coco_dataset("det_test_valid", json_file, images)
    registered.append("det_test_valid")
    assert summary["images"] == 8 and summary["thing_classes"] == ["square", "triangle"]
    dicts = DatasetCatalog.get("det_test_valid")
    assert len(dicts) == 8 and all(d["annotations"] for d in dicts)
    assert MetadataCatalog.get("det_test_valid").thing_classes == ["square", "triangle"]
    register_coco_dataset("det_test_valid", json_file, images)  # same files again: fine
    copy = shutil.copytree(images, tmp_path / "copy")
    with pytest.raises(DatasetError, match="already registered"):
        register_coco_dataset("det_test_valid", json_file, copy)


def _broken(tmp_path, tiny_coco, edit):
    json_file, images = tiny_coco
    data = json.loads(json_file.read_text())
    edit(data)
    out = tmp_path / "broken.json"
    out.write_text(json.dumps(data))
    return out, images


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.pop("categories"), "missing or not a list: categories"),
    (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\] lacks bbox"),
    (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), r"annotations\[1\]\.bbox must be \[x, y, width, height\]"),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4]]), r"segmentation must be polygons"),
    (lambda d: d["annotations"][0].update(image_id=999), "image_id 999, which is not in 'images'"),
    (lambda d: d["annotations"][0].update(category_id=7), "category_id 7, which is not in 'categories'"),
    (lambda d: d["images"][2].pop("height"), r"images\[2\] lacks height"),
    (lambda d: d["images"][0].update(file_name="nope.png"), "1 image files not found under .* nope.png"),
])
def test_a_malformed_dataset_names_the_file_and_the_problem(tmp_path, tiny_coco, edit, expected):
    json_file, images = _broken(tmp_path, tiny_coco, edit)
    with pytest.raises(DatasetError, match=expected) as err:
        register_coco_dataset("det_test_broken", json_file, images)
    assert str(json_file) in str(err.value)
    assert "det_test_broken" not in DatasetCatalog.list()


def test_missing_files_name_the_path(tmp_path, tiny_coco):
    json_file, images = tiny_coco
    with pytest.raises(DatasetError, match=f"{tmp_path / 'none.json'}: no such annotation file"):
        register_coco_dataset("det_test_x", tmp_path / "none.json", images)
    with pytest.raises(DatasetError, match=f"{tmp_path / 'imgs'}: no such image folder"):
        register_coco_dataset("det_test_x", json_file, tmp_path / "imgs")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        register_coco_dataset("det_test_x", bad, images)


def test_builtin_coco_without_files_says_where_it_looked():
    with pytest.raises(DatasetError) as err:
        check_dataset("coco_2017_val")
    msg = str(err.value)
    assert "instances_val2017.json" in msg and "DETECTRON2_DATASETS" in msg


def test_an_unregistered_name_says_how_to_register():
    with pytest.raises(DatasetError, match="--register-coco my_set JSON IMAGE_DIR"):
        check_dataset(["my_set"])


def test_class_count_mismatch_is_caught_before_training(tiny_coco, registered):
    json_file, images = tiny_coco
    for name in ("tiny_train", "tiny_val"):
        if name not in DatasetCatalog.list():
            register_coco_dataset(name, json_file, images)
            registered.append(name)
    check_config(load_config(TINY_CONFIG))
    with pytest.raises(ConfigError, match="has 2 classes but the model predicts 80: add model.roi_heads.num_classes=2"):
        check_config(load_config(TINY_CONFIG, ["model.roi_heads.num_classes=80"]))


# --------------------------------------------------------------------------- LSJ crop (Detectron2's, polygons by shapely)
def test_lsj_crop_moves_polygons_into_the_crop():
    np.random.seed(0)
    image = np.zeros((64, 120, 3), dtype=np.uint8)  # cropped in x only, at a random offset in [0, 56]
    ann = {"bbox": [40, 10, 80, 20], "bbox_mode": 1, "category_id": 0,
           "segmentation": [[40.0, 10.0, 120.0, 10.0, 120.0, 30.0, 40.0, 30.0]]}
    aug = T.AugInput(image)
    transforms = T.AugmentationList([T.FixedSizeCrop(crop_size=(64, 64), pad=False)])(aug)
    assert aug.image.shape[:2] == (64, 64)
    out = utils.transform_instance_annotations(dict(ann), transforms, (64, 64))
    inst = utils.annotations_to_instances([out], (64, 64), mask_format="polygon")
    crop = next(t for t in transforms.transforms if hasattr(t, "x0"))
    inside = (min(120, crop.x0 + 64) - max(40, crop.x0)) * 20
    assert inst.gt_masks.area().item() == pytest.approx(inside)


def test_lsj_crop_cuts_a_concave_polygon_into_the_pieces_inside_the_window():
    """A U whose base lies below the crop window: the crop keeps its two arms, as two polygons, and they
    rasterize to the crop of the U's own mask."""
    u_shape = [8, 10, 20, 10, 20, 100, 44, 100, 44, 10, 56, 10, 56, 110, 8, 110]  # x, y; arms 12 px wide
    image = np.zeros((120, 64, 3), dtype=np.uint8)  # cropped in y only
    np.random.seed(0)
    aug = T.AugInput(image)
    transforms = T.AugmentationList([T.FixedSizeCrop(crop_size=(64, 64), pad=False)])(aug)
    crop = next(t for t in transforms.transforms if hasattr(t, "y0"))
    assert 10 < crop.y0 and crop.y0 + 64 < 100  # the window cuts both arms above the base
    ann = {"bbox": [8, 10, 48, 100], "bbox_mode": 1, "category_id": 0, "segmentation": [list(map(float, u_shape))]}
    out = utils.transform_instance_annotations(dict(ann), transforms, (64, 64))
    assert len(out["segmentation"]) == 2  # one polygon per arm
    inst = utils.annotations_to_instances([out], (64, 64), mask_format="polygon")
    assert inst.gt_masks.area().item() == pytest.approx(2 * 12 * 64)
    got = utils.polygons_to_bitmask(out["segmentation"], 64, 64)
    whole = utils.polygons_to_bitmask([np.array(u_shape, dtype=float)], 120, 64)
    assert (got == whole[crop.y0:crop.y0 + 64]).all()


def test_vitdet_lsj_does_not_pad_training_images():
    """ViTDet's LSJ: ``FixedSizeCrop((1024, 1024), pad=False)``; an image that ``ResizeScale`` made smaller
    than the crop stays smaller (Detectron2's default ``pad=True`` fills it to 1024 with grey)."""
    from detectron2.config import instantiate

    augs = instantiate(load_config("mask_rcnn_vitdet_b_100ep").dataloader.train.mapper.augmentations)
    assert type(augs[-1]) is T.FixedSizeCrop and augs[-1].pad is False
    image = np.full((480, 640, 3), 7, dtype=np.uint8)
    np.random.seed(0)
    shapes = []
    for _ in range(8):
        aug = T.AugInput(image)
        T.AugmentationList(augs)(aug)
        shapes.append(aug.image.shape[:2])
        assert (aug.image != 128).all()  # no grey padding anywhere
    assert all(h <= 1024 and w <= 1024 for h, w in shapes) and any(h < 1024 for h, w in shapes), shapes
    small = T.AugInput(image)  # 480x640 -> x0.5 of the 1024 fit: 384x512
    transforms = T.AugmentationList([T.ResizeScale(0.5, 0.5, 1024, 1024), augs[-1]])(small)
    assert small.image.shape[:2] == (384, 512)
    assert not any(isinstance(t, T.PadTransform) for t in transforms.transforms)
    padded = T.AugInput(image)
    T.AugmentationList([T.ResizeScale(0.5, 0.5, 1024, 1024), T.FixedSizeCrop(crop_size=(1024, 1024), pad=True)])(padded)
    assert padded.image.shape[:2] == (1024, 1024) and (padded.image[400:, :] == 128).all()
