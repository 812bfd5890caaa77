"""Sample data: valid in each real format, exact ground truth, deterministic by seed."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from mae_transfer.cli import main as cli
from mae_transfer.sample_data import CATEGORIES, SEG_CLASSES, SampleSizes, write_sample_data

SMALL = SampleSizes(unlabeled=5, cls_train_per_class=4, cls_val_per_class=2, cls_size=32, scene_train=6, scene_val=3,
                    scene_size=64)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    write_sample_data(out, seed=3, sizes=SMALL)
    return out


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_by_seed(sample, tmp_path):
    write_sample_data(tmp_path / "again", seed=3, sizes=SMALL)
    write_sample_data(tmp_path / "other", seed=4, sizes=SMALL)
    assert _digest(tmp_path / "again") == _digest(sample)
    assert _digest(tmp_path / "other") != _digest(sample)


def test_class_folders_load_with_imagefolder(sample):
    from torchvision.datasets import ImageFolder

    for split, n in (("train", 4), ("val", 2)):
        ds = ImageFolder(sample / "classification" / split)
        assert ds.classes == sorted(CATEGORIES)
        assert len(ds) == n * len(CATEGORIES)
        img, _ = ds[0]
        assert img.size == (32, 32) and img.mode == "RGB"


def test_single_object_images_differ_only_by_outline(sample):
    """Classification and unlabeled images: one flat-coloured object on a flat background, so colour
    says nothing of the category; the object's pixel count is that of its polygon."""
    images = sorted((sample / "classification").rglob("*.png")) + sorted((sample / "unlabeled").glob("*.png"))
    assert len(list((sample / "unlabeled").glob("*.png"))) == 5
    for path in images:
        pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
        colours, counts = np.unique(pixels, axis=0, return_counts=True)
        assert len(colours) == 2, path  # object and background, nothing else
        assert counts.min() / counts.sum() > 0.05, path  # a sizeable object


def test_coco_json_loads_in_pycocotools_with_exact_masks(sample):
    from pycocotools.coco import COCO

    coco = COCO(str(sample / "coco" / "annotations" / "instances_train2017.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CATEGORIES)
    assert len(coco.getImgIds()) == 6 and len(coco.getAnnIds()) >= 6
    for img in coco.loadImgs(coco.getImgIds()):
        assert (sample / "coco" / "train2017" / img["file_name"]).is_file()
        label = np.asarray(Image.open(sample / "ade" / "ADEChallengeData2016" / "annotations" / "training"
                                      / img["file_name"].replace(".jpg", ".png")))
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            mask = coco.annToMask(ann).astype(bool)
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 64.01 and y + h <= 64.01
            # pycocotools' rasterization of the polygon lies on the label map's pixels of that category
            obj = label == ann["category_id"] + 1
            assert (mask & obj).sum() / mask.sum() > 0.9
            assert abs(mask.sum() - ann["area"]) / ann["area"] < 0.25


def test_ade_layout_loads_in_mmseg(sample):
    """Read with MMSeg's loader under ADE20K's conventions (.jpg/.png, reduce_zero_label).

    ``ADE20KDataset`` itself only accepts subsets of ADE's 150 class names, so the same loader
    (``BaseSegDataset``, which ``ADE20KDataset`` only configures) is given our class names.
    """
    from mmseg.datasets import BaseSegDataset

    root = sample / "ade" / "ADEChallengeData2016"
    ds = BaseSegDataset(data_root=str(root), data_prefix=dict(img_path="images/validation", seg_map_path="annotations/validation"),
                        img_suffix=".jpg", seg_map_suffix=".png", reduce_zero_label=True, pipeline=[],
                        metainfo=dict(classes=SEG_CLASSES, palette=[[i * 40, i * 40, i * 40] for i in range(len(SEG_CLASSES))]))
    assert len(ds) == 3
    info = ds[0]
    label = np.asarray(Image.open(info["seg_map_path"]))
    assert set(np.unique(label)) <= set(range(1, len(SEG_CLASSES) + 1))  # 0 (unlabelled) never used
    assert 1 in label and ds.reduce_zero_label is True


def test_cli_writes_sample_data(tmp_path, capsys):
    assert cli(["data", "sample", str(tmp_path / "s"), "--seed", "1"]) == 0
    summary = json.loads((tmp_path / "s" / "sample_data.json").read_text())
    assert summary["seed"] == 1 and summary["classification_train"] == 40 and summary["unlabeled"] == 2000
    assert "coco_train_images=120" in capsys.readouterr().out
