"""``mae-transfer data sample OUT``: write the deterministic sample data set."""
from __future__ import annotations

import argparse
import time


def run_sample(args: argparse.Namespace) -> int:
    from training.errors import check_output_dir
    from mae_transfer.sample_data import write_sample_data

    check_output_dir(args.out, "output folder")
    t = time.perf_counter()
    summary = write_sample_data(args.out, seed=args.seed)
    print(f"wrote sample data to {args.out} in {time.perf_counter() - t:.1f} s: "
          + ", ".join(f"{k}={v}" for k, v in summary.items() if isinstance(v, int) and k != "seed"))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="data utilities (sample data)")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    s = dsub.add_parser("sample", help="write deterministic sample data in every format (no download)")
    s.add_argument("out", help="output folder")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=run_sample)
