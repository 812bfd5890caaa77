"""``mae-transfer bench``: two backbones through one recipe over two seeds, the table, failures, Ctrl-C."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from mae_transfer.bench import BenchPlan, Cell, parse_backbone, run_bench, summarize, write_table
from mae_transfer.cli import main as cli
from mae_transfer.runners import Arch, Backbone, DataPaths, Recipe, TaskResult
from mae_transfer.reference import lookup
from mae_transfer.sample_data import SampleSizes, write_sample_data

TINY = SampleSizes(unlabeled=4, cls_train_per_class=6, cls_val_per_class=3, cls_size=32, scene_train=2, scene_val=2, scene_size=64)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_data")
    write_sample_data(root, seed=0, sizes=TINY)
    return root


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch

    from mae_backbone import create_vit
    from mae_backbone.checkpoint import save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(create_vit("vit_tiny_patch16", depth=2, patch_size=8, img_size=32), path)
    return path


def test_two_backbones_two_seeds_real_runs_write_the_table(tiny_data, tiny_checkpoint, tmp_path):
    """``random`` and a saved checkpoint, linear probing on the same tiny data, seeds 0 and 1."""
    arch = Arch.make("vit_tiny_patch16", depth=2, patch_size=8)
    recipe = Recipe(arch=arch, img_size=32, linprobe_epochs=1, linprobe_batch=8)
    backbones = [parse_backbone("random"), parse_backbone(f"tiny={tiny_checkpoint}")]
    plan = BenchPlan(backbones, ["linprobe"], [0, 1], recipe, DataPaths.sample(tiny_data))
    result = run_bench(plan, tmp_path, log=lambda s: None)

    assert result.finished and [c.error for c in result.cells] == [None] * 4
    # the runs are real: each seed's head trains on the checkpoint's (or random) features
    val_images = sum(1 for _ in (tiny_data / "classification" / "val").rglob("*.png"))
    for c in result.cells:  # top-1 is a count of correct val images, in %
        assert (c.metrics["top-1"] * val_images / 100.0) == pytest.approx(round(c.metrics["top-1"] * val_images / 100.0))
        assert (tmp_path / "runs" / c.backbone / "linprobe" / f"seed{c.seed}" / "metrics.json").is_file()
    rows = {r.backbone: r for r in result.rows}
    for name in ("random", "tiny"):
        values = [c.metrics["top-1"] for c in result.cells if c.backbone == name]
        assert rows[name].values == values
        assert rows[name].mean == pytest.approx(statistics.mean(values))
        assert rows[name].std == pytest.approx(statistics.stdev(values))
    md = (tmp_path / "bench.md").read_text()
    for name in ("random", "tiny"):
        line = next(l for l in md.splitlines() if l.startswith(f"| {name} | linprobe |"))
        cells = [x.strip() for x in line.strip("|").split("|")]
        assert cells[3] == f"{rows[name].mean:.2f}" and cells[4] == f"{rows[name].std:.2f}" and cells[5] == "2"
        assert cells[7] == "n/a"  # a tiny model has no published number
    with open(tmp_path / "bench.csv") as f:
        got = list(csv.DictReader(f))
    assert [(r["backbone"], r["task"], r["metric"], r["n"]) for r in got] == [
        ("random", "linprobe", "top-1", "2"), ("tiny", "linprobe", "top-1", "2")]
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert len(saved["cells"]) == 4 and saved["finished"] is True


def _fake_runner(fail_on: str | None = None, interrupt_at: int | None = None):
    calls = []

    def runner(task, backbone, recipe, data, seed, out):
        calls.append((backbone.name, task, seed))
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        if backbone.name == fail_on:
            raise RuntimeError(f"cannot load {backbone.name}")
        return TaskResult({"AP box": 10.0 + seed, "AP mask": 5.0 + seed})

    return runner, calls


def _plan(names, seeds=(0, 1)):
    return BenchPlan([Backbone(n) for n in names], ["detect"], list(seeds), Recipe(), DataPaths())


def test_a_failed_cell_shows_its_error_and_the_rest_still_run(tmp_path):
    runner, calls = _fake_runner(fail_on="bad")
    result = run_bench(_plan(["bad", "good"]), tmp_path, log=lambda s: None, runner=runner)
    assert len(calls) == 4 and result.finished
    rows = {(r.backbone, r.metric): r for r in result.rows}
    assert rows[("good", "AP box")].values == [10.0, 11.0] and rows[("bad", "AP box")].values == []
    md = (tmp_path / "bench.md").read_text()
    assert "seed 0: RuntimeError: cannot load bad" in md
    assert "error.txt" in " ".join(str(p) for p in (tmp_path / "runs" / "bad" / "detect" / "seed0").iterdir())


def test_a_detector_that_found_nothing_gets_zero_with_the_reason_and_a_nan_shows_as_na(tmp_path):
    def runner(task, backbone, recipe, data, seed, out):
        why = "no detections above the model's test score threshold"
        return TaskResult({"AP box": 0.0, "AP mask": float("nan")}, notes={"AP box": why, "AP mask": "no masks"})

    lines = []
    result = run_bench(_plan(["weak"], seeds=(0,)), tmp_path, log=lines.append, runner=runner)
    assert result.finished and result.cells[0].error is None
    md = (tmp_path / "bench.md").read_text()
    assert ("| weak | detect | AP box | 0.00 |  | 1 | 0.00 | n/a | "
            "`seed 0: no detections above the model's test score threshold` |") in md
    assert "| weak | detect | AP mask | n.a. |  | 1 | n.a. | n/a | `seed 0: no masks` |" in md
    assert any("AP box 0.00 (no detections above" in line and "AP mask n.a. (no masks)" in line for line in lines)


def test_ctrl_c_writes_the_table_of_what_finished(tmp_path):
    runner, calls = _fake_runner(interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_bench(_plan(["a", "b"]), tmp_path, log=lambda s: None, runner=runner)
    md = (tmp_path / "bench.md").read_text()
    assert "**Interrupted** after 2 of 4 runs" in md
    assert "| a | detect | AP box | 10.50 | 0.71 | 2 |" in md
    assert "| b | detect | AP box |  |  | 0 |" in md
    assert json.loads((tmp_path / "bench.json").read_text())["finished"] is False


def test_published_numbers_only_for_the_paper_recipe_at_a_published_size(tmp_path):
    cells = [Cell("mae_b", "finetune", 0, {"top-1": 80.0}), Cell("mae_b", "segment", 0, {"mIoU": 40.0})]
    backbones = [Backbone("mae_b", Path("x"), method="mae")]
    vit_b = Arch.make("vit_base_patch16")
    rows = summarize(cells, backbones, ["finetune", "segment"], vit_b, Recipe.paper(vit_b))
    assert [(r.metric, r.reference) for r in rows] == [("top-1", 83.6), ("mIoU", 48.1)]
    assert all(r.reference_source for r in rows)
    files = write_table(rows, tmp_path, "t")
    md = files["md"].read_text()
    assert "| mae_b | finetune | top-1 | 80.00 |  | 1 | 80.00 | 83.6 |" in md and "Table 5" in md
    # a tiny architecture, or the demo recipe, or an unknown method: no reference
    tiny = Arch.make("vit_tiny_patch16", depth=2)
    assert summarize(cells, backbones, ["finetune"], tiny, Recipe.paper(tiny))[0].reference is None
    assert summarize(cells, backbones, ["finetune"], vit_b, Recipe(arch=vit_b))[0].reference is None
    assert lookup("finetune", "top-1", None, "B") is None and lookup("detect", "AP box", "mae", "L").value == 55.6


def test_cli_rejects_bad_input_with_a_clear_message(tmp_path, capsys):
    assert cli(["bench", "nopath", "--output", str(tmp_path)]) == 2
    assert "expected NAME=PATH" in capsys.readouterr().err
    assert cli(["bench", f"x={tmp_path / 'missing.pth'}", "--output", str(tmp_path)]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert cli(["bench", "random", "--tasks", "classify", "--output", str(tmp_path)]) == 2
    assert "unknown task 'classify'" in capsys.readouterr().err
    assert cli(["bench", "random", "--coco", str(tmp_path), "--tasks", "segment", "--output", str(tmp_path)]) == 2
    assert "needs its data (--ade DIR)" in capsys.readouterr().err
    assert cli(["bench", "random", "--seeds", "0,x", "--output", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert cli(["bench", f"mae={tmp_path / 'missing.pth'}", "--output", str(tmp_path)]) == 2  # checked first
    capsys.readouterr()
    (tmp_path / "mine.pth").write_bytes(b"")
    assert cli(["bench", f"mae={tmp_path / 'mine.pth'}", "--pretrain", "mae", "--output", str(tmp_path)]) == 2
    assert "also --pretrain methods" in capsys.readouterr().err
    assert cli(["bench", "random", "--pretrain", "mae", "--imagenet", str(tmp_path), "--tasks", "linprobe",
                "--output", str(tmp_path)]) == 2
    assert "demo recipe" in capsys.readouterr().err


def test_cli_arch_mismatch_is_refused(tmp_path, tiny_checkpoint, capsys):
    from mae_backbone import create_vit
    from mae_backbone.checkpoint import save_checkpoint

    other = tmp_path / "deeper.safetensors"
    save_checkpoint(create_vit("vit_tiny_patch16", depth=3, patch_size=8, img_size=32), other)
    data = tmp_path / "imagenet"
    (data / "train").mkdir(parents=True)
    rc = cli(["bench", f"a={tiny_checkpoint}", f"b={other}", "--imagenet", str(data), "--tasks", "linprobe",
              "--output", str(tmp_path / "out")])
    assert rc == 2 and "differ in architecture" in capsys.readouterr().err


def test_pretrain_produces_the_three_controlled_baselines_with_one_budget(tiny_data, tmp_path):
    """``pretrain_baselines`` runs the real MAE / MoCo v3 / supervised trainers with one budget; the
    encoders record their method, load strictly into the recipe's ViT and differ from a fresh ViT."""
    import torch

    from mae_backbone import create_vit
    from mae_backbone.checkpoint import read_checkpoint
    from mae_transfer.bench import pretrain_baselines

    arch = Arch.make("vit_tiny_patch16", depth=2, patch_size=8)
    recipe = Recipe(arch=arch, img_size=32)
    got = pretrain_baselines(["mae", "mocov3", "supervised"], tiny_data / "classification", tmp_path, recipe,
                             epochs=1, batch_size=8, log=lambda s: None)
    assert [b.name for b in got] == ["mae", "mocov3", "supervised"] == [b.method for b in got]
    torch.manual_seed(0)
    fresh = create_vit("vit_tiny_patch16", depth=2, patch_size=8, img_size=32).state_dict()
    for b in got:
        sd, meta = read_checkpoint(b.checkpoint)
        assert meta.get("method") == b.method, meta
        model = create_vit("vit_tiny_patch16", depth=2, patch_size=8, img_size=32)
        model.load_state_dict(sd, strict=True)
        assert not torch.equal(sd["blocks.0.attn.qkv.weight"], fresh["blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="known methods"):
        pretrain_baselines(["simclr"], tiny_data / "classification", tmp_path, recipe, epochs=1)


def test_a_cells_run_log_holds_its_lines_once_in_plain_text(tmp_path):
    """Each cell's ``run.log``: our loggers' lines (the trainers' per-epoch lines) once, no colour codes."""
    import logging

    def runner(task, backbone, recipe, data, seed, out):
        logging.getLogger("training.run").info("epoch 1/1: loss 0.5")
        print("\x1b[32mgreen\x1b[0m done")
        return TaskResult({"AP box": 1.0, "AP mask": 1.0})

    run_bench(_plan(["a"], seeds=(0,)), tmp_path, log=lambda s: None, runner=runner)
    text = (tmp_path / "runs" / "a" / "detect" / "seed0" / "run.log").read_text()
    assert "\x1b[" not in text and "green done" in text
    assert sum("training.run: epoch 1/1: loss 0.5" in line for line in text.splitlines()) == 1, text
