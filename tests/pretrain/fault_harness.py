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

``FailingFile`` (imported by the fault tests) simulates a disk that fills up: a file object whose
writes raise ``OSError(code)`` once ``limit`` bytes went through.
"""
from __future__ import annotations

import io
import os
import signal
import sys

import torch

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
