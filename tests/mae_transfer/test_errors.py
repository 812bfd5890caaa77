"""The one error boundary of ``mae-transfer`` (``mae_transfer.cli.main``) and ``training.errors``:
a user's mistake (an output path that is a file or read-only, a full disk, a file convert does not
recognise) is one line naming the path or key with exit status 2, no traceback, and nothing earlier
changed; ``--debug`` shows the traceback; Ctrl-C exits 130 and says how to resume."""
from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from fault_harness import write_images
from training import errors
from mae_transfer.cli import main
from training.errors import UserError, check_output_dir, os_error_message

TINY_PRETRAIN = ["--model", "mae_vit_tiny_patch16", "--img-size", "32",
                 "--model-kwargs", '{"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8}',
                 "--decoder-depth", "1", "--decoder-dim", "32", "--decoder-heads", "2", "--num-workers", "0",
                 "--no-tensorboard", "--no-progress", "--vis-every", "0", "--warmup-epochs", "1",
                 "--batch-size", "4", "--save-every", "1", "--log-every", "1", "--device", "cpu"]


def digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def one_line_error(capsys, *names: object) -> str:
    """The captured stderr: a ``mae-transfer ...: error:`` line naming every one of ``names``."""
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out, err
    assert "error:" in err and all(str(n) in err for n in names), err
    return err


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    write_images(root, 16)
    return root


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)``: nothing can be created in ``folder`` (chmod; root ignores permission
    bits, so ``os.access`` also says no for it and the files under it)."""
    def make(folder: Path) -> Path:
        folder.chmod(0o555)
        real_access = os.access

        def access(path, mode, *a, **kw):
            if mode & os.W_OK and Path(path).absolute().is_relative_to(folder.absolute()):
                return False
            return real_access(path, mode, *a, **kw)

        monkeypatch.setattr(errors.os, "access", access)
        return folder

    yield make


# --------------------------------------------------------------------------- training.errors
def test_check_output_dir_names_the_path(tmp_path, read_only):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(UserError, match=f"{a_file} is a file"):
        check_output_dir(a_file, "--output")
    with pytest.raises(UserError, match=f"{a_file}/sub cannot be created: {a_file} is a file"):
        check_output_dir(a_file / "sub", "--output")
    assert check_output_dir(tmp_path / "new" / "deep") == tmp_path / "new" / "deep"  # creatable, not created
    assert not (tmp_path / "new").exists()
    assert check_output_dir(tmp_path / "made", create=True).is_dir()
    (tmp_path / "locked").mkdir()
    locked = read_only(tmp_path / "locked")
    with pytest.raises(UserError, match=f"{locked}/run is not writable"):
        check_output_dir(locked / "run")
    with pytest.raises(UserError, match=f"{locked} is not writable"):
        check_output_dir(locked)
    assert isinstance(UserError("x"), ValueError)


def test_os_error_messages_name_the_file():
    assert os_error_message(OSError(errno.ENOSPC, "No space left on device", "/d/x.png")) == \
        "/d/x.png: no space left on device"
    assert os_error_message(OSError(errno.EROFS, "Read-only file system", "/m")) == "/m: read-only file system"
    assert os_error_message(OSError(errno.ELOOP, "Too many levels of symbolic links", "/a/b")) == "/a/b: symlink loop"
    assert os_error_message(OSError(errno.EACCES, "Permission denied", "a", None, "b")) == "a -> b: permission denied"


# --------------------------------------------------------------------------- an output path that is a file
def _is_a_file_cases(tmp_path: Path, images: Path, target: Path) -> dict[str, list[str]]:
    return {
        "pretrain": ["pretrain", "--data", str(images), "--output", str(target), *TINY_PRETRAIN],
        "finetune": ["finetune", "--data", str(images), "--output", str(target), "--device", "cpu"],
        "demo": ["demo", "--output", str(target), "--quick"],
        "data sample": ["data", "sample", str(target)],
        "bench": ["bench", "random", "--output", str(target)],
        "convert --to hf": ["convert", str(tmp_path / "enc.pth"), str(target), "--to", "hf"],
    }


@pytest.mark.parametrize("command", ["pretrain", "finetune", "demo", "data sample", "bench", "convert --to hf"])
def test_an_output_path_that_is_a_file_is_an_error(tmp_path, images, capsys, command):
    from mae_backbone import create_vit

    torch.save(create_vit("vit_tiny_patch16", img_size=32, patch_size=8, depth=1).state_dict(), tmp_path / "enc.pth")
    target = tmp_path / "results.txt"
    target.write_text("my notes\n")
    before = digest(target)
    assert main(_is_a_file_cases(tmp_path, images, target)[command]) == 2
    err = one_line_error(capsys, target, "is a file")
    assert err.startswith(f"mae-transfer {command.split(' --')[0]}: error:"), err
    assert digest(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["enc.pth", "images", "results.txt"]


def test_convert_to_a_path_that_is_a_folder_is_an_error(tmp_path, capsys):
    from mae_backbone import create_vit

    torch.save(create_vit("vit_tiny_patch16", img_size=32, patch_size=8, depth=1).state_dict(), tmp_path / "enc.pth")
    (tmp_path / "out").mkdir()
    assert main(["convert", str(tmp_path / "enc.pth"), str(tmp_path / "out"), "--to", "timm"]) == 2
    one_line_error(capsys, tmp_path / "out", "is a folder")


# --------------------------------------------------------------------------- read-only outputs
@pytest.mark.parametrize("command", ["pretrain", "finetune", "data sample"])
def test_a_read_only_output_folder_is_an_error(tmp_path, images, capsys, read_only, command):
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(locked)
    target = locked / "run"
    argv = _is_a_file_cases(tmp_path, images, target)[command]
    assert main(argv) == 2
    one_line_error(capsys, target, "not writable")
    assert list(locked.iterdir()) == []


def test_resuming_into_a_read_only_run_folder_is_an_error_and_keeps_the_checkpoint(tmp_path, images, capsys, read_only):
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(images), "--output", str(run), "--epochs", "1", *TINY_PRETRAIN]) == 0
    checkpoint = run / "checkpoint.pth"
    before = {p.name: digest(p) for p in run.iterdir() if p.is_file()}
    read_only(run)
    capsys.readouterr()
    assert main(["pretrain", "--data", str(images), "--output", str(run), "--epochs", "2", *TINY_PRETRAIN]) == 2
    one_line_error(capsys, run, "not writable")
    assert {p.name: digest(p) for p in run.iterdir() if p.is_file()} == before and checkpoint.name in before


# --------------------------------------------------------------------------- a full disk
def test_data_sample_on_a_full_disk_names_the_file(tmp_path, capsys, monkeypatch):
    from PIL import Image

    real_save = Image.Image.save
    written = []

    def save(self, fp, *a, **kw):
        if len(written) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))
        written.append(fp)
        return real_save(self, fp, *a, **kw)

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "sample"
    assert main(["data", "sample", str(out)]) == 2
    err = one_line_error(capsys, "no space left on device")
    assert err.startswith("mae-transfer data sample: error: ") and str(out) in err, err


# --------------------------------------------------------------------------- convert: unknown keys
def test_convert_refuses_keys_it_does_not_recognise_unless_the_format_is_named(tmp_path, capsys):
    from mae_backbone import create_vit

    sd = create_vit("vit_tiny_patch16", img_size=32, patch_size=8, depth=1).state_dict()
    sd["adapter.down.weight"] = torch.zeros(2, 2)  # not a ViT key: read as timm, passed through
    src = tmp_path / "mixed.pth"
    torch.save(sd, src)
    dst = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(dst)]) == 2
    one_line_error(capsys, src, "adapter.down.weight", "--from timm")
    assert not dst.exists()
    assert main(["convert", str(src), str(dst), "--from", "timm"]) == 0  # named: converted as it is, with a note
    assert "note: adapter.down.weight is not a ViT encoder key" in capsys.readouterr().out and dst.exists()


# --------------------------------------------------------------------------- --debug, unknown errors
def test_debug_shows_the_traceback(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        main(["--debug", "data", "sample", str(target)])


def test_a_bug_is_not_hidden(monkeypatch):
    import mae_transfer.sample_data as sample_data

    def bug(*a, **kw):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(sample_data, "write_sample_data", bug)
    with pytest.raises(ZeroDivisionError):
        main(["data", "sample", "/tmp/never-written-sample"])


# --------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_exits_130_says_how_to_resume_and_the_checkpoint_resumes(tmp_path, images):
    from pretrain import load_training_state

    run = tmp_path / "run"
    argv = ["pretrain", "--data", str(images), "--output", str(run), "--epochs", "5000", *TINY_PRETRAIN]
    # as from a terminal: SIGINT not ignored (a suite started as a background job, e.g. `make test &`
    # from a script, inherits SIGINT ignored, and so would the run)
    proc = subprocess.Popen([sys.executable, "-m", "mae_transfer", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoint = run / "checkpoint.pth"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert checkpoint.exists(), proc.communicate(timeout=30)
    time.sleep(0.3)
    # Ctrl-C as a user gives it: once, and again if the run is still going 5 s later
    for _ in range(3):
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=5)
            break
        except subprocess.TimeoutExpired:
            continue
    else:
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err + out, err
    hint = f"mae-transfer pretrain: interrupted; resume with: mae-transfer pretrain --data {images} --output {run}"
    assert hint in err and err.rstrip().endswith(f"--resume {checkpoint}"), err[-2000:]
    epoch = load_training_state(checkpoint)["epoch"]  # intact: it loads
    assert epoch >= 1
    assert main(["pretrain", "--data", str(images), "--output", str(run), *TINY_PRETRAIN,
                 "--epochs", str(epoch + 1), "--resume", str(checkpoint)]) == 0
    assert load_training_state(checkpoint)["epoch"] == epoch + 1


def test_ctrl_c_in_a_command_without_a_checkpoint_says_run_it_again(monkeypatch, capsys):
    import mae_transfer.sample_data as sample_data

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_data, "write_sample_data", interrupted)
    assert main(["data", "sample", "/tmp/never-written-sample"]) == 130
    err = capsys.readouterr().err
    assert "mae-transfer data sample: interrupted; resume with: mae-transfer data sample /tmp/never-written-sample " \
           "(run it again)" in err and "Traceback" not in err


# --------------------------------------------------------------------------- data-loading workers
def test_the_default_workers_fit_the_machine():
    from torch.utils.data import DataLoader

    from pretrain import PretrainConfig
    from training.options import RunOptions

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = RunOptions.default("num_workers")
    assert workers == min(8, cpus) and PretrainConfig.default("num_workers") == workers
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when a loader asks for more workers than CPUs
        DataLoader(range(4), num_workers=workers).check_worker_number_rationality()


@pytest.mark.parametrize("argv, command", [
    (["detect", "train", "mask_rcnn_vitdet_b_100ep", "--output", "out"], "detect train"),
    (["segment", "train", "cfg.py", "--work-dir", "wd"], "segment train"),
])
def test_ctrl_c_in_detect_or_segment_training_resumes_with_their_flag(monkeypatch, capsys, argv, command):
    """Run again without ``--resume``, ``detect train`` / ``segment train`` would start over and
    overwrite the run's checkpoints: the hint carries the flag that continues the run."""
    import detection.engine
    import mae_transfer.commands.segment as segment_command

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(detection.engine, "train_main", interrupted)
    monkeypatch.setattr("detectron2.engine.launch", lambda fn, *a, **k: fn())
    monkeypatch.setitem(segment_command._ACTIONS, "train", interrupted)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f"mae-transfer {command}: interrupted; resume with: mae-transfer {' '.join(argv)} --resume" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["pretrain", "finetune", "linprobe"])
def test_debug_shows_the_traceback_in_the_trainers_too(tmp_path, command):
    """The trainers report their own errors (``training.cli.run_command``): ``--debug`` reaches it."""
    from training import DataError

    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    with pytest.raises(DataError, match="empty"):
        main(["--debug", command, "--data", str(empty), "--output", str(tmp_path / "out"), "--device", "cpu"])


def test_debug_shows_the_traceback_in_visualize(tmp_path):
    missing = tmp_path / "no_such_checkpoint.pth"
    with pytest.raises(Exception, match="no_such_checkpoint"):
        main(["--debug", "visualize", str(missing), str(tmp_path / "x.png"), "-o", str(tmp_path / "fig.png")])
