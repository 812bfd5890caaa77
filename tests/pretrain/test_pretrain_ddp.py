"""Two processes under torchrun (gloo, CPU) train exactly like one process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mae_backbone import safe_torch_load
from mae_transfer.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY_FLAGS = ["--model", "mae_vit_tiny_patch16", "--img-size", "32",
              "--model-kwargs", '{"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8}',
              "--decoder-depth", "1", "--decoder-dim", "32", "--decoder-heads", "2", "--num-workers", "0",
              "--no-tensorboard", "--no-progress", "--vis-every", "0", "--epochs", "2", "--warmup-epochs", "1",
              "--lr", "2e-3", "--log-every", "1", "--masking", "block", "--mask-ratio", "0.6"]


def step_losses(output: Path) -> list[float]:
    rows = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "step"]


def test_two_process_ddp_matches_one_process(tmp_path, image_folder, assert_weights_close):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["pretrain", "--data", str(image_folder), "--output", str(one), "--batch-size", "4", *TINY_FLAGS]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mae_transfer", "pretrain", "--data", str(image_folder), "--output", str(two),
           "--batch-size", "2", "--dist-backend", "gloo", *TINY_FLAGS]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()][0]
    assert run["world_size"] == 2 and run["effective_batch"] == 4
    a, b = step_losses(one), step_losses(two)
    assert len(a) == len(b) == 8
    assert b == pytest.approx(a, rel=1e-6, abs=1e-6)
    wa, wb = safe_torch_load(one / "checkpoint.pth")["model"], safe_torch_load(two / "checkpoint.pth")["model"]
    assert_weights_close(wa, wb)
