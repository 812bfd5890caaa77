"""Faults and bad input in MAE pretraining: SIGKILL at seeded random points (also in the middle of a
checkpoint write), failing writes, corrupt and malicious checkpoints, bad images, wrong data
sources, config typos, non-finite gradients."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fault_harness import EXPECTED, SUFFIX, FailingFile, finish, kill_plan, same_state, start, write_images, write_kind
from mae_backbone import io as mio
from mae_backbone.checkpoint import read_checkpoint
from mae_backbone.io import CheckpointWriteError
from mae_transfer.cli import main
from pretrain import CHECKPOINT_NAME, MaskedAutoencoderViT, TrainingDiverged
from pretrain.data import ImageFiles, build_transform, load_rgb
from pretrain import load_training_state
from pretrain.train import build_model, train
from unsafe_pickle import RunsCode

TINY_FLAGS = ["--model", "mae_vit_tiny_patch16", "--img-size", "32",
              "--model-kwargs", json.dumps({"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8}),
              "--decoder-depth", "1", "--decoder-dim", "32", "--decoder-heads", "2", "--num-workers", "0",
              "--no-tensorboard", "--no-progress", "--vis-every", "0", "--warmup-epochs", "1", "--lr", "2e-3",
              "--save-every", "1", "--log-every", "1", "--device", "cpu"]


def cli_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--data", str(data), "--output", str(out), *TINY_FLAGS, *extra]


def log_records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["type"] == kind]


# --------------------------------------------------------------------------- SIGKILL and resume
def test_sigkill_at_seeded_points_then_resume_equals_the_uninterrupted_run_bit_for_bit(tmp_path):
    data = tmp_path / "images"
    write_images(data, 16)
    flags = ["--epochs", "6", "--batch-size", "4", "--accum-iter", "2"]  # 2 optimizer steps per epoch
    ref = start("none", cli_args(data, tmp_path / "ref", *flags))  # runs alongside the killed runs
    out = tmp_path / "run"
    ckpt = out / CHECKPOINT_NAME
    plan = kill_plan(seed=3, epochs=6, steps_per_epoch=2)  # [step:4, write:2:0.375, replace:3]
    assert {spec.split(":")[0] for spec, _ in plan} == {"step", "write", "replace"}, plan
    for spec, saved in plan:
        rc, text = finish(start(spec, cli_args(data, out, *flags)))
        assert rc == -signal.SIGKILL, (spec, text[-2000:])
        if saved == 0:
            assert not ckpt.exists(), spec
        else:  # the file in place is always a whole, verified checkpoint of the last finished epoch
            assert load_training_state(ckpt)["epoch"] == saved, (plan, spec)
        if spec.startswith(("write", "replace")):
            assert list(out.glob(f".{CHECKPOINT_NAME}.*.tmp")), "the killed write leaves its temporary file"
    rc, text = finish(start("none", cli_args(data, out, *flags)))
    assert rc == 0, text[-3000:]
    rc_ref, text_ref = finish(ref)
    assert rc_ref == 0, text_ref[-3000:]

    runs = log_records(out, "run")
    assert [r["start_epoch"] for r in runs] == [0] + [saved for _, saved in plan], plan
    assert not list(out.glob(f".{CHECKPOINT_NAME}.*.tmp")), "stale temporaries are cleaned up"
    a, b = load_training_state(tmp_path / "ref" / CHECKPOINT_NAME), load_training_state(ckpt)
    assert a["epoch"] == b["epoch"] == 6 and a["step"] == b["step"] == 12
    for key in ("model", "optimizer", "counters", "step"):
        same_state(a[key], b[key], key)
    ea, eb = read_checkpoint(tmp_path / "ref" / "encoder.safetensors")[0], read_checkpoint(out / "encoder.safetensors")[0]
    same_state(ea, eb, "encoder")
    # the epoch losses after each resume are those of the uninterrupted run
    ref_loss = {r["epoch"]: r["loss"] for r in log_records(tmp_path / "ref", "epoch")}
    for r in log_records(out, "epoch"):
        assert r["loss"] == ref_loss[r["epoch"]], r["epoch"]


# --------------------------------------------------------------------------- failing writes
def fail_checkpoint_write(monkeypatch, nth: int, code: int, limit: int = 3000) -> None:
    """The ``nth`` write of ``checkpoint.pth`` fails with ``code`` after ``limit`` bytes."""
    import builtins

    count = [0]

    def fake_open(path, mode="r", *a, **kw):
        f = builtins.open(path, mode, *a, **kw)
        if "w" in mode and Path(path).name.startswith(f".{CHECKPOINT_NAME}."):
            count[0] += 1
            if count[0] == nth:
                return FailingFile(f, limit, code)
        return f

    monkeypatch.setattr(mio, "open", fake_open, raising=False)


def test_a_full_disk_at_a_checkpoint_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, image_folder, tiny_config,
                                                                               monkeypatch):
    out = tmp_path / "run"
    cfg = tiny_config(image_folder, out, epochs=3)
    fail_checkpoint_write(monkeypatch, 2, errno.ENOSPC)
    with pytest.raises(CheckpointWriteError, match=rf"{out / CHECKPOINT_NAME}: could not write it \(No space left "
                                                   r"on device\); the previous file is unchanged"):
        train(cfg)
    monkeypatch.undo()
    assert load_training_state(out / CHECKPOINT_NAME)["epoch"] == 1
    assert not list(out.glob(".*.tmp"))
    result = train(cfg)  # space freed: the same command continues from epoch 1
    assert result.resumed_from == out / CHECKPOINT_NAME and result.epochs_done == 3


def test_permission_denied_at_a_checkpoint_is_a_clear_cli_error(tmp_path, image_folder, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(cli_args(image_folder, out, "--epochs", "1", "--batch-size", "4")) == 0
    before = (out / CHECKPOINT_NAME).read_bytes()
    real_replace = os.replace

    def deny(src, dst, *a, **kw):
        if Path(dst).name == CHECKPOINT_NAME:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(dst))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(mio.os, "replace", deny)
    capsys.readouterr()
    assert main(cli_args(image_folder, out, "--epochs", "2", "--batch-size", "4")) == 2
    err = capsys.readouterr().err
    assert f"error: {out / CHECKPOINT_NAME}: could not write it (Operation not permitted); the previous file is " \
           "unchanged" in err and "Traceback" not in err
    assert (out / CHECKPOINT_NAME).read_bytes() == before


# --------------------------------------------------------------------------- corrupt / malicious checkpoints
@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory) -> tuple[Path, Path, bytes]:
    root = tmp_path_factory.mktemp("pre_faults")
    data = root / "images"
    write_images(data, 16)
    torch.set_num_threads(1)
    assert main(cli_args(data, root / "run", "--epochs", "1", "--batch-size", "4")) == 0
    return data, root / "run" / CHECKPOINT_NAME, (root / "run" / CHECKPOINT_NAME).read_bytes()


def _flip_in_tensor_data(data: bytes, tensor: torch.Tensor) -> bytes:
    raw = tensor.contiguous().numpy().tobytes()
    pos = data.find(raw[:32])
    assert pos > 0
    out = bytearray(data)
    out[pos + 5] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated or corrupt checkpoint"),
    ("empty", "the file is empty"),
    ("flip", "checksum mismatch"),
])
@pytest.mark.parametrize("how", ["auto", "--resume"])
def test_a_damaged_checkpoint_is_refused_by_name_and_not_overwritten(tmp_path, one_epoch_run, capsys, damage,
                                                                    message, how):
    data, good, good_bytes = one_epoch_run
    model_sd = load_training_state(good)["model"]
    damaged = {"truncate": good_bytes[: len(good_bytes) * 2 // 3], "empty": b"",
               "flip": _flip_in_tensor_data(good_bytes, model_sd["blocks.0.mlp.fc1.weight"])}[damage]
    out = tmp_path / "run"
    path = out / CHECKPOINT_NAME if how == "auto" else tmp_path / "elsewhere.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(damaged)
    extra = ["--resume", str(path)] if how == "--resume" else []
    capsys.readouterr()
    assert main(cli_args(data, out, "--epochs", "2", "--batch-size", "4", *extra)) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: {message}" in err and "Traceback" not in err, err
    assert path.read_bytes() == damaged  # never trained over, never replaced


def test_malicious_pickles_are_refused_and_never_run(tmp_path, one_epoch_run, capsys):
    data, good, _ = one_epoch_run
    marker = tmp_path / "pwned"
    state = load_training_state(good)
    state["counters"] = RunsCode(marker)
    evil = tmp_path / "run" / CHECKPOINT_NAME
    evil.parent.mkdir()
    torch.save(state, evil)
    other = tmp_path / "evil.pth"
    torch.save({"model": RunsCode(marker)}, other)
    for argv, rc in ((cli_args(data, tmp_path / "run", "--epochs", "2", "--batch-size", "4"), 2),  # auto-resume
                     (cli_args(data, tmp_path / "run2", "--resume", str(other), "--batch-size", "4"), 2),
                     (["visualize", str(evil), str(next(data.rglob("*.png"))), "-o", str(tmp_path / "v.png")], 2)):
        capsys.readouterr()
        assert main(argv) == rc
        err = capsys.readouterr().err
        assert "refused to load" in err and "posix.system" in err and "Traceback" not in err, err
    assert not marker.exists()


# --------------------------------------------------------------------------- non-finite gradients
class NanGradMAE(MaskedAutoencoderViT):
    """Our MAE whose n-th forward calls (1-based) return a finite loss whose gradient is NaN."""

    def __init__(self, nan_grad_calls=(), **kwargs):
        super().__init__(**kwargs)
        self.calls, self.nan_grad_calls = 0, set(nan_grad_calls)

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        self.calls += 1
        loss, pred, mask = super().forward(imgs, mask_ratio, noise)
        if self.calls in self.nan_grad_calls or "all" in self.nan_grad_calls:
            loss = loss + 0.0 * torch.sqrt(self.cls_token.sum() * 0.0)  # value 0, gradient 0 * inf = NaN
        return loss, pred, mask


def nan_grad_model(cfg, calls):
    with torch.device("meta"):
        kwargs = build_model(cfg).config()
    torch.manual_seed(cfg.seed)
    return NanGradMAE(nan_grad_calls=calls, **kwargs)


def test_a_nonfinite_gradient_with_a_finite_loss_skips_the_step_and_never_reaches_the_weights(
        tmp_path, image_folder, tiny_config):
    cfg = tiny_config(image_folder, tmp_path / "run", epochs=1)
    result = train(cfg, model=nan_grad_model(cfg, {2}))
    assert result.history[0]["nonfinite_steps"] == 1
    state = load_training_state(result.checkpoint)
    assert state["counters"]["nonfinite_steps"] == 1 and state["step"] == 4
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {3.0}
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_nonfinite_gradients_in_a_row_stop_the_run_and_keep_the_checkpoint(tmp_path, image_folder, tiny_config):
    out = tmp_path / "run"
    train(tiny_config(image_folder, out, epochs=1))
    before = (out / CHECKPOINT_NAME).read_bytes()
    cfg = tiny_config(image_folder, out, epochs=3, max_nonfinite=2)
    with pytest.raises(TrainingDiverged, match="2 optimizer steps in a row had a non-finite loss or gradient"):
        train(cfg, model=nan_grad_model(cfg, {"all"}))
    assert (out / CHECKPOINT_NAME).read_bytes() == before


# --------------------------------------------------------------------------- images
@pytest.fixture
def bomb_limit(monkeypatch):
    """Pillow's decompression-bomb limit lowered so that an 80x80 image is over twice of it (an
    error) and the 36x40 test images are under it."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_each_kind_of_image_loads_as_rgb_or_is_skipped_naming_the_file(tmp_path, kind, bomb_limit):
    path = write_kind(tmp_path / f"{kind}{SUFFIX.get(kind, '.png')}", kind)
    item = ImageFiles([path], build_transform("crop_rand_colorjit", 32))[(0, 7)]
    if EXPECTED[kind] == "skipped":
        assert item.image is None and item.failure.startswith(f"{path}: ")
        return
    assert item.failure is None and item.image.shape == (3, 32, 32) and torch.isfinite(item.image).all()
    img = load_rgb(path)
    assert img.mode == "RGB"
    if EXPECTED[kind] is not None:
        assert np.abs(np.asarray(img, dtype=int)[0, 0] - EXPECTED[kind]).max() <= 2, np.asarray(img)[0, 0]


