# SPDX-License-Identifier: Apache-2.0
"""Shared pieces of the GPU-readiness checks (``test_cuda.py``, ``test_host_sync.py``)."""

from contextlib import contextmanager, nullcontext

import torch
from pyro.infer.util import torch_item

from pyro_arm import TraceARM_ELBO, trace_arm_elbo
from tests.tiny_models import sbn, synthetic_data


def warm_vectorized_step(device):
    """The SBN of ``tiny_models.sbn`` with its params created on ``device`` by one warm-up step of
    vectorized TraceARM_ELBO; returns ``(elbo, model, guide, data)``. The default device is
    restored afterwards, so that a tensor allocated later without a device lands on the CPU."""
    previous = torch.get_default_device()
    torch.set_default_device(device)
    try:
        model, guide = sbn()
        data = synthetic_data()
        elbo = TraceARM_ELBO(num_particles=3, vectorize_particles=True)
        elbo.loss_and_grads(model, guide, data)
    finally:
        torch.set_default_device(previous)
    return elbo, model, guide, data


@contextmanager
def loss_item_allowed(monkeypatch, during=lambda: nullcontext()):
    """Counts the calls of ``torch_item`` in TraceARM_ELBO (Pyro's loss ``.item()``, the one
    synchronisation a step may make) in ``calls`` and runs each inside ``during()``."""
    calls = []

    def counted_item(x):
        calls.append(x)
        with during():
            return torch_item(x)

    monkeypatch.setattr(trace_arm_elbo, "torch_item", counted_item)
    yield calls
