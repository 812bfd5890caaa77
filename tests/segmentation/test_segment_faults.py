"""Fault injection into ``mae-transfer segment``: kills, failed writes, damaged and malicious
checkpoints, bad images, label maps and layouts, config typos and non-finite losses.

The kill/resume test runs the real CLI in subprocesses through ``tests/helpers/kill_harness.py`` (SIGKILL
after a seeded backward pass, then in the middle of a seeded checkpoint write) and compares the
final weights with one uninterrupted run, bit for bit. The other tests run in-process.
"""
from __future__ import annotations

import builtins
import errno
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae_backbone import CheckpointError, safe_torch_load
from mae_transfer.cli import main
from segmentation import ADELayoutDataset, DatasetError
from segmentation.engine import ConfigError, load_config, prepare
from segmentation.safe_loading import AtomicLocalBackend

import kill_harness
from seg_helpers import CLASSES, torch_threads, unique_name, write_ade_layout
from unsafe_pickle import unsafe_mmengine_checkpoint

ROOT = Path(__file__).resolve().parents[2]
HARNESS = Path(kill_harness.__file__)
MAX_ITERS, INTERVAL = 8, 2  # checkpoints iter_2, iter_4, iter_6, iter_8
OPTIONS = [f"train_cfg.max_iters={MAX_ITERS}", "train_cfg.val_interval=1000",
           f"default_hooks.checkpoint.interval={INTERVAL}"]
SEED = 20261129
PREFIX = dict(img_path="images/training", seg_map_path="annotations/training")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def _train_cmd(config: Path, work_dir: Path, *harness: str, resume: bool = False) -> list[str]:
    return [sys.executable, str(HARNESS), *harness, "--", "segment", "train", str(config), "--work-dir",
            str(work_dir), *(["--resume"] if resume else []), "--cfg-options", *OPTIONS]


def _train(config: Path, work_dir: Path, *options: str, resume: str | None = None) -> int:
    """``segment train`` in this process."""
    return main(["segment", "train", str(config), "--work-dir", str(work_dir), *(["--resume"] if resume == "auto" else
                 ["--resume", resume] if resume else []), "--cfg-options", f"experiment_name={unique_name()}",
                 *OPTIONS, *options])


@pytest.fixture(scope="module")
def reference(tiny_config, tmp_path_factory) -> Path:
    """One uninterrupted run of MAX_ITERS iterations, in this process with the harness's settings
    (one thread, no oneDNN), which saves a subprocess start."""
    work_dir = tmp_path_factory.mktemp("seg_reference")
    onednn = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        with torch_threads(1):
            assert _train(tiny_config, work_dir) == 0
    finally:
        torch.backends.mkldnn.enabled = onednn
    return work_dir


def _whole_checkpoints(work_dir: Path) -> list[int]:
    """Every iter_*.pth loads and passes its checksum; last_checkpoint names one of them."""
    steps = sorted(int(p.stem[5:]) for p in work_dir.glob("iter_*.pth"))
    for step in steps:
        safe_torch_load(work_dir / f"iter_{step}.pth")
    if (work_dir / "last_checkpoint").exists():
        assert Path((work_dir / "last_checkpoint").read_text()).name in {f"iter_{s}.pth" for s in steps}
    return steps


