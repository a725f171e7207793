# SPDX-License-Identifier: Apache-2.0
"""
Tiny models for the importance-weighted bound, shared by the test modules. Each function returns
``(model, guide, args)`` and carries a ``form`` attribute: ``"local"`` (every site lies in the
data plate: one bound per datapoint) or ``"joint"`` (a site outside the plate: one bound over all
sites). :data:`CASES` maps names to them and :data:`FORMS` names to forms. Params have fixed
initial values; tensors are made in the default dtype (the tests run them in float64). The leaf
counts stay small so that :func:`tests.iw_exact.exact_iw_bound` enumerates K-tuples of leaves
quickly for K = 2 and 3 (leaves per model in each docstring).
"""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch.distributions import constraints


def t(*values):
    return torch.tensor(values, dtype=torch.get_default_dtype())


def _form(form):
    def decorate(f):
        f.form = form
        return f

    return decorate


@_form("local")
def one_layer():
    """
    One Bernoulli site of two components per datapoint in a data plate of 2, learnable prior
    logits and decoder weight in the model (16 leaves).
    """
    data = t([1.0, 0.0, 1.0], [0.0, 1.0, 1.0])

    def model(data):
        prior = pyro.param("prior", t(0.3, -0.5))
        w = pyro.param("w", t([1.5, -0.7, 0.4], [-0.3, 1.1, 0.8]))
        with pyro.plate("data", 2):
            z = pyro.sample("z", dist.Bernoulli(logits=prior).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=(2 * z - 1) @ w + 0.3).to_event(1), obs=data)

    def guide(data):
        phi = pyro.param("phi", t([0.2, -0.4], [0.5, 1.0]))
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Bernoulli(logits=phi).to_event(1))

    return model, guide, (data,)


@_form("local")
def two_layer():
    """
    Two dependent Bernoulli layers per datapoint: model z2 -> z1 -> x, guide x -> z1 -> z2 (16
    leaves).
    """
    data = t([1.0, 0.0], [0.0, 1.0])

    def model(data):
        with pyro.plate("data", 2):
            z2 = pyro.sample("z2", dist.Bernoulli(logits=t(0.4)))
            z1 = pyro.sample("z1", dist.Bernoulli(logits=1.5 * z2 - 0.6))
            x_logits = torch.stack([2.0 * z1 - 1.0, 1.0 - 2.5 * z1 + 0.5 * z2], -1)
            pyro.sample("x", dist.Bernoulli(logits=x_logits).to_event(1), obs=data)

    def guide(data):
        a = pyro.param("a", t(0.7, -1.1))
        b = pyro.param("b", t(1.3, -0.6))
        with pyro.plate("data", 2):
            z1 = pyro.sample("z1", dist.Bernoulli(logits=data @ a - 0.3))
            pyro.sample("z2", dist.Bernoulli(logits=b[0] * z1 + b[1]))

    return model, guide, (data,)


@_form("joint")
def global_and_local():
    """
    A global Bernoulli outside the data plate, sampled first, and one local Bernoulli per
    datapoint depending on it: the bound is joint (8 leaves).
    """
    data = t(1.0, 0.0)

    def model(data):
        g = pyro.sample("g", dist.Bernoulli(logits=t(0.3)))
        with pyro.plate("data", 2):
            z = pyro.sample("z", dist.Bernoulli(logits=1.5 * g - 0.5))
            pyro.sample("x", dist.Bernoulli(logits=3.0 * z - 1.5 + 0.5 * g), obs=data)

    def guide(data):
        a = pyro.param("a", t(-0.4))
        b = pyro.param("b", t(0.9, -0.7))
        c = pyro.param("c", t(1.2))
        g = pyro.sample("g", dist.Bernoulli(logits=a))
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Bernoulli(logits=b + c * g))

    return model, guide, (data,)


@_form("local")
def categorical_bernoulli():
    """
    A Categorical site of three classes per datapoint, then a Bernoulli site reading it (36
    leaves); also the "beside a Bernoulli" case of :mod:`tests.categorical_models`.
    """
    data = t(1.0, 0.0)

    def model(data):
        with pyro.plate("data", 2):
            c = pyro.sample("c", dist.Categorical(logits=t(0.1, -0.2, 0.3)))
            z = pyro.sample("z", dist.Bernoulli(logits=t(-1.0, 0.0, 1.0)[c]))
            pyro.sample("x", dist.Bernoulli(logits=2.0 * z - 1.0 + 0.5 * c), obs=data)

    def guide(data):
        cl = pyro.param("cl", t([0.4, -0.2, 0.1], [-0.3, 0.6, 0.0]))
        zl = pyro.param("zl", t(0.5, -0.5, 0.2))
        with pyro.plate("data", 2):
            c = pyro.sample("c", dist.Categorical(logits=cl))
            pyro.sample("z", dist.Bernoulli(logits=zl[c]))

    return model, guide, (data,)


