"""Data sources, unreadable files, augmentations, and the reproducible epoch order."""
from __future__ import annotations

import pytest
import torch

from pretrain.data import AUGMENTATIONS, ImageFiles, build_transform, collate
from training.data import DataError, EpochBatchSampler, list_images, sample_seed


def test_sources_class_folders_flat_folder_and_list_file(tmp_path, make_images):
    nested = make_images(tmp_path / "nested", 4)
    assert list_images(tmp_path / "nested") == sorted(nested)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, p in enumerate(nested):
        (flat / f"{i}.png").write_bytes(p.read_bytes())
    (flat / "notes.txt").write_text("not an image")
    assert [p.name for p in list_images(flat)] == ["0.png", "1.png", "2.png", "3.png"]
    listing = tmp_path / "train.txt"
    listing.write_text(f"# training split\nflat/0.png\n\n{nested[1]}\n")
    assert list_images(listing) == [tmp_path / "flat" / "0.png", nested[1]]


def test_sources_without_images_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        list_images(tmp_path / "empty")
    with pytest.raises(DataError, match="no such"):
        list_images(tmp_path / "missing")


def test_unreadable_file_is_reported_and_dropped(tmp_path, make_images):
    good = make_images(tmp_path, 2)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    ds = ImageFiles([good[0], bad, good[1]], build_transform("none", 32))
    items = [ds[(i, 0)] for i in range(3)]
    assert items[1].image is None and str(bad) in items[1].failure
    batch = collate(items)
    assert batch["images"].shape == (2, 3, 32, 32)
    assert batch["indices"].tolist() == [0, 2]
    assert len(batch["failures"]) == 1 and str(bad) in batch["failures"][0]


def test_no_readable_image_is_an_error(tmp_path):
    bad = [tmp_path / f"{i}.png" for i in range(3)]
    for p in bad:
        p.write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of the 3"):
        ImageFiles(bad, build_transform("none", 32)).first_readable()


@pytest.mark.parametrize("aug", AUGMENTATIONS)
def test_augmentation_is_a_function_of_the_sample_seed(tmp_path, make_images, aug):
    ds = ImageFiles(make_images(tmp_path, 1, size=(60, 50)), build_transform(aug, 32))
    before = torch.get_rng_state()
    a, b, c = ds[(0, 11)].image, ds[(0, 11)].image, ds[(0, 12)].image
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is untouched
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert torch.equal(a, c) == (aug == "none")  # only "none" ignores the seed


def test_epoch_order_is_reproducible_and_split_across_processes():
    single = EpochBatchSampler(50, batch_size=8, seed=3, world_size=1, accum_iter=2)
    ranks = [EpochBatchSampler(50, batch_size=4, seed=3, rank=r, world_size=2, accum_iter=2) for r in range(2)]
    assert len(single) == len(ranks[0]) == 6  # 50 // 16 = 3 steps x 2 micro-batches
    for epoch in (0, 1):
        for s in [single, *ranks]:
            s.set_epoch(epoch)
        one = list(single)
        two = [list(r) for r in ranks]
        for j, batch in enumerate(one):
            assert batch == two[0][j] + two[1][j]  # the same samples, with the same seeds
        assert one == list(single)  # a pure function of (seed, epoch)
        assert all(seed == sample_seed(3, epoch, i) for b in one for i, seed in b)
    single.set_epoch(0)
    e0 = list(single)
    single.set_epoch(1)
    assert list(single) != e0
