"""The ADE20K-layout datasets: what loads, and the errors that name what is wrong."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segmentation import ADELayoutDataset, CheckedADE20KDataset, DatasetError

from seg_helpers import CLASSES, write_ade_layout

PREFIX = dict(img_path="images/training", seg_map_path="annotations/training")


def _set_label(root, name, values, mode="L"):
    arr = np.resize(np.asarray(values, dtype=np.uint8), (64, 64))  # the image's size
    Image.fromarray(arr, mode=mode).save(root / "annotations" / "training" / name)


@pytest.fixture
def small_root(tmp_path):
    return write_ade_layout(tmp_path / "ADEChallengeData2016", {"training": (3, (64, 64))}, seed=3)


def test_a_valid_dataset_loads_with_ade20k_label_semantics(small_root):
    _set_label(small_root, "img_000.png", [0, 1, 150, 255])  # ignore, class 0, class 149, ignore
    ds = CheckedADE20KDataset(data_root=str(small_root), data_prefix=PREFIX, pipeline=[])
    assert len(ds) == 3 and ds.reduce_zero_label and len(ds.metainfo["classes"]) == 150
    own = ADELayoutDataset(data_root=str(small_root), data_prefix=PREFIX, pipeline=[],
                           metainfo=dict(classes=CLASSES * 50))  # 150 names: raw 1..150 valid
    assert [d["img_path"].rsplit("/", 1)[1] for d in own] == ["img_000.jpg", "img_001.jpg", "img_002.jpg"]


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(DatasetError, match=r"image folder .*nowhere/images/training does not exist"):
        CheckedADE20KDataset(data_root=str(tmp_path / "nowhere"), data_prefix=PREFIX, pipeline=[])
    (tmp_path / "half" / "images" / "training").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"annotation folder .*half/annotations/training does not exist"):
        CheckedADE20KDataset(data_root=str(tmp_path / "half"), data_prefix=PREFIX, pipeline=[])


def test_label_values_outside_the_class_range_name_file_and_values(small_root):
    _set_label(small_root, "img_001.png", [1, 151, 200, 255])
    with pytest.raises(DatasetError) as err:
        CheckedADE20KDataset(data_root=str(small_root), data_prefix=PREFIX, pipeline=[])
    msg = str(err.value)
    assert "1 of 3 label maps" in msg and "img_001.png: [151, 200]" in msg
    assert "1..150 (classes 0..149, reduce_zero_label)" in msg


def test_without_reduce_zero_label_the_range_is_0_to_k_minus_1(small_root):
    _set_label(small_root, "img_000.png", [0, 1, 2, 255])
    _set_label(small_root, "img_001.png", [0, 1, 2])
    _set_label(small_root, "img_002.png", [0, 3])
    kw = dict(data_root=str(small_root), data_prefix=PREFIX, pipeline=[], metainfo=dict(classes=CLASSES))
    with pytest.raises(DatasetError, match=r"allowed: 0\.\.2 \(classes\) or 255.*img_002.png: \[3\]"):
        ADELayoutDataset(reduce_zero_label=False, **kw)
    assert len(ADELayoutDataset(reduce_zero_label=True, **kw)) == 3  # raw 3 = class 2 there


def test_missing_or_multichannel_label_maps_and_missing_classes(small_root):
    rgb = np.zeros((64, 64, 3), np.uint8)
    Image.fromarray(rgb, mode="RGB").save(small_root / "annotations" / "training" / "img_001.png")
    with pytest.raises(DatasetError, match=r"img_001.png: a label map must have one channel"):
        CheckedADE20KDataset(data_root=str(small_root), data_prefix=PREFIX, pipeline=[])
    (small_root / "annotations" / "training" / "img_001.png").unlink()
    with pytest.raises(DatasetError, match=r"1 of 3 images have no label map.*img_001.png"):
        CheckedADE20KDataset(data_root=str(small_root), data_prefix=PREFIX, pipeline=[])
    with pytest.raises(DatasetError, match="give the class names"):
        ADELayoutDataset(data_root=str(small_root), data_prefix=PREFIX, pipeline=[])
