"""``mae-transfer`` entry point: one ``argparse`` sub-command per module in ``COMMANDS``.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func(args) -> int``.  Modules are imported lazily by the parser so that ``mae-transfer --help``
does not import detectron2 or mmseg.
"""
from __future__ import annotations

import argparse
import importlib
import os
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
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error instead of a one-line message")
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


# modules whose error classes are users' mistakes (reported in one line, exit status 2); a module
# is only looked up when already imported, so the boundary never imports detectron2 or mmseg itself
KNOWN_ERRORS = (
    ("mae_backbone.io", "CheckpointError"),
    ("training.data", "DataError"),
    ("training.loop", "TrainingDiverged"),
    ("training.state", "NonFiniteModelError"),
    ("detection.data", "DatasetError"),
    ("detection.config", "ConfigError"),
    ("segmentation.datasets", "DatasetError"),
    ("segmentation.engine", "ConfigError"),
    ("PIL.Image", "UnidentifiedImageError"),
    ("PIL.Image", "DecompressionBombError"),
)


def known_error_types() -> tuple[type[BaseException], ...]:
    """The exception classes the boundary reports as a user's mistake (of the modules imported so far)."""
    from training.errors import UserError

    types: list[type[BaseException]] = [UserError]
    for module, name in KNOWN_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            types.append(cls)
    return tuple(types)


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message for a known failure kind, ``None`` for anything else (a bug: traceback)."""
    from training.errors import is_reportable_os_error, os_error_message

    if isinstance(exc, known_error_types()):
        if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in str(exc):
            return f"{exc.filename}: {exc}"
        return str(exc) or type(exc).__name__
    if is_reportable_os_error(exc):
        return os_error_message(exc)  # type: ignore[arg-type]
    return None


# commands that continue a run only when told to (``--resume`` finds the last checkpoint in the run's
# folder); run again without it, they would start over and overwrite the run's checkpoints
RESUME_FLAG_COMMANDS = ("detect train", "segment train")


def resume_hint(argv: Sequence[str], checkpoint: str | os.PathLike | None, command: str = "") -> str:
    """What to type to carry on after Ctrl-C: a trainer stopped after a checkpoint resumes from it
    (``--resume CHECKPOINT``, replacing any earlier ``--resume``); ``detect train`` / ``segment
    train`` resume with their ``--resume`` flag; anything else runs again."""
    import shlex

    words = ["mae-transfer", *argv]
    if checkpoint is None and command in RESUME_FLAG_COMMANDS:
        return shlex.join(words if "--resume" in words else [*words, "--resume"])
    if checkpoint is None:
        return f"{shlex.join(words)} (run it again)"
    kept: list[str] = []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word == "--resume":
            skip = True
        elif not word.startswith("--resume="):
            kept.append(word)
    return shlex.join([*kept, "--resume", str(checkpoint)])


# the ``dest`` of commands' own sub-commands (``data sample``, ``detect eval``, ``segment test``)
ACTION_DESTS = ("data_command", "action", "segment_command")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run one command, and be the one error boundary of every command.

    Known failure kinds (``known_error_types``, an ``OSError`` naming a path) print one line
    ``mae-transfer <command>: error: <message>`` and return 2; ``--debug`` re-raises them to show
    the traceback. Ctrl-C returns 130 and says how to resume.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _unrecognized(parser, args.command, unknown)
    command_words = [a for a in argv if a != "--debug"]
    name = " ".join([args.command, *(str(getattr(args, d)) for d in ACTION_DESTS if getattr(args, d, None))])
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        hint = resume_hint(command_words, getattr(exc, "resume_checkpoint", None), name)
        print(f"\nmae-transfer {name}: interrupted; resume with: {hint}",
              file=sys.stderr)
        return 130
    except Exception as exc:
        message = user_error_message(exc)
        if message is None or args.debug:
            raise
        print(f"mae-transfer {name}: error: {message}", file=sys.stderr)
        return 2
