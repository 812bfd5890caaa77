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
    "mae_transfer.commands.bench_speed",
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


def _unrecognized(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> None:
    """argparse's ``unrecognized arguments`` error, with the closest option of the command for each
    mistyped flag (``--mask-ration (did you mean --mask-ratio?)``); exits with status 2."""
    import difflib

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command_parser = sub.choices[command]
    options = [o for a in command_parser._actions for o in a.option_strings if o.startswith("--")]
    words = []
    for arg in unknown:
        close = difflib.get_close_matches(arg.split("=")[0], options, n=1) if arg.startswith("--") else []
        words.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
    command_parser.error("unrecognized arguments: " + " ".join(words))


def main(argv: Sequence[str] | None = None) -> int:
    from mae_backbone.io import CheckpointError

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _unrecognized(parser, args.command, unknown)
    try:
        return int(args.func(args) or 0)
    except CheckpointError as exc:  # bad input from the user: say what and where, no traceback
        print(f"mae-transfer {args.command}: error: {exc}", file=sys.stderr)
        return 2
