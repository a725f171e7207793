# SPDX-License-Identifier: Apache-2.0
"""
The process-wide state a test may change: the handlers of SIGINT and SIGTERM, the working
directory, the environment, torch's thread count and the global random generators.

:func:`process_state_fixture` is the fixture ``process_state`` (import it into a test module,
where every test uses it): it records the state before the test and gives the record to the
test, to compare with what was there, never with an assumed default (a test process started
with SIGINT ignored has ``SIG_IGN`` as its handler, not :func:`signal.default_int_handler`).
Afterwards it checks that the signal handlers, the working directory and the environment are as
they were, then restores everything. Training changes the thread count (``--threads``) and the
global RNG (its guide's samples) by design; those are restored without a check.
"""

from __future__ import annotations

import os
import random
import signal
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

SIGNALS = (signal.SIGINT, signal.SIGTERM)


# written by pytest in every phase of a test, and by torch the first time it reads its
# compiler's cache folder (in the first optimizer step of the process)
UNWATCHED = ("PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR")


def _environ() -> dict:
    """The environment but for :data:`UNWATCHED`."""
    return {k: v for k, v in os.environ.items() if k not in UNWATCHED}


@dataclass
class ProcessState:
    """What :func:`process_state` records and restores."""

    handlers: dict = field(default_factory=lambda: {s: signal.getsignal(s) for s in SIGNALS})
    cwd: str = field(default_factory=os.getcwd)
    environ: dict = field(default_factory=_environ)
    threads: int = field(default_factory=torch.get_num_threads)
    torch_rng: torch.Tensor = field(default_factory=torch.get_rng_state)
    python_rng: tuple = field(default_factory=random.getstate)
    numpy_rng: tuple = field(default_factory=np.random.get_state)

    def restore(self) -> None:
        for signum, handler in self.handlers.items():
            signal.signal(signum, handler)
        os.chdir(self.cwd)
        for name in set(_environ()) - set(self.environ):
            del os.environ[name]
        os.environ.update(self.environ)
        torch.set_num_threads(self.threads)
        torch.set_rng_state(self.torch_rng)
        random.setstate(self.python_rng)
        np.random.set_state(self.numpy_rng)


@pytest.fixture(autouse=True, name="process_state")
def process_state_fixture():
    """The :class:`ProcessState` before the test; checked and restored after it."""
    before = ProcessState()
    yield before
    after = ProcessState()
    before.restore()
    assert after.handlers == before.handlers, "signal handlers not restored"
    assert after.cwd == before.cwd, "working directory not restored"
    changed = {
        k: (before.environ.get(k), after.environ.get(k))
        for k in set(before.environ) | set(after.environ)
        if before.environ.get(k) != after.environ.get(k)
    }
    assert not changed, f"environment not restored: {changed}"
