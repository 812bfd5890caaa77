"""Safe, atomic file I/O for checkpoints: the only place the toolkit calls ``torch.load``.

- ``safe_torch_load``: ``torch.load(weights_only=True)`` always (tensors, containers, numbers and
  strings, plus a short allow-list of harmless classes such as ``argparse.Namespace`` that the
  official MAE training scripts store); a pickle that would construct anything else, i.e. run
  code, is refused with ``UnsafeCheckpointError``; a truncated or corrupt file raises
  ``CheckpointError`` naming it.
- ``atomic_torch_save`` / ``atomic_write_bytes``: write to a temporary file in the same folder,
  flush and fsync, then ``os.replace``: the destination is either the old file or the whole new one.
  A write that fails (no space, permission denied, ...) raises ``CheckpointWriteError`` naming
  the destination and leaves the previous file as it was.
- ``add_checksum`` / ``verify_checksum``: a sha256 over every tensor, key and value of a
  training state, stored in the state itself (``CHECKSUM_KEY``); ``safe_torch_load`` verifies
  it whenever it is there, so a bit flip or a partial copy is refused instead of loaded as garbage
  (torch's zip container has no checksum of its own).
- ``remove_stale_temporaries``: the temporary files an interrupted (killed) write left behind.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

# Classes that checkpoints written by common tools contain and that cannot run code.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]
# Where a training state stores its own checksum (see ``add_checksum``).
CHECKSUM_KEY = "mae_transfer_sha256"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit; the message names the file and why."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle would construct arbitrary Python objects (run code)."""


class CheckpointWriteError(CheckpointError):
    """Writing a file failed (no space, permission denied, ...); the previous file is unchanged."""


# --------------------------------------------------------------------------- checksums
def _feed(h: "hashlib._Hash", obj: Any, where: str) -> None:
    """Hash ``obj`` (nested dicts / lists / tuples of tensors and plain values) into ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{where}|T|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"{where}|D|{len(obj)}\n".encode())
        for k, v in obj.items():
            _feed(h, v, f"{where}/{type(k).__name__}:{k!r}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{where}|{type(obj).__name__}|{len(obj)}\n".encode())
        for i, v in enumerate(obj):
            _feed(h, v, f"{where}/{i}")
    elif isinstance(obj, argparse.Namespace):
        _feed(h, vars(obj), f"{where}|NS")
    else:
        h.update(f"{where}|{type(obj).__name__}|{obj!r}\n".encode())


def state_checksum(state: dict[str, Any]) -> str:
    """sha256 over every key, value and tensor byte of ``state`` except ``CHECKSUM_KEY``."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != CHECKSUM_KEY}, "")
    return h.hexdigest()


def add_checksum(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with its ``state_checksum`` stored under ``CHECKSUM_KEY`` (a new dict)."""
    return {**{k: v for k, v in state.items() if k != CHECKSUM_KEY}, CHECKSUM_KEY: state_checksum(state)}


def verify_checksum(state: Any, path: str | os.PathLike, required: bool = False) -> None:
    """Raise ``CheckpointError`` naming ``path`` when ``state``'s stored checksum does not match
    (or is missing while ``required``)."""
    stored = state.get(CHECKSUM_KEY) if isinstance(state, dict) else None
    if stored is None:
        if required and not isinstance(state, dict):
            raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a training state; the file is "
                                  "damaged or not one of ours; it was not loaded")
        if required:
            raise CheckpointError(f"{path}: has no checksum ({CHECKSUM_KEY}); it was not written by this "
                                  "version of mae-transfer or it is damaged; it was not loaded")
        return
    actual = state_checksum(state)
    if stored != actual:
        raise CheckpointError(
            f"{path}: checksum mismatch (stored {str(stored)[:12]}..., computed {actual[:12]}...): the file "
            "changed after it was written (disk error, partial copy); it was not loaded"
        )


def safe_torch_load(path: str | os.PathLike, extra_safe_globals: list[Any] | None = None,
                    require_checksum: bool = False) -> Any:
    """Load a ``torch.save`` file without executing code from it.

    Args:
        path: the file.
        extra_safe_globals: further classes the caller knows to be harmless.
        require_checksum: the file must be a dict carrying its checksum (``add_checksum``); else
            a stored checksum is verified when there is one.
    Raises:
        CheckpointError: missing, truncated or corrupt file.
        UnsafeCheckpointError: the pickle references a callable/class outside the allow-list.
        CheckpointError: the file stores a checksum (``add_checksum``) that its content does not match.
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
            obj = torch.load(path, map_location="cpu", weights_only=True)
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
    except Exception as exc:  # a damaged pickle makes the unpickler fail in many ways (IndexError, TypeError ...)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({type(exc).__name__}: {first})") from None
    verify_checksum(obj, path, required=require_checksum)
    return obj


def _unsupported_global(msg: str) -> str:
    """The line of torch's message that names the refused global (e.g. ``GLOBAL posix.system``)."""
    for line in msg.splitlines():
        if "GLOBAL" in line.upper() and ("unsupported" in line.lower() or "blocked" in line.lower()):
            return line.strip().split(" To add it")[0].rstrip(".")
    return "the unpickler met an object outside the allow-list"


def atomic_write(path: str | os.PathLike, writer: Callable[[str], None]) -> Path:
    """Call ``writer(tmp_path)`` then move the finished file onto ``path`` atomically.

    The temporary file sits in the destination folder (same filesystem) and is removed if the
    writer fails, so a failed or interrupted write leaves any previous ``path`` untouched.  The
    new file gets the permissions a plain ``open(path, "w")`` would give it (``0o666 & ~umask``).

    Raises:
        CheckpointWriteError: the folder or the file cannot be written (no space left, permission
            denied, read-only file system, ...): the message names ``path`` and the reason.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        writer(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        oserr = _os_error_in(exc)
        if oserr is None and isinstance(exc, RuntimeError) and _errno_in(str(exc)) is not None:
            reason = _errno_in(str(exc))
        elif oserr is not None:
            reason = oserr.strerror or str(oserr)
        else:
            raise
        state = "the previous file is unchanged" if path.exists() else "no file was written"
        raise CheckpointWriteError(f"{path}: could not write it ({reason}); {state}") from exc
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` sets it
    for a moment, which other threads creating files at that time would see)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _os_error_in(exc: BaseException) -> OSError | None:
    """The ``OSError`` behind ``exc``: itself, or one it was raised from or while handling (torch's
    zip writer turns a failed write into a ``RuntimeError`` raised while handling the ``OSError``)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return None


def _errno_in(message: str) -> str | None:
    """The OS reason in a torch writer's RuntimeError (``... No space left on device``), if any."""
    import errno

    for code in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO):
        text = os.strerror(code)
        if text.lower() in message.lower():
            return text
    return None


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (``.NAME.*.tmp``) that writes of ``path`` killed midway left in
    its folder; return them.  Call it only where no other process writes ``path`` at the time."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for p in stale:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    return stale


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` that is atomic (see ``atomic_write``).

    It writes through a Python file object, so that a failing write raises the ``OSError`` of the
    system (e.g. ``No space left on device``) rather than torch's opaque zip-writer error.
    """

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, _write)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_write``)."""

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, _write)
