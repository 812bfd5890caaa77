"""Resume MMEngine checkpoints under torch's ``weights_only`` default, deliberately.

MMEngine 0.10.7 saves its message hub (``HistoryBuffer`` objects holding numpy arrays and numpy
scalars) inside every checkpoint and reads checkpoints with a plain ``torch.load``.  Since torch
2.6 that load is ``weights_only=True`` and refuses those objects, so ``resume=True`` fails.  The
fix here is an allow-list of exactly those data classes (no callables), active only inside
``mmengine_safe_loading()``; anything else in a file, e.g. a pickled ``os.system``, is still
refused.  Safe loading is never turned off.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch


def mmengine_safe_globals() -> list[Any]:
    """The classes MMEngine's own checkpoints contain besides tensors and builtins."""
    from mmengine.logging.history_buffer import HistoryBuffer

    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    dtype_classes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)]
    return [
        HistoryBuffer,
        core.multiarray._reconstruct,  # rebuilds a numpy array from its bytes (no object dtype)
        core.multiarray.scalar,  # rebuilds a numpy scalar from its bytes
        np.ndarray,
        np.dtype,
        *dtype_classes,
    ]


@contextmanager
def mmengine_safe_loading() -> Iterator[None]:
    """Within this block, ``torch.load(weights_only=True)`` also accepts MMEngine's data classes."""
    with torch.serialization.safe_globals(mmengine_safe_globals()):
        yield
