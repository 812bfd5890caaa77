"""The COCO evaluation path of ``mae-transfer detect eval`` on known answers: a model that predicts
the ground truth scores AP 100, one that misses a class scores its share, one that detects nothing
scores 0 with the reason, never a traceback or a missing ``segm`` entry."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig

from det_helpers import ground_truth_detector
from mae_transfer.cli import main

TINY = str(Path(__file__).parent / "configs" / "tiny_mask_rcnn_vitdet.py")


def _eval(tmp_path: Path, tiny_coco, classes) -> tuple[int, dict]:
    """``detect eval`` of ``ground_truth_detector(tiny_val, classes)`` through the CLI, in this process."""
    cfg = LazyConfig.load(TINY)
    cfg.model = L(ground_truth_detector)(dataset="tiny_val", classes=classes)
    config = tmp_path / "gt_detector.yaml"
    LazyConfig.save(cfg, str(config))
    weights = tmp_path / "gt.pth"
    torch.save({"model": {"anchor": torch.zeros(1)}}, weights)
    json_file, images = (str(p) for p in tiny_coco)
    out = tmp_path / "eval"
    code = main(["detect", "eval", str(config), "--weights", str(weights), "--output", str(out),
                 "--register-coco", "tiny_train", json_file, images, "--register-coco", "tiny_val", json_file, images])
    return code, json.loads((out / "eval_results.json").read_text()) if code == 0 else {}


def test_ground_truth_predictions_score_ap_100_for_boxes_and_masks(tmp_path, tiny_coco):
    code, results = _eval(tmp_path, tiny_coco, None)
    assert code == 0
    for task in ("bbox", "segm"):
        assert results[task]["AP"] == pytest.approx(100.0), task
        assert results[task]["AP-square"] == pytest.approx(100.0) and results[task]["AP-triangle"] == pytest.approx(100.0)
    assert "notes" not in results


def test_a_class_never_predicted_scores_zero_and_halves_the_mean(tmp_path, tiny_coco):
    code, results = _eval(tmp_path, tiny_coco, (0,))  # squares only
    assert code == 0
    for task in ("bbox", "segm"):
        assert results[task]["AP-square"] == pytest.approx(100.0)
        assert results[task]["AP-triangle"] == pytest.approx(0.0)
        assert results[task]["AP"] == pytest.approx(50.0)


def test_no_detections_give_ap_0_for_both_tasks_with_the_reason(tmp_path, tiny_coco, capsys):
    """Detectron2's own evaluator returns only a NaN ``bbox`` entry here (no ``segm``): the demo
    crashed on it with ``KeyError: 'segm'``."""
    code, results = _eval(tmp_path, tiny_coco, ())
    assert code == 0
    for task in ("bbox", "segm"):
        assert results[task]["AP"] == 0.0 and results[task]["AP50"] == 0.0
        assert results[task]["AP-square"] == 0.0 and results[task]["AP-triangle"] == 0.0
        assert math.isnan(results[task]["APl"])  # the tiny images hold no object of COCO's large area range
        assert results["notes"][task] == "no detections above the model's test score threshold"
    assert "Traceback" not in capsys.readouterr().err
