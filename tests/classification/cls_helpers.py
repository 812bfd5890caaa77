"""Helpers of the classification tests: a small real-format class-folder dataset and tiny run options."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# A tiny ViT: 32 px images, 8 px patches (4x4 grid), 2 blocks 32 wide.
TINY_VIT: dict[str, Any] = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8)
CLASSES = ("red_stripes", "green_checks", "blue_dots", "gray_gradient")


def draw(kind: int, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """One image [size, size, 3] uint8 of class ``kind``: colour and texture both tell it."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    period = rng.uniform(6, 10)
    phase = rng.uniform(0, period)
    if kind == 0:  # red horizontal stripes
        pattern = (np.sin(2 * np.pi * (y + phase) / period) > 0).astype(float)
        colour = np.array([0.9, 0.15, 0.1])
    elif kind == 1:  # green checkerboard
        pattern = (((x + phase) // (period / 2) + (y + phase) // (period / 2)) % 2).astype(float)
        colour = np.array([0.1, 0.85, 0.2])
    elif kind == 2:  # blue dots
        pattern = ((np.hypot((x + phase) % period - period / 2, (y + phase) % period - period / 2)) < period / 4)
        pattern = pattern.astype(float)
        colour = np.array([0.1, 0.2, 0.95])
    else:  # gray diagonal gradient
        pattern = ((x + y) / (2 * size) + rng.uniform(-0.1, 0.1)).clip(0, 1)
        colour = np.array([0.6, 0.6, 0.6])
    base = rng.uniform(0.0, 0.15)
    img = base + pattern[..., None] * colour * rng.uniform(0.75, 1.0)
    img = img + rng.normal(0, 0.03, img.shape)
    return (img.clip(0, 1) * 255).astype(np.uint8)


def write_dataset(root: Path, per_class: tuple[int, int] = (12, 6), classes: tuple[str, ...] = CLASSES,
                  seed: int = 0) -> Path:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.jpg`` (real formats, 40 px)."""
    rng = np.random.default_rng(seed)
    for split, count, ext in (("train", per_class[0], "png"), ("val", per_class[1], "jpg")):
        for kind, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(draw(kind % 4, rng)).save(folder / f"{name}_{i:03d}.{ext}", quality=95)
    return root


def tiny_run(data: Path, output: Path, checkpoint: Path | None, **overrides: Any) -> dict[str, Any]:
    """Options of a test-sized run."""
    opts: dict[str, Any] = dict(data=str(data), output=str(output), img_size=32, batch_size=8, epochs=2,
                                warmup_epochs=0, num_workers=0, tensorboard=False, progress=False, log_every=1)
    if checkpoint is not None:
        opts["checkpoint"] = str(checkpoint)
    opts.update(overrides)
    return opts
