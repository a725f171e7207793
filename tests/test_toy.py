# SPDX-License-Identifier: Apache-2.0
"""
The toy problem of the ARM paper: maximise E[(z - p0)^2], z ~ Bernoulli(sigmoid(phi)),
p0 = 0.49. Since (1 - p0)^2 > p0^2, the maximum is at z = 1: phi should INCREASE.

As a Pyro ELBO: the model scores z with ``pyro.factor("f", (z - p0)^2)``. Its prior on z is the
guide's own distribution with detached logits, so that log p(z) - log q(z) = 0 and the ELBO is
exactly E[(z - p0)^2]: d ELBO / d phi = (1 - 2 p0) sigmoid'(phi), and the loss (-ELBO) has the
opposite sign. (With a flat Bernoulli(1/2) prior instead, the ELBO also holds the entropy of q and
d ELBO / d phi = (1 - 2 p0 - phi) sigmoid'(phi); both are checked against the exact reference.)
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI
from pyro.optim import SGD

from pyro_arm import TraceARM_ELBO
from tests.exact import assert_unbiased, exact_loss_and_grads

P0 = 0.49
PHI0 = 0.3


def toy(cancel_entropy=True):
    def model():
        if cancel_entropy:
            logits = pyro.param("phi", torch.tensor(PHI0)).detach()
            prior = dist.Bernoulli(logits=logits)
        else:
            prior = dist.Bernoulli(probs=torch.tensor(0.5))
        z = pyro.sample("z", prior)
        pyro.factor("f", (z - P0) ** 2)

    def guide():
        phi = pyro.param("phi", torch.tensor(PHI0))
        pyro.sample("z", dist.Bernoulli(logits=phi))

    return model, guide


def dsigmoid(phi):
    s = torch.sigmoid(torch.tensor(phi, dtype=torch.float64))
    return (s * (1 - s)).item()


@pytest.mark.parametrize("cancel_entropy", [True, False])
def test_exact_reference_matches_analytic_gradient(cancel_entropy, float64):
    model, guide = toy(cancel_entropy)
    _, grads = exact_loss_and_grads(model, guide)
    elbo_grad = (1 - 2 * P0 - (0.0 if cancel_entropy else PHI0)) * dsigmoid(PHI0)
    assert grads["phi"].item() == pytest.approx(-elbo_grad, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("cancel_entropy", [True, False])
@pytest.mark.parametrize("estimator", ["arm", "disarm", "ar"])
def test_toy_unbiased(estimator, cancel_entropy, float64):
    model, guide = toy(cancel_entropy)
    elbo = TraceARM_ELBO(num_particles=500, vectorize_particles=True, estimator=estimator)
    assert_unbiased(elbo, model, guide, num_samples=25000, seed=0)


@pytest.mark.parametrize("estimator", ["arm", "disarm"])
def test_toy_every_estimate_has_the_right_sign(estimator, float64):
    """
    On the toy, f(1) - f(0) = 1 - 2 p0 > 0, so every single ARM/DisARM estimate of d ELBO / d phi
    is >= 0 and at most (1 - 2 p0) / 2 in size. This holds only if the explicit gradient of
    -log q(z) at the ARM site is dropped (it is +-sigmoid(phi)-sized noise).
    """
    model, guide = toy()
    elbo = TraceARM_ELBO(estimator=estimator)
    phi = pyro.param("phi", torch.tensor(PHI0)).unconstrained()
    pyro.set_rng_seed(0)
    for _ in range(200):
        phi.grad = None
        elbo.loss_and_grads(model, guide)
        g = -phi.grad.item()  # d ELBO / d phi
        assert -1e-12 <= g <= (1 - 2 * P0) / 2 + 1e-12


@pytest.mark.parametrize("estimator", ["arm", "disarm"])
def test_toy_sgd_moves_phi_up(estimator):
    model, guide = toy()
    svi = SVI(model, guide, SGD({"lr": 20.0}), loss=TraceARM_ELBO(estimator=estimator))
    pyro.set_rng_seed(0)
    for _ in range(300):
        svi.step()
    phi = pyro.param("phi").item()
    # the exact gradient flow moves phi by about 300 * 20 * 0.02 * 0.2 = 24 at first; allow noise
    assert phi > PHI0 + 2.0, phi
