# SPDX-License-Identifier: Apache-2.0
"""
The CPU side of the GPU-ready step: a vectorized ``loss_and_grads`` reads nothing back to the
host except Pyro's loss ``.item()``.

On a GPU every read of a tensor's value by the host (``.item()``, ``bool(t)``, ``if t.any():``,
``nonzero``, ``masked_select``) is a synchronisation; ``tests/test_cuda.py`` checks the step with
``torch.cuda.set_sync_debug_mode("error")``. Here the same ops are caught on the CPU with a
``TorchDispatchMode``, so that CI catches a new one without a GPU.
"""

from __future__ import annotations

import traceback
from contextlib import contextmanager

import pyro
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.step_checks import loss_item_allowed, warm_vectorized_step

#: The aten ops that read a tensor's data on the host (synchronise on a GPU).
HOST_READS = {
    "aten._local_scalar_dense.default",  # .item(), float(t), bool(t), int(t)
    "aten.is_nonzero.default",
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten.equal.default",
    "aten.unique_consecutive.default",
    "aten._unique2.default",
}


class HostReads(TorchDispatchMode):
    """Records each host read (op name and where in the caller it came from) while active and
    not ``paused``."""

    def __init__(self):
        super().__init__()
        self.reads: list[tuple[str, str]] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in HOST_READS and not self.paused:
            self.reads.append((str(func), "".join(traceback.format_stack(limit=8)[:-1])))
        return func(*args, **(kwargs or {}))

    @contextmanager
    def pause(self):
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def report(self) -> str:
        return "\n\n".join(f"{op} from\n{where}" for op, where in self.reads)


def test_step_reads_only_the_loss(monkeypatch):
    elbo, model, guide, data = warm_vectorized_step(torch.device("cpu"))
    reads = HostReads()
    with pyro.validation_enabled(False), loss_item_allowed(monkeypatch, reads.pause) as calls:
        with reads:
            elbo.loss_and_grads(model, guide, data)
    assert len(calls) == 1
    assert not reads.reads, reads.report()


def test_host_reads_are_caught():
    """The checker's power: ``differentiable_loss`` checks its loss tensor for NaN
    (``warn_if_nan``, as Pyro's ``Trace_ELBO`` does), a host read the recorder must see."""
    elbo, model, guide, data = warm_vectorized_step(torch.device("cpu"))
    reads = HostReads()
    with pyro.validation_enabled(False), reads:
        elbo.differentiable_loss(model, guide, data).backward()
    assert reads.reads
    assert "warn_if_nan" in reads.report()
