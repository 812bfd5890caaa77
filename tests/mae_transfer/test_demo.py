"""The demo's runner: progress, failed stages, Ctrl-C, and what the report embeds."""
from __future__ import annotations

import json
import re

import pytest

from mae_transfer.demo import STAGES, DemoContext, DemoPlan, run_demo
from mae_transfer.demo.figures import plot_curves
from mae_transfer.runners import Arch, checkpoint_arch


def _record(task, mae, random):
    """A stage that records ``mae`` / ``random`` (a value, or a list of one value per seed)."""
    def stage(ctx: DemoContext) -> None:
        key = f"{task}:top-1" if task != "detect" else "detect:AP box"
        ctx.results[key] = {init: v if isinstance(v, list) else [v] for init, v in (("mae", mae), ("random", random))}
        ctx.figures[f"{task}: training loss"] = plot_curves(
            {"MAE": [(1.0, 2.0), (2.0, 1.0)], "random init": [(1.0, 2.0), (2.0, 1.5)]}, task, "epoch",
            ctx.out / "figures" / f"{task}_loss.png")
    return stage


def _boom(ctx: DemoContext) -> None:
    raise RuntimeError("segmentation exploded\nsecond line")


def _interrupt(ctx: DemoContext) -> None:
    raise KeyboardInterrupt


def test_failed_stage_is_reported_and_the_others_still_run(tmp_path):
    stages = {"finetune": ("fine-tuning", _record("finetune", 61.5, 40.25), 1),
              "segment": ("segmentation", _boom, 1),
              "linprobe": ("linear probing", _record("linprobe", 55.0, 30.0), 1)}
    lines = []
    ctx = run_demo(tmp_path, stages=stages, log=lines.append)
    assert ctx.errors == {"segment": "RuntimeError: segmentation exploded"}
    assert ctx.results["linprobe:top-1"] == {"mae": [55.0], "random": [30.0]}  # ran after the failure
    report = (tmp_path / "report.md").read_text()
    assert "| segmentation | **failed** | `RuntimeError: segmentation exploded` |" in report
    assert "| fine-tuning | top-1 (%) | 61.50 | 40.25 | one seed | MAE higher (one seed: no spread measured) |" in report
    assert "| linear probing | top-1 (%) | 55.00 | 30.00 | one seed | MAE higher (one seed: no spread measured) |" in report
    assert "Interrupted" not in report
    assert "Traceback" in (tmp_path / "error_segment.txt").read_text()
    assert any("FAILED" in line and "segmentation" in line for line in lines)
    # progress lines name the stage, its number and an ETA
    assert re.search(r"\[2/3\] segmentation \.\.\. \(elapsed \d+ s, ETA \d+ s\)", "\n".join(lines))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["finished"] is True and saved["errors"]["segment"].startswith("RuntimeError")


def test_ctrl_c_writes_the_report_of_what_finished(tmp_path):
    stages = {"finetune": ("fine-tuning", _record("finetune", 70.0, 35.0), 1),
              "detect": ("detection", _interrupt, 1),
              "linprobe": ("linear probing", _record("linprobe", 1.0, 2.0), 1)}
    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path, stages=stages, log=lambda s: None)
    report = (tmp_path / "report.md").read_text()
    assert report.count("**Interrupted**") == 1
    assert "| fine-tuning | top-1 (%) | 70.00 | 35.00 | one seed |" in report
    assert "linear probing" not in report.split("## Timings")[0]  # never started
    assert json.loads((tmp_path / "results.json").read_text())["finished"] is False


