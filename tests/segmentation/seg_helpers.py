"""Helpers of the segmentation tests: a tiny ADE20K-layout dataset and a tiny UperNet config.

The tiny config is a real config file that inherits the shipped ViT-B ADE20K config (so that one
is loaded and built on every run) and shrinks it: a 64-wide, 4-block ViT on 64 px images, three
classes (background, red squares, blue disks), 16 iterations.
"""
from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from segmentation import CONFIG_DIR

B_CONFIG = CONFIG_DIR / "upernet-mae-vit-b_8xb2-160k_ade20k-512x512.py"
CLASSES = ("background", "square", "disk")
TINY_VIT: dict[str, Any] = dict(embed_dim=64, depth=4, num_heads=2)
MAX_ITERS = 16
CKPT_INTERVAL = 8

_run_ids = itertools.count()


def write_ade_layout(root: Path, splits: dict[str, tuple[int, tuple[int, int]]], seed: int = 0) -> Path:
    """Write ``images/<split>/*.jpg`` and ``annotations/<split>/*.png`` like ADEChallengeData2016.

    Raw labels follow ADE20K's convention (``reduce_zero_label``): 0 = unlabelled (a 2 px frame
    on odd images), 1 = background (grey), 2 = square (red), 3 = disk (blue), so the classes are
    learnable from colour alone.
    """
    rng = np.random.default_rng(seed)
    for split, (count, (h, w)) in splits.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        y, x = np.mgrid[0:h, 0:w]
        for i in range(count):
            label = np.ones((h, w), np.uint8)
            s, cy, cx = rng.integers(14, 24), rng.integers(0, h - 24), rng.integers(0, w - 24)
            label[cy:cy + s, cx:cx + s] = 2
            r, dy, dx = rng.integers(7, 12), rng.integers(12, h - 12), rng.integers(12, w - 12)
            label[(y - dy) ** 2 + (x - dx) ** 2 <= r * r] = 3
            if i % 2:
                label[:2], label[-2:], label[:, :2], label[:, -2:] = 0, 0, 0, 0
            colours = np.array([[128, 128, 128], [128, 128, 128], [220, 30, 30], [30, 30, 220]], np.float32)
            img = colours[label] + rng.normal(0, 12, (h, w, 3))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "images" / split / f"img_{i:03d}.jpg",
                                                                    quality=95)
            Image.fromarray(label, mode="L").save(root / "annotations" / split / f"img_{i:03d}.png")
    return root



def tiny_config_text(data_root: Path, max_iters: int = MAX_ITERS) -> str:
    """A config file inheriting the shipped ViT-B config and shrinking it (see module doc)."""
    return f"""
_base_ = [{str(B_CONFIG)!r}]
crop_size = (64, 64)
classes = {CLASSES!r}
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch=dict(_delete_=True, **{TINY_VIT!r}), img_size=64, out_indices=[0, 1, 2, 3], drop_path_rate=0.0),
    neck=dict(embed_dim=64),
    decode_head=dict(in_channels=[64, 64, 64, 64], channels=32, pool_scales=(1, 2), num_classes=3,
                     dropout_ratio=0.0),
    auxiliary_head=dict(in_channels=64, channels=16, num_classes=3, dropout_ratio=0.0),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(48, 48)))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
dataset = dict(type='ADELayoutDataset', data_root={str(data_root)!r}, metainfo=dict(classes=classes))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(dataset, pipeline=train_pipeline))
val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(dataset, pipeline=test_pipeline))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=2, end={max_iters}),
]
train_cfg = dict(max_iters={max_iters}, val_interval={max_iters})
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval={CKPT_INTERVAL}, max_keep_ckpts=-1))
env_cfg = dict(cudnn_benchmark=False)
randomness = dict(seed=0)
"""



@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore the previous number."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def unique_name() -> str:
    """An experiment name per Runner (MMEngine keys its logger and visualizer instances by it)."""
    return f"segtest{next(_run_ids)}"
