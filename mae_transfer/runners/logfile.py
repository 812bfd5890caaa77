"""A run's log file, as the demo's stages and the benchmark's cells write it: everything the run
prints or logs, once, in plain text.

``stage_output(path)`` redirects stdout and stderr to the file and gives the root logger exactly
one handler, on that file at INFO, for the run's time (so our loggers' lines, e.g. the trainers'
per-epoch lines, land there; the handlers it had come back afterwards); a record that a logger's
own handler already wrote (a framework's console handler on the redirected stdout) is not written
again; ANSI colour codes (Detectron2's and MMEngine's console formats) are taken out.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path
from typing import Iterator, TextIO

__all__ = ["ANSI_ESCAPE", "PlainText", "stage_output"]

# an ANSI escape sequence (CSI: colours, cursor moves), as terminals read them
ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class PlainText(io.TextIOBase):
    """A text stream writing to ``target`` without ANSI escape sequences; after ``close`` writes are
    dropped (a framework's handler that outlives its stage must not write into the next stage's log
    or fail on a closed file)."""

    def __init__(self, target: TextIO):
        super().__init__()
        self.target: TextIO | None = target

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if self.target is not None:
            self.target.write(ANSI_ESCAPE.sub("", text))
        return len(text)

    def flush(self) -> None:
        if self.target is not None:
            self.target.flush()

    def close(self) -> None:
        self.flush()
        self.target = None
        super().close()


class _NotHandledBelowRoot(logging.Filter):
    """Pass a record only if no logger between its own and the root has a handler: such a logger
    (a framework's console handler on the redirected stdout) has already written it."""

    def filter(self, record: logging.LogRecord) -> bool:
        log: logging.Logger | None = logging.getLogger(record.name)
        root = logging.getLogger()
        while log is not None and log is not root:
            if log.handlers:
                return False
            log = log.parent
        return True


@contextlib.contextmanager
def stage_output(path: Path) -> Iterator[TextIO]:
    """Everything a stage prints or logs goes to ``path`` (plain text, each record once): stdout and
    stderr are redirected, and the root logger has exactly one handler, on that file, at INFO."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    with open(path, "w") as f, PlainText(f) as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.addFilter(_NotHandledBelowRoot())
        for h in saved_handlers:
            root.removeHandler(h)
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):  # type: ignore[type-var]
                yield stream  # type: ignore[misc]
        finally:
            root.removeHandler(handler)
            for h in saved_handlers:
                root.addHandler(h)
            root.setLevel(saved_level)