def test_a_folder_of_every_kind_trains_and_counts_the_skipped_files(tmp_path, tiny_config, bomb_limit):
    data = tmp_path / "images"
    write_images(data, 4)
    for kind in EXPECTED:
        write_kind(data / "class0" / f"{kind}{SUFFIX.get(kind, '.png')}", kind)
    result = train(tiny_config(data, tmp_path / "run", epochs=1, batch_size=15))  # one step, every file
    rec = result.history[0]
    skipped = sorted(k for k, v in EXPECTED.items() if v == "skipped")
    assert rec["skipped_images"] == len(skipped) and rec["images"] == 15 - len(skipped)
    assert sorted(Path(m.split(":")[0]).stem for m in rec["skipped_files"]) == skipped


# --------------------------------------------------------------------------- data sources and config typos
@pytest.mark.parametrize("layout, message", [
    ("missing", "no such folder or list file"),
    ("empty", "no image files"),
    ("no_images", "no image files"),
    ("list_of_missing", "none of the 2 image files can be read"),
])
def test_wrong_data_sources_are_errors_naming_them(tmp_path, capsys, layout, message):
    src = tmp_path / "data"
    if layout in ("empty", "no_images"):
        (src / "class0").mkdir(parents=True)
        if layout == "no_images":
            (src / "class0" / "notes.txt").write_text("x")
    elif layout == "list_of_missing":
        src = tmp_path / "list.txt"
        src.write_text("a.png\n# comment\nsub/b.jpg\n")
    capsys.readouterr()
    assert main(cli_args(src, tmp_path / "run", "--epochs", "1")) == 2
    err = capsys.readouterr().err
    named = str(src) if layout != "list_of_missing" else str(tmp_path / "a.png")
    assert message in err and named in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / CHECKPOINT_NAME).exists()


