# SPDX-License-Identifier: Apache-2.0
"""
Whether a model fits in memory, checked before it is allocated.

Training keeps four numbers per parameter (the value, its gradient and Adam's two moments), so a
model of ``n`` float32 parameters needs at least ``16 n`` bytes. An architecture that cannot fit
in the device's memory is refused with a :class:`~pyro_arm.sbn.config.ConfigError` instead of an
allocator error (or, on Linux, the out-of-memory killer).
"""

from __future__ import annotations

import os

import torch

from pyro_arm.sbn.config import ConfigError
from pyro_arm.sbn.models import build_sbn

__all__ = ["BYTES_PER_PARAMETER", "device_memory", "num_parameters", "check_fits"]

#: Bytes of training state per float32 parameter: value, gradient, Adam's two moments.
BYTES_PER_PARAMETER = 16


def num_parameters(model: str) -> int:
    """The number of parameters of the architecture ``model``, counted without allocating it."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_sbn(model).parameters())


def device_memory(device: torch.device) -> int:
    """The total memory of ``device`` in bytes (physical memory for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(model: str, device: torch.device, memory: int | None = None) -> None:
    """
    :param memory: the bytes available (default :func:`device_memory`).
    :raises ConfigError: if training ``model`` needs more than ``memory``.
    """
    need = BYTES_PER_PARAMETER * num_parameters(model)
    memory = device_memory(device) if memory is None else memory
    if need > memory:
        raise ConfigError(
            f"--model {model} is too large: its {need // BYTES_PER_PARAMETER:,} parameters need "
            f"{need / 2**30:.1f} GiB to train, and {device} has {memory / 2**30:.1f} GiB; "
            "choose smaller layers"
        )
