"""The demo's stage runner: stages in order with a progress line (stage, elapsed, ETA); a failed
stage is reported and the next one runs; the report is written also when interrupted (Ctrl-C).

A stage's output goes to ``logs/KEY.log``, once and in plain text: its stdout and stderr, and the
records of every logger that reaches the root logger (ours: pretraining's per-epoch lines), through
one handler for the stage's time; colour codes (Detectron2's and MMEngine's console formats) are
taken out.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO

from mae_transfer.demo.context import DemoContext, DemoPlan, Stages
from mae_transfer.demo.report import write_report
from mae_transfer.demo.stages import STAGES


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


def run_stages(keys: Sequence[str], stages: dict[str, tuple[str, Callable[[Any], None], float]], state: Any,
               errors: dict[str, str], timings: dict[str, float], logs: Path, log: Callable[[str], None],
               pace_scale: float = 1.0) -> None:
    """Run ``stages[k]`` for ``k`` in ``keys`` with a progress line (stage, elapsed, ETA).

    A stage that raises is recorded in ``errors`` (first line; the traceback in
    ``logs/../error_KEY.txt``) and the next one runs; ``KeyboardInterrupt`` propagates.
    Each stage's own output (the frameworks' logging, ours) goes to ``logs/KEY.log`` (``stage_output``).
    """
    planned = {k: stages[k][2] * pace_scale for k in keys}
    t0 = time.perf_counter()
    logs.mkdir(parents=True, exist_ok=True)
    for i, key in enumerate(keys, 1):
        title, fn, _ = stages[key]
        spent = sum(timings.get(k, 0.0) for k in keys[:i - 1])
        done_plan = sum(planned[k] for k in keys[:i - 1])
        # actual / planned so far; a short first stage (the data) says little about the pace yet
        pace = spent / done_plan if done_plan >= 0.1 * sum(planned.values()) else 1.0
        eta = pace * sum(planned[k] for k in keys[i - 1:])
        log(f"[{i}/{len(keys)}] {title} ... (elapsed {time.perf_counter() - t0:.0f} s, ETA {eta:.0f} s)")
        t = time.perf_counter()
        stage_log = logs / f"{key}.log"
        error_file = logs.parent / f"error_{key}.txt"
        error_file.unlink(missing_ok=True)
        errors.pop(key, None)
        try:
            with stage_output(stage_log):
                fn(state)
        except Exception as exc:  # a failed stage is reported; the others still run
            errors[key] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            error_file.write_text(traceback.format_exc())
            log(f"[{i}/{len(keys)}] {title}: FAILED ({errors[key]}); details in {error_file.name}")
        finally:
            timings[key] = time.perf_counter() - t
        log(f"[{i}/{len(keys)}] {title}: {timings[key]:.0f} s (log: {stage_log})")


def run_demo(out: str | Path, quick: bool = False, seed: int = 0, only: list[str] | None = None,
             log: Callable[[str], None] = print, plan: DemoPlan | None = None,
             stages: Stages | None = None) -> DemoContext:
    """Run the stages (all, or ``only``) and write ``out/report.md``; returns the context.

    ``plan`` overrides the sizes of ``quick``/``seed``; ``stages`` replaces ``STAGES`` (tests).
    """
    stages = STAGES if stages is None else stages
    ctx = DemoContext(Path(out).absolute(), plan or DemoPlan.make(quick, seed), stages=stages)
    ctx.out.mkdir(parents=True, exist_ok=True)
    keys = [k for k in stages if only is None or k in only]
    finished = False
    try:
        run_stages(keys, stages, ctx, ctx.errors, ctx.timings, ctx.out / "logs", log,
                   0.2 if ctx.plan.quick else 1.0)
        finished = True
    finally:
        report = write_report(ctx, finished)
        log(f"report: {report}")
    return ctx
