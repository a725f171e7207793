# SPDX-License-Identifier: Apache-2.0
"""
Tiny models with Categorical and OneHotCategorical guide sites (at most a few hundred joint
values), for the exact-enumeration tests of the coupled estimators. Each function returns
``(model, guide, args)``; :data:`CASES` maps names to them. Tensors are made in the default
dtype (the tests run them in float64).
"""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch

from tests.iw_models import categorical_bernoulli as beside_bernoulli
from tests.tiny_models import t


def amortized():
    """One Categorical (4 classes) per datapoint, its logits computed from the datapoint."""
    data = t([1.0, 0.0], [0.0, 1.0])

    def model(data):
        prior = pyro.param("prior", t(0.2, -0.1, 0.4, 0.0))
        with pyro.plate("data", 2):
            c = pyro.sample("c", dist.Categorical(logits=prior))
            emit = t([2.0, -1.0], [-1.0, 1.5], [0.5, 0.5], [-2.0, -0.5])[c]
            pyro.sample("x", dist.Bernoulli(logits=emit).to_event(1), obs=data)

    def guide(data):
        w = pyro.param("w", t([0.5, -0.3, 0.2, -0.6], [-0.4, 0.7, 0.1, 0.3]))
        b = pyro.param("b", t(0.1, 0.0, -0.2, 0.3))
        with pyro.plate("data", 2):
            pyro.sample("c", dist.Categorical(logits=data @ w + b))

    return model, guide, (data,)


def one_hot_probs():
    """A OneHotCategorical written with ``probs=`` per datapoint (3 classes)."""
    data = t(1.0, 0.0)

    def model(data):
        with pyro.plate("data", 2):
            c = pyro.sample("c", dist.OneHotCategorical(probs=t(0.3, 0.5, 0.2)))
            pyro.sample("x", dist.Bernoulli(logits=c @ t(1.5, -1.0, 0.3)), obs=data)

    def guide(data):
        p = pyro.param(
            "p", t([0.5, 0.3, 0.2], [0.2, 0.2, 0.6]), constraint=dist.constraints.simplex
        )
        with pyro.plate("data", 2):
            pyro.sample("c", dist.OneHotCategorical(probs=p))

    return model, guide, (data,)


def two_dependent():
    """Two Categorical sites, the second's logits reading the first's value."""
    data = t(1.0)

    def model(data):
        a = pyro.sample("a", dist.Categorical(logits=t(0.1, 0.3, -0.2)))
        c = pyro.sample(
            "c", dist.Categorical(logits=t([0.5, -0.5, 0.0], [0.0, 1.0, -1.0], [-0.3, 0.2, 0.6])[a])
        )
        pyro.sample("x", dist.Bernoulli(logits=t(-1.0, 0.5, 2.0)[c] + 0.3 * a), obs=data)

    def guide(data):
        al = pyro.param("al", t(0.4, -0.2, 0.1))
        cl = pyro.param("cl", t([0.3, -0.6, 0.2], [0.0, 0.5, -0.4], [0.8, -0.1, 0.0]))
        a = pyro.sample("a", dist.Categorical(logits=al))
        pyro.sample("c", dist.Categorical(logits=cl[a]))

    return model, guide, (data,)


def expand_to_event():
    """Two Categorical variables as one site: ``.expand([2]).to_event(1)``."""
    data = t(1.0, 0.0)

    def model(data):
        c = pyro.sample("c", dist.Categorical(logits=t(0.0, 0.2, -0.2)).expand([2]).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=t(1.0, -1.0, 0.5)[c]).to_event(1), obs=data)

    def guide(data):
        cl = pyro.param("cl", t(0.3, -0.4, 0.2))
        pyro.sample("c", dist.Categorical(logits=cl).expand([2]).to_event(1))

    return model, guide, (data,)


def masked():
    """``poutine.mask``, ``Distribution.mask`` and ``poutine.scale`` at a Categorical site."""
    data = t(1.0, 0.0, 1.0)
    keep = torch.tensor([True, False, True])
    mask = torch.tensor([True, True, False])

    def model(data):
        with pyro.plate("data", 3), poutine.scale(scale=1.5):
            c = pyro.sample("c", dist.Categorical(logits=t(0.2, -0.3, 0.1)).mask(mask))
            pyro.sample("x", dist.Bernoulli(logits=t(1.0, -0.5, 0.3)[c]), obs=data)

    def guide(data):
        cl = pyro.param("cl", t([0.3, -0.1, 0.2], [-0.5, 0.4, 0.0], [0.1, 0.1, -0.6]))
        with pyro.plate("data", 3), poutine.scale(scale=1.5), poutine.mask(mask=keep):
            pyro.sample("c", dist.Categorical(logits=cl).mask(mask))

    return model, guide, (data,)


def subsampled():
    """A Categorical per datapoint in a plate of 3 subsampled 2 at a time."""
    data = t(1.0, 0.0, 1.0)

    def model(data):
        with pyro.plate("data", 3, subsample_size=2) as idx:
            c = pyro.sample("c", dist.Categorical(logits=t(0.2, -0.3, 0.1)))
            pyro.sample("x", dist.Bernoulli(logits=t(1.5, -0.5, 0.3)[c]), obs=data[idx])

    def guide(data):
        cl = pyro.param("cl", t([0.3, -0.1, 0.2], [-0.5, 0.4, 0.0], [0.1, 0.1, -0.6]))
        with pyro.plate("data", 3, subsample_size=2) as idx:
            pyro.sample("c", dist.Categorical(logits=cl[idx]))

    return model, guide, (data,)


CASES = {
    "amortized": amortized,
    "one_hot_probs": one_hot_probs,
    "two_dependent": two_dependent,
    "expand_to_event": expand_to_event,
    "beside_bernoulli": beside_bernoulli,
    "masked": masked,
    "subsampled": subsampled,
}
