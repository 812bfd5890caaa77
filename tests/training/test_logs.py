"""What every trainer prints when stderr is not a terminal (nohup, SLURM, ``| tee``): one line per
epoch, from the run skeleton (``training.run.log_epoch``), with no colour codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def write_class_folders(root: Path, per_class: int) -> Path:
    for c in range(2):
        for i in range(per_class):
            path = root / f"class{c}" / f"img{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (36, 36), (200 * c, 50 + 10 * i, 100)).save(path)
    return root


def run_piped(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m mae_transfer ARGS`` with stdout and stderr pipes (not a terminal)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mae_transfer", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("trainer", ["pretrain", "finetune"])
def test_every_trainer_logs_each_epoch_when_stderr_is_a_pipe(tmp_path, trainer):
    out = tmp_path / "run"
    common = ["--output", str(out), "--img-size", "32", "--epochs", "2", "--warmup-epochs", "1", "--num-workers",
              "0", "--no-tensorboard", "--device", "cpu"]
    if trainer == "pretrain":
        data = write_class_folders(tmp_path / "images", 4)
        args = ["pretrain", "--data", str(data), "--batch-size", "4", "--model", "mae_vit_tiny_patch16",
                "--model-kwargs", json.dumps({"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8}),
                "--decoder-depth", "1", "--decoder-dim", "32", "--decoder-heads", "2", "--vis-every", "0", *common]
    else:
        data = tmp_path / "data"
        write_class_folders(data / "train", 4)
        write_class_folders(data / "val", 2)
        args = ["finetune", "--data", str(data), "--batch-size", "4", "--model", "vit_tiny_patch16",
                "--model-kwargs", json.dumps({"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8}),
                "--eval-every", "2", *common]
    proc = run_piped(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for epoch in (1, 2):
        assert f"epoch {epoch}/2: loss " in proc.stderr, proc.stderr[-3000:]
    assert "\x1b[" not in proc.stderr + proc.stdout
