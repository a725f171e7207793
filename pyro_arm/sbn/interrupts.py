# SPDX-License-Identifier: Apache-2.0
"""
A clean stop on SIGINT (Ctrl-C) and SIGTERM (``kill``, Slurm, ``docker stop``, ``timeout``).

While a :class:`StopSignals` block runs, the first of these signals only *requests* a stop:
the training loop sees :attr:`StopSignals.requested` between two steps, finishes the step it is
in (and its metrics row), saves a checkpoint and stops. A second signal aborts at once by raising
:class:`Aborted` wherever the program is; the checkpoint on disk is still the last complete one,
as every file is written atomically (:mod:`pyro_arm.sbn.files`). Where nothing is left to save
(the final evaluation), :meth:`StopSignals.at_once` makes the first signal raise
:class:`Interrupted` at once.

A command-line program wraps its whole run in :class:`ExitSignals`, whose handlers stay installed
until the process exits (:meth:`ExitSignals.exit`): once a stop signal has been received, any
further one ends the process at once with status 128 + its number, right after the program's
one-line message, so that a signal during the shutdown (closing a process group, the exit hooks
of the libraries) never prints a traceback nor kills the process by the signal.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from types import FrameType
from typing import NoReturn, Optional

__all__ = ["Aborted", "ExitSignals", "Interrupted", "StopSignals", "STOP_SIGNALS"]

#: The signals that stop a training run cleanly.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop signal interrupted the program where it was."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Aborted(Interrupted):
    """A second stop signal arrived: the run stops at once, without saving."""


def signal_name(signum: int) -> str:
    """``2 -> "SIGINT"``."""
    return signal.Signals(signum).name


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class StopSignals:
    """
    Context manager: turns the first SIGINT / SIGTERM into a stop request, a second into
    :class:`Aborted`, and restores the previous handlers on exit. Outside the main thread (where
    Python cannot install handlers) it does nothing and the signals keep their usual effect.

    :param message: printed to stderr when the first signal arrives.
    """

    def __init__(self, message: str = ""):
        self.message = message
        #: The number of the first signal received, or None.
        self.signum: Optional[int] = None
        self._at_once = False
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was requested."""
        return self.signum is not None

    def at_once(self) -> None:
        """From now on the first signal raises :class:`Interrupted` instead of requesting a
        stop."""
        self._at_once = True

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is not None:
            raise Aborted(signum)
        self.signum = signum
        if self._at_once:
            raise Interrupted(signum)
        if self.message:
            print(f"{signal_name(signum)}: {self.message}", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        if _in_main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        outer = getattr(self._previous.get(signal.SIGINT), "__self__", None)
        if isinstance(outer, ExitSignals) and self.signum is not None:
            outer.received = True  # the program is stopping: a further signal ends it
        self._previous.clear()


class ExitSignals:
    """
    Context manager for the run of a command-line program (outside it, a :class:`StopSignals`
    block takes over for the training). Until a stop signal is received, the first SIGINT /
    SIGTERM raises :class:`Interrupted`. After one (here or in a :class:`StopSignals` block
    inside), any further signal ends the process at once (:func:`os._exit`) with status 128 +
    its number; one that arrives before :meth:`done` waits for it, so that the program's
    message is printed first. Outside the main thread it does nothing.

    :param restore: restore the previous handlers on exit. A program leaves them installed
        (``restore=False``) until the process exits, through its exit hooks.
    """

    def __init__(self, restore: bool = True):
        self.restore = restore
        #: Whether a stop signal was received.
        self.received = False
        self._done = False
        self._pending: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self._done:
            _exit(128 + signum)
        if self.received:
            self._pending = signum  # ends the process in done(), after the message
            return
        self.received = True
        raise Interrupted(signum)

    def done(self) -> None:
        """The program's outcome is settled and its message printed: from now on a signal ends
        the process at once, as does one that arrived since the first."""
        self._done = True
        if self._pending is not None:
            _exit(128 + self._pending)

    def exit(self, status: int) -> NoReturn:
        """
        Runs the process's exit hooks (:mod:`atexit`) under these handlers, then ends the process
        with ``status``. The interpreter's own shutdown, skipped here, would give the signals
        their default action again (death by the signal) while it runs.
        """
        self.done()
        atexit._run_exitfuncs()
        _exit(status)

    def __enter__(self) -> ExitSignals:
        if _in_main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.restore:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self._previous.clear()


def _exit(status: int) -> None:
    """Flushes what can be flushed and ends the process with ``status``, skipping exit hooks."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # closed, or in the middle of a write this signal interrupted
            pass
    os._exit(status)
