"""What a run tells its user: a progress bar, TensorBoard scalars and a JSON-lines log.

Only the main process writes; the others get a ``Monitor`` whose methods do nothing.
``log.jsonl`` has one record per line with a ``type``: ``run`` (start: world size, effective
batch, lr, dataset size), ``step`` (every ``log_every`` optimizer steps: loss, lr) and ``epoch``
(mean loss, img/s, skipped images, non-finite steps).  A run killed in the middle of a write
may leave a cut last line; the next run starts on a new line, so every other line stays valid JSON.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

LOG_NAME = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"


class Monitor:
    """Progress bar + TensorBoard + ``log.jsonl`` for one run folder.

    Args:
        output: the run folder.
        enabled: False on non-main processes (then nothing is written or shown).
        tensorboard: write TensorBoard event files under ``output/tensorboard``.
        progress: show a tqdm bar (only where stderr is a terminal).
    """

    def __init__(self, output: Path, enabled: bool = True, tensorboard: bool = True, progress: bool = True):
        self.output = Path(output)
        self.enabled = enabled
        self.show_progress = enabled and progress
        self.writer = None
        self._line_checked = False
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError(
                    f"TensorBoard logging needs the tensorboard package ({exc}); install it or pass --no-tensorboard"
                ) from None
            self.writer = SummaryWriter(str(self.output / TENSORBOARD_DIR))

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON record (with a wall-clock ``time``) to ``log.jsonl``."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.output / LOG_NAME, "a+b") as f:
            text = json.dumps(record) + "\n"
            if not self._line_checked:  # a cut line left by a killed run: end it first
                self._line_checked = True
                if f.tell() > 0:
                    f.seek(-1, 2)
                    if f.read(1) != b"\n":
                        text = "\n" + text
            f.write(text.encode())

    def scalars(self, step: int, prefix: str, values: dict[str, float]) -> None:
        """TensorBoard scalars ``prefix/name`` at ``step``."""
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def bar(self, total: int, desc: str) -> Any:
        """A tqdm bar (disabled off the main process, with --no-progress, or without a terminal)."""
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True,
                    disable=None if self.show_progress else True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
