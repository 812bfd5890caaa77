"""What every trainer's command does around its run: logging (INFO on the main process), the
options from the command line, and user errors reported as one line without a traceback.

    return run_command("mae-transfer pretrain", lambda: config_from_args(args), lambda cfg, main: ...)
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

from mae_backbone import CheckpointError
from training.data import DataError
from training.loop import TrainingDiverged
from training.state import NonFiniteModelError

# what a run raises for a mistake or a condition the user can act on (reported, exit status 1)
USER_ERRORS = (DataError, TrainingDiverged, NonFiniteModelError, CheckpointError, ValueError)


def is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` job, or a single process."""
    return os.environ.get("RANK", "0") == "0"


def run_command(prog: str, make_config: Callable[[], Any], body: Callable[[Any, bool], None]) -> int:
    """Configure logging, build the options (``make_config``) and run ``body(cfg, main_process)``.

    Returns:
        0 on success; 2 when the options are invalid; 1 when the run stops with a ``USER_ERRORS``
        error (printed as ``<prog>: error: <message>`` on stderr).
    """
    main_process = is_main_process()
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = make_config()
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        body(cfg, main_process)
    except USER_ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0
