"""``mae-transfer`` entry point: one ``argparse`` sub-command per module in ``COMMANDS``.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func(args) -> int``.  Modules are imported lazily by the parser so that ``mae-transfer --help``
does not import detectron2 or mmseg.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from mae_transfer import __version__

# sub-command modules, in the order --help lists them
COMMANDS = (
    "mae_transfer.commands.env",
    "mae_transfer.commands.convert",
    "mae_transfer.commands.data",
    "mae_transfer.commands.pretrain",
    "mae_transfer.commands.visualize",
    "mae_transfer.commands.finetune",
    "mae_transfer.commands.demo",
    "mae_transfer.commands.bench",
    "mae_transfer.commands.detect",
    "mae_transfer.commands.segment",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mae-transfer",
        description="MAE pretraining and transfer to classification, detection and segmentation.",
    )
    parser.add_argument("--version", action="version", version=f"mae-transfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from mae_backbone.io import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CheckpointError as exc:  # bad input from the user: say what and where, no traceback
        print(f"mae-transfer {args.command}: error: {exc}", file=sys.stderr)
        return 2
