"""Fixtures of the detection tests (the helpers live in ``det_helpers.py``)."""
from __future__ import annotations

from pathlib import Path

import pytest

from det_helpers import write_tiny_coco


@pytest.fixture(autouse=True, scope="module")
def _no_onednn():
    """oneDNN builds a kernel for every new convolution shape, and ROI heads see a new number of
    boxes every step: on a 2-core CPU the plain kernels run these tiny models faster. Per module,
    restored after, so tests elsewhere are unaffected."""
    import torch

    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = before


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory) -> tuple[Path, Path]:
    """(json, image folder) of the tiny dataset, written once per session."""
    return write_tiny_coco(tmp_path_factory.mktemp("tiny_coco"))


@pytest.fixture(autouse=True)
def _fresh_detectron2_logging():
    """Each ``detect`` run adds console and file handlers to Detectron2's loggers, the console one on
    that test's captured stdout: take them off after the test, as the next run in a process does."""
    yield
    import sys

    if "detection.engine" in sys.modules:
        sys.modules["detection.engine"].reset_detectron2_logging()
