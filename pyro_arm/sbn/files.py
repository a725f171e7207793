# SPDX-License-Identifier: Apache-2.0
"""
Atomic file writes: a reader (or a resumed run) sees either the old file or the new one, never a
half-written file, even if the process is killed mid-write.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


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
