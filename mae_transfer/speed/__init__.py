"""The speed benchmark behind ``mae-transfer bench-speed`` (also ``python -m mae_transfer.speed``).

``harness`` measures (interleaved rounds, medians, peak memory, FLOPs, the table); one module per
part: ``peak``, ``data``, ``pretrain``, ``features``, ``detection``, ``segmentation``, each with
``run(args, report, device)``; ``cli`` builds the options and runs the parts.  ``mask_tokens`` is
the separate "w/ [M]" pretraining-step benchmark, one process per configuration.
"""
from mae_transfer.speed.cli import PARTS, build_parser, main, run

__all__ = ["PARTS", "build_parser", "main", "run"]
