"""``python benchmarks/bench_pretrain.py``: kept for old command lines; the benchmark is the module
``mae_transfer.speed.mask_tokens`` (``python -m mae_transfer.speed.mask_tokens``)."""
import sys

from mae_transfer.speed.mask_tokens import main

if __name__ == "__main__":
    sys.exit(main())
