"""Fault injection into ``mae-transfer detect``: kills, failed writes, damaged and malicious
checkpoints, bad images and annotations, config typos and non-finite losses.

The kill/resume test runs the real CLI in subprocesses through ``tests/helpers/kill_harness.py`` (SIGKILL
after a seeded backward pass, then in the middle of a seeded checkpoint write) and compares the
final weights with one uninterrupted run, bit for bit. The other tests run in-process.
"""
from __future__ import annotations

import builtins
import errno
import json
import os
import pickle
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
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils
from PIL import Image
from torch import nn

from detection import SafeDetectionCheckpointer
from detection.config import ConfigError, load_config
from detection.data import DatasetError, register_coco_dataset, validate_coco_json
from mae_backbone import CheckpointError, safe_torch_load
from mae_transfer.cli import main

import fault_harness as fh  # tests/helpers: FailingFile, a disk that fills up
import kill_harness
from unsafe_pickle import RunsCode

ROOT = Path(__file__).resolve().parents[2]
HARNESS = Path(kill_harness.__file__)
TINY = str(Path(__file__).parent / "configs" / "tiny_mask_rcnn_vitdet.py")
MAX_ITER, PERIOD = 6, 2  # checkpoints after iterations 1, 3, 5 and model_final after 5
RUN = [f"train.max_iter={MAX_ITER}", f"train.checkpointer.period={PERIOD}", "train.eval_period=0"]
SEED = 20261129


def _register(tiny_coco) -> list[str]:
    json_file, images = (str(p) for p in tiny_coco)
    return ["--register-coco", "tiny_train", json_file, images, "--register-coco", "tiny_val", json_file, images]


