# SPDX-License-Identifier: Apache-2.0
"""
Named random streams of a training run, each a pure function of ``(seed, stream, index...)``.

A run draws from six independent streams (:class:`Stream`). Each seed is made by
:class:`numpy.random.SeedSequence` from the run's seed, the stream's number and an optional index
(an epoch or a step), so that no two streams, epochs or steps share random numbers and any of
them can be re-created on resume without replaying the others.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator

import numpy as np
import torch


class Stream(enum.IntEnum):
    """The random streams of a run (the numbers are part of the checkpoint format: keep them)."""

    #: The guide's samples: the global torch RNG, seeded once at the start of a run.
    GUIDE = 0
    #: The order of the training images, one permutation per epoch.
    ORDER = 1
    #: The dynamic binarization of each training batch, per step.
    BINARIZE = 2
    #: The validation ``-ELBO`` of each evaluation step.
    VALID = 3
    #: The final test bounds.
    TEST = 4
    #: The figures (reconstructions and samples).
    PLOTS = 5


def derived_seed(seed: int, stream: Stream, *index: int) -> int:
    """A 64-bit seed for ``stream`` (at ``index``, e.g. an epoch or step) of the run ``seed``."""
    parts = [int(seed), int(stream), *(int(i) for i in index)]
    return int(np.random.SeedSequence(parts).generate_state(1, np.uint64)[0])


def generator(seed: int, stream: Stream, *index: int) -> torch.Generator:
    """A CPU :class:`torch.Generator` seeded with :func:`derived_seed`."""
    return torch.Generator().manual_seed(derived_seed(seed, stream, *index))


def seed_global(seed: int, stream: Stream, *index: int) -> None:
    """Seeds the global torch RNG (all devices) with :func:`derived_seed`."""
    torch.manual_seed(derived_seed(seed, stream, *index))


@contextlib.contextmanager
def forked(seed: int, stream: Stream, *index: int, device: torch.device) -> Iterator[None]:
    """
    Runs the block on the global torch RNG seeded for ``stream``, then restores the RNG state
    (CPU and, on a CUDA ``device``, that device), so the block does not perturb the guide's stream.
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        seed_global(seed, stream, *index)
        yield
