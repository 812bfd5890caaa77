"""A user's mistake in ``mae-transfer segment`` is one line naming the file or key, exit 2.

Each case feeds the mistake to the CLI (in this process) and checks the exit code, that the
message names the file or key, that no traceback is printed, and that no file written before
(checkpoints, the output) changed. Cases: bit-flipped checkpoints and encoders on every loading
path, bad images and encoder-only checkpoints in ``infer``, ADE20K-layout faults (truncated JPEG,
1x1 image, symlink loop), nested ``--cfg-options`` typos and batch size 0, unusable work dirs,
where ``segment test`` writes by default, shipped config names, and resuming a copied work dir.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS
from PIL import Image

from mae_backbone.io import add_checksum
from mae_transfer.cli import main
from segmentation import ADELayoutDataset, DatasetError, load_config
from segmentation.engine import resume_checkpoint

from seg_helpers import CLASSES, unique_name, write_ade_layout

SHIPPED = "upernet-mae-vit-b_8xb2-160k_ade20k-512x512"
PREFIX = dict(img_path="images/training", seg_map_path="annotations/training")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and its hash (what must not change)."""
    return {str(p): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def fails(capsys, argv: list[str], *named: str) -> str:
    """Run the CLI; it must exit 2 with one error line naming every string of ``named``."""
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, err)
    assert "Traceback" not in err + out, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"mae-transfer segment {argv[1]}: error: "), err
    for name in named:
        assert str(name) in line, (name, line)
    return line


@pytest.fixture(scope="module")
def segmentor_state(tiny_config) -> dict[str, torch.Tensor]:
    init_default_scope("mmseg")
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in MODELS.build(load_config(tiny_config).model).state_dict().items()}


def _checkpoint(sd: dict[str, torch.Tensor], path: Path) -> Path:
    meta = {"dataset_meta": {"classes": CLASSES, "palette": [[0, 0, 0], [255, 0, 0], [0, 0, 255]]}}
    torch.save(add_checksum({"state_dict": sd, "meta": meta}), path)
    return path


def _flip_a_bit(path: Path, outer: str | None) -> Path:
    """Flip one bit of one stored weight, keeping the stored checksum (a bit flip on disk)."""
    obj = torch.load(path, weights_only=True)
    sd = obj[outer] if outer else obj
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)
    sd[key].view(torch.int32).view(-1)[0] ^= 1 << 20
    torch.save(obj, path)
    return path


def _train_args(config: Path, work: Path, *options: str) -> list[str]:
    return ["segment", "train", str(config), "--work-dir", str(work), "--cfg-options",
            f"experiment_name={unique_name()}", *options]


# --------------------------------------------------------------------------- checksums on every path
@pytest.mark.parametrize("where", ["test", "infer", "train load_from", "train --resume PATH", "train --resume",
                                   "train model.pretrained (encoder)"])
def test_a_bit_flipped_checkpoint_or_encoder_is_refused_on_every_path(tiny_config, ade_root, segmentor_state,
                                                                     tmp_path, capsys, where):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("an earlier output")
    if where.endswith("(encoder)"):
        vit = {k[len("backbone.vit."):]: v for k, v in segmentor_state.items() if k.startswith("backbone.vit.")}
        bad = tmp_path / "encoder.pth"
        torch.save(add_checksum({"model": vit}), bad)
        _flip_a_bit(bad, "model")
    else:
        bad = _flip_a_bit(_checkpoint(dict(segmentor_state), (work if where == "train --resume" else tmp_path)
                                      / "iter_4.pth"), "state_dict")
    before = snapshot(tmp_path)
    image = ade_root / "images" / "validation" / "img_000.jpg"
    argv = {
        "test": ["segment", "test", str(tiny_config), str(bad), "--work-dir", str(work)],
        "infer": ["segment", "infer", str(tiny_config), str(bad), str(image), "--out", str(work / "o.png"),
                  "--device", "cpu"],
        "train load_from": _train_args(tiny_config, work, f"load_from={bad}"),
        "train --resume PATH": _train_args(tiny_config, work, "--resume", str(bad)),
        "train --resume": ["segment", "train", str(tiny_config), "--work-dir", str(work), "--resume"],
        "train model.pretrained (encoder)": _train_args(tiny_config, work, f"model.pretrained={bad}"),
    }[where]
    if where == "train --resume":
        (work / "last_checkpoint").write_text(str(bad))
        before = snapshot(tmp_path)
    if where == "train --resume PATH":  # --resume takes the path before --cfg-options
        argv = ["segment", "train", str(tiny_config), "--work-dir", str(work), "--resume", str(bad)]
    fails(capsys, argv, bad, "checksum mismatch")
    after = {k: v for k, v in snapshot(tmp_path).items() if k in before}
    assert after == before and not (work / "o.png").exists()


