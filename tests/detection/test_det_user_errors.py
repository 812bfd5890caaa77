"""A user's mistakes in ``mae-transfer detect`` are one line naming the file or key, exit status 2, no
traceback, nothing written: bad images for ``infer``, config values of the wrong type, a batch of 0,
weights that are a folder or missing, an output path that is a file or read-only. Also: ``eval``
writes nothing into the current folder, the backbone's load report reaches Detectron2's own logger,
and two runs in one process write each log line once, in plain text."""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import pytest
import torch
from detectron2.config import instantiate
from PIL import Image

from detection.config import load_config
from mae_transfer.cli import main

TINY = str(Path(__file__).parent / "configs" / "tiny_mask_rcnn_vitdet.py")
FAST = ["train.max_iter=1", "train.eval_period=0", "train.checkpointer.period=1"]


def _register(tiny_coco) -> list[str]:
    json_file, images = (str(p) for p in tiny_coco)
    return ["--register-coco", "tiny_train", json_file, images, "--register-coco", "tiny_val", json_file, images]


def _fails(capsys, argv: list[str], *named: str) -> str:
    """``main(argv)`` exits 2 with one error line naming each of ``named``, and no traceback."""
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, err)
    assert "Traceback" not in err and "Traceback" not in out
    line = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(line) == 1 and line[0].startswith(f"mae-transfer detect {argv[1]}: error: "), err
    for name in named:
        assert name in line[0], (name, err)
    return line[0]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Untrained tiny detector weights (what ``detect train`` writes, minus the training)."""
    torch.manual_seed(0)
    model = instantiate(load_config(TINY).model)
    path = tmp_path_factory.mktemp("det_weights") / "model_final.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture
def existing_run(tmp_path) -> tuple[Path, dict[str, str]]:
    """An earlier run's folder, with its digest to check it is left as it was."""
    run = tmp_path / "earlier_run"
    run.mkdir()
    (run / "log.txt").write_text("an earlier run\n")
    (run / "metrics.json").write_text("{}\n")
    return run, _digest(run)


# --------------------------------------------------------------------------- infer: bad images
@pytest.mark.parametrize("kind", ["missing", "truncated", "not an image", "a folder", "decompression bomb"])
def test_infer_with_a_bad_image_names_the_file(weights, tiny_coco, tmp_path, capsys, monkeypatch, kind):
    image = tmp_path / "photo.png"
    good = (tiny_coco[1] / "000.png").read_bytes()
    if kind == "truncated":
        image.write_bytes(good[:200])  # a valid header, cut pixel data
    elif kind == "not an image":
        image.write_text("these are not pixels\n")
    elif kind == "a folder":
        image.mkdir()
    elif kind == "decompression bomb":
        image.write_bytes(good)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)
    out = tmp_path / "pred.png"
    _fails(capsys, ["detect", "infer", TINY, str(image), "--weights", str(weights), "--out", str(out)], str(image))
    assert not out.exists()


# --------------------------------------------------------------------------- config values
@pytest.mark.parametrize("override, words", [
    ("train.max_iter=abc", "train.max_iter must be an integer"),
    ("train.max_iter=2.5", "train.max_iter must be an integer"),
    ("train.eval_period=soon", "train.eval_period must be an integer"),
    ("train.checkpointer.period=-1", "train.checkpointer.period must be at least 1"),
    ("optimizer.lr=fast", "optimizer.lr must be a number"),
    ("optimizer.weight_decay=[0.1]", "optimizer.weight_decay must be a number"),
    ("model.backbone.net.depth=two", "model.backbone.net.depth must be an integer"),
    ("train.amp.enabled=yes", "train.amp.enabled must be True or False"),
    ("dataloader.train.total_batch_size=0", "dataloader.train.total_batch_size must be at least 1"),
    ("dataloader.train.num_workers=-2", "dataloader.train.num_workers must be at least 0"),
])
def test_a_config_value_of_the_wrong_type_names_the_key_before_any_work(tiny_coco, capsys, existing_run,
                                                                          override, words):
    run, before = existing_run
    _fails(capsys, ["detect", "train", TINY, override, "--output", str(run), *_register(tiny_coco)], words)
    assert _digest(run) == before  # nothing written, not even config.yaml


