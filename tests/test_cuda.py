# SPDX-License-Identifier: Apache-2.0
"""
TraceARM_ELBO on a GPU: unbiased against the exact reference, params and gradients stay on the
device, the estimator work of a step never synchronises with the host and allocates nothing off
the logits' device, and a small SBN trains. Skipped without CUDA. (``PYRO_ARM_TEST_DEVICE=cpu``
dry-runs the same code on the CPU; the synchronisation check needs CUDA.)
"""

import math
import os
from contextlib import contextmanager

import pyro
import pytest
import torch
from pyro.infer import SVI
from pyro.optim import Adam
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pyro_arm import TraceARM_ELBO
from tests.exact import assert_unbiased
from tests.step_checks import loss_item_allowed, warm_vectorized_step
from tests.tiny_models import CASES, decrease, sbn, synthetic_data

DEVICE = os.environ.get("PYRO_ARM_TEST_DEVICE", "cuda")

pytestmark = pytest.mark.skipif(
    DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA device"
)


@pytest.fixture
def on_device():
    """Creates every tensor (data, params, subsamples) on the device by default."""
    previous = torch.get_default_device()
    torch.set_default_device(DEVICE)
    yield torch.device(DEVICE)
    torch.set_default_device(previous)


def assert_on_device(device):
    for name, p in pyro.get_param_store().named_parameters():
        assert p.device.type == device.type, name
        assert p.grad is None or p.grad.device.type == device.type, name


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["arm", "disarm"])
@pytest.mark.parametrize(
    "case", ["two_layer", "subsampled", "normal_then_bernoulli", "local_then_global"]
)
def test_unbiased_on_device(case, estimator, on_device, float64):
    model, guide, args = CASES[case]()
    elbo = TraceARM_ELBO(num_particles=500, vectorize_particles=True, estimator=estimator)
    report = assert_unbiased(elbo, model, guide, args, num_samples=25000, seed=0)
    print(
        f"{DEVICE} {case} {estimator}: max |z| = {report.zscores().abs().max():.2f} over "
        f"{len(report.names)} components"
    )
    elbo.loss_and_grads(model, guide, *args)
    assert_on_device(on_device)


@pytest.mark.parametrize("vectorize", [False, True])
def test_sequential_and_vectorized_on_device(vectorize, on_device):
    model, guide = sbn()
    data = synthetic_data()
    assert data.device.type == on_device.type
    elbo = TraceARM_ELBO(num_particles=3, vectorize_particles=vectorize)
    loss = elbo.loss_and_grads(model, guide, data)
    assert math.isfinite(loss)
    assert_on_device(on_device)
    for _, p in pyro.get_param_store().named_parameters():
        assert p.grad is not None
    loss_t = elbo.differentiable_loss(model, guide, data)
    assert loss_t.device.type == on_device.type


@pytest.mark.slow
def test_sbn_trains_on_device(on_device):
    model, guide = sbn()
    data = synthetic_data()
    svi = SVI(
        model,
        guide,
        Adam({"lr": 0.1}),
        loss=TraceARM_ELBO(num_particles=8, vectorize_particles=True),
    )
    losses = [svi.step(data) for _ in range(150)]
    first, last = decrease(losses)
    assert last < first - 0.15 * abs(first)
    assert_on_device(on_device)


@contextmanager
def sync_debug_off():
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("error")


def test_step_does_not_synchronize(monkeypatch):
    """
    After a warm-up step, a vectorized ``loss_and_grads`` (the estimator work of an SVI step)
    makes no host synchronisation except Pyro's loss ``.item()``:
    ``torch.cuda.set_sync_debug_mode("error")`` raises on any other. Pyro's validation (support
    checks, ``.all()`` on device tensors) synchronises by design and is off here; so is
    ``differentiable_loss``'s ``warn_if_nan`` on the loss tensor (as in Pyro's ``Trace_ELBO``),
    which ``loss_and_grads`` does not use.
    """
    if not DEVICE.startswith("cuda"):
        pytest.skip("set_sync_debug_mode needs CUDA")
    elbo, model, guide, data = warm_vectorized_step(torch.device(DEVICE))
    torch.cuda.synchronize()
    with pyro.validation_enabled(False), loss_item_allowed(monkeypatch, sync_debug_off) as calls:
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = elbo.loss_and_grads(model, guide, data)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert math.isfinite(loss)
    assert len(calls) == 1


class DeviceRecorder(TorchDispatchMode):
    """Records every op whose output tensors are not on ``device``."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.off_device, self.cpu_scalars = device, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != self.device.type:
                (self.cpu_scalars if t.dim() == 0 else self.off_device).append(str(func))
        return out


def test_step_allocates_only_on_the_logits_device():
    """
    Every tensor a vectorized step allocates (forward and backward, the noise, the branches) is
    on the logits' device. 0-dim CPU tensors (torch's CPU scalars, passed to kernels by value)
    are listed, not counted. On the CPU dry run this checks nothing but that the test runs.
    """
    device = torch.device(DEVICE)
    elbo, model, guide, data = warm_vectorized_step(device)
    recorder = DeviceRecorder(device)
    with pyro.validation_enabled(False), recorder:
        elbo.loss_and_grads(model, guide, data)
    if recorder.cpu_scalars:
        print("0-dim CPU tensors from:", sorted(set(recorder.cpu_scalars)))
    assert not recorder.off_device, sorted(set(recorder.off_device))