def _train_cmd(out: Path, tiny_coco, *harness: str, resume: bool = False) -> list[str]:
    return [sys.executable, str(HARNESS), *harness, "--", "detect", "train", TINY, *RUN, "--output", str(out),
            *_register(tiny_coco), *(["--resume"] if resume else [])]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_coco) -> Path:
    """One uninterrupted run of MAX_ITER iterations, in this process with the harness's settings
    (one thread, no oneDNN: the module's conftest fixture), which saves a subprocess start."""
    out = tmp_path_factory.mktemp("det_reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["detect", "train", TINY, *RUN, "--output", str(out), *_register(tiny_coco)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _whole_checkpoints(out: Path) -> list[str]:
    """Every *.pth in ``out`` loads and passes its checksum; last_checkpoint names one of them."""
    names = sorted(p.name for p in out.glob("*.pth"))
    for name in names:
        safe_torch_load(out / name)  # raises on a partial or damaged file
    if (out / "last_checkpoint").exists():
        assert (out / "last_checkpoint").read_text() in names
    return names


# --------------------------------------------------------------------------- kill / resume
def test_killed_twice_then_resumed_equals_the_uninterrupted_run(reference, tiny_coco, tmp_path):
    rng = random.Random(SEED)
    # in iteration kill_after - 1 (0-based), after backward; at least one checkpoint is written before
    kill_after = rng.randint(PERIOD + 1, MAX_ITER - 1)
    out = tmp_path / "run"
    proc = _run(_train_cmd(out, tiny_coco, "--kill-after-backward", str(kill_after)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    saved = _whole_checkpoints(out)
    done = [int(n[6:13]) for n in saved if n[6:13].isdigit()]
    assert all(it < kill_after - 1 for it in done)

    # resumed, killed in the middle of one of the checkpoint writes still to come
    last = max(done, default=-1)
    writes = [it for it in range(MAX_ITER) if (it + 1) % PERIOD == 0 and it > last] + [MAX_ITER - 1]  # + final
    nth, fraction = rng.randint(1, len(writes)), rng.uniform(0.05, 0.95)
    size = (reference / "model_final.pth").stat().st_size
    tag_before = (out / "last_checkpoint").read_text() if (out / "last_checkpoint").exists() else None
    proc = _run(_train_cmd(out, tiny_coco, "--kill-in-write", str(nth), "--fraction", str(fraction),
                           "--size-hint", str(size), resume=True))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = list(out.glob(".*.pth.*.tmp"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < size  # the cut file is only a temporary
    saved = _whole_checkpoints(out)
    killed_name = f"model_{writes[nth - 1]:07d}.pth" if nth < len(writes) else "model_final.pth"
    assert killed_name not in saved
    if nth == 1:
        assert ((out / "last_checkpoint").read_text() if tag_before else None) == tag_before

    resumed_from = int((out / "last_checkpoint").read_text()[6:13])
    proc = _run(_train_cmd(out, tiny_coco, resume=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"replaying {resumed_from + 1} batches" in (out / "log.txt").read_text()
    assert not list(out.glob(".*.tmp"))  # the partial temporary was removed on resume
    full = torch.load(reference / "model_final.pth", weights_only=True)["model"]
    resumed = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert resumed.keys() == full.keys()
    points = f"killed after backward {kill_after}, then in checkpoint write {nth} at {fraction:.2f}"
    for key, value in full.items():
        assert torch.equal(resumed[key], value), f"{key} ({points})"  # bit for bit


# --------------------------------------------------------------------------- write failures
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EPERM])
def test_a_failed_checkpoint_write_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch, code):
    model = nn.Linear(4, 3)
    checkpointer = SafeDetectionCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        model.weight.add_(1.0)
    real_open = builtins.open

    def failing_open(file, mode="r", *args, **kwargs):
        if "w" in mode and str(tmp_path) in os.fspath(file):
            if code == errno.EPERM:
                raise PermissionError(code, os.strerror(code), os.fspath(file))
            return fh.FailingFile(real_open(file, mode, *args, **kwargs), 100, errno.ENOSPC)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_open)
    for name in ("model_0000001", "model_0000003"):  # over the previous file, and a new one
        with pytest.raises(CheckpointError) as err:
            checkpointer.save(name, iteration=3)
        assert str(tmp_path / f"{name}.pth") in str(err.value) and os.strerror(code) in str(err.value)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporaries either
    fresh = nn.Linear(4, 3)
    extra = SafeDetectionCheckpointer(fresh, str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 1 and not torch.equal(fresh.weight, model.weight)


# --------------------------------------------------------------------------- damaged checkpoints
def _damage(src: Path, dst: Path, how: str) -> Path:
    data = bytearray(src.read_bytes())
    if how == "truncated":
        data = data[: len(data) * 2 // 3]
    else:
        data[len(data) // 2] ^= 0x04  # one bit, in the tensor data
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_a_damaged_detector_checkpoint_is_refused_by_name(reference, tiny_coco, tmp_path, capsys, how):
    bad = _damage(reference / "model_final.pth", tmp_path / "model_final.pth", how)
    rc = main(["detect", "eval", TINY, "--weights", str(bad), "--output", str(tmp_path / "e"), *_register(tiny_coco)])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err
    assert ("checksum mismatch" if how == "bit-flipped" else "truncated or corrupt") in err


def test_a_damaged_last_checkpoint_is_refused_on_resume(reference, tiny_coco, tmp_path, capsys):
    out = shutil.copytree(reference, tmp_path / "run")
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    _damage(reference / "model_final.pth", out / "model_final.pth", "bit-flipped")
    rc = main(["detect", "train", TINY, *RUN, "train.max_iter=8", "--resume", "--output", str(out),
               *_register(tiny_coco)])
    err = capsys.readouterr().err
    assert rc == 2 and f"{out / 'model_final.pth'}: checksum mismatch" in err


def test_a_truncated_pretrained_encoder_is_refused_by_name(tiny_coco, tmp_path, capsys):
    from mae_backbone import create_vit
    from mae_backbone.checkpoint import write_checkpoint

    good = write_checkpoint(create_vit("vit_tiny_patch16", depth=2, img_size=64).state_dict(),
                            tmp_path / "encoder.pth", "timm")
    bad = _damage(Path(good), tmp_path / "encoder_cut.pth", "truncated")
    rc = main(["detect", "train", TINY, *RUN, f"model.backbone.pretrained={bad}", "--output", str(tmp_path / "o"),
               *_register(tiny_coco)])
    assert rc == 2 and str(bad) in capsys.readouterr().err


# --------------------------------------------------------------------------- malicious pickles
@pytest.mark.parametrize("where", ["eval --weights .pth", "eval --weights .pkl", "infer --weights .pth",
                                   "train init_checkpoint", "train --resume", "train backbone.pretrained"])
def test_a_checkpoint_that_would_run_code_is_never_unpickled(reference, tiny_coco, tmp_path, capsys, where):
    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    if where.endswith(".pkl"):
        evil = tmp_path / "zoo.pkl"
        evil.write_bytes(pickle.dumps({"model": {}, "payload": RunsCode(marker)}))
    else:
        evil = tmp_path / "model_final.pth"
        torch.save({"model": {}, "payload": RunsCode(marker)}, evil)
    reg = _register(tiny_coco)
    if where.startswith("eval"):
        argv = ["detect", "eval", TINY, "--weights", str(evil), "--output", str(out), *reg]
    elif where.startswith("infer"):
        argv = ["detect", "infer", TINY, str(tiny_coco[1] / "000.png"), "--weights", str(evil), "--out",
                str(out / "p.png"), *reg]
    elif where == "train init_checkpoint":
        argv = ["detect", "train", TINY, *RUN, f"train.init_checkpoint={evil}", "--output", str(out), *reg]
    elif where == "train --resume":
        out.mkdir()
        shutil.copy(evil, out / "model_0000003.pth")
        (out / "last_checkpoint").write_text("model_0000003.pth")
        argv = ["detect", "train", TINY, *RUN, "--resume", "--output", str(out), *reg]
    else:
        argv = ["detect", "train", TINY, *RUN, f"model.backbone.pretrained={evil}", "--output", str(out), *reg]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "refused" in err
    assert ("--trust-pickle" in err) if where.endswith(".pkl") else ("GLOBAL" in err or "posix.system" in err)
    assert not marker.exists()


# --------------------------------------------------------------------------- images
def _dataset_with(tmp_path: Path, tiny_coco, image: Image.Image | bytes | None, size=None) -> tuple[Path, Path]:
    """A copy of the tiny dataset whose first image is replaced (size in the json updated)."""
    json_file, images = tiny_coco
    root = tmp_path / "coco"
    shutil.copytree(images, root / "images")
    data = json.loads(json_file.read_text())
    first = data["images"][0]
    path = root / "images" / first["file_name"]
    if isinstance(image, bytes):
        path.write_bytes(image)
    elif image is not None:
        first["file_name"] = Path(first["file_name"]).stem + (".jpg" if image.mode == "CMYK" else ".png")
        path.unlink()
        image.save(root / "images" / first["file_name"])
    if size is not None:
        first["width"], first["height"] = size
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] != first["id"]]
    out = root / "instances.json"
    out.write_text(json.dumps(data))
    return out, root / "images"


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` 8-bit RGB pixels and holds none (a decompression
    bomb's header is all a reader sees before it allocates)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("kind, expected", [
    ("corrupt", "not a readable image"),
    ("zero-byte", r"the image file is empty \(0 bytes\)"),
    ("16-bit", "a I;16 image"),
    ("huge", r"refused, 10000x9000 pixels is more than PIL.Image.MAX_IMAGE_PIXELS \(89478485\)"),
    ("bomb", "refused, too many pixels"),
    ("wrong size", r"is 32x48 but the json says 64x64"),
])
def test_unusable_images_are_refused_at_registration_by_name(tiny_coco, tmp_path, kind, expected):
    image: Image.Image | bytes
    if kind == "corrupt":
        image = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    elif kind == "zero-byte":
        image = b""
    elif kind == "16-bit":
        image = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    elif kind == "wrong size":
        image = Image.new("RGB", (32, 48))
    else:  # over PIL's default limit (89.5 M pixels), and over twice it (PIL's own refusal)
        image = _png_header(10000, 9000) if kind == "huge" else _png_header(100000, 100000)
    json_file, images = _dataset_with(tmp_path, tiny_coco, image)
    name = (images / json.loads(json_file.read_text())["images"][0]["file_name"])
    with pytest.raises(DatasetError, match=expected) as err:
        register_coco_dataset("det_fault_bad_image", json_file, images)
    assert str(name) in str(err.value) and str(json_file) in str(err.value)
    assert "det_fault_bad_image" not in DatasetCatalog.list()


@pytest.mark.parametrize("kind", ["grayscale", "palette", "CMYK", "tiny"])
def test_other_image_modes_and_sizes_load_as_rgb(tiny_coco, tmp_path, kind):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image = {"grayscale": Image.fromarray(pixels[..., 0], "L"),
             "palette": Image.fromarray(pixels).convert("P"),
             "CMYK": Image.fromarray(pixels).convert("CMYK"),
             "tiny": Image.fromarray(pixels[:1, :1])}[kind]
    json_file, images = _dataset_with(tmp_path, tiny_coco, image, size=(1, 1) if kind == "tiny" else None)
    assert validate_coco_json(json_file, images)["images"] == 8
    first = json.loads(json_file.read_text())["images"][0]
    rgb = detection_utils.read_image(str(images / first["file_name"]), format="RGB")  # as the mapper reads it
    assert rgb.dtype == np.uint8 and rgb.shape == (first["height"], first["width"], 3)
    expected = np.asarray(Image.open(images / first["file_name"]).convert("RGB"))
    np.testing.assert_array_equal(rgb, expected)
    if kind == "grayscale":
        assert (rgb == pixels[..., :1]).all()


# --------------------------------------------------------------------------- annotations and layouts
def _edited(tmp_path, tiny_coco, edit) -> tuple[Path, Path]:
    json_file, images = tiny_coco
    data = json.loads(json_file.read_text())
    edit(data)
    out = tmp_path / "edited.json"
    out.write_text(json.dumps(data))
    return out, images


def _move(ann: dict, dx: float) -> None:
    ann["bbox"][0] += dx
    ann["segmentation"] = [[v + dx if i % 2 == 0 else v for i, v in enumerate(p)] for p in ann["segmentation"]]


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.update(annotations=[]), "'annotations' is empty"),
    (lambda d: d["images"][1].pop("file_name"), r"images\[1\] lacks file_name"),
    (lambda d: d["annotations"][2].pop("category_id"), r"annotations\[2\] lacks category_id"),
    (lambda d: _move(d["annotations"][0], 100.0), r"annotations\[0\] \(id 1\) has a box or polygon outside its "
                                                   r"image 000.png \(64x64\)"),
    (lambda d: d["annotations"][1].update(bbox=[10, 10, -4, 5]), r"annotations\[1\]\.bbox has a negative width"),
])
def test_bad_annotations_are_refused_naming_the_json_and_entry(tiny_coco, tmp_path, edit, expected):
    json_file, images = _edited(tmp_path, tiny_coco, edit)
    with pytest.raises(DatasetError, match=expected) as err:
        validate_coco_json(json_file, images)
    assert str(json_file) in str(err.value)


def test_coordinates_a_pixel_outside_the_image_are_accepted(tiny_coco, tmp_path):
    json_file, images = _edited(tmp_path, tiny_coco, lambda d: _move(d["annotations"][0], -d["annotations"][0]["bbox"][0] - 1))
    assert validate_coco_json(json_file, images)["annotations"] == 12


@pytest.mark.parametrize("layout", ["json is a folder", "image folder is a file", "images one level deeper"])
def test_wrong_layouts_are_errors_naming_the_path(tiny_coco, tmp_path, capsys, layout):
    json_file, images = tiny_coco
    if layout == "json is a folder":
        json_arg, img_arg, named = tmp_path, images, tmp_path
    elif layout == "image folder is a file":
        json_arg, img_arg, named = json_file, json_file, json_file
    else:
        shutil.copytree(images, tmp_path / "coco" / "train2017")
        json_arg, img_arg, named = json_file, tmp_path / "coco", tmp_path / "coco"
    rc = main(["detect", "train", TINY, "--output", str(tmp_path / "o"), "--register-coco", "det_fault_layout",
               str(json_arg), str(img_arg)])
    err = capsys.readouterr().err
    assert rc == 2 and str(named) in err


# --------------------------------------------------------------------------- config typos
@pytest.mark.parametrize("override, expected", [
    ("model.backbone.net.dpeth=2", r"'model\.backbone\.net\.dpeth'.*did you mean 'depth'"),
    ("model.backbone.out_chanels=32", r"'model\.backbone\.out_chanels'.*did you mean 'out_channels'"),
    ("train.max_iters=3", r"'train\.max_iters'.*did you mean 'max_iter'"),
    ("train.checkpointer.perod=3", r"'train\.checkpointer\.perod'.*did you mean 'period'"),
])
def test_config_override_typos_name_the_key_and_suggest(tiny_coco, tmp_path, capsys, override, expected):
    rc = main(["detect", "train", TINY, override, "--output", str(tmp_path), *_register(tiny_coco)])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(expected, err), err


@pytest.mark.parametrize("line, expected", [
    ("model.backbone.net.window_sise = 4", r"'model\.backbone\.net\.window_sise'.*did you mean 'window_size'"),
    ("model.roi_heads.num_clases = 2", r"'model\.roi_heads\.num_clases'.*did you mean 'num_classes'"),
    ("train.eval_perod = 10", r"'train\.eval_perod'.*did you mean 'eval_period'"),
])
def test_typos_inside_a_lazyconfig_file_name_the_key_and_suggest(tmp_path, line, expected):
    path = tmp_path / "my_config.py"
    path.write_text(f"from detectron2.config import LazyConfig\n_c = LazyConfig.load({TINY!r})\n"
                    "model, train, dataloader, optimizer, lr_multiplier = (_c.model, _c.train, _c.dataloader, "
                    f"_c.optimizer, _c.lr_multiplier)\n{line}\n")
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_yacs_typos_name_the_key_and_suggest():
    with pytest.raises(ConfigError, match=r"unknown config key 'MODEL\.VIT\.WINDOW_SISE'; did you mean 'WINDOW_SIZE'"):
        load_config("mask_rcnn_vit_b_vitdet.yaml", ["MODEL.VIT.WINDOW_SISE=4"])


# --------------------------------------------------------------------------- non-finite loss
def test_a_non_finite_loss_stops_training_before_any_checkpoint_of_it(tiny_coco, tmp_path, capsys, monkeypatch):
    from detectron2.modeling import GeneralizedRCNN

    forward, calls = GeneralizedRCNN.forward, [0]

    def nan_at_iteration_3(self, batched_inputs):
        out = forward(self, batched_inputs)
        if self.training:
            calls[0] += 1
            if calls[0] == 4:  # iteration 3 (0-based), after the checkpoint of iteration 1
                out = {k: v * float("nan") for k, v in out.items()}
        return out

    monkeypatch.setattr(GeneralizedRCNN, "forward", nan_at_iteration_3)
    rc = main(["detect", "train", TINY, *RUN, "--output", str(tmp_path), *_register(tiny_coco)])
    err = capsys.readouterr().err
    assert rc == 2 and "Loss became infinite or NaN at iteration=3" in err and "last good one" in err
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    state = safe_torch_load(tmp_path / "model_0000001.pth")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_an_image_cut_after_its_header_fails_training_naming_the_file(tiny_coco, tmp_path, capsys):
    """The header passes registration; the pixel data is only decoded in training."""
    json_file, images = tiny_coco
    cut = shutil.copytree(images, tmp_path / "images")
    for png in cut.glob("*.png"):
        png.write_bytes(png.read_bytes()[:200])
    rc = main(["detect", "train", TINY, *RUN, "dataloader.train.dataset.names=det_fault_cut",
               "dataloader.test.dataset.names=det_fault_cut", "--output", str(tmp_path / "o"),
               "--register-coco", "det_fault_cut", str(json_file), str(cut)])
    out, err = capsys.readouterr()
    assert rc == 2 and re.search(rf"{cut}/00\d\.png: image file is truncated", err), err
    assert "Traceback" not in out + err  # Detectron2's train loop logs it with one; --debug keeps that


def test_an_exif_rotated_photo_is_checked_at_its_upright_size(tmp_path):
    """Phone photos store 20x40 pixels with EXIF orientation 6; Detectron2's read_image turns them
    upright (40x20 -> the json's width 20, height 40 after rotation), so registration must agree."""
    from PIL import Image

    from detection.data import check_image
    from detectron2.data.detection_utils import read_image

    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (200, 10, 10)).save(path, exif=exif.tobytes())
    assert read_image(str(path), format="RGB").shape[:2] == (40, 20)  # height 40, width 20
    assert check_image(path) == (20, 40)
