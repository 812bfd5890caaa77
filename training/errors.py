"""Mistakes a user can fix, and how they are told: ``UserError`` (reported by ``mae_transfer.cli.main``
as one line, exit status 2), the output-folder check every command runs before any work, and the
one-line wording of an ``OSError`` (full disk, permission, read-only file system, missing path).
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

__all__ = ["UserError", "check_output_dir", "check_output_file", "os_error_message"]


class UserError(ValueError):
    """A mistake in the command line or its inputs; the message names the file, folder or key."""


# errno -> what the user should read (the file name is added by ``os_error_message``)
_OS_WORDS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "not a folder (a file is in the way)",
    errno.EEXIST: "already exists",
    errno.EISDIR: "is a folder, not a file",
    errno.ELOOP: "symlink loop",
    errno.ENOENT: "no such file or folder",
    errno.ENAMETOOLONG: "file name too long",
}


def os_error_message(exc: OSError) -> str:
    """One line for an ``OSError``: what went wrong and which path, e.g.
    ``out/sample/img_3.png: no space left on device``."""
    words = _OS_WORDS.get(exc.errno or -1) or exc.strerror or str(exc)
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    if not paths:
        return words
    return f"{' -> '.join(os.fsdecode(p) for p in paths)}: {words}"


def is_reportable_os_error(exc: BaseException) -> bool:
    """An ``OSError`` the boundary reports as one line: it names a path, or is a full disk."""
    return isinstance(exc, OSError) and (
        exc.filename is not None or exc.errno in (errno.ENOSPC, errno.EDQUOT))


def check_output_dir(path: str | os.PathLike, what: str = "output folder", *, create: bool = False) -> Path:
    """Check that ``path`` can hold a command's outputs, before any work starts.

    Args:
        path: the folder the command will write into.
        what: how the message names it (``"output folder"``, ``"--output"``, ``"run folder"``).
        create: make the folder (and its parents) when missing; otherwise a missing folder is
            fine as long as its nearest existing parent is a writable folder.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        UserError: naming the path when it is a file, sits under a file, or is not writable
            (permission, read-only file system).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{what} {path} cannot be created: {os_error_message(exc)}") from None
    probe = path
    while not probe.exists():  # nearest existing ancestor decides whether it can be created
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{what} {path} cannot be created: {probe} is a file")
    if not _writable(probe):
        where = "" if probe == path else f" ({probe} is not writable)"
        raise UserError(f"{what} {path} is not writable{where}: permission denied or read-only file system")
    return path


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Check that the file ``path`` can be written: not a folder, and its folder writable.

    Raises:
        UserError: naming the path.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{what} {path} is not writable: permission denied")
    check_output_dir(path.parent if str(path.parent) else Path("."), f"folder of {what} {path}")
    return path


def _writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tries one: ``os.access`` misses read-only mounts
    and ignores root's bypass of permission bits only where the file system allows it)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".mae-transfer-write-check-"):
            pass
    except OSError:
        return False
    return True
