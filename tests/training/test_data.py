"""``training.data``'s folder scan: symlinked folders followed once, each real image counted once."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from PIL import Image

from classification.data import find_classes, list_samples
from training.data import DataError, image_files, list_images


def cyclic_folder(root: Path) -> Path:
    """16 images in two class folders, with symlinks back up the tree (cycles), a link to a
    sibling folder and a second link to one image: 16 real images, many more paths to them."""
    for i in range(16):
        path = root / f"class{i % 2}" / f"img{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(path)
    os.symlink("..", root / "class0" / "up")  # class0/up/class0/up/... : a cycle through the root
    os.symlink(".", root / "class1" / "self")  # class1/self/self/...
    os.symlink("../class0", root / "class1" / "sibling")  # the other class's images again
    os.symlink("img00.png", root / "class0" / "again.png")  # one image under a second name
    return root


def test_a_symlink_cycle_lists_each_real_image_once(tmp_path, caplog):
    root = cyclic_folder(tmp_path / "images")
    with caplog.at_level(logging.WARNING, logger="training.data"):
        files = list_images(root)
    real = {Path(os.path.realpath(p)).name for p in files}
    assert len(files) == 16 and real == {f"img{i:02d}.png" for i in range(16)}  # 336 before
    assert "symlinked paths to folders or images already listed" in caplog.text and str(root) in caplog.text


def test_a_symlinked_folder_outside_the_tree_is_followed_once(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "x.png")
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    os.symlink(outside, root / "a" / "link1")
    os.symlink(outside, root / "a" / "link2")
    assert [p.relative_to(root).as_posix() for p in image_files(root)] == ["a/link1/x.png"]


def test_class_folders_with_a_symlink_cycle_count_each_image_once_per_class(tmp_path):
    root = cyclic_folder(tmp_path / "train")
    classes = find_classes(root)
    assert classes == ["class0", "class1"]
    samples = list_samples(root, classes)
    per_class = [sum(1 for _, t in samples if t == c) for c in range(2)]
    # class1/sibling links to class0's 8 images: inside class1 they are class1's (as the user linked
    # them), but never twice and never through the cycles
    assert per_class == [8, 16], per_class
    assert len({(os.path.realpath(p), t) for p, t in samples}) == len(samples) == 24


def test_a_class_folder_that_links_back_to_the_root_is_not_a_class(tmp_path, caplog):
    root = cyclic_folder(tmp_path / "train")
    os.symlink(".", root / "loop")
    with caplog.at_level(logging.WARNING, logger="classification.data"):
        assert find_classes(root) == ["class0", "class1"]
    assert "loop" in caplog.text and "symlink cycles" in caplog.text


def test_a_data_path_that_is_a_symlink_loop_is_named(tmp_path):
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(DataError, match=r"loop: a broken symlink or a symlink loop \(-> loop\)"):
        list_images(tmp_path / "loop")
