"""``python benchmarks/bench_speed.py``: kept for old command lines; the benchmark is the package
``mae_transfer.speed`` (``mae-transfer bench-speed`` or ``python -m mae_transfer.speed``)."""
import sys

from mae_transfer.speed.cli import main

if __name__ == "__main__":
    sys.exit(main())
