# SPDX-License-Identifier: Apache-2.0
"""
TraceARM_ELBO on a GPU: unbiased against the exact reference, params and gradients stay on the
device, and a small SBN trains. Skipped without CUDA. (``PYRO_ARM_TEST_DEVICE=cpu`` dry-runs the
same code on the CPU.)
"""

import math
import os
import time

import pyro
import pytest
import torch
from pyro.infer import SVI
from pyro.optim import Adam

from pyro_arm import TraceARM_ELBO
from tests import test_svi
from tests.exact import assert_unbiased
from tests.tiny_models import CASES

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


@pytest.mark.parametrize("estimator", ["arm", "disarm"])
@pytest.mark.parametrize(
    "case", ["two_layer", "subsampled", "normal_then_bernoulli", "local_then_global"]
)
def test_unbiased_on_device(case, estimator, on_device, float64):
    model, guide, args = CASES[case]()
    elbo = TraceARM_ELBO(num_particles=500, vectorize_particles=True, estimator=estimator)
    start = time.perf_counter()
    report = assert_unbiased(elbo, model, guide, args, num_samples=25000, seed=0)
    print(
        f"{DEVICE} {case} {estimator}: max |z| = {report.zscores().abs().max():.2f} over "
        f"{len(report.names)} components, {time.perf_counter() - start:.2f}s"
    )
    elbo.loss_and_grads(model, guide, *args)
    assert_on_device(on_device)


@pytest.mark.parametrize("vectorize", [False, True])
def test_sequential_and_vectorized_on_device(vectorize, on_device):
    model, guide = test_svi.sbn()
    data = test_svi.synthetic_data()
    assert data.device.type == on_device.type
    elbo = TraceARM_ELBO(num_particles=3, vectorize_particles=vectorize)
    loss = elbo.loss_and_grads(model, guide, data)
    assert math.isfinite(loss)
    assert_on_device(on_device)
    for _, p in pyro.get_param_store().named_parameters():
        assert p.grad is not None
    loss_t = elbo.differentiable_loss(model, guide, data)
    assert loss_t.device.type == on_device.type


def test_sbn_trains_on_device(on_device):
    model, guide = test_svi.sbn()
    data = test_svi.synthetic_data()
    svi = SVI(
        model,
        guide,
        Adam({"lr": 0.1}),
        loss=TraceARM_ELBO(num_particles=8, vectorize_particles=True),
    )
    start = time.perf_counter()
    losses = [svi.step(data) for _ in range(150)]
    first, last = test_svi.decrease(losses)
    print(f"{DEVICE} SBN: -ELBO {first:.2f} -> {last:.2f} in {time.perf_counter() - start:.2f}s")
    assert last < first - 0.15 * abs(first)
    assert_on_device(on_device)
