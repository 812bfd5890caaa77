"""Faults and bad input in fine-tuning and linear probing: SIGKILL at seeded points (also in the
middle of a checkpoint write) then resume, failing writes, damaged and malicious checkpoints
(resume, pretrained weights, --eval), bad images, wrong folder layouts, config typos, non-finite
losses and gradients."""
from __future__ import annotations

import errno
import importlib
import json
import os
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from classification.config import make_config
from classification.data import ClassFolder, build_transform, find_classes
from classification.state import CHECKPOINT_NAME, MODEL_NAME, load_training_state
from classification.train import train
from mae_backbone import create_vit
from mae_backbone import io as mio
from mae_backbone.checkpoint import save_checkpoint
from mae_backbone.io import CheckpointWriteError
from mae_transfer.cli import main
from training import TrainingDiverged

import fault_harness as fh
from cls_helpers import TINY_VIT, tiny_run, write_dataset
from unsafe_pickle import RunsCode


def cli_args(protocol: str, data: Path, out: Path, checkpoint: Path | None, *extra: str) -> list[str]:
    args = [protocol, "--data", str(data), "--output", str(out), "--img-size", "32", "--batch-size", "8",
            "--warmup-epochs", "1", "--num-workers", "0", "--no-tensorboard", "--no-progress", "--log-every", "1",
            "--device", "cpu"]
    return args + (["--checkpoint", str(checkpoint)] if checkpoint else []) + list(extra)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """4 classes x (4 train, 2 val) images: 2 optimizer steps per epoch at batch 8; a tiny encoder."""
    root = tmp_path_factory.mktemp("cls_faults")
    data = write_dataset(root / "data", per_class=(4, 2))
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16", img_size=32, **TINY_VIT)
    enc = root / "encoder.safetensors"
    save_checkpoint(vit, enc, {"arch": "vit_tiny_patch16", "arch_overrides": TINY_VIT})
    return data, enc


def compare_runs(ref: Path, run: Path) -> None:
    a, b = load_training_state(ref / CHECKPOINT_NAME), load_training_state(run / CHECKPOINT_NAME)
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"]
    for key in ("model", "optimizer", "counters", "ema"):
        fh.same_state(a[key], b[key], key)
    strip = lambda hist: [{k: v for k, v in r.items() if k not in ("seconds", "img_per_s")} for r in hist]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])  # losses and val metrics of every epoch
    from mae_backbone.checkpoint import read_checkpoint

    fh.same_state(read_checkpoint(ref / MODEL_NAME)[0], read_checkpoint(run / MODEL_NAME)[0], MODEL_NAME)


# --------------------------------------------------------------------------- SIGKILL and resume
@pytest.mark.parametrize("protocol, seed, epochs", [("finetune", 3, 4), ("linprobe", 11, 3)])
def test_sigkill_at_seeded_points_then_resume_equals_the_uninterrupted_run_bit_for_bit(tmp_path, small, protocol,
                                                                                      seed, epochs):
    data, enc = small
    flags = ["--epochs", str(epochs)] + (["--ema-decay", "0.9"] if protocol == "finetune" else [])
    ref = fh.start("none", cli_args(protocol, data, tmp_path / "ref", enc, *flags))
    out = tmp_path / "run"
    kinds = ("step", "write", "replace") if protocol == "finetune" else ("write",)
    plan = fh.kill_plan(seed, epochs, steps_per_epoch=2, kinds=kinds)
    assert [p[0].split(":")[0] for p in plan] == list(kinds), plan
    for spec, saved in plan:
        rc, text = fh.finish(fh.start(spec, cli_args(protocol, data, out, enc, *flags)))
        assert rc == -signal.SIGKILL, (spec, text[-2000:])
        ckpt = out / CHECKPOINT_NAME
        assert (not ckpt.exists()) if saved == 0 else load_training_state(ckpt)["epoch"] == saved, (plan, spec)
    rc, text = fh.finish(fh.start("none", cli_args(protocol, data, out, enc, *flags)))
    assert rc == 0, text[-3000:]
    rc_ref, text_ref = fh.finish(ref)
    assert rc_ref == 0, text_ref[-3000:]
    runs = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["type"] == "run"]
    assert [r["start_epoch"] for r in runs] == [0] + [saved for _, saved in plan], plan
    assert not list(out.glob(".*.tmp"))
    compare_runs(tmp_path / "ref", out)


