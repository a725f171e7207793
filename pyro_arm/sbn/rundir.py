# SPDX-License-Identifier: Apache-2.0
"""
The run folder: where it may be, which folders a fresh run may use, and the clean-up after a run
that failed before writing its first checkpoint.

A fresh run only starts in a folder that is missing or empty, so that nothing of the user's (a
finished run, a copy of one, unrelated files) is ever overwritten; ``--resume`` is the only way
into a folder that holds a run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from pyro_arm.sbn.config import ConfigError

__all__ = ["RUN_FILES", "check_location", "check_fresh", "fresh_run_folder"]

#: The files a run writes before its first checkpoint (removed if it fails before then).
RUN_FILES = ("config.json", "metrics.csv")


def check_location(run_dir: Path) -> None:
    """
    :raises ConfigError: if ``run_dir``, or a folder above it, is an existing file.
    """
    for path in (run_dir, *run_dir.parents):
        if path.exists() and not path.is_dir():
            where = "is" if path == run_dir else f"would be inside {path}, which is"
            raise ConfigError(f"--run-dir {run_dir} {where} a file, not a folder; pick a folder")


def check_fresh(run_dir: Path) -> None:
    """
    :raises ConfigError: if ``run_dir`` exists and is not empty (a fresh run never writes there).
    """
    if run_dir.is_dir() and any(run_dir.iterdir()):
        what = "already holds a run" if (run_dir / "checkpoint.pt").exists() else "is not empty"
        raise ConfigError(
            f"{run_dir} {what}; pass --resume to continue the run in it, or choose another "
            "--run-dir (a fresh run only starts in a missing or empty folder)"
        )


@contextlib.contextmanager
def fresh_run_folder(run_dir: Path) -> Iterator[None]:
    """
    Creates ``run_dir`` for a fresh run. If the block fails before a ``checkpoint.pt`` exists,
    the files of :data:`RUN_FILES` are removed, and the folder too if this created it: a run that
    failed before its first checkpoint leaves nothing behind.
    """
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if not (run_dir / "checkpoint.pt").exists():
            for name in RUN_FILES:
                (run_dir / name).unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):  # not empty: keep it
                    run_dir.rmdir()
        raise
