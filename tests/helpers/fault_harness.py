"""Run the real ``mae-transfer`` command line and SIGKILL it at a chosen point (fault tests only).

    python fault_harness.py KILL -- pretrain --data ... --output ...

KILL is one of
    none            run to the end;
    step:N          right after this process's N-th optimizer step;
    write:N:F       during this process's N-th write of ``checkpoint.pth``, after a fraction F
                    (0..1) of its bytes reached the temporary file (flushed and fsynced);
    replace:N       after the N-th ``checkpoint.pth`` was written whole to its temporary file,
                    before it is moved into place.

Nothing in the toolkit knows about this: the harness patches torch's optimizer step hooks,
``torch.save`` and ``os.replace`` from the outside, then calls the CLI's ``main``.

Also the helpers the fault tests of pretraining and classification share: ``kill_plan`` (seeded
kill points), ``same_state`` (bit-exact comparison), ``write_kind`` / ``EXPECTED`` (the kinds of
image files the readers meet and what each must become) and ``FailingFile``, which simulates a disk that fills up: a file object whose
writes raise ``OSError(code)`` once ``limit`` bytes went through.
"""
from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CHECKPOINT = "checkpoint.pth"


class FailingFile:
    """Wraps an open file: writes raise ``OSError(code)`` once ``limit`` bytes were written."""

    def __init__(self, f, limit: int, code: int):
        self.f, self.limit, self.code, self.written = f, limit, code, 0

    def write(self, data) -> int:
        room = self.limit - self.written
        if len(data) > room:
            self.f.write(bytes(data[: max(room, 0)]))
            self.written = self.limit
            raise OSError(self.code, os.strerror(self.code))
        self.written += len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


# the CLI runs in subprocesses on one thread each (they run alongside the reference run)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start(kill: str, argv: list[str]) -> subprocess.Popen:
    """``mae-transfer ARGV`` in a subprocess through this harness, armed with ``kill`` (``arm``)."""
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), kill, "--", *argv], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    """Wait for a ``start``ed run: (exit status, its stdout + stderr)."""
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out + err


def kill_plan(seed: int, epochs: int, steps_per_epoch: int,
              kinds: tuple[str, ...] = ("step", "write", "replace")) -> list[tuple[str, int]]:
    """Seeded kill points: (harness spec, epochs the checkpoint holds after the kill).  Each kill
    leaves at least one epoch to do; kinds: after an optimizer step, in the middle of writing the
    checkpoint (a random fraction of its bytes), and between the whole write and the rename."""
    rng = random.Random(seed)
    saved, plan = 0, []
    for kind in kinds:
        left = epochs - saved
        if left <= 1:
            break
        if kind == "step":
            n = rng.randint(1, (left - 1) * steps_per_epoch)
            spec, saved = f"step:{n}", saved + (n - 1) // steps_per_epoch
        elif kind == "write":
            w = rng.randint(1, left - 1)
            spec, saved = f"write:{w}:{rng.uniform(0.02, 0.98):.3f}", saved + w - 1
        else:
            r = rng.randint(1, left - 1)
            spec, saved = f"replace:{r}", saved + r - 1
        plan.append((spec, saved))
    return plan


def same_state(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_state(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def write_kind(path: Path, kind: str) -> Path:
    """One file of a kind of image (or non-image) the readers meet in the wild."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
    if kind == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 200, dtype=np.uint8)))
    elif kind == "truncated_jpeg":
        Image.fromarray(rgb).save(path.with_suffix(".tmp.jpg"), quality=90)
        data = path.with_suffix(".tmp.jpg").read_bytes()
        path.with_suffix(".tmp.jpg").unlink()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not an image\n")
    elif kind == "grayscale":
        Image.new("L", (36, 40), 100).save(path)
    elif kind == "cmyk":
        Image.new("CMYK", (36, 40), (0, 255, 0, 0)).save(path, quality=95)
    elif kind == "sixteen_bit":
        Image.fromarray(np.full((40, 36), 100 * 257, dtype=np.uint16)).save(path)
    elif kind == "rgba":
        Image.fromarray(np.dstack([rgb, np.full((40, 36), 7, np.uint8)])).save(path)
    elif kind == "palette":
        Image.fromarray(rgb).convert("P").save(path)
    elif kind == "tiny":
        Image.new("RGB", (1, 1), (10, 200, 30)).save(path)
    elif kind == "huge":
        Image.new("RGB", (80, 80), (1, 2, 3)).save(path)  # over the (test-lowered) bomb limit
    else:
        raise ValueError(kind)
    return path


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` random 36x40 PNGs split over two class folders."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"class{i % 2}" / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


SUFFIX = {"truncated_jpeg": ".jpg", "cmyk": ".jpg"}
# what each kind becomes: a pixel of the RGB image, or "skipped"
EXPECTED = {"corrupt": "skipped", "truncated_jpeg": "skipped", "zero_bytes": "skipped", "text": "skipped",
            "huge": "skipped", "grayscale": (100, 100, 100), "cmyk": (255, 0, 255), "sixteen_bit": (100, 100, 100),
            "rgba": None, "palette": None, "tiny": (10, 200, 30)}


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(spec: str) -> None:
    kind, *args = spec.split(":")
    if kind == "none":
        return
    if kind == "step":
        target, count = int(args[0]), [0]

        def after_step(optimizer, *_):
            count[0] += 1
            if count[0] == target:
                die()

        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(after_step)
    elif kind == "write":
        target, fraction, count = int(args[0]), float(args[1]), [0]
        real_save = torch.save

        def save(obj, f, *a, **kw):
            name = os.path.basename(getattr(f, "name", str(f)))
            if name.startswith(f".{CHECKPOINT}."):
                count[0] += 1
                if count[0] == target:
                    buf = io.BytesIO()
                    real_save(obj, buf, *a, **kw)
                    data = buf.getvalue()
                    f.write(data[: int(len(data) * fraction)])
                    f.flush()
                    os.fsync(f.fileno())
                    die()
            return real_save(obj, f, *a, **kw)

        torch.save = save
    elif kind == "replace":
        target, count = int(args[0]), [0]
        real_replace = os.replace

        def replace(src, dst, *a, **kw):
            if os.path.basename(str(dst)) == CHECKPOINT:
                count[0] += 1
                if count[0] == target:
                    die()
            return real_replace(src, dst, *a, **kw)

        os.replace = replace
    else:
        raise SystemExit(f"fault_harness: unknown kill point {spec!r}")


if __name__ == "__main__":
    spec, sep, *argv = sys.argv[1:]
    assert sep == "--", "usage: fault_harness.py KILL -- COMMAND ARGS"
    torch.set_num_threads(1)
    arm(spec)
    from mae_transfer.cli import main

    raise SystemExit(main(argv))