# --------------------------------------------------------------------------- kill / resume
def test_killed_twice_then_resumed_equals_the_uninterrupted_run(reference, tiny_config, tmp_path):
    rng = random.Random(SEED)
    # in iteration kill_after (1-based), after backward; at least one checkpoint is written before
    kill_after = rng.randint(INTERVAL + 1, MAX_ITERS - 1)
    work_dir = tmp_path / "run"
    proc = _run(_train_cmd(tiny_config, work_dir, "--kill-after-backward", str(kill_after)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    done = _whole_checkpoints(work_dir)
    assert all(step < kill_after for step in done)

    writes = [s for s in range(INTERVAL, MAX_ITERS + 1, INTERVAL) if s > max(done, default=0)]
    nth, fraction = rng.randint(1, len(writes)), rng.uniform(0.05, 0.95)
    size = (reference / f"iter_{MAX_ITERS}.pth").stat().st_size
    proc = _run(_train_cmd(tiny_config, work_dir, "--kill-in-write", str(nth), "--fraction", str(fraction),
                           "--size-hint", str(size), resume=True))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = list(work_dir.glob(".*.pth.*.tmp"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < size  # the cut file is only a temporary
    assert writes[nth - 1] not in _whole_checkpoints(work_dir)

    resumed_from = int(Path((work_dir / "last_checkpoint").read_text()).stem[5:])
    proc = _run(_train_cmd(tiny_config, work_dir, resume=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Advance dataloader {resumed_from} steps" in proc.stdout + proc.stderr
    assert not list(work_dir.glob(".*.tmp"))
    points = f"killed after backward {kill_after}, then in checkpoint write {nth} at {fraction:.2f}"
    full = torch.load(reference / f"iter_{MAX_ITERS}.pth", weights_only=True)["state_dict"]
    resumed = torch.load(work_dir / f"iter_{MAX_ITERS}.pth", weights_only=True)["state_dict"]
    assert resumed.keys() == full.keys()
    for key, value in full.items():
        assert torch.equal(resumed[key], value), f"{key} ({points})"  # bit for bit


def test_an_empty_last_checkpoint_falls_back_to_the_newest_whole_one(reference, tiny_config, tmp_path, capsys):
    """MMEngine writes last_checkpoint non-atomically: a kill there leaves it empty."""
    work_dir = tmp_path / "run"
    work_dir.mkdir()
    for step in (2, 4):
        shutil.copy(reference / f"iter_{step}.pth", work_dir)
    (work_dir / "last_checkpoint").write_text("")
    assert _train(tiny_config, work_dir, "train_cfg.max_iters=5", resume="auto") == 0
    assert safe_torch_load(work_dir / "iter_5.pth")["meta"]["iter"] == 5
    assert not (work_dir / "iter_3.pth").exists()  # continued from iter_4, not from scratch


# --------------------------------------------------------------------------- write failures
def _failing_open(monkeypatch, where: Path, code: int, after: int = 0):
    """Make binary writes of files under ``where`` fail with ``code``, from the ``after+1``-th on."""
    real_open, count = builtins.open, [0]

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            self.f.write(b[:100])
            raise OSError(code, os.strerror(code))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def failing(file, mode="r", *args, **kwargs):
        if "wb" in mode and str(where) in os.fspath(file) and ".pth" in os.fspath(file):
            count[0] += 1
            if count[0] > after:
                if code == errno.EPERM:
                    raise PermissionError(code, os.strerror(code), os.fspath(file))
                return FullDisk(real_open(file, mode, *args, **kwargs))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing)


def test_a_failed_checkpoint_write_in_training_names_the_file_and_keeps_the_previous_one(
        tiny_config, tmp_path, monkeypatch, capsys):
    _failing_open(monkeypatch, tmp_path, errno.ENOSPC, after=1)  # iter_2 is written, iter_4 is not
    rc = _train(tiny_config, tmp_path, "train_cfg.max_iters=4")
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 2 and f"{tmp_path / 'iter_4.pth'}: could not write it (No space left on device)" in err
    assert _whole_checkpoints(tmp_path) == [2] and not list(tmp_path.glob(".*.tmp"))
    assert (tmp_path / "last_checkpoint").read_text() == str(tmp_path / "iter_2.pth")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EPERM])
def test_the_atomic_backend_keeps_the_previous_file_on_a_failed_write(tmp_path, monkeypatch, code):
    path = tmp_path / "iter_2.pth"
    backend = AtomicLocalBackend()
    backend.put(b"previous checkpoint", path)
    _failing_open(monkeypatch, tmp_path, code)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: could not write it ({os.strerror(code)})")):
        backend.put(b"new checkpoint" * 1000, path)
    monkeypatch.undo()
    assert path.read_bytes() == b"previous checkpoint" and [p.name for p in tmp_path.iterdir()] == ["iter_2.pth"]


def test_every_run_gets_atomic_writes_and_the_reliability_hooks(tiny_config, tmp_path):
    cfg = prepare(load_config(tiny_config), work_dir=str(tmp_path))
    assert cfg.default_hooks.checkpoint.backend_args == dict(backend="atomic_local")
    assert {"SafeCheckpointHook", "FiniteLossHook"} <= {h["type"] for h in cfg.custom_hooks}


# --------------------------------------------------------------------------- damaged checkpoints
def _damage(src: Path, dst: Path, how: str) -> Path:
    data = bytearray(src.read_bytes())
    if how == "truncated":
        data = data[: len(data) * 2 // 3]
    else:
        data[len(data) // 2] ^= 0x04
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_a_damaged_checkpoint_is_refused_by_name_in_test_and_on_resume(reference, tiny_config, tmp_path, capsys, how):
    bad = _damage(reference / f"iter_{MAX_ITERS}.pth", tmp_path / f"iter_{MAX_ITERS}.pth", how)
    message = "checksum mismatch" if how == "bit-flipped" else "truncated or corrupt"
    rc = main(["segment", "test", str(tiny_config), str(bad), "--work-dir", str(tmp_path / "t"),
               "--cfg-options", f"experiment_name={unique_name()}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad}: {message}" in err
    (tmp_path / "last_checkpoint").write_text(str(bad))
    assert _train(tiny_config, tmp_path, "train_cfg.max_iters=10", resume="auto") == 2
    assert f"{bad}: {message}" in capsys.readouterr().err


def test_a_truncated_pretrained_encoder_is_refused_by_name(tiny_config, tmp_path, capsys):
    bad = tmp_path / "encoder.pth"
    torch.save({"model": {"pos_embed": torch.zeros(1, 17, 64)}}, bad)
    _damage(bad, bad, "truncated")
    assert _train(tiny_config, tmp_path / "w", f"model.pretrained={bad}") == 2
    assert str(bad) in capsys.readouterr().err


# --------------------------------------------------------------------------- malicious pickles
@pytest.mark.parametrize("where", ["test", "infer", "train --resume (auto)", "train --resume PATH", "train load_from",
                                   "train model.pretrained"])
def test_a_checkpoint_that_would_run_code_is_never_unpickled(tiny_config, ade_root, tmp_path, capsys, where):
    marker = tmp_path / "pwned"
    evil = unsafe_mmengine_checkpoint(tmp_path / "iter_4.pth", marker)
    work = tmp_path / "w"
    if where == "test":
        rc = main(["segment", "test", str(tiny_config), str(evil), "--work-dir", str(work)])
    elif where == "infer":
        rc = main(["segment", "infer", str(tiny_config), str(evil), str(ade_root / "images" / "validation" /
                   "img_000.jpg"), "--out", str(tmp_path / "o.png"), "--device", "cpu"])
    elif where == "train --resume (auto)":
        work.mkdir()
        evil = Path(shutil.copy(evil, work / "iter_4.pth"))
        (work / "last_checkpoint").write_text(str(evil))
        rc = _train(tiny_config, work, resume="auto")
    elif where == "train --resume PATH":
        rc = _train(tiny_config, work, resume=str(evil))
    elif where == "train load_from":
        rc = _train(tiny_config, work, f"load_from={evil}")
    else:
        rc = _train(tiny_config, work, f"model.pretrained={evil}")
    err = capsys.readouterr().err
    assert rc == 2 and "refused to load" in err and str(evil) in err
    assert not marker.exists()


# --------------------------------------------------------------------------- images, label maps, layouts
def _layout(tmp_path: Path) -> Path:
    return write_ade_layout(tmp_path / "ADE", {"training": (2, (64, 64))}, seed=5)


def _dataset(root: Path, pipeline=()) -> ADELayoutDataset:
    return ADELayoutDataset(data_root=str(root), data_prefix=PREFIX, pipeline=list(pipeline),
                            metainfo=dict(classes=CLASSES))


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` 8-bit RGB pixels and holds none (a decompression
    bomb's header is all a reader sees before it allocates)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("kind, expected", [
    ("corrupt", "not a readable image"),
    ("zero-byte", r"the file is empty \(0 bytes\)"),
    ("huge", r"refused, 10000x9000 pixels is more than PIL.Image.MAX_IMAGE_PIXELS \(89478485\)"),
    ("bomb", "refused, too many pixels"),
    ("wrong size", r"is 32x48 but its label map .*img_001.png is 64x64"),
])
def test_unusable_images_are_refused_when_the_dataset_is_built(tmp_path, kind, expected):
    root = _layout(tmp_path)
    image = root / "images" / "training" / "img_001.jpg"
    if kind == "corrupt":
        image.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    elif kind == "zero-byte":
        image.write_bytes(b"")
    elif kind == "wrong size":
        Image.new("RGB", (32, 48)).save(image)
    else:  # over PIL's default limit (89.5 M pixels), and over twice it (PIL's own refusal)
        image.write_bytes(_png_header(10000, 9000) if kind == "huge" else _png_header(100000, 100000))
    with pytest.raises(DatasetError, match=expected) as err:
        _dataset(root)
    assert str(image) in str(err.value)


@pytest.mark.parametrize("kind", ["grayscale", "CMYK", "16-bit", "palette", "tiny"])
def test_other_image_modes_and_sizes_load_as_8_bit_colour(tmp_path, kind):
    root = _layout(tmp_path)
    image = root / "images" / "training" / "img_000.jpg"
    rgb = np.asarray(Image.open(image).convert("RGB"))
    if kind == "grayscale":
        Image.fromarray(rgb[..., 0]).save(image.with_suffix(".png"))
    elif kind == "16-bit":
        Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(image.with_suffix(".png"))
    elif kind == "palette":
        Image.fromarray(rgb).convert("P").save(image.with_suffix(".png"))
    elif kind == "CMYK":
        Image.fromarray(rgb).convert("CMYK").save(image, quality=100)
    else:
        Image.fromarray(rgb[:1, :1]).save(image.with_suffix(".png"))
        label = root / "annotations" / "training" / "img_000.png"
        Image.fromarray(np.asarray(Image.open(label))[:1, :1]).save(label)
    if kind != "CMYK":
        image.unlink()
        image = image.with_suffix(".png")
    ds = ADELayoutDataset(data_root=str(root), data_prefix=PREFIX, img_suffix=image.suffix,
                          pipeline=[dict(type="LoadImageFromFile")], metainfo=dict(classes=CLASSES))
    if kind != "CMYK":  # only img_000 has the new suffix
        assert len(ds) == 1
    img = ds[0]["img"]  # as MMSeg's pipeline reads it: BGR
    expected = {"grayscale": rgb[..., :1].repeat(3, 2), "16-bit": rgb[..., :1].repeat(3, 2),
                "palette": np.asarray(Image.open(image).convert("RGB")), "tiny": rgb[:1, :1],
                "CMYK": np.asarray(Image.open(image).convert("RGB"))}[kind]
    assert img.dtype == np.uint8 and img.shape == expected.shape
    np.testing.assert_allclose(img[..., ::-1].astype(int), expected.astype(int), atol=2)  # CMYK: JPEG decoders


def test_out_of_range_labels_and_wrong_layouts_fail_the_cli_naming_file_or_folder(tiny_config, tmp_path, capsys):
    root = _layout(tmp_path)
    shutil.copytree(root / "images" / "training", root / "images" / "validation")
    shutil.copytree(root / "annotations" / "training", root / "annotations" / "validation")
    label = root / "annotations" / "training" / "img_001.png"
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(label)
    cases = [
        (lambda: None, rf"{label}: \[200\]"),
        (lambda: label.unlink(), rf"1 of 2 images have no label map in .*{label}"),
        (lambda: shutil.rmtree(root / "annotations"),
         rf"annotation folder {root / 'annotations' / 'training'} does not exist"),
        (lambda: shutil.move(root / "images", root / "imgs"), rf"image folder {root / 'images' / 'training'} does not exist"),
    ]
    for damage, expected in cases:
        damage()
        rc = main(["segment", "train", str(tiny_config), "--work-dir", str(tmp_path / "w"), "--data-root", str(root),
                   "--cfg-options", f"experiment_name={unique_name()}"])
        err = capsys.readouterr().err
        assert rc == 2 and re.search(expected, err), err


# --------------------------------------------------------------------------- config typos
@pytest.mark.parametrize("option, expected", [
    ("model.backbone.drop_path_rte=0.1", r"'model\.backbone\.drop_path_rte': MAEViT has no argument 'drop_path_rte'; "
                                         r"did you mean 'drop_path_rate'"),
    ("model.decode_head.num_clases=3", r"'model\.decode_head\.num_clases'.*did you mean 'num_classes'"),
    ("model.neck.embed_dimm=64", r"'model\.neck\.embed_dimm'.*did you mean 'embed_dim'"),
    ("optim_wraper.optimizer.lr=0.1", r"unknown top-level key 'optim_wraper'.*did you mean 'optim_wrapper'"),
])
def test_config_option_typos_name_the_key_and_suggest(tiny_config, tmp_path, capsys, option, expected):
    rc = main(["segment", "train", str(tiny_config), "--work-dir", str(tmp_path), "--cfg-options", option])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(expected, err), err


def test_a_typo_in_the_backbone_dict_of_a_config_file_names_file_key_and_suggestion(tiny_config, tmp_path):
    path = tmp_path / "my_config.py"
    path.write_text(f"_base_ = [{str(tiny_config)!r}]\nmodel = dict(backbone=dict(out_indeces=[0, 1, 2, 3]))\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: unknown key 'model.backbone.out_indeces': MAEViT has no "
                                                    "argument 'out_indeces'; did you mean 'out_indices'?")):
        load_config(path)


# --------------------------------------------------------------------------- non-finite loss
def test_a_non_finite_loss_stops_training_before_any_checkpoint_of_it(tiny_config, tmp_path, capsys, monkeypatch):
    from mmseg.models.segmentors import EncoderDecoder

    loss, calls = EncoderDecoder.loss, [0]

    def nan_at_iteration_5(self, inputs, data_samples):
        losses = loss(self, inputs, data_samples)
        calls[0] += 1
        if calls[0] == 5:
            losses = {k: v * float("nan") if "loss" in k else v for k, v in losses.items()}
        return losses

    monkeypatch.setattr(EncoderDecoder, "loss", nan_at_iteration_5)
    rc = _train(tiny_config, tmp_path)
    err = capsys.readouterr().err
    assert rc == 2 and "non-finite loss at iteration 5" in err and "last good one" in err
    assert _whole_checkpoints(tmp_path) == [2, 4]
    assert (tmp_path / "last_checkpoint").read_text() == str(tmp_path / "iter_4.pth")
    state = safe_torch_load(tmp_path / "iter_4.pth")["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_an_image_cut_after_its_header_fails_loading_naming_the_file(tmp_path):
    """The header passes the dataset's check; MMCV's loader fails when decoding (an
    ``AssertionError``), which the dataset reports as a ``DatasetError`` naming the file."""
    root = _layout(tmp_path)
    image = root / "images" / "training" / "img_000.jpg"
    image.write_bytes(image.read_bytes()[: image.stat().st_size * 9 // 10])
    ds = _dataset(root, pipeline=[dict(type="LoadImageFromFile")])
    with pytest.raises(DatasetError, match=re.escape(f"{image} / ") + ".*cannot be loaded "
                       + re.escape(f"(AssertionError: failed to load image: {image})")):
        ds.prepare_data(0)


def test_a_remote_checkpoint_is_refused_before_mmengine_would_unpickle_it():
    """MMEngine would fetch and torch.load a URL itself, unchecked; ours asks for a local file."""
    from mae_backbone.io import CheckpointError
    from segmentation.engine import verify_checkpoint

    with pytest.raises(CheckpointError, match="download it"):
        verify_checkpoint("https://example.com/upernet.pth")