@pytest.mark.parametrize("name, content, key, suggestion", [
    ("run.yaml", "mask_ration: 0.5\n", "mask_ration", "mask_ratio"),
    ("run.json", '{"decoder-dept": 2}', "decoder-dept", "decoder_depth"),
    ("run.yml", "model_kwargs: {dpeth: 2}\n", "dpeth", "depth"),
])
def test_config_file_typos_name_the_key_and_suggest_the_closest(tmp_path, capsys, name, content, key, suggestion):
    (tmp_path / name).write_text(content)
    capsys.readouterr()
    assert main(["pretrain", "--config", str(tmp_path / name), "--data", str(tmp_path), "--output",
                 str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"'{key}'" in err and f"did you mean '{suggestion}'?" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_mistyped_flags_name_the_flag_and_suggest_the_closest(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--data", str(tmp_path), "--output", str(tmp_path / "run"), "--mask-ration", "0.5"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --mask-ration (did you mean --mask-ratio?) 0.5" in capsys.readouterr().err


def test_a_log_line_cut_by_a_kill_does_not_break_the_next_runs_lines(tmp_path):
    from training.monitor import LOG_NAME, Monitor

    (tmp_path / LOG_NAME).write_text('{"type": "run", "start_epoch": 0}\n{"type": "step", "lo')
    monitor = Monitor(tmp_path, tensorboard=False, progress=False)
    monitor.log({"type": "run", "start_epoch": 1})
    monitor.log({"type": "epoch", "epoch": 2})
    lines = (tmp_path / LOG_NAME).read_text().splitlines()
    assert lines[1] == '{"type": "step", "lo'
    assert [json.loads(x)["type"] for x in lines[:1] + lines[2:]] == ["run", "run", "epoch"]


def test_a_folder_with_a_symlink_cycle_trains_on_each_image_once(tmp_path, capsys, caplog):
    """A folder whose sub-folders link back up the tree: 16 images, not 336 (each counted once)."""
    data = tmp_path / "images"
    write_images(data, 16)
    sub = sorted(p for p in data.iterdir() if p.is_dir())
    os.symlink("..", sub[0] / "up")
    os.symlink(".", sub[-1] / "self")
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--output", str(out), "--batch-size", "4", "--epochs", "1",
                 *TINY_FLAGS]) == 0
    runs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["images"] for r in runs if r["type"] == "run"] == [16]
    assert "symlinked paths to folders or images already listed" in caplog.text
