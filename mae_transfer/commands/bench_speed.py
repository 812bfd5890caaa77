"""``mae-transfer bench-speed``: the speed benchmark of ``benchmarks/bench_speed.py`` as a command.

The benchmark lives beside the repository's other benchmarks (it is not part of the installed
packages), so this command loads it from the source tree it was installed from.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_speed.py"


def _load() -> ModuleType:
    if "bench_speed" in sys.modules:
        return sys.modules["bench_speed"]
    if not SCRIPT.is_file():
        raise FileNotFoundError(f"{SCRIPT}: the benchmark script is missing (bench-speed needs a source checkout)")
    spec = importlib.util.spec_from_file_location("bench_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["bench_speed"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def run(args: argparse.Namespace) -> int:
    return _load().run(args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-speed", help="speed of ours vs HF ViTMAE, timm, all-global ViTDet, MMSeg MAE (one run)",
                       description="Speed benchmark (see benchmarks/bench_speed.py).")
    try:
        _load().build_parser(p)
    except FileNotFoundError as exc:
        p.set_defaults(func=lambda a: (print(f"mae-transfer bench-speed: error: {exc}", file=sys.stderr), 1)[1])
        return
    p.set_defaults(func=run)
