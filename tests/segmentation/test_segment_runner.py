"""``mae-transfer segment train|test|infer`` through MMEngine's Runner on a tiny ADE-layout dataset.

One training run (session fixture, through the CLI) is shared: 16 iterations, checkpoints at 8
and 16, validation at the end.  The other tests test, infer and resume from its files.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mmcv
import numpy as np
import pytest
import torch
from PIL import Image

from mae_transfer.cli import main
from segmentation.engine import ConfigError, enable_amp, infer, load_config

from seg_helpers import CKPT_INTERVAL, CLASSES, MAX_ITERS, torch_threads, unique_name
from unsafe_pickle import unsafe_mmengine_checkpoint


def _scalars(work_dir: Path) -> list[dict]:
    (path,) = work_dir.glob("*/vis_data/scalars.json")
    return [json.loads(line) for line in path.read_text().splitlines()]


def _palette(work_dir: Path) -> list:
    return torch.load(work_dir / f"iter_{MAX_ITERS}.pth", weights_only=True)["meta"]["dataset_meta"]["palette"]


@pytest.fixture(scope="session")
def trained(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work_dir = tmp_path_factory.mktemp("segment_train")
    with torch_threads(1):  # a session fixture is set up before the function-scoped autouse one
        rc = main(["segment", "train", str(tiny_config), "--work-dir", str(work_dir),
                   "--cfg-options", f"experiment_name={unique_name()}"])
    assert rc == 0
    return work_dir


# --------------------------------------------------------------------------- train
def test_training_loss_falls_and_validation_gives_miou(trained):
    rows = _scalars(trained)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == MAX_ITERS
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.05, losses
    (val,) = [r for r in rows if "mIoU" in r]
    assert set(val) >= {"aAcc", "mIoU", "mAcc"} and val["aAcc"] > 50
    assert list(trained.glob("*/vis_data/events.out.tfevents.*")), "no TensorBoard event file"


def test_checkpoints_load_under_weights_only(trained):
    ckpt = torch.load(trained / f"iter_{MAX_ITERS}.pth", weights_only=True)  # no allow-list
    assert ckpt["meta"]["iter"] == MAX_ITERS
    assert ckpt["meta"]["dataset_meta"]["classes"] == CLASSES
    assert "backbone.vit.blocks.3.attn.qkv.weight" in ckpt["state_dict"]
    assert {"message_hub", "optimizer", "param_schedulers"} <= set(ckpt)


def test_resume_equals_uninterrupted_training(trained, tiny_config, tmp_path):
    """`--resume` from iteration 8 reaches iteration 16's weights bit for bit.

    Exact because the tiny config has no dropout / drop path (no model randomness between the two
    runs) and MMEngine replays the data loader up to the resumed iteration under the same seed.
    """
    shutil.copy(trained / f"iter_{CKPT_INTERVAL}.pth", tmp_path / f"iter_{CKPT_INTERVAL}.pth")
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / f"iter_{CKPT_INTERVAL}.pth"))
    rc = main(["segment", "train", str(tiny_config), "--work-dir", str(tmp_path), "--resume",
               "--cfg-options", f"experiment_name={unique_name()}", "train_cfg.val_interval=1000"])
    assert rc == 0
    full = torch.load(trained / f"iter_{MAX_ITERS}.pth", weights_only=True)
    resumed = torch.load(tmp_path / f"iter_{MAX_ITERS}.pth", weights_only=True)
    assert resumed["state_dict"].keys() == full["state_dict"].keys()
    for key, value in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)
    losses = [r["loss"] for r in _scalars(tmp_path) if "loss" in r]
    assert losses == pytest.approx([r["loss"] for r in _scalars(trained) if "loss" in r][CKPT_INTERVAL:])


# --------------------------------------------------------------------------- test / infer
def test_segment_test_prints_miou_and_the_class_table(trained, tiny_config, capsys):
    rc = main(["segment", "test", str(tiny_config), str(trained / f"iter_{MAX_ITERS}.pth"),
               "--work-dir", str(trained / "test"), "--cfg-options", f"experiment_name={unique_name()}"])
    assert rc == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-5].split() == ["class", "IoU", "Acc"]
    assert [line.split()[0] for line in out[-4:-1]] == list(CLASSES)
    assert out[-1].startswith("mIoU: ") and "mAcc: " in out[-1] and "aAcc: " in out[-1]
    miou = float(out[-1].split()[1])
    assert miou == pytest.approx(np.nanmean([float(line.split()[1]) for line in out[-4:-1]]), abs=0.01)
    val = [r for r in _scalars(trained) if "mIoU" in r][0]
    assert miou == pytest.approx(val["mIoU"], abs=0.01)  # the validation after training: same model and data


def test_infer_writes_a_colour_overlay(trained, tiny_config, ade_root, tmp_path, capsys):
    image = ade_root / "images" / "validation" / "img_001.jpg"
    out = tmp_path / "overlay.png"
    rc = main(["segment", "infer", str(tiny_config), str(trained / f"iter_{MAX_ITERS}.pth"), str(image),
               "--out", str(out), "--device", "cpu"])
    assert rc == 0 and f"wrote {out} (96x64)" in capsys.readouterr().out
    result = infer(load_config(tiny_config), str(trained / f"iter_{MAX_ITERS}.pth"), str(image),
                   str(tmp_path / "again.png"), device="cpu", opacity=0.5)
    overlay = np.asarray(Image.open(out))
    rgb = mmcv.imread(str(image))[..., ::-1].astype(np.float32)
    palette = np.asarray(_palette(trained), np.float32)
    assert overlay.shape == (64, 96, 3) and result.pred.shape == (64, 96)
    assert set(np.unique(result.pred)) <= {0, 1, 2}
    np.testing.assert_allclose(overlay, np.clip((rgb * 0.5 + palette[result.pred] * 0.5).round(), 0, 255), atol=1)
    assert abs(sum(result.shares.values()) - 100) < 1e-6


# --------------------------------------------------------------------------- refusals and errors
def test_malicious_checkpoints_are_refused(tiny_config, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = unsafe_mmengine_checkpoint(tmp_path / "evil.pth", marker)
    rc = main(["segment", "test", str(tiny_config), str(evil), "--work-dir", str(tmp_path / "t"),
               "--cfg-options", f"experiment_name={unique_name()}"])
    assert rc == 2 and "refused to load" in capsys.readouterr().err
    rc = main(["segment", "train", str(tiny_config), "--work-dir", str(tmp_path / "p"),
               "--cfg-options", f"experiment_name={unique_name()}", f"model.pretrained={evil}"])
    err = capsys.readouterr().err
    assert rc == 2 and "refused to load" in err and "evil.pth" in err
    assert not marker.exists()


def test_config_typos_and_bad_data_are_errors_that_say_so(tiny_config, tmp_path, capsys):
    rc = main(["segment", "train", str(tiny_config), "--cfg-options", "optim_wraper.optimizer.lr=0.1"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown top-level key 'optim_wraper'" in err and "did you mean 'optim_wrapper'" in err
    rc = main(["segment", "train", str(tiny_config), "--work-dir", str(tmp_path), "--data-root", str(tmp_path / "no"),
               "--cfg-options", f"experiment_name={unique_name()}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{tmp_path}/no/images/training does not exist" in err
    rc = main(["segment", "infer", str(tiny_config), str(tmp_path / "none.pth"), "x.jpg", "--out", "y.png"])
    assert rc == 2 and "no such checkpoint file" in capsys.readouterr().err


def test_amp_switches_the_optim_wrapper_or_says_it_needs_a_gpu(tiny_config):
    cfg = load_config(tiny_config)
    if torch.cuda.is_available():
        enable_amp(cfg, "bfloat16")
        assert cfg.optim_wrapper.type == "AmpOptimWrapper" and cfg.optim_wrapper.dtype == "bfloat16"
    else:
        with pytest.raises(ConfigError, match="--amp needs a GPU"):
            enable_amp(cfg)
        assert cfg.optim_wrapper.type == "OptimWrapper"


# --------------------------------------------------------------------------- distributed
def test_distributed_training_through_torchrun(tiny_config, tmp_path):
    """Two processes through the standard launcher (gloo and per-process BN on a CPU machine)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mae_transfer", "segment", "train", str(tiny_config), "--work-dir", str(tmp_path),
           "--cfg-options", "train_cfg.max_iters=2", "train_cfg.val_interval=100", "default_hooks.checkpoint.interval=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Distributed launcher: pytorch" in log and "Distributed training: True" in log
    assert log.count("trained to iteration 2") == 1  # printed by rank 0 only
    ckpt = torch.load(tmp_path / "iter_2.pth", weights_only=True)
    assert ckpt["meta"]["iter"] == 2 and not any(k.startswith("module.") for k in ckpt["state_dict"])
