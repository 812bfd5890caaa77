"""Fixtures of the segmentation tests (the helpers live in ``seg_helpers.py``)."""
from __future__ import annotations

from pathlib import Path

import pytest

from seg_helpers import tiny_config_text, write_ade_layout


@pytest.fixture(scope="session")
def ade_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 training images 64x64, 2 validation images 64x96 (non-square: two slide windows)."""
    return write_ade_layout(tmp_path_factory.mktemp("ade") / "ADEChallengeData2016",
                            {"training": (6, (64, 64)), "validation": (2, (64, 96))})


@pytest.fixture(scope="session")
def tiny_config(ade_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny config file (see ``seg_helpers.tiny_config_text``)."""
    path = tmp_path_factory.mktemp("configs") / "upernet-tiny-vit_1xb2-16it_ade-layout-64x64.py"
    path.write_text(tiny_config_text(ade_root))
    return path
