# SPDX-License-Identifier: Apache-2.0
"""
Sites marked for enumeration are never sampled silently: every ELBO of the package raises
NotImplementedError naming the first such site, in model or guide, before sampling it.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import config_enumerate

from pyro_arm import IWELBO, TraceARM_ELBO

DATA = torch.tensor([1.0, 0.0])
MODES = [dict(), dict(num_particles=3, vectorize_particles=True, max_plate_nesting=1)]
METHODS = ["loss", "loss_and_grads", "differentiable_loss"]


def mixture_model(data, kind="parallel"):
    locs = torch.tensor([-1.0, 1.0])
    with pyro.plate("data", 2):
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(2)))
        c = pyro.sample("c", dist.Bernoulli(logits=torch.zeros(2)), infer={"enumerate": kind})
        pyro.sample("x", dist.Normal(locs[c.long()] + z, 1.0), obs=data)


def guide(data, kind=None):
    phi = pyro.param("phi", torch.zeros(2))
    with pyro.plate("data", 2):
        pyro.sample("z", dist.Bernoulli(logits=phi))


def raises_at(site, elbo, method, model, guide, *args):
    with pytest.raises(NotImplementedError, match=f"At site '{site}'.*enumeration"):
        getattr(elbo, method)(model, guide, *args)


@pytest.mark.parametrize("mode", MODES, ids=["seq", "vec"])
@pytest.mark.parametrize("kind", ["parallel", "sequential"])
@pytest.mark.parametrize("method", METHODS)
def test_enumerated_model_site_raises(method, kind, mode):
    pyro.clear_param_store()
    raises_at("c", TraceARM_ELBO(**mode), method, mixture_model, guide, DATA, kind)


@pytest.mark.parametrize("mode", MODES, ids=["seq", "vec"])
def test_config_enumerate_model_raises(mode):
    def model(data):
        with pyro.plate("data", 2):
            z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(2)))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data)
        pyro.sample("g", dist.Categorical(logits=torch.zeros(3)))

    pyro.clear_param_store()
    raises_at("g", TraceARM_ELBO(**mode), "loss", config_enumerate(model), guide, DATA)


@pytest.mark.parametrize("mode", MODES, ids=["seq", "vec"])
@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_enumerated_guide_site_raises(kind, mode):
    def enum_guide(data):
        phi = pyro.param("phi", torch.zeros(2))
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Bernoulli(logits=phi), infer={"enumerate": kind})
            pyro.sample("c", dist.Bernoulli(logits=phi))

    def model(data):
        mixture_model(data, kind=None)

    pyro.clear_param_store()
    raises_at("z", TraceARM_ELBO(**mode), "loss_and_grads", model, enum_guide, DATA)


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
@pytest.mark.parametrize("vectorize", [False, True], ids=["seq", "vec"])
def test_iwelbo_enumerated_site_raises(vectorize, kind):
    elbo = IWELBO(num_samples=2, vectorize_particles=vectorize, max_plate_nesting=1)
    pyro.clear_param_store()
    raises_at("c", elbo, "loss_and_grads", mixture_model, guide, DATA, kind)


def test_unmarked_site_is_sampled():
    """The same model without the mark runs (the refusal depends on the mark alone)."""
    pyro.clear_param_store()

    def model(data, kind=None):
        mixture_model(data, kind=None)

    def full_guide(data):
        phi = pyro.param("phi", torch.zeros(2))
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Bernoulli(logits=phi))
            pyro.sample("c", dist.Bernoulli(logits=phi))

    assert torch.isfinite(torch.tensor(TraceARM_ELBO().loss(model, full_guide, DATA)))
