"""What every trainer's command does around its run: logging (INFO on the main process), the
options from the command line, the run folder checked before any work, and user errors reported as
one line without a traceback (exit status 2, as ``mae_transfer.cli.main`` reports every command's).

    return run_command("mae-transfer pretrain", lambda: config_from_args(args), lambda cfg, main: ...)
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from mae_backbone import CheckpointError
from training.data import DataError
from training.loop import TrainingDiverged
from training.state import NonFiniteModelError

# what a run raises for a mistake or a condition the user can act on (reported, exit status 2)
USER_ERRORS = (DataError, TrainingDiverged, NonFiniteModelError, CheckpointError, ValueError)


def is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` job, or a single process."""
    return os.environ.get("RANK", "0") == "0"


def run_command(prog: str, make_config: Callable[[], Any], body: Callable[[Any, bool], None],
                debug: bool = False) -> int:
    """Configure logging, build the options (``make_config``), check the run folder (``cfg.output``)
    can be written, and run ``body(cfg, main_process)``.

    Returns:
        0 on success; 2 when the options are invalid, the run folder cannot be written, or the run
        stops with a ``USER_ERRORS`` error or an ``OSError`` naming a path (full disk, permission),
        printed as ``<prog>: error: <message>`` on stderr. With ``debug`` (``mae-transfer --debug``)
        those errors are raised instead, so the traceback shows.

    Raises:
        KeyboardInterrupt: with ``resume_checkpoint`` set to the run folder's checkpoint when one
            exists (``mae_transfer.cli.main`` says how to resume).
    """
    from training.errors import check_output_dir, is_reportable_os_error, os_error_message

    main_process = is_main_process()
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = make_config()
        output = getattr(cfg, "output", None)
        if output and main_process and not getattr(cfg, "eval", False):
            check_output_dir(output, "run folder (--output)")
    except ValueError as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        body(cfg, main_process)
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if debug or not is_reportable_os_error(exc):
            raise
        print(f"{prog}: error: {os_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        checkpoint = Path(output) / "checkpoint.pth" if output else None
        exc.resume_checkpoint = checkpoint if checkpoint is not None and checkpoint.is_file() else None  # type: ignore[attr-defined]
        raise
    return 0
