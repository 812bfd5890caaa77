"""``mae-transfer demo``: sample data -> MAE pretraining -> transfer (MAE vs random init) -> report."""
from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from mae_transfer.demo import run_demo
    from training.errors import check_output_dir

    check_output_dir(args.output, "--output")
    ctx = run_demo(args.output, quick=args.quick, seed=args.seed, only=args.only)
    return 1 if ctx.errors else 0


def register(sub: argparse._SubParsersAction) -> None:
    from mae_transfer.demo import STAGES

    p = sub.add_parser("demo", help="end-to-end demo on generated data (no download) with a Markdown report")
    p.add_argument("--output", default="demo_output", help="folder for the data, runs and report.md")
    p.add_argument("--quick", action="store_true", help="a ~3-minute smoke run with tiny budgets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", choices=list(STAGES), help="run only these stages")
    p.set_defaults(func=run)
