# SPDX-License-Identifier: Apache-2.0
"""
Whether a run fits in memory: checked before the model is allocated, and the allocator's
failures while it trains or evaluates.

Training keeps four numbers per parameter (the value, its gradient and Adam's two moments), so a
model of ``n`` float32 parameters needs at least ``16 n`` bytes. An architecture that cannot fit
in the memory the process may use (the device's memory; on the CPU also what the process's
``RLIMIT_AS`` and ``RLIMIT_DATA`` leave, as set by ``ulimit -v`` / ``-d`` or a container) is
refused with a :class:`~pyro_arm.sbn.config.ConfigError` instead of an allocator error (or, on
Linux, the out-of-memory killer). An allocation that fails later, in a step or an evaluation
(:func:`is_out_of_memory`), is reported as an :class:`OutOfMemory` naming the options to reduce
(:func:`memory_options`).
"""

from __future__ import annotations

import os
import re
import resource
from typing import Optional

import torch

from pyro_arm.estimators import ESTIMATORS
from pyro_arm.sbn.config import ConfigError, TrainConfig
from pyro_arm.sbn.models import build_sbn

__all__ = [
    "BYTES_PER_PARAMETER",
    "OutOfMemory",
    "allocation_failed",
    "check_fits",
    "device_memory",
    "is_out_of_memory",
    "memory_options",
    "num_parameters",
    "process_memory_limit",
]

#: Bytes of training state per float32 parameter: value, gradient, Adam's two moments.
BYTES_PER_PARAMETER = 16

# the soft limits on a process's memory, with the line of /proc/self/status that holds the
# amount each one counts
_LIMITS = (("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData"))


class OutOfMemory(ConfigError):
    """An allocation failed while a run trained or evaluated; the message says what to reduce."""


def num_parameters(model: str) -> int:
    """The number of parameters of the architecture ``model``, counted without allocating it."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_sbn(model).parameters())


def _status_bytes(field: str) -> int:
    """A ``kB`` line of ``/proc/self/status`` in bytes (0 where it cannot be read)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def process_memory_limit() -> Optional[tuple[int, str]]:
    """
    The bytes this process may still allocate under its soft ``RLIMIT_AS`` and ``RLIMIT_DATA``
    (the limit less what the process uses of it), with the name of the tighter limit; None where
    neither is set.
    """
    left = []
    for name, field in _LIMITS:
        soft, _ = resource.getrlimit(getattr(resource, name))
        if soft != resource.RLIM_INFINITY:
            left.append((max(soft - _status_bytes(field), 0), name))
    return min(left) if left else None


def device_memory(device: torch.device) -> int:
    """The total memory of ``device`` in bytes (physical memory for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(model: str, device: torch.device, memory: int | None = None) -> None:
    """
    :param memory: the bytes available (default :func:`device_memory`, or on the CPU what
        :func:`process_memory_limit` leaves if that is less).
    :raises ConfigError: if training ``model`` needs more than ``memory``.
    """
    need = BYTES_PER_PARAMETER * num_parameters(model)
    where = f"{device} has"
    if memory is None:
        memory = device_memory(device)
        limit = process_memory_limit() if device.type == "cpu" else None
        if limit is not None and limit[0] < memory:
            memory, where = limit[0], f"this process's {limit[1]} leaves"
    if need > memory:
        raise ConfigError(
            f"--model {model} is too large: its {need // BYTES_PER_PARAMETER:,} parameters need "
            f"{need / 2**30:.1f} GiB to train, and {where} {memory / 2**30:.1f} GiB; "
            "choose smaller layers"
        )


def memory_options(config: TrainConfig) -> str:
    """
    The options that set the memory of a training step, with their values, as advice: ``a
    smaller --batch-size (now 50) or smaller layers (--model linear)``, with ``--num-particles``
    when above 1 and ``--num-samples`` (and ``--num-members``) where the objective or the
    estimator draws several samples (``--objective iwae``, ``rloo``, ``arms``).
    """
    options = [f"a smaller --batch-size (now {config.batch_size})"]
    if config.num_particles > 1:
        options.append(f"fewer --num-particles (now {config.num_particles})")
    iw = config.objective == "iwae"
    estimator = ESTIMATORS.get(config.estimator)
    if iw or (estimator is not None and estimator.multi_sample):
        options.append(f"fewer --num-samples (now {config.num_samples or 2})")
    if iw and config.estimator == "arms":
        options.append(f"fewer --num-members (now {config.num_members or 3})")
    return ", ".join(options) + f" or smaller layers (--model {config.model})"


_ALLOCATOR_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocator's failure: :class:`MemoryError`,
    :class:`torch.OutOfMemoryError`, or a :class:`RuntimeError` of torch's CPU or CUDA allocator."""
    if isinstance(error, MemoryError):
        return True
    if isinstance(error, RuntimeError):
        first = str(error).strip().split("\n", 1)[0].lower()
        return any(m in first for m in _ALLOCATOR_MESSAGES)
    return False


def allocation_failed(error: BaseException) -> str:
    """A short account of an allocator's failure: the size it could not allocate, if it says."""
    text = str(error)
    found = re.search(r"allocate (\d+) bytes", text)
    if found:
        return f"could not allocate {int(found.group(1)) / 2**20:,.1f} MiB"
    found = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]?i?B)", text)
    if found:
        return f"could not allocate {found.group(1)}"
    return "an allocation failed"
