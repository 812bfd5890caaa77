"""``mae_transfer.speed``: the speed benchmark is part of the installed package (``bench-speed`` runs
from any folder), and its harness interleaves the sides of a comparison."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

import torch

import mae_transfer.speed
from mae_transfer.speed import PARTS
from mae_transfer.speed.cli import PART_MODULES
from mae_transfer.speed.harness import Case, interleave


def _console_script() -> str:
    return shutil.which("mae-transfer") or str(Path(sys.executable).parent / "mae-transfer")


def _outside_checkout(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``mae-transfer bench-speed ARGS`` in an empty folder, with nothing from the checkout on the path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([_console_script(), "bench-speed", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_bench_speed_help_works_from_an_empty_folder(tmp_path):
    proc = _outside_checkout(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "source checkout" not in proc.stdout + proc.stderr
    for flag in ("--parts", "--clock", "--rel-pos-impl", "--det-checkpointing", "--seg-batch"):
        assert flag in proc.stdout
    for part in PARTS:
        assert part in proc.stdout
    assert list(tmp_path.iterdir()) == []  # writes nothing where it runs


def test_bench_speed_measures_from_an_empty_folder(tmp_path):
    """The peak and data parts at toy sizes: the part modules are imported from the package and print rows."""
    proc = _outside_checkout(tmp_path, "--parts", "peak", "data", "--peak-size", "32", "--data-images", "2",
                             "--steps", "1", "--img-size", "32", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("matmul peak fp32:") for line in lines)
    assert any(line.startswith("matmul peak bf16:") for line in lines)
    row = next(line for line in lines if line.startswith("data (500x375 JPEG) fp32 decode+au"))
    assert "[s/round: " in row and "one process; a DataLoader runs one per worker" in row


def test_every_part_ships_in_the_installed_package():
    """A wheel carries what ``packages.find`` finds: the benchmark must be there, not in a checkout-only folder."""
    from setuptools import find_namespace_packages

    root = Path(__file__).resolve().parents[2]
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert "mae_transfer.speed" in find_namespace_packages(where=str(root), include=config["include"])
    package = Path(mae_transfer.speed.__file__).parent
    for module in ["harness", "peak", "cli", "mask_tokens", *(m.rsplit(".", 1)[1] for m in PART_MODULES.values())]:
        assert (package / f"{module}.py").is_file(), module


def test_interleave_alternates_the_cases_and_counts_flops_once():
    calls: list[str] = []
    w = torch.randn(8, 8)

    def step(name: str):
        def go() -> torch.Tensor:
            calls.append(name)
            return w @ w
        return go

    ours, base = Case("ours", step("ours"), images=4), Case("base", step("base"), images=4)
    interleave([ours, base], steps=3, warmup=2, device=torch.device("cpu"))
    # warm-up per case (the first call counted by the FLOP counter), then rounds ours, base, ours, base ...
    assert calls == ["ours", "ours", "base", "base"] + ["ours", "base"] * 3
    assert ours.flops == base.flops == 2 * 8**3
    assert len(ours.times) == len(base.times) == 3 and len(ours.peaks) == 3
    assert ours.img_s == 4 / ours.seconds


def test_json_summary_holds_the_keyed_rows_per_part_and_dtype(tmp_path):
    from mae_transfer.speed.harness import Report

    report = Report({"fp32": 1e9})
    ours, base = Case("ours", lambda: None, images=8, dtype="fp32"), Case("base", lambda: None, images=8, dtype="fp32")
    ours.times, base.times, ours.peaks, base.peaks = [2.0], [4.0], [2**20 * 30], [2**20 * 60]
    ours.flops = 4e9
    report.add("pretrain base", ours, base, key="pretrain")
    report.add("unkeyed", ours, base)
    summary = report.summary()
    assert list(summary) == ["pretrain"]
    row = summary["pretrain"]["fp32"]
    assert (row["ours"], row["baseline"], row["ratio"]) == (4.0, 2.0, 2.0)
    assert (row["ours_peak_mib"], row["baseline_peak_mib"]) == (30.0, 60.0)
    assert row["ours_peak_fraction"] == 2.0 and row["baseline_peak_fraction"] is None


def test_bench_speed_refuses_an_unwritable_json_path_before_measuring(tmp_path):
    proc = _outside_checkout(tmp_path, "--parts", "peak", "--peak-size", "32", "--json", str(tmp_path))
    assert proc.returncode == 2
    assert "--json file" in proc.stderr and "is a folder" in proc.stderr and "Traceback" not in proc.stderr
    assert "matmul peak" not in proc.stdout


def test_the_official_style_baseline_computes_our_mae_loss():
    """The pretrain baseline is the same computation as ours (it loads our weights strictly and gives
    the same loss for the same noise), so the comparison times two implementations of one step."""
    from mae_transfer.speed.pretrain import OfficialStyleMAE, official_adamw
    from pretrain import create_mae

    torch.manual_seed(0)
    ours = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                      decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    base = OfficialStyleMAE(32, 8, 32, 2, 2, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    base.load_state_dict(ours.state_dict(), strict=True)
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    torch.testing.assert_close(base(imgs, noise), ours(imgs, 0.75, noise=noise)[0], rtol=1e-5, atol=1e-6)
    groups = official_adamw(base, 1e-3).param_groups  # main_pretrain.py: no decay on 1-D parameters and biases
    assert all(p.ndim <= 1 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.05
