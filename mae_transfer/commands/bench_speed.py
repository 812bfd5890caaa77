"""``mae-transfer bench-speed``: the speed benchmark of ``mae_transfer.speed`` as a command."""
from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from mae_transfer.speed import run as run_benchmark

    return run_benchmark(args)


def register(sub: argparse._SubParsersAction) -> None:
    from mae_transfer.speed import build_parser

    p = sub.add_parser("bench-speed", help="speed of ours vs HF ViTMAE, timm, all-global ViTDet, MMSeg MAE (one run)",
                       description="Speed benchmark (see mae_transfer/speed: one harness, one module per part).")
    build_parser(p)
    p.set_defaults(func=run)
