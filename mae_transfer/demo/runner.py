"""The demo's stage runner: stages in order with a progress line (stage, elapsed, ETA); a failed
stage is reported and the next one runs; the report is written also when interrupted (Ctrl-C).

A stage's output goes to ``logs/KEY.log``, once and in plain text (``runners.logfile.stage_output``).
"""
from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from mae_transfer.demo.context import DemoContext, DemoPlan, Stages
from mae_transfer.demo.report import write_report
from mae_transfer.demo.stages import STAGES
from mae_transfer.runners.logfile import stage_output


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