# --------------------------------------------------------------------------- failing writes
def fail_write_of(monkeypatch, name: str, nth: int, code: int, limit: int = 2000) -> None:
    import builtins

    count = [0]

    def fake_open(path, mode="r", *a, **kw):
        f = builtins.open(path, mode, *a, **kw)
        if "w" in mode and Path(path).name.startswith(f".{name}."):
            count[0] += 1
            if count[0] == nth:
                return fh.FailingFile(f, limit, code)
        return f

    monkeypatch.setattr(mio, "open", fake_open, raising=False)


def test_a_full_disk_at_a_checkpoint_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, small, monkeypatch):
    data, enc = small
    out = tmp_path / "run"
    cfg = make_config("finetune", tiny_run(data, out, enc, epochs=3))
    fail_write_of(monkeypatch, CHECKPOINT_NAME, 2, errno.ENOSPC)
    with pytest.raises(CheckpointWriteError, match=rf"{out / CHECKPOINT_NAME}: could not write it \(No space left on "
                                                   r"device\); the previous file is unchanged"):
        train(cfg)
    monkeypatch.undo()
    assert load_training_state(out / CHECKPOINT_NAME)["epoch"] == 1 and not list(out.glob(".*.tmp"))
    assert train(cfg).epochs_done == 3


def test_a_failing_export_is_a_clear_cli_error(tmp_path, small, monkeypatch, capsys):
    data, enc = small
    out = tmp_path / "run"
    fail_write_of(monkeypatch, MODEL_NAME, 1, errno.EDQUOT, limit=0)
    capsys.readouterr()
    assert main(cli_args("linprobe", data, out, enc, "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert f"error: {out / MODEL_NAME}: could not write it (Disk quota exceeded); no file was written" in err
    assert "Traceback" not in err and load_training_state(out / CHECKPOINT_NAME)["epoch"] == 1


# --------------------------------------------------------------------------- damaged / malicious checkpoints
@pytest.fixture(scope="module")
def one_epoch(small, tmp_path_factory) -> tuple[Path, bytes]:
    data, enc = small
    out = tmp_path_factory.mktemp("cls_one_epoch") / "run"
    torch.set_num_threads(1)
    assert main(cli_args("linprobe", data, out, enc, "--epochs", "1")) == 0
    return out, (out / CHECKPOINT_NAME).read_bytes()


def damage(data: bytes, kind: str, tensor: torch.Tensor | None = None) -> bytes:
    if kind == "truncate":
        return data[: len(data) // 2]
    if kind == "empty":
        return b""
    raw = tensor.contiguous().numpy().tobytes()  # flip one bit inside the tensor's bytes
    pos = data.find(raw[:32]) + 3
    out = bytearray(data)
    out[pos] ^= 0x02
    return bytes(out)


@pytest.mark.parametrize("kind, message", [("truncate", "truncated or corrupt"), ("empty", "the file is empty"),
                                           ("flip", "checksum mismatch")])
def test_a_damaged_training_checkpoint_is_refused_for_resume_and_eval(tmp_path, small, one_epoch, capsys, kind,
                                                                      message):
    data, enc = small
    good_out, good = one_epoch
    bad = damage(good, kind, load_training_state(good_out / CHECKPOINT_NAME)["model"]["blocks.1.mlp.fc2.weight"])
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINT_NAME).write_bytes(bad)
    for argv in (cli_args("linprobe", data, out, enc, "--epochs", "2"),
                 cli_args("linprobe", data, tmp_path / "ev", out / CHECKPOINT_NAME, "--eval")):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"error: {out / CHECKPOINT_NAME}: {message}" in err and "Traceback" not in err, err
    assert (out / CHECKPOINT_NAME).read_bytes() == bad


@pytest.mark.parametrize("kind, message", [("truncate", "truncated or corrupt"), ("flip", "checksum mismatch")])
def test_damaged_pretrained_weights_are_refused_by_name(tmp_path, small, capsys, kind, message):
    data, enc = small
    bad = tmp_path / "encoder.safetensors"
    from mae_backbone.checkpoint import read_checkpoint

    bad.write_bytes(damage(enc.read_bytes(), kind, read_checkpoint(enc)[0]["blocks.0.mlp.fc1.weight"]))
    capsys.readouterr()
    assert main(cli_args("finetune", data, tmp_path / "run", bad, "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}: {message}" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / CHECKPOINT_NAME).exists()


def test_malicious_pickles_are_refused_everywhere_a_checkpoint_is_read(tmp_path, small, one_epoch, capsys):
    data, enc = small
    good_out, _ = one_epoch
    marker = tmp_path / "pwned"
    state = load_training_state(good_out / CHECKPOINT_NAME)
    state["history"] = [RunsCode(marker)]
    out = tmp_path / "run"
    out.mkdir()
    torch.save(state, out / CHECKPOINT_NAME)  # resume
    evil_pth = tmp_path / "mae_pretrain_vit_evil.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 32)}, "args": RunsCode(marker)}, evil_pth)
    evil_pkl = tmp_path / "weights.pkl"
    evil_pkl.write_bytes(pickle.dumps({"model": RunsCode(marker)}))
    cases = [cli_args("linprobe", data, out, enc, "--epochs", "2"),                     # auto-resume
             cli_args("finetune", data, tmp_path / "r1", enc, "--resume", str(out / CHECKPOINT_NAME)),
             cli_args("finetune", data, tmp_path / "r2", evil_pth, "--model", "vit_tiny_patch16"),  # pretrained
             cli_args("finetune", data, tmp_path / "r3", evil_pkl, "--model", "vit_tiny_patch16"),
             cli_args("finetune", data, tmp_path / "r4", evil_pth, "--eval"),            # evaluation
             cli_args("finetune", data, tmp_path / "r5", out / CHECKPOINT_NAME, "--eval")]
    for argv in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "refused to load" in err and ("posix.system" in err or "allow-list" in err), (argv, err)
        assert "Traceback" not in err
    assert not marker.exists()


# --------------------------------------------------------------------------- non-finite losses / gradients
class ScriptedLoss(torch.nn.Module):
    """The recipe's criterion whose n-th calls return NaN (``loss``) or a finite value with a NaN
    gradient (``grad``)."""

    def __init__(self, real: torch.nn.Module, calls, kind: str):
        super().__init__()
        self.real, self.calls, self.kind, self.n = real, set(calls), kind, 0

    def forward(self, logits, target):
        self.n += 1
        loss = self.real(logits, target)
        if self.n in self.calls or "all" in self.calls:
            if self.kind == "loss":
                return loss * float("nan")
            return loss + 0.0 * torch.sqrt(logits.sum() * 0.0)
        return loss


def script_loss(monkeypatch, calls, kind: str) -> None:
    ct = importlib.import_module("classification.train")  # the package exports a function of that name

    real = ct.build_criterion
    monkeypatch.setattr(ct, "build_criterion", lambda cfg, mixup: ScriptedLoss(real(cfg, mixup), calls, kind))


@pytest.mark.parametrize("protocol", ["finetune", "linprobe"])
@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_a_nonfinite_step_is_skipped_and_counted_and_the_weights_stay_finite(tmp_path, small, monkeypatch, protocol,
                                                                           kind):
    data, enc = small
    script_loss(monkeypatch, {3}, kind)
    result = train(make_config(protocol, tiny_run(data, tmp_path / "run", enc, epochs=2)))
    assert [r["nonfinite_steps"] for r in result.history] == [0, 1]
    state = load_training_state(result.checkpoint)
    assert state["counters"]["nonfinite_steps"] == 1 and state["step"] == 4
    steps = {float(s["step"]) if torch.is_tensor(s.get("step")) else None for s in state["optimizer"]["state"].values()}
    assert steps in ({3.0}, {None})  # AdamW counts 3 steps; LARS keeps no step count
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(np.isfinite(r["val"]["loss"]) for r in result.history)


@pytest.mark.parametrize("protocol", ["finetune", "linprobe"])
def test_nonfinite_steps_in_a_row_stop_with_a_clear_error_and_keep_the_checkpoint(tmp_path, small, monkeypatch,
                                                                                 protocol):
    data, enc = small
    out = tmp_path / "run"
    train(make_config(protocol, tiny_run(data, out, enc, epochs=1)))
    before = (out / CHECKPOINT_NAME).read_bytes()
    script_loss(monkeypatch, {"all"}, "loss")
    with pytest.raises(TrainingDiverged, match=r"2 optimizer steps in a row had a non-finite loss or gradient .*"
                                               r"The last checkpoint was not overwritten"):
        train(make_config(protocol, tiny_run(data, out, enc, epochs=3, max_nonfinite=2)))
    assert (out / CHECKPOINT_NAME).read_bytes() == before


# --------------------------------------------------------------------------- images
@pytest.mark.parametrize("protocol", ["finetune", "linprobe"])
def test_each_kind_of_image_loads_as_rgb_or_is_skipped_naming_the_file(tmp_path, monkeypatch, protocol):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    root = tmp_path / "train"
    (root / "c").mkdir(parents=True)
    paths = {k: fh.write_kind((root / "c" / k).with_suffix(fh.SUFFIX.get(k, ".png")), k) for k in fh.EXPECTED}
    cfg = make_config(protocol, {"data": str(tmp_path), "output": str(tmp_path / "o"), "img_size": 32}).resolve(None)
    for training in (True, False):
        ds = ClassFolder(root, build_transform(cfg, is_training=training))
        assert len(ds) == len(fh.EXPECTED)
        for i, (path, _) in enumerate(ds.samples):
            item = ds[(i, 5)]
            kind = path.stem
            if fh.EXPECTED[kind] == "skipped":
                assert item.image is None and item.failure.startswith(f"{paths[kind]}: "), kind
            else:
                assert item.failure is None and item.image.shape == (3, 32, 32), kind
                assert torch.isfinite(item.image).all(), kind


# --------------------------------------------------------------------------- layouts and config typos
@pytest.mark.parametrize("layout, message", [
    ("no_train", "{data}/train: no such folder (expected one sub-folder per class)"),
    ("no_val", "{data}/val: no such folder"),
    ("flat_train", "{data}/train: no class sub-folders (expected root/<class>/<image>)"),
    ("empty_class", "{data}/train: class folders without image files (.jpg"),
    ("val_classes_differ", "only in {data}/val: extra"),
    ("data_is_a_file", "{data}/train: no such folder"),
])
def test_wrong_folder_layouts_are_errors_naming_the_folder(tmp_path, small, capsys, layout, message):
    _, enc = small
    data = tmp_path / "data"
    if layout == "data_is_a_file":
        data.write_text("x")
    else:
        write_dataset(data, per_class=(1, 1), classes=("a", "b"))
    if layout == "no_train":
        os.rename(data / "train", tmp_path / "elsewhere")
    elif layout == "no_val":
        os.rename(data / "val", tmp_path / "elsewhere")
    elif layout == "flat_train":
        for f in list((data / "train").rglob("*.png")):
            f.rename(data / "train" / f.name)
        for d in ("a", "b"):
            (data / "train" / d).rmdir()
    elif layout == "empty_class":
        for f in (data / "train" / "b").iterdir():
            f.unlink()
    elif layout == "val_classes_differ":
        (data / "val" / "extra").mkdir()
    capsys.readouterr()
    assert main(cli_args("finetune", data, tmp_path / "run", enc, "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert message.format(data=data) in err and "Traceback" not in err, err


@pytest.mark.parametrize("protocol, content, expected", [
    ("finetune", "layer_decy: 0.7\n", "unknown option 'layer_decy'; did you mean 'layer_decay'?"),
    ("linprobe", '{"epoch": 3}', "unknown option 'epoch'; did you mean 'epochs'?"),
    ("finetune", "model_kwargs: {dpeth: 2}\n", "'dpeth' is not a ViT option; did you mean 'depth'?"),
])
def test_config_file_typos_name_the_key_and_suggest_the_closest(tmp_path, small, capsys, protocol, content, expected):
    data, enc = small
    path = tmp_path / ("run.json" if content.startswith("{") else "run.yaml")
    path.write_text(content)
    capsys.readouterr()
    assert main(cli_args(protocol, data, tmp_path / "run", enc, "--config", str(path))) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert find_classes(data / "train") and not (tmp_path / "run").exists()


def test_mistyped_flags_name_the_flag_and_suggest_the_closest(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--data", str(tmp_path), "--output", str(tmp_path / "run"), "--reprobb=0.1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --reprobb=0.1 (did you mean --reprob?)" in capsys.readouterr().err
