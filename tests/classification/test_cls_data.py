"""Data: class folders, the class check, seeded augmentation, unreadable files, mixup / cutmix."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from classification import ClassFolder, build_mixup, build_transform, check_same_classes, find_classes, make_config
from classification.data import collate
from training import DataError


def ft_config(**kw):
    return make_config("finetune", {"data": "unused", "output": "unused", "img_size": 32, **kw}).resolve(None)


def test_class_folders_are_read_like_imagefolder(dataset):
    from torchvision.datasets import ImageFolder

    ds = ClassFolder(dataset / "val", build_transform(ft_config(), is_training=False))
    ref = ImageFolder(str(dataset / "val"))
    assert ds.classes == ref.classes == sorted(ds.classes)
    assert [(str(p), t) for p, t in ds.samples] == ref.samples
    item = ds[(0, 0)]
    assert item.image.shape == (3, 32, 32) and item.target == ref.samples[0][1]


def test_different_train_and_val_classes_are_an_error_listing_them(make_dataset, tmp_path):
    root = make_dataset(tmp_path / "d", per_class=(1, 1))
    (root / "train" / "zebra").mkdir()
    (root / "val" / "red_stripes").rename(root / "val" / "red_strips")
    with pytest.raises(DataError) as err:
        check_same_classes(find_classes(root / "train"), find_classes(root / "val"), root / "train", root / "val")
    msg = str(err.value)
    assert "only in " + str(root / "train") + ": red_stripes, zebra" in msg
    assert "only in " + str(root / "val") + ": red_strips" in msg
    check_same_classes(["a", "b"], ["b", "a"])  # same set: fine


def test_empty_class_folder_is_an_error(make_dataset, tmp_path):
    root = make_dataset(tmp_path / "d", per_class=(1, 1))
    (root / "train" / "empty").mkdir()
    with pytest.raises(DataError, match="without image files.*empty"):
        ClassFolder(root / "train", build_transform(ft_config(), True))


def test_augmentation_is_a_function_of_the_sample_seed(dataset):
    ds = ClassFolder(dataset / "train", build_transform(ft_config(), is_training=True))
    a, b, c = ds[(3, 11)], ds[(3, 11)], ds[(3, 12)]
    assert torch.equal(a.image, b.image)
    assert not torch.equal(a.image, c.image)
    state = torch.get_rng_state()
    ds[(3, 13)]
    assert torch.equal(state, torch.get_rng_state())  # the caller's generators are untouched


def test_unreadable_images_are_reported_and_skipped(dataset):
    bad = dataset / "train" / "blue_dots" / "broken.png"
    bad.write_bytes(b"not an image")
    ds = ClassFolder(dataset / "train", build_transform(ft_config(), is_training=False))
    index = [str(p) for p, _ in ds.samples].index(str(bad))
    batch = collate([ds[(index, 0)], ds[(0, 0)]])
    assert batch["images"].shape[0] == 1 and batch["targets"].tolist() == [ds.samples[0][1]]
    assert len(batch["failures"]) == 1 and str(bad) in batch["failures"][0]


def _labels(targets: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((len(targets), num_classes), off).scatter_(1, targets[:, None], 1 - smoothing + off)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixup_and_cutmix_targets_sum_to_one_and_match_the_mixed_images(kind):
    cfg = ft_config(**({"cutmix": 0.0} if kind == "mixup" else {"mixup": 0.0}))
    mix = build_mixup(cfg, num_classes=4)
    np.random.seed(0)
    torch.manual_seed(0)
    x = torch.rand(8, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    mixed, soft = mix(x.clone(), y)
    assert soft.shape == (8, 4)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(8))
    assert (soft >= 0).all() and not torch.equal(mixed, x)
    # the batch is mixed with its reverse; the images say how much of each sample is in each
    flip = x.flip(0)
    if kind == "mixup":
        lam = float(((mixed - flip) / (x - flip))[0].median())
    else:
        own = (mixed == x).all(dim=1)  # [B, H, W]: pixels kept from the sample itself
        assert ((mixed == x) | (mixed == flip)).all()
        lam = float(own[0].float().mean())
    assert 0.0 < lam < 1.0
    want = lam * _labels(y, 4, 0.1) + (1 - lam) * _labels(y.flip(0), 4, 0.1)
    torch.testing.assert_close(soft, want, rtol=1e-5, atol=1e-5)


def test_mixup_is_off_for_linear_probing_and_when_disabled():
    assert build_mixup(ft_config(mixup=0.0, cutmix=0.0), 4) is None
    lp = make_config("linprobe", {"data": "d", "output": "o"}).resolve(None)
    assert build_mixup(lp, 4) is None


def test_randaugment_posterize_at_zero_bits_works_on_current_pillow():
    """The recipe's 'inc1' RandAugment asks posterize for 0 bits at high magnitude; Pillow 13 raises
    there. Every posterize op of the fine-tuning transform must give a black image instead."""
    from PIL import Image

    from classification import build_transform, make_config

    cfg = make_config("finetune", {"data": "unused", "output": "unused", "img_size": 32})
    transform = build_transform(cfg, is_training=True)
    ops = [op for t in transform.transforms for op in getattr(t, "ops", []) if op.name.startswith("Posterize")]
    assert ops, "the recipe's RandAugment has a posterize op"
    img = Image.new("RGB", (8, 8), (200, 120, 40))
    for op in ops:
        assert list(op.aug_fn(img, 0).getdata()) == [(0, 0, 0)] * 64
        assert op.aug_fn(img, 4).getpixel((0, 0)) == (192, 112, 32)
        assert op.aug_fn(img, 8) is img


@pytest.mark.parametrize("protocol", ["finetune", "linprobe"])
def test_crop_scale_sets_the_smallest_area_of_the_random_resized_crop(protocol):
    from timm.data.transforms import RandomResizedCropAndInterpolation

    def crops(**values):
        cfg = make_config(protocol, {"data": "x", "output": "x", "img_size": 32, **values}).resolve(None)
        return [t for t in build_transform(cfg, is_training=True).transforms
                if isinstance(t, RandomResizedCropAndInterpolation)]

    (default,) = crops()
    assert default.scale == (0.08, 1.0)  # the recipe (timm's and MAE's)
    (whole,) = crops(crop_scale=0.6)
    assert whole.scale == (0.6, 1.0)
    with pytest.raises(ValueError, match="crop_scale must be in"):
        make_config(protocol, {"data": "x", "output": "x", "crop_scale": 0.0})
