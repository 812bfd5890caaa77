"""The evaluation path of ``mae-transfer segment test`` on known answers: a model that predicts the
ground truth scores mIoU 100; one that never predicts a class scores IoU 0 for it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.structures import PixelData
from mmseg.models.segmentors.base import BaseSegmentor
from mmseg.registry import MODELS

from mae_transfer.cli import main
from seg_helpers import CLASSES, unique_name


@MODELS.register_module(force=True)
class GroundTruthSegmentor(BaseSegmentor):
    """Predicts each image's ground-truth label map, with class ``drop`` (if any) predicted as
    ``instead``: what a perfect (or a one-class-blind) model outputs. One parameter, so that a
    checkpoint of it can be saved and loaded."""

    def __init__(self, data_preprocessor=None, drop: int | None = None, instead: int = 0, init_cfg=None):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.drop, self.instead = drop, instead

    def predict(self, inputs, data_samples):
        for sample in data_samples:
            label = sample.gt_sem_seg.data.clone()
            if self.drop is not None:
                label[label == self.drop] = self.instead
            sample.set_data({"pred_sem_seg": PixelData(data=label)})
        return data_samples

    def extract_feat(self, inputs):
        return inputs

    def encode_decode(self, inputs, batch_data_samples):
        raise NotImplementedError("ground truth only: see predict")

    def loss(self, inputs, data_samples):
        raise NotImplementedError("ground truth only: nothing to train")

    def _forward(self, inputs, data_samples=None):
        return inputs


def _test(tiny_config: Path, tmp_path: Path, capsys, **model) -> dict[str, float]:
    """``segment test`` of a ``GroundTruthSegmentor`` through the CLI; class -> IoU, plus ``mIoU``."""
    cfg = Config.fromfile(str(tiny_config))
    cfg.model = dict(type="GroundTruthSegmentor", data_preprocessor=cfg.model.data_preprocessor, **model)
    config = tmp_path / "gt_segmentor.py"
    cfg.dump(str(config))
    checkpoint = tmp_path / "gt.pth"
    torch.save({"state_dict": {"anchor": torch.zeros(1)}, "meta": {}}, checkpoint)
    rc = main(["segment", "test", str(config), str(checkpoint), "--work-dir", str(tmp_path / "test"),
               "--cfg-options", f"experiment_name={unique_name()}"])
    assert rc == 0
    out = capsys.readouterr().out.splitlines()
    found = {line.split()[0]: float(line.split()[1]) for line in out[-4:-1]}
    assert list(found) == list(CLASSES)
    return {**found, "mIoU": float(out[-1].split()[1])}


def test_ground_truth_predictions_score_miou_100(tiny_config, tmp_path, capsys):
    assert _test(tiny_config, tmp_path, capsys) == {**{c: 100.0 for c in CLASSES}, "mIoU": 100.0}


def test_a_class_never_predicted_has_iou_0(tiny_config, tmp_path, capsys):
    found = _test(tiny_config, tmp_path, capsys, drop=2, instead=0)  # disks predicted as background
    assert found["disk"] == 0.0 and found["square"] == 100.0
    assert 0.0 < found["background"] < 100.0  # the disks' pixels are false positives of the background
    assert found["mIoU"] == pytest.approx((found["background"] + 100.0) / 3, abs=0.01)