@pytest.mark.parametrize("override, words", [
    ("SOLVER.MAX_ITER=abc", "SOLVER.MAX_ITER"),
    ("SOLVER.IMS_PER_BATCH=0", "SOLVER.IMS_PER_BATCH must be at least 1"),
])
def test_a_yacs_value_of_the_wrong_type_names_the_key(capsys, existing_run, override, words):
    run, before = existing_run
    _fails(capsys, ["detect", "train", "mask_rcnn_vit_b_vitdet.yaml", override, "--output", str(run)], words)
    assert _digest(run) == before


# --------------------------------------------------------------------------- weights
def test_eval_with_weights_that_are_a_folder_names_it_and_the_file_meant(weights, tiny_coco, capsys, existing_run):
    run, before = existing_run
    line = _fails(capsys, ["detect", "eval", TINY, "--weights", str(weights.parent), "--output", str(run),
                           *_register(tiny_coco)], str(weights.parent), "is a folder")
    assert f"did you mean {weights}?" in line
    assert _digest(run) == before


def test_eval_with_the_folder_of_a_run_still_training_names_its_last_checkpoint(tiny_coco, tmp_path, capsys,
                                                                                 existing_run):
    run, before = existing_run
    training = tmp_path / "training"
    training.mkdir()
    (training / "model_0000005.pth").write_bytes(b"")
    (training / "last_checkpoint").write_text("model_0000005.pth")
    _fails(capsys, ["detect", "eval", TINY, "--weights", str(training), "--output", str(run), *_register(tiny_coco)],
           f"did you mean {training / 'model_0000005.pth'}?")
    assert _digest(run) == before


def test_eval_with_missing_weights_names_the_path(tiny_coco, tmp_path, capsys, existing_run):
    run, before = existing_run
    missing = tmp_path / "nowhere" / "model_final.pth"
    _fails(capsys, ["detect", "eval", TINY, "--weights", str(missing), "--output", str(run), *_register(tiny_coco)],
           str(missing), "no such checkpoint file")
    assert _digest(run) == before


# --------------------------------------------------------------------------- output paths
@pytest.mark.parametrize("action", ["train", "eval"])
def test_an_output_path_that_is_a_file_is_named(weights, tiny_coco, tmp_path, capsys, action):
    blocker = tmp_path / "output"
    blocker.write_text("a file where the output folder should be\n")
    extra = ["--weights", str(weights)] if action == "eval" else []
    _fails(capsys, ["detect", action, TINY, *FAST, "--output", str(blocker), *extra, *_register(tiny_coco)],
           str(blocker))
    assert blocker.read_text() == "a file where the output folder should be\n"


@pytest.mark.parametrize("action", ["train", "eval"])
def test_a_read_only_output_folder_is_named(weights, tiny_coco, tmp_path, capsys, monkeypatch, action):
    """Read-only through ``_writable`` (the tests may run as root, which ignores permission bits)."""
    import training.errors as errors

    ro = tmp_path / "read_only"
    ro.mkdir()
    monkeypatch.setattr(errors, "_writable", lambda folder: Path(folder).resolve() != ro.resolve())
    extra = ["--weights", str(weights)] if action == "eval" else []
    _fails(capsys, ["detect", action, TINY, *FAST, "--output", str(ro), *extra, *_register(tiny_coco)],
           str(ro), "not writable")
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_infer_out_that_cannot_be_written_is_named(weights, tiny_coco, tmp_path, capsys, where):
    if where == "a folder":
        out = tmp_path / "pred.png"
        out.mkdir()
    else:
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "pred.png"
    _fails(capsys, ["detect", "infer", TINY, str(tiny_coco[1] / "000.png"), "--weights", str(weights),
                    "--out", str(out)], str(out))