@_form("joint")
def normal_beside_bernoulli():
    """
    A reparameterized scalar Normal outside the data plate, and one Bernoulli per datapoint whose
    logits read it, in model and guide: the bound is joint (4 leaves per Gauss-Hermite node).
    """
    data = t(1.0, 0.0)

    def model(data):
        y = pyro.sample("y", dist.Normal(t(0.0), t(1.0)))
        with pyro.plate("data", 2):
            z = pyro.sample("z", dist.Bernoulli(logits=y * t(1.0, -1.0)))
            pyro.sample("x", dist.Bernoulli(logits=2.0 * z - 1.0 + 0.5 * y), obs=data)

    def guide(data):
        loc = pyro.param("loc", t(0.3))
        scale = pyro.param("scale", t(0.8), constraint=constraints.positive)
        w = pyro.param("w", t(0.9, -0.5))
        y = pyro.sample("y", dist.Normal(loc, scale))
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Bernoulli(logits=w * y + 0.2))

    return model, guide, (data,)


@_form("local")
def subsampled():
    """
    A data plate of 3 with a random subsample of 2 (scale 3/2 outside the log) and two dependent
    Bernoulli layers per datapoint (3 subsamples x 16 leaves).
    """
    data = t(1.0, 0.0, 1.0)

    def model(data):
        with pyro.plate("data", 3, subsample_size=2) as ind:
            z1 = pyro.sample("z1", dist.Bernoulli(logits=t(0.3)))
            z2 = pyro.sample("z2", dist.Bernoulli(logits=2.0 * z1 - 1.0))
            pyro.sample("x", dist.Bernoulli(logits=3.0 * z2 - 1.5 + z1), obs=data[ind])

    def guide(data):
        a = pyro.param("a", t(1.0, -0.8, 0.4))
        b = pyro.param("b", t(-0.5, 0.7, 0.2))
        with pyro.plate("data", 3, subsample_size=2) as ind:
            z1 = pyro.sample("z1", dist.Bernoulli(logits=a[ind]))
            pyro.sample("z2", dist.Bernoulli(logits=b[ind] + 1.2 * z1))

    return model, guide, (data,)


CASES = {
    f.__name__: f
    for f in [
        one_layer,
        two_layer,
        global_and_local,
        categorical_bernoulli,
        normal_beside_bernoulli,
        subsampled,
    ]
}

#: The form of each case's bound.
FORMS = {name: f.form for name, f in CASES.items()}


@_form("local")
def sigmoid_belief_net():
    """
    A one-layer sigmoid belief net on two binary datapoints: two Bernoulli latents per datapoint,
    guide logits from an amortized linear map of the data (16 leaves).
    """
    data = t([1.0, 1.0, 0.0], [0.0, 1.0, 1.0])

    def model(data):
        prior = pyro.param("prior", t(0.1, -0.2))
        w = pyro.param("w", t([1.2, -0.8, 0.5], [-0.6, 0.9, 1.1]))
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(logits=prior).expand([2]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=z @ w - 0.3).to_event(1), obs=data)

    def guide(data):
        v = pyro.param("v", t([0.5, -0.4], [0.3, 0.6], [-0.7, 0.2]))
        c = pyro.param("c", t(0.2, -0.1))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=data @ v + c).to_event(1))

    return model, guide, (data,)


@_form("joint")
def global_and_weighted_local():
    """
    :func:`global_and_local` with a weight per datapoint (``poutine.scale`` by a tensor inside the
    data plate): the bound is joint, the scaled terms inside the log (8 leaves).
    """
    data = t(1.0, 0.0)
    weights = t(0.5, 3.0)

    def model(data):
        g = pyro.sample("g", dist.Bernoulli(logits=t(0.3)))
        with pyro.plate("data", 2), poutine.scale(scale=weights):
            z = pyro.sample("z", dist.Bernoulli(logits=1.5 * g - 0.5))
            pyro.sample("x", dist.Bernoulli(logits=3.0 * z - 1.5 + 0.5 * g), obs=data)

    def guide(data):
        a = pyro.param("a", t(-0.4))
        b = pyro.param("b", t(0.9, -0.7))
        c = pyro.param("c", t(1.2))
        g = pyro.sample("g", dist.Bernoulli(logits=a))
        with pyro.plate("data", 2), poutine.scale(scale=weights):
            pyro.sample("z", dist.Bernoulli(logits=b + c * g))

    return model, guide, (data,)
