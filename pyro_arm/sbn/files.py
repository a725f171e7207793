# SPDX-License-Identifier: Apache-2.0
"""
File access in a run folder that cannot be turned against its user.

- Atomic writes: a reader (or a resumed run) sees either the old file or the new one, never a
  half-written file, even if the process is killed mid-write. The temporary file is created
  exclusively and renamed over the destination, so a link planted under the destination's name
  is replaced, never followed.
- :func:`open_regular` opens a file in place (the lock, an appended log, a checkpoint to read)
  without following a symbolic link and only if it is a regular file, so that a link, a FIFO or
  a folder planted in the run folder is refused (:class:`UnsafeFile`) instead of being written
  through, blocking the process or giving an unrelated error.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


class UnsafeFile(ValueError):
    """An entry of a run folder is a link or not a regular file; the message names it."""

    def __init__(self, path: PathLike, kind: str):
        super().__init__(
            f"{path} is {kind}, not a regular file: a run folder holds only the run's own "
            "files; remove it, or pick another --run-dir"
        )
        self.path, self.kind = Path(path), kind


def entry_kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, in words (``"a regular file"``, ``"a FIFO"``...)."""
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
    )
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def check_regular(path: PathLike) -> None:
    """
    :raises UnsafeFile: if ``path`` exists and is a symbolic link or not a regular file (it is
        not followed).
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise UnsafeFile(path, entry_kind(mode))


def open_regular(path: PathLike, flags: int, mode: int = 0o644) -> int:
    """
    :func:`os.open` of a regular file, never through a symbolic link: ``O_NOFOLLOW`` refuses a
    link, ``O_NONBLOCK`` keeps a FIFO from blocking the open, and the opened file must be a
    regular one. Returns the file descriptor.

    :param flags: the ``os.O_*`` flags (``O_NOFOLLOW``, ``O_NONBLOCK`` and ``O_CLOEXEC`` are
        added).
    :raises UnsafeFile: if ``path`` is a link or not a regular file.
    :raises OSError: as :func:`os.open` (``FileNotFoundError`` without ``O_CREAT``).
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):  # a link, a folder, a FIFO
            check_regular(path)
        raise
    try:
        st_mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st_mode):
        os.close(fd)
        raise UnsafeFile(path, entry_kind(st_mode))
    return fd


def atomic_write(path: PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """
    Calls ``write(f)`` on a temporary file in the folder of ``path``, flushes and ``fsync``\\ s it,
    then renames it over ``path`` with :func:`os.replace` and ``fsync``\\ s the folder (so the
    rename survives a power cut). On any error (also ``KeyboardInterrupt``, or an ``OSError``
    such as a full disk) the temporary file is removed and ``path`` is left as it was.

    :param path: the destination; its folder is created if missing.
    :param write: writes the content to a binary file object.
    :returns: ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e  # say which file (a full disk)
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """``fsync``\\ s a folder's entry list (skipped where a folder cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))