def test_report_embeds_existing_pngs_and_the_results_chart(tmp_path):
    stages = {"finetune": ("fine-tuning", _record("finetune", 50.0, 50.0), 1),
              "detect": ("detection", _record("detect", 3.0, 4.0), 1)}
    run_demo(tmp_path, stages=stages, log=lambda s: None)
    report = (tmp_path / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert "figures/results.png" in images and "figures/finetune_loss.png" in images
    for rel in images:
        assert (tmp_path / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| fine-tuning | top-1 (%) | 50.00 | 50.00 | one seed | tie (one seed: no spread measured) |" in report
    assert "| detection | AP box | 3.00 | 4.00 | one seed | random init higher (one seed: no spread measured) |" in report


@pytest.mark.parametrize("mae, random, expected", [
    # means 60 vs 50, stds 1 and 1: the gap 10 exceeds the spread 2
    ([59.0, 60.0, 61.0], [49.0, 50.0, 51.0], "**MAE ahead** by 10.00 (> spread 2.00)"),
    # means 52 vs 50, stds 3 and 1: the gap 2 is inside the spread 4, whatever the order of the means
    ([49.0, 52.0, 55.0], [49.0, 50.0, 51.0], "within the seed spread (2.00 <= 4.00)"),
    ([30.0, 30.0, 30.0], [40.0, 41.0, 42.0], "**random init ahead** by 11.00 (> spread 1.00)"),
    ([float("nan")], [1.0], "n.a."),
])
def test_verdict_calls_an_init_ahead_only_beyond_the_seed_spread(mae, random, expected):
    from mae_transfer.demo.report import cell_text, verdict

    assert verdict(mae, random) == expected
    assert cell_text([59.0, 60.0, 61.0]) == "60.00 ± 1.00" and cell_text([61.5]) == "61.50"
    assert cell_text([float("nan")]) == "n.a."


def test_report_shows_mean_std_over_seeds_and_the_reason_of_a_zero(tmp_path):
    def detect(ctx: DemoContext) -> None:
        ctx.results["detect:AP box"] = {"mae": [2.5], "random": [0.0]}
        ctx.notes["detect:AP box"] = {"random": "no detections above the model's test score threshold"}

    stages = {"linprobe": ("linear probing", _record("linprobe", [59.0, 60.0, 61.0], [49.0, 50.0, 51.0]), 1),
              "detect": ("detection", detect, 1)}
    run_demo(tmp_path, stages=stages, log=lambda s: None)
    report = (tmp_path / "report.md").read_text()
    assert ("| linear probing | top-1 (%) | 60.00 ± 1.00 | 50.00 ± 1.00 | 3 seeds | "
            "**MAE ahead** by 10.00 (> spread 2.00) |") in report
    assert ("| detection | AP box | 2.50 | 0.00 | one seed | MAE higher (one seed: no spread measured) "
            "(random init: no detections above the model's test score threshold) |") in report


def test_demo_stages_and_quick_plan():
    assert list(STAGES) == ["data", "pretrain", "finetune", "linprobe", "partial", "segment", "detect"]
    quick, full = DemoPlan.make(True), DemoPlan.make(False)
    assert quick.pretrain_epochs < full.pretrain_epochs
    assert quick.recipe.det_iters < full.recipe.det_iters and quick.recipe.seg_iters < full.recipe.seg_iters
    # MAE and random init share one recipe object: only the checkpoint differs
    assert full.recipe.layer_decay("detect", _bb()) == full.recipe.layer_decay("detect", _bb("x.safetensors"))


def _bb(path=None):
    from pathlib import Path

    from mae_transfer.runners import Backbone

    return Backbone("b", Path(path) if path else None)


def test_checkpoint_arch_reads_overrides_and_sizes(tmp_path):
    from mae_backbone import create_vit
    from mae_backbone.checkpoint import save_checkpoint

    small = tmp_path / "small.safetensors"
    save_checkpoint(create_vit("vit_tiny_patch16", depth=2, patch_size=8, img_size=32), small)
    arch = checkpoint_arch(small)
    assert arch == Arch.make("vit_tiny_patch16", depth=2, patch_size=8)
    assert arch.size is None and arch.dims["depth"] == 2
    assert Arch.make("vit_base_patch16").size == "B" and Arch.make("vit_base_patch16", depth=6).size is None


def test_a_relative_output_folder_works_like_make_demo(tmp_path, monkeypatch):
    """``make demo`` runs ``mae-transfer demo`` with the relative default ``demo_output``: the real data
    and pretraining stages must find their files from there (a relative image list was once read
    relative to itself, and every image went missing)."""
    from dataclasses import replace

    monkeypatch.chdir(tmp_path)
    plan = replace(DemoPlan.make(quick=True), pretrain_epochs=1)
    ctx = run_demo("demo_output", only=["data", "pretrain"], plan=plan, log=lambda s: None)
    assert ctx.errors == {}
    assert ctx.results["pretrain"]["images"] == 256 and ctx.results["pretrain"]["epochs"] == 1  # the quick limit
    assert (tmp_path / "demo_output" / "pretrain" / "encoder.safetensors").is_file()
    # the pretraining stage's log holds its per-epoch line (it was empty: nothing reached the file)
    assert "INFO training.run: epoch 1/1: loss " in (tmp_path / "demo_output" / "logs" / "pretrain.log").read_text()
    for path in (tmp_path / "demo_output").rglob("*"):  # no colour escape in any log file written
        if path.suffix in (".log", ".txt", ".jsonl"):
            assert b"\x1b[" not in path.read_bytes(), path
    # again into the same folder: the finished pretraining is resumed (nothing to do), still reported
    again = run_demo("demo_output", only=["pretrain"], plan=plan, log=lambda s: None)
    assert again.errors == {} and again.results["pretrain"] == ctx.results["pretrain"]


def _noisy(ctx: DemoContext) -> None:
    """Logs as our trainers do (through the root logger), as a framework does (its own console
    handler on stdout, in colour, still propagating), and prints colour codes itself."""
    import logging
    import sys

    logging.getLogger("training.run").info("epoch 1/1: loss 0.5")
    framework = logging.getLogger("someframework")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("\x1b[32m[%(name)s]\x1b[0m %(message)s"))
    framework.addHandler(handler)
    try:
        framework.warning("framework line")
    finally:
        framework.removeHandler(handler)
    print("\x1b[1;31mred\x1b[0m text")
    sys.stderr.write("\x1b[33mwarning on stderr\x1b[0m\n")


def test_stage_logs_hold_every_line_once_in_plain_text(tmp_path, capsys):
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stages = {"pretrain": ("MAE pretraining", _noisy, 1), "finetune": ("fine-tuning", _noisy, 1)}
    run_demo(tmp_path, stages=stages, log=lambda s: None)
    for key in stages:
        text = (tmp_path / "logs" / f"{key}.log").read_text()
        assert "\x1b[" not in text, text
        lines = text.splitlines()
        assert sum("training.run: epoch 1/1: loss 0.5" in line for line in lines) == 1, text
        assert lines.count("[someframework] framework line") == 1, text
        assert "red text" in lines and "warning on stderr" in lines
    assert list(root.handlers) == handlers and root.level == level  # put back after each stage
    captured = capsys.readouterr()
    assert "epoch 1/1" not in captured.out + captured.err  # nothing of a stage on the terminal

