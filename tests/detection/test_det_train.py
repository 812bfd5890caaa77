"""End to end through ``mae-transfer detect``: Mask R-CNN on our ViTDet backbone trains with
falling loss, evaluates to COCO AP, resumes, evaluates again and draws predictions."""
from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path
from statistics import mean

import numpy as np
import pytest
from PIL import Image

from mae_transfer.cli import main

TINY = str(Path(__file__).parent / "configs" / "tiny_mask_rcnn_vitdet.py")  # 12 iterations, checkpoint every 6


def _register(tiny_coco) -> list[str]:
    json_file, images = (str(p) for p in tiny_coco)
    return ["--register-coco", "tiny_train", json_file, images, "--register-coco", "tiny_val", json_file, images]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_coco) -> Path:
    out = tmp_path_factory.mktemp("det_train")
    assert main(["detect", "train", TINY, "--output", str(out), *_register(tiny_coco)]) == 0
    return out


def test_training_loss_falls(trained):
    losses = [row["total_loss"] for row in _metrics(trained) if "total_loss" in row]
    assert len(losses) == 12
    assert mean(losses[-3:]) < 0.95 * mean(losses[:3]), losses


def test_training_writes_checkpoints_logs_and_a_coco_evaluation(trained):
    final = [row for row in _metrics(trained) if "bbox/AP" in row][-1]
    assert final["iteration"] == 12  # the evaluation after the last of 12 iterations
    for task in ("bbox", "segm"):  # both tasks evaluated, every class scored (a NaN: nothing evaluated)
        for key in ("AP", "AP50", "AP75", "AP-square", "AP-triangle"):
            assert math.isfinite(final[f"{task}/{key}"]), (task, key)
    names = {p.name for p in trained.iterdir()}
    assert {"model_0000005.pth", "model_final.pth", "last_checkpoint", "config.yaml", "log.txt"} <= names
    assert "config.yaml.pkl" not in names  # the config serializes as yaml
    assert any(n.startswith("events.out.tfevents") for n in names)  # TensorBoard
    assert "eta:" in (trained / "log.txt").read_text()  # progress with ETA


def test_resume_continues_from_the_last_checkpoint(trained, tiny_coco, tmp_path):
    out = shutil.copytree(trained, tmp_path / "resumed")
    assert main(["detect", "train", TINY, "train.max_iter=13", "--resume", "--output", str(out),
                 *_register(tiny_coco)]) == 0
    iterations = [row["iteration"] for row in _metrics(out) if "total_loss" in row]
    assert iterations == list(range(13))  # 0..11 from the first run, then 12 only
    log = (out / "log.txt").read_text()
    assert f"Loading from {out / 'model_final.pth'}" in log and "Starting training from iteration 12" in log


def test_eval_command_reports_box_and_mask_ap(trained, tiny_coco, tmp_path):
    assert main(["detect", "eval", TINY, "--weights", str(trained / "model_final.pth"), "--output", str(tmp_path),
                 *_register(tiny_coco)]) == 0
    results = json.loads((tmp_path / "eval_results.json").read_text())
    final = [row for row in _metrics(trained) if "bbox/AP" in row][-1]
    assert results["bbox"]["AP"] == pytest.approx(final["bbox/AP"])
    assert results["segm"]["AP"] == pytest.approx(final["segm/AP"])


def test_infer_draws_predictions_on_the_image(trained, tiny_coco, tmp_path, capsys):
    image = tiny_coco[1] / "000.png"
    out = tmp_path / "pred.png"
    assert main(["detect", "infer", TINY, str(image), "--weights", str(trained / "model_final.pth"), "--out",
                 str(out), "--threshold", "0.0", *_register(tiny_coco)]) == 0
    assert "detections with score >= 0.0 drawn to" in capsys.readouterr().out
    drawn = np.asarray(Image.open(out).convert("RGB"))
    assert drawn.shape == (64, 64, 3)
    assert not np.array_equal(drawn, np.asarray(Image.open(image).convert("RGB")))


def test_pkl_weights_need_the_trust_flag(trained, tiny_coco, tmp_path, capsys):
    path = tmp_path / "zoo.pkl"
    path.write_bytes(pickle.dumps({"model": {}, "__author__": "someone"}))
    assert main(["detect", "eval", TINY, "--weights", str(path), "--output", str(tmp_path),
                 *_register(tiny_coco)]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
