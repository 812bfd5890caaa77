"""A pickle that would run code on load, for the tests that every reader refuses it.

Shared test helpers live in ``tests/helpers/`` (this folder): ``unsafe_pickle`` (here),
``fault_harness`` (kills ``mae-transfer pretrain`` / ``finetune`` at seeded points; the fault
tests' shared checks) and ``kill_harness`` (kills ``detect train`` / ``segment train``).
``pyproject.toml`` puts this folder on ``sys.path`` for pytest (``[tool.pytest.ini_options]
pythonpath``), so a test in any folder writes ``from unsafe_pickle import RunsCode``; this works
with ``python -m pytest tests`` or ``pytest tests/<folder>`` from the repository root of any clone.
``tests/`` itself must not go on ``sys.path``: its folders named like our packages
(``tests/mae_transfer`` ...) would shadow them; a module here must not take a package's name.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path


class RunsCode:
    """Unpickling this object runs ``touch MARKER``: a loader that unpickles it leaves ``marker`` behind.

    Put one anywhere in what ``torch.save`` / ``pickle.dumps`` writes, then assert that the reader
    refused the file and that ``marker`` does not exist.
    """

    def __init__(self, marker: str | Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def unsafe_mmengine_checkpoint(path: Path, marker: str | Path) -> Path:
    """Write ``path`` as an MMEngine checkpoint (``state_dict`` + ``meta``) whose ``meta`` is ``RunsCode(marker)``."""
    import torch

    torch.save({"state_dict": {}, "meta": RunsCode(marker)}, path)
    return path
