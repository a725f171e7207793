# SPDX-License-Identifier: Apache-2.0
"""TraceARM_ELBO in training loops: pyro SVI, plain torch optimizers, loss consistency, dtypes."""

import math

import pyro
import pytest
import torch
from pyro.infer import SVI
from pyro.optim import Adam

from pyro_arm import TraceARM_ELBO
from tests.tiny_models import decrease, sbn, synthetic_data


@pytest.mark.slow
@pytest.mark.parametrize(
    "estimator,vectorize,num_particles",
    [("arm", False, 1), ("disarm", True, 4), ("ar", True, 4)],
)
def test_svi_trains_sbn(estimator, vectorize, num_particles):
    data = synthetic_data()
    model, guide = sbn()
    elbo = TraceARM_ELBO(
        num_particles=num_particles, vectorize_particles=vectorize, estimator=estimator
    )
    svi = SVI(model, guide, Adam({"lr": 0.1}), loss=elbo)
    losses = [svi.step(data) for _ in range(120)]
    assert all(math.isfinite(x) for x in losses)
    first, last = decrease(losses)
    print(f"{estimator} vec={vectorize} P={num_particles}: -ELBO {first:.2f} -> {last:.2f}")
    assert last < first - 0.15 * abs(first), (first, last)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["module", "differentiable_loss"])
def test_torch_optimizer_trains_sbn(how):
    data = synthetic_data()
    model, guide = sbn()
    elbo = TraceARM_ELBO(num_particles=4, vectorize_particles=True)
    if how == "module":
        loss_fn = elbo(model, guide)
        assert isinstance(loss_fn, torch.nn.Module)
    else:

        def loss_fn(data):
            return elbo.differentiable_loss(model, guide, data)

    loss_fn(data)  # creates the params (plain functions: they live in the param store)
    params = [p for _, p in pyro.get_param_store().named_parameters()]
    assert len(params) == 5
    opt = torch.optim.Adam(params, lr=0.1)
    losses = []
    for _ in range(120):
        opt.zero_grad()
        loss = loss_fn(data)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = decrease(losses)
    print(f"torch {how}: -ELBO {first:.2f} -> {last:.2f}")
    assert last < first - 0.15 * abs(first), (first, last)


@pytest.mark.parametrize("estimator", ["arm", "disarm", "ar"])
@pytest.mark.parametrize("vectorize,num_particles", [(False, 1), (False, 3), (True, 5)])
def test_same_seed_same_loss(estimator, vectorize, num_particles):
    data = synthetic_data()
    model, guide = sbn()
    elbo = TraceARM_ELBO(
        num_particles=num_particles, vectorize_particles=vectorize, estimator=estimator
    )
    pyro.set_rng_seed(7)
    a = elbo.loss(model, guide, data)
    pyro.set_rng_seed(7)
    b = elbo.loss_and_grads(model, guide, data)
    pyro.set_rng_seed(7)
    c = elbo.differentiable_loss(model, guide, data).item()
    pyro.set_rng_seed(7)
    d = elbo(model, guide)(data).item()
    assert isinstance(a, float) and isinstance(b, float)
    assert a == pytest.approx(b, rel=1e-6, abs=1e-6)
    assert a == pytest.approx(c, rel=1e-6, abs=1e-6)
    assert a == pytest.approx(d, rel=1e-6, abs=1e-6)
    pyro.set_rng_seed(8)
    assert elbo.loss(model, guide, data) != a  # a different seed gives another estimate


@pytest.mark.parametrize("vectorize", [False, True])
def test_float64(vectorize, float64):
    data = synthetic_data()
    assert data.dtype == torch.float64
    model, guide = sbn()
    elbo = TraceARM_ELBO(num_particles=2, vectorize_particles=vectorize)
    svi = SVI(model, guide, Adam({"lr": 0.05}), loss=elbo)
    losses = [svi.step(data) for _ in range(5)]
    assert all(math.isfinite(x) for x in losses)
    for name, p in pyro.get_param_store().named_parameters():
        assert p.dtype == torch.float64, name
    elbo.loss_and_grads(model, guide, data)
    for name, p in pyro.get_param_store().named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float64, name
