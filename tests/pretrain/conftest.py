"""Fixtures of the pretraining tests: a tiny MAE, a small image folder, tiny run options."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain import MaskedAutoencoderViT, PretrainConfig, create_mae, make_config

# 32 px images, 8 px patches: a 4x4 grid; two 32-wide encoder blocks, one 32-wide decoder block
TINY_MODEL: dict[str, Any] = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                                  decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
TINY_RUN: dict[str, Any] = dict(
    model="mae_vit_tiny_patch16", img_size=32, model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
    decoder_depth=1, decoder_dim=32, decoder_heads=2, batch_size=4, num_workers=0, tensorboard=False, progress=False,
    vis_every=0, epochs=2, warmup_epochs=0, lr=1e-3, log_every=1, save_every=1,
)


def write_images(folder: Path, count: int, size: tuple[int, int] = (36, 40), seed: int = 0) -> list[Path]:
    """Two-colour linear ramps in random directions (learnable from the visible patches),
    split over two class folders."""
    rng = np.random.default_rng(seed)
    paths = []
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    for i in range(count):
        a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        angle = rng.uniform(0, 2 * np.pi)
        t = ((np.cos(angle) * x + np.sin(angle) * y) / (1.25 * max(h, w)) + 0.5).clip(0, 1)[..., None]
        img = a * (1 - t) + b * t
        path = folder / f"class{i % 2}" / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def make_images() -> Callable[..., list[Path]]:
    """``write_images(folder, count, size=(h, w), seed=0)`` as a fixture."""
    return write_images


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """16 readable PNGs in two class folders."""
    root = tmp_path / "images"
    write_images(root, 16)
    return root


@pytest.fixture
def tiny_mae() -> Callable[..., MaskedAutoencoderViT]:
    def make(**overrides: Any) -> MaskedAutoencoderViT:
        return create_mae("mae_vit_tiny_patch16", **{**TINY_MODEL, **overrides})

    return make


@pytest.fixture
def tiny_config() -> Callable[..., PretrainConfig]:
    def make(data: Path, output: Path, **overrides: Any) -> PretrainConfig:
        return make_config({**TINY_RUN, "data": str(data), "output": str(output), **overrides})

    return make


def _assert_weights_close(a: dict, b: dict, rtol: float = 1e-4, atol: float = 2e-5) -> None:
    """State dicts equal up to float rounding.

    The key third of every ``attn.qkv.bias`` is left out: softmax ignores a constant added to all
    scores, so its true gradient is 0 and what it gets is rounding noise, which Adam scales up
    to lr-sized steps that differ between two equivalent runs.
    """
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attn.qkv.bias"):
            d = x.shape[0] // 3
            x, y = torch.cat([x[:d], x[2 * d :]]), torch.cat([y[:d], y[2 * d :]])
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture
def assert_weights_close() -> Callable[..., None]:
    return _assert_weights_close
