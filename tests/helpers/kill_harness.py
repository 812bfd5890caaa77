"""Run ``mae_transfer.cli.main`` and SIGKILL the process at a chosen point (fault-injection tests).

    python tests/helpers/kill_harness.py [--kill-after-backward K] [--kill-in-write N --fraction F] -- CLI ARGS

- ``--kill-after-backward K``: die right after the K-th backward pass (1-based), i.e. in the
  middle of a training iteration, between backward and the optimizer step.
- ``--kill-in-write N --fraction F``: die during the N-th file opened for binary writing whose
  name contains ``.pth`` (a checkpoint or its temporary file), after writing a fraction F of
  its bytes, flushed to disk. The write layer is ``builtins.open``, below any framework code.

Only this test script patches anything; the production code runs unchanged. One intra-op thread,
plain (non-oneDNN) CPU kernels as in the in-process tests.
"""
from __future__ import annotations

import argparse
import builtins
import io
import os
import signal
import sys

import torch


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _DyingFile(io.RawIOBase):
    """A binary file that SIGKILLs the process once ``limit`` bytes have been written."""

    def __init__(self, f, limit: int):
        self.f, self.limit, self.written = f, limit, 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.f.seekable()

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, *args):
        return self.f.seek(*args)

    def write(self, b) -> int:
        b = bytes(b)
        room = self.limit - self.written
        if len(b) >= room:
            self.f.write(b[:room])
            self.f.flush()
            os.fsync(self.f.fileno())
            _die()
        self.written += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        self.f.close()
        super().close()


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--kill-after-backward", type=int, default=0)
    p.add_argument("--kill-in-write", type=int, default=0)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--size-hint", type=int, default=0, help="bytes of the killed file (to place F); default 1 MiB")
    opts = p.parse_args(argv[:split])
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False

    if opts.kill_after_backward:
        count = [0]
        backward = torch.autograd.backward

        def dying_backward(*args, **kwargs):
            backward(*args, **kwargs)
            count[0] += 1
            if count[0] == opts.kill_after_backward:
                _die()

        torch.autograd.backward = dying_backward

    if opts.kill_in_write:
        opened = [0]
        real_open = builtins.open

        def dying_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if "b" in mode and ("w" in mode or "a" in mode) and ".pth" in os.fspath(file):
                opened[0] += 1
                if opened[0] == opts.kill_in_write:
                    limit = max(1, int(opts.fraction * (opts.size_hint or (1 << 20))))
                    return _DyingFile(f, limit)
            return f

        builtins.open = dying_open

    from mae_transfer.cli import main as cli

    return cli(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