# --------------------------------------------------------------------------- nothing in the current folder
def test_eval_without_output_writes_beside_the_weights_not_the_current_folder(weights, tiny_coco, tmp_path,
                                                                              capsys, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = _digest(weights.parent)
    assert main(["detect", "eval", TINY, "--weights", str(weights), *_register(tiny_coco)]) == 0
    assert list(cwd.iterdir()) == []
    results = weights.parent / "eval_model_final" / "eval_results.json"
    assert results.is_file()
    after = _digest(weights.parent)
    assert {k: v for k, v in after.items() if not k.startswith("eval_model_final/")} == before


# --------------------------------------------------------------------------- logging
def test_the_backbone_load_report_shows_in_detectron2s_own_logger_setup(tmp_path):
    """Detectron2's tools (``default_setup`` -> ``setup_logger()``) configure the ``detectron2``
    logger only; the pretrained-load report must reach its handlers."""
    from detectron2.modeling.backbone.fpn import LastLevelMaxPool
    from detectron2.utils.logger import setup_logger

    from detection import SimpleFeaturePyramid
    from mae_backbone import create_vit
    from mae_backbone.checkpoint import write_checkpoint

    encoder = write_checkpoint(create_vit("vit_tiny_patch16", depth=2, img_size=224).state_dict(),
                               tmp_path / "encoder.safetensors", "ours")
    from detection.engine import reset_detectron2_logging

    logs = tmp_path / "tools"
    reset_detectron2_logging()  # a fresh logging state: no handlers left by earlier runs in this process
    d2 = logging.getLogger("detectron2")
    saved = (d2.level, d2.propagate)
    try:
        setup_logger(str(logs))  # as tools/lazyconfig_train_net.py's default_setup does: logs/log.txt
        vit = create_vit("vit_tiny_patch16", depth=2, img_size=64, window_size=2, global_blocks=(1,), rel_pos=True)
        SimpleFeaturePyramid(vit, top_block=LastLevelMaxPool(), square_pad=64, pretrained=str(encoder))
    finally:
        reset_detectron2_logging()  # flushes and closes logs/log.txt
        d2.setLevel(saved[0])
        d2.propagate = saved[1]
    log_file = logs / "log.txt"
    text = log_file.read_text()
    assert "pretrained ViT for detection" in text and "pos_embed" in text, text


def test_two_runs_in_one_process_write_each_log_line_once(tiny_coco, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        assert main(["detect", "train", TINY, *FAST, "--output", str(out), *_register(tiny_coco)]) == 0
    console = capsys.readouterr().out
    for out in (first, second):
        text = (out / "log.txt").read_text()
        assert "\x1b[" not in text  # plain text (Detectron2 logs the config file highlighted for a terminal)
        for once in ("Rank of current process", "Starting training from iteration 0", f"Full config saved to {out}",
                     f"Saving checkpoint to {out / 'model_final.pth'}"):
            assert text.count(once) == 1, (out, once)
    assert str(second) not in (first / "log.txt").read_text()  # the second run does not write the first's log
    for once_per_run in ("Rank of current process", "Starting training from iteration 0", "Full config saved to"):
        assert console.count(once_per_run) == 2, once_per_run


def test_training_a_shipped_recipe_without_output_asks_for_it(tmp_path, monkeypatch, capsys):
    """The shipped recipes' ``train.output_dir`` is ``./output``: ``detect train`` of one without
    ``--output`` (or an override) stops before any work instead of writing into the current folder."""
    monkeypatch.chdir(tmp_path)
    rc = main(["detect", "train", "mask_rcnn_vitdet_b_100ep"])
    out, err = capsys.readouterr()
    assert rc == 2 and "give --output FOLDER" in err and "./output" in err, err
    assert "Traceback" not in out + err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("action", ["train", "eval"])
def test_an_unregistered_dataset_or_wrong_class_count_changes_nothing_in_the_output_folder(
        weights, tiny_coco, capsys, existing_run, action):
    """The datasets and class counts are checked before Detectron2's ``default_setup`` writes
    ``config.yaml`` and appends to ``log.txt`` in the output folder (a resumed run's folder)."""
    run, before = existing_run
    extra = ["--weights", str(weights)] if action == "eval" else []
    rc = main(["detect", action, TINY, "dataloader.train.dataset.names=no_such_dataset",
               "dataloader.test.dataset.names=no_such_dataset", "--output", str(run), *extra])
    out, err = capsys.readouterr()
    assert rc == 2 and "no_such_dataset" in err and "Traceback" not in out + err, err
    assert _digest(run) == before
