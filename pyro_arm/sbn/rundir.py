# SPDX-License-Identifier: Apache-2.0
"""
The run folder: where it may be, which folders a fresh run may use, the lock that keeps a second
run out of it, and the clean-up after a run that failed before writing its first checkpoint.

A fresh run only starts in a folder that is missing or empty, so that nothing of the user's (a
finished run, a copy of one, unrelated files) is ever overwritten; ``--resume`` is the only way
into a folder that holds a run.

One run at a time writes a run folder: :func:`run_folder` holds an exclusive :func:`fcntl.flock`
on the file :data:`LOCK_FILE` inside it for the life of the run, with the holder's process id and
host written in it. A second run on the folder (fresh or ``--resume``, in another terminal, a
re-submitted job) is refused with :class:`RunFolderBusy` before it writes anything. The kernel
releases the lock when its holder dies, even by SIGKILL, so a killed run never blocks its
``--resume``; the file itself is removed when the run ends. A folder that holds only a stale
lock file (its holder died) is still a fresh folder.

A run folder cannot be turned against its user: every entry must be a regular file
(:func:`check_entries`, before and after taking the lock), and the lock, like every file a run
writes, is opened without following symbolic links (:mod:`~pyro_arm.sbn.files`). A link named
``.lock`` that points at one of the user's files is refused, never truncated.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from pyro_arm.sbn.config import ConfigError
from pyro_arm.sbn.files import check_regular, open_regular

__all__ = [
    "LOCK_FILE",
    "RUN_FILES",
    "RunFolderBusy",
    "check_entries",
    "check_location",
    "check_fresh",
    "run_folder",
]

#: The files a run writes before its first checkpoint (removed if it fails before then).
RUN_FILES = ("config.json", "metrics.csv")

#: The lock file inside a run folder while a run holds it.
LOCK_FILE = ".lock"

# the run folders this process holds (resolved paths), so that an inner run_folder is a no-op
_held: set[Path] = set()


class RunFolderBusy(ConfigError):
    """Another process holds the run folder's lock; the message names it where it can."""

    def __init__(self, run_dir: Path, holder: str):
        who = f"another run ({holder})" if holder else "another run"
        super().__init__(
            f"{run_dir} is in use by {who}; wait for it to finish, or pick another --run-dir"
        )


def check_location(run_dir: Path) -> None:
    """
    :raises ConfigError: if ``run_dir``, or a folder above it, is an existing file.
    """
    for path in (run_dir, *run_dir.parents):
        if path.exists() and not path.is_dir():
            where = "is" if path == run_dir else f"would be inside {path}, which is"
            raise ConfigError(f"--run-dir {run_dir} {where} a file, not a folder; pick a folder")


def check_entries(run_dir: Path) -> None:
    """
    :raises UnsafeFile: naming the first entry of ``run_dir`` (by name) that is a symbolic link
        or not a regular file (a folder, a FIFO, a socket, a device); none is followed.
    """
    try:
        names = sorted(os.listdir(run_dir))
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in names:
        check_regular(run_dir / name)


def check_fresh(run_dir: Path) -> None:
    """
    :raises RunFolderBusy: if another run holds ``run_dir``.
    :raises ConfigError: if ``run_dir`` exists and holds anything but :data:`LOCK_FILE` (a fresh
        run never writes there).
    """
    if run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        holder = _holder_if_locked(run_dir)
        if holder is not None:
            raise RunFolderBusy(run_dir, holder)
        what = "already holds a run" if (run_dir / "checkpoint.pt").exists() else "is not empty"
        raise ConfigError(
            f"{run_dir} {what}; pass --resume to continue the run in it, or choose another "
            "--run-dir (a fresh run only starts in a missing or empty folder)"
        )


def _holder_if_locked(run_dir: Path) -> str | None:
    """The holder of ``run_dir``'s lock (``""`` if unknown), or None if it is free; creates
    nothing."""
    try:
        fd = open_regular(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(fd)
    finally:
        os.close(fd)  # also releases a shared lock taken just now
    return None


def _read_holder(fd: int) -> str:
    """``pid P on HOST`` from an open lock file; waits up to a second for its holder to write it
    (it does so right after taking the lock); ``""`` if it does not."""
    for _ in range(20):
        words = os.pread(fd, 1024, 0).decode("utf-8", "replace").split()
        if len(words) == 2:
            return f"pid {words[0]} on {words[1]}"
        time.sleep(0.05)
    return ""


def _lock(run_dir: Path) -> int:
    """
    Takes the exclusive lock of ``run_dir`` (creating the folder and :data:`LOCK_FILE`) and
    writes this process's id and host in it; returns the file descriptor that holds it.

    :raises RunFolderBusy: if another process holds it.
    :raises UnsafeFile: if :data:`LOCK_FILE` is a link or not a regular file.
    """
    path = run_dir / LOCK_FILE
    while True:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = open_regular(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderBusy(run_dir, holder) from None
        except BaseException:
            os.close(fd)
            raise
        # the lock counts only if the file is still the one at ``path``: a run that ended
        # removes the file after locking it, and the next one must lock the new file
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unlock(run_dir: Path, fd: int) -> None:
    """Removes :data:`LOCK_FILE` while still holding it, then releases it."""
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(run_dir / LOCK_FILE)
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_folder(run_dir: Path, fresh: bool, writer: bool = True) -> Iterator[None]:
    """
    Holds the lock of ``run_dir`` while the block runs (nothing more if this process holds it
    already).

    Every entry of the folder must be a regular file (:func:`check_entries`), and for a fresh run
    (``fresh``) the folder must be missing or empty (:func:`check_fresh`), before and after taking
    the lock; if the block fails before a ``checkpoint.pt`` exists, the files
    of :data:`RUN_FILES` are removed. A folder created here and left empty is removed again, so
    that a run that failed before its first checkpoint leaves nothing behind.

    :param writer: whether this process writes the folder; the other ranks of a torchrun run
        (``writer=False``) only check that a fresh folder is empty, and take no lock.
    :raises RunFolderBusy: if another process holds the lock.
    :raises ConfigError: if a fresh run's folder is not empty.
    :raises UnsafeFile: if an entry of the folder is a link or not a regular file.
    """
    key = run_dir.resolve()
    if key in _held:
        yield
        return
    check_entries(run_dir)  # before the lock: nothing is opened through a planted link
    if fresh:
        check_fresh(run_dir)  # a folder holding anything gets no lock file
    if not writer:
        yield
        return
    created = not run_dir.exists()
    fd = _lock(run_dir)
    _held.add(key)
    try:
        check_entries(run_dir)
        if fresh:
            check_fresh(run_dir)
        yield
    except BaseException:
        if fresh and not (run_dir / "checkpoint.pt").exists():
            for name in RUN_FILES:
                (run_dir / name).unlink(missing_ok=True)
        raise
    finally:
        _held.discard(key)
        _unlock(run_dir, fd)
        if created:
            with contextlib.suppress(OSError):  # not empty: keep it
                run_dir.rmdir()
