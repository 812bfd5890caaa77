"""Safe, atomic file I/O for checkpoints: the only place the toolkit calls ``torch.load``.

- ``safe_torch_load``: ``torch.load(weights_only=True)`` always (tensors, containers, numbers and
  strings, plus a short allow-list of harmless classes such as ``argparse.Namespace`` that the
  official MAE training scripts store); a pickle that would construct anything else, i.e. run
  code, is refused with ``UnsafeCheckpointError``; a truncated or corrupt file raises
  ``CheckpointError`` naming it.
- ``atomic_torch_save`` / ``atomic_write_bytes``: write to a temporary file in the same folder,
  flush and fsync, then ``os.replace``: the destination is either the old file or the whole new one.
"""
from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

# Classes that checkpoints written by common tools contain and that cannot run code.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit; the message names the file and why."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle would construct arbitrary Python objects (run code)."""


def safe_torch_load(path: str | os.PathLike, extra_safe_globals: list[Any] | None = None) -> Any:
    """Load a ``torch.save`` file without executing code from it.

    Args:
        path: the file.
        extra_safe_globals: further classes the caller knows to be harmless.
    Raises:
        CheckpointError: missing, truncated or corrupt file.
        UnsafeCheckpointError: the pickle references a callable/class outside the allow-list.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); it was probably cut off while being written")
    allowed = SAFE_GLOBALS + list(extra_safe_globals or [])
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "weights_only" in msg.lower() or "GLOBAL" in msg.upper():
            detail = _unsupported_global(msg)
            raise UnsafeCheckpointError(
                f"{path}: refused to load: the file asks to construct Python objects that could "
                f"run code ({detail}). Only tensors and plain containers are loaded. If you made "
                "this file yourself, re-save its state dict (torch.save(model.state_dict(), ...))."
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({msg.splitlines()[0]})") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({first})") from None


def _unsupported_global(msg: str) -> str:
    """The line of torch's message that names the refused global (e.g. ``GLOBAL posix.system``)."""
    for line in msg.splitlines():
        if "GLOBAL" in line.upper() and ("unsupported" in line.lower() or "blocked" in line.lower()):
            return line.strip().split(" To add it")[0].rstrip(".")
    return "the unpickler met an object outside the allow-list"


def atomic_write(path: str | os.PathLike, writer: Callable[[str], None]) -> Path:
    """Call ``writer(tmp_path)`` then move the finished file onto ``path`` atomically.

    The temporary file sits in the destination folder (same filesystem) and is removed if the
    writer fails, so a failed or interrupted write leaves any previous ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` that is atomic (see ``atomic_write``)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, _write)
