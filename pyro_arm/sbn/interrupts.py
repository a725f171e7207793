# SPDX-License-Identifier: Apache-2.0
"""
A clean stop on SIGINT (Ctrl-C) and SIGTERM (``kill``, Slurm, ``docker stop``, ``timeout``).

While a :class:`StopSignals` block runs, the first of these signals only *requests* a stop:
the training loop sees :attr:`StopSignals.requested` between two steps, finishes the step it is
in (and its metrics row), saves a checkpoint and stops. A second signal aborts at once by raising
:class:`Aborted` wherever the program is; the checkpoint on disk is still the last complete one,
as every file is written atomically (:mod:`pyro_arm.sbn.files`).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Optional

__all__ = ["Aborted", "StopSignals", "STOP_SIGNALS"]

#: The signals that stop a training run cleanly.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Aborted(KeyboardInterrupt):
    """A second stop signal arrived: the run stops at once, without saving."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def signal_name(signum: int) -> str:
    """``2 -> "SIGINT"``."""
    return signal.Signals(signum).name


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
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was requested."""
        return self.signum is not None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is not None:
            raise Aborted(signum)
        self.signum = signum
        if self.message:
            print(f"{signal_name(signum)}: {self.message}", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