# --------------------------------------------------------------------------- segment infer
@pytest.mark.parametrize("kind", ["missing", "truncated", "not an image", "empty"])
def test_infer_with_a_bad_image_names_it(tiny_config, ade_root, segmentor_state, tmp_path, capsys, kind):
    ckpt = _checkpoint(dict(segmentor_state), tmp_path / "model.pth")
    image = tmp_path / "photo.jpg"
    good = (ade_root / "images" / "validation" / "img_000.jpg").read_bytes()
    if kind == "truncated":
        image.write_bytes(good[: len(good) * 9 // 10])
    elif kind == "not an image":
        image.write_text("this is a text file\n")
    elif kind == "empty":
        image.write_bytes(b"")
    out = tmp_path / "overlay.png"
    out.write_bytes(b"an earlier overlay")
    before = snapshot(tmp_path)
    fails(capsys, ["segment", "infer", str(tiny_config), str(ckpt), str(image), "--out", str(out), "--device", "cpu"],
          image)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("layout", ["pretrain's {'model': ...}", "a bare state dict"])
def test_infer_with_an_encoder_only_checkpoint_says_so(tiny_config, ade_root, segmentor_state, tmp_path, capsys, layout):
    vit = {k[len("backbone.vit."):]: v for k, v in segmentor_state.items() if k.startswith("backbone.vit.")}
    encoder = tmp_path / "encoder.pth"
    torch.save(add_checksum({"model": vit}) if layout.startswith("pretrain") else vit, encoder)
    out = tmp_path / "overlay.png"
    line = fails(capsys, ["segment", "infer", str(tiny_config), str(encoder),
                          str(ade_root / "images" / "validation" / "img_000.jpg"), "--out", str(out), "--device", "cpu"],
                 encoder)
    assert "an encoder checkpoint" in line and "model.pretrained=FILE" in line and not out.exists()


# --------------------------------------------------------------------------- ADE20K layout faults
def _layout(tmp_path: Path) -> Path:
    root = write_ade_layout(tmp_path / "ADE", {"training": (2, (64, 64))}, seed=5)
    shutil.copytree(root / "images" / "training", root / "images" / "validation")
    shutil.copytree(root / "annotations" / "training", root / "annotations" / "validation")
    return root


@pytest.mark.parametrize("workers", [0, 1])  # 1: torch re-raises the worker's error with its traceback inside
def test_a_truncated_jpeg_stops_training_naming_it_before_any_checkpoint(tiny_config, tmp_path, capsys, workers):
    root = _layout(tmp_path)
    image = root / "images" / "training" / "img_000.jpg"
    image.write_bytes(image.read_bytes()[: image.stat().st_size * 9 // 10])  # the header is whole
    work = tmp_path / "work"
    line = fails(capsys, _train_args(tiny_config, work, "train_cfg.max_iters=2", "train_cfg.val_interval=1000",
                                     f"train_dataloader.num_workers={workers}") + ["--data-root", str(root)],
                 image, "cannot be loaded")
    assert "Caught" not in line
    assert not list(work.glob("*.pth"))


def test_a_1x1_image_is_named_when_the_shipped_pipeline_cannot_load_it(tmp_path):
    """MMSeg's RandomCrop fails with a ``TypeError`` on a 1x1 image; the dataset names the files."""
    init_default_scope("mmseg")
    root = _layout(tmp_path)
    image = root / "images" / "training" / "img_000.jpg"
    Image.new("RGB", (1, 1), (128, 128, 128)).save(image)
    Image.fromarray(np.ones((1, 1), np.uint8), mode="L").save(root / "annotations" / "training" / "img_000.png")
    ds = ADELayoutDataset(data_root=str(root), data_prefix=PREFIX, metainfo=dict(classes=CLASSES),
                          pipeline=load_config(SHIPPED).train_pipeline)
    with pytest.raises(DatasetError, match=f"{image} / .*img_000.png: cannot be loaded \\(TypeError"):
        ds[0]


def test_a_symlink_loop_in_the_layout_is_named_before_training(tiny_config, tmp_path, capsys):
    root = _layout(tmp_path)
    link = root / "images" / "training" / "again"
    os.symlink("..", link)  # images/training/again/training/again/...
    work = tmp_path / "work"
    fails(capsys, _train_args(tiny_config, work) + ["--data-root", str(root)], link, "symlink loop")
    assert not list(work.glob("*.pth"))


# --------------------------------------------------------------------------- config keys and values
@pytest.mark.parametrize("option, named", [
    ("train_cfg.max_iter=1", ["'train_cfg.max_iter'", "did you mean 'max_iters'"]),
    ("optim_wrapper.optimizer.lrr=0.1", ["'optim_wrapper.optimizer.lrr'", "did you mean 'lr'"]),
    ("optim_wrapper.paramwise_cfg.layer_decay_rat=0.65",
     ["'optim_wrapper.paramwise_cfg.layer_decay_rat'", "did you mean 'layer_decay'"]),
    ("default_hooks.checkpoint.intervall=2", ["'default_hooks.checkpoint.intervall'", "did you mean 'interval'"]),
    ("train_dataloader.batch_size=0", ["train_dataloader.batch_size must be an integer >= 1, got 0"]),
    ("val_dataloader.num_workers=-1", ["val_dataloader.num_workers must be an integer >= 0, got -1"]),
])
def test_nested_config_typos_and_bad_values_name_the_key(tiny_config, tmp_path, capsys, option, named):
    fails(capsys, _train_args(tiny_config, tmp_path / "work", option), *named)
    assert not (tmp_path / "work").exists()


def test_debug_shows_the_traceback_instead(tiny_config, tmp_path):
    from segmentation.engine import ConfigError

    with pytest.raises(ConfigError, match="train_cfg.max_iter"):
        main(["--debug", *_train_args(tiny_config, tmp_path / "work", "train_cfg.max_iter=1")])


def test_shipped_config_names_are_accepted_and_unknown_ones_suggest(tmp_path, capsys):
    for name in (SHIPPED, SHIPPED + ".py"):  # accepted: the next error is the option's
        fails(capsys, ["segment", "train", name, "--work-dir", str(tmp_path / "w"), "--cfg-options",
                       "train_dataloader.batch_size=0"], "train_dataloader.batch_size")
    fails(capsys, ["segment", "train", SHIPPED[:-1], "--work-dir", str(tmp_path / "w")], SHIPPED[:-1],
          f"did you mean '{SHIPPED}'")


# --------------------------------------------------------------------------- work dirs
@pytest.mark.parametrize("command", ["train", "test"])
@pytest.mark.parametrize("problem", ["a file", "read-only"])
def test_a_work_dir_that_is_a_file_or_read_only_is_named(tiny_config, segmentor_state, tmp_path, capsys,
                                                         monkeypatch, command, problem):
    ckpt = _checkpoint(dict(segmentor_state), tmp_path / "model.pth")
    work = tmp_path / "work"
    if problem == "a file":
        work.write_text("not a folder")
    else:
        work.mkdir()
        work.chmod(0o555)
        if os.access(work, os.W_OK):  # root writes anyway: a read-only mount as the check sees it
            access = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == work else access(p, mode, **kw))
    before = snapshot(tmp_path)
    args = _train_args(tiny_config, work) if command == "train" else \
        ["segment", "test", str(tiny_config), str(ckpt), "--work-dir", str(work)]
    try:
        fails(capsys, args, work, "--work-dir")
    finally:
        work.chmod(0o755) if work.is_dir() else None
    assert snapshot(tmp_path) == before


def test_train_needs_a_work_dir_and_test_writes_beside_the_checkpoint(tiny_config, segmentor_state, tmp_path,
                                                                      capsys, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    fails(capsys, ["segment", "train", str(tiny_config)], "--work-dir")
    (tmp_path / "ro").mkdir()
    ro_ckpt = _checkpoint(dict(segmentor_state), tmp_path / "ro" / "model.pth")
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro_ckpt.parent else access(p, mode, **kw))
    fails(capsys, ["segment", "test", str(tiny_config), str(ro_ckpt)], ro_ckpt.parent, "--work-dir")
    monkeypatch.setattr(os, "access", access)
    run = tmp_path / "run"
    run.mkdir()
    ckpt = _checkpoint(dict(segmentor_state), run / "iter_16.pth")
    (run / tiny_config.name).write_text("# the training run's own config copy\n")  # MMEngine's dump name
    before = {p.name: digest(p) for p in run.iterdir()}
    assert main(["segment", "test", str(tiny_config), str(ckpt), "--cfg-options",
                 f"experiment_name={unique_name()}"]) == 0
    assert "mIoU" in capsys.readouterr().out
    assert not list(cwd.iterdir())  # nothing in the current folder
    assert list((run / "test_iter_16").glob("*/*.log"))  # the logs beside the checkpoint, in their own folder
    assert {p.name: digest(p) for p in run.iterdir() if p.name != "test_iter_16"} == before  # the run unchanged


# --------------------------------------------------------------------------- a copied work dir
def test_a_copied_work_dir_resumes_from_its_own_checkpoint(tiny_config, tmp_path, capsys):
    original, copy = tmp_path / "original", tmp_path / "copy"
    options = ["train_cfg.val_interval=1000", "default_hooks.checkpoint.interval=2"]
    assert main(_train_args(tiny_config, original, "train_cfg.max_iters=2", *options)) == 0
    shutil.copytree(original, copy)
    assert (copy / "last_checkpoint").read_text().strip() == str(original / "iter_2.pth")  # MMEngine's absolute path
    assert resume_checkpoint(copy) == str(copy / "iter_2.pth")
    (original / "iter_2.pth").write_bytes(b"the original folder is not read")
    before = snapshot(original)
    assert main(_train_args(tiny_config, copy, "train_cfg.max_iters=4", *options) + ["--resume"]) == 0
    out = "".join(capsys.readouterr())
    assert f"Load checkpoint from {copy / 'iter_2.pth'}" in out and "resumed epoch: 0, iter: 2" in out
    assert (copy / "iter_4.pth").is_file() and (copy / "last_checkpoint").read_text().strip() == str(copy / "iter_4.pth")
    assert snapshot(original) == before
