"""Fixtures of the classification tests: one thread, a small dataset, a tiny encoder checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from cls_helpers import TINY_VIT, write_dataset


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """4 classes, 12 train (PNG) + 6 val (JPEG) images each."""
    return write_dataset(tmp_path / "data")


@pytest.fixture
def make_dataset() -> Callable[..., Path]:
    return write_dataset


@pytest.fixture
def encoder_checkpoint(tmp_path: Path) -> Path:
    """A tiny randomly initialized ViT encoder saved in our format (arch + overrides in its metadata)."""
    import torch

    from mae_backbone import create_vit
    from mae_backbone.checkpoint import save_checkpoint

    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16", img_size=32, **TINY_VIT)
    path = tmp_path / "encoder.safetensors"
    save_checkpoint(vit, path, {"arch": "vit_tiny_patch16", "arch_overrides": TINY_VIT})
    return path
