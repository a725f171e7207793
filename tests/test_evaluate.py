# SPDX-License-Identifier: Apache-2.0
"""The test bounds against exact enumeration on tiny sigmoid belief nets."""

import itertools
import math

import pyro
import pyro.poutine as poutine
import pytest
import torch

from pyro_arm.sbn.evaluate import (
    evaluate_sbn,
    iw_log_likelihoods,
    log_weights,
    negative_elbo,
    negative_iw_bound,
)
from pyro_arm.sbn.models import SigmoidBeliefNet, build_sbn


def tiny_sbn(latent_dims, hidden_dims=()):
    sbn = SigmoidBeliefNet(x_dim=6, latent_dims=latent_dims, hidden_dims=hidden_dims)
    with torch.no_grad():
        for p in sbn.parameters():
            p.normal_(0.0, 1.0)
    return sbn


def exact(sbn, x):
    """Per-datapoint exact ``log p(x)`` and ELBO, enumerating every joint latent value."""
    dims = sbn.latent_dims
    configs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=sum(dims))))
    n = len(configs)
    values, start = {}, 0
    for i, d in enumerate(dims):
        z = configs[:, start : start + d].unsqueeze(1).expand(n, x.shape[0], d)
        values[f"z{i + 1}"] = z.to(x.dtype)
        start += d

    def log_joint(fn):
        with pyro.plate("configs", n, dim=-2):
            trace = poutine.trace(poutine.condition(fn, data=values)).get_trace(x)
        trace.compute_log_prob()
        return sum(
            site["log_prob"].expand(n, x.shape[0])
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and name not in ("configs", "data")
        )

    with torch.no_grad():
        log_p, log_q = log_joint(sbn.model), log_joint(sbn.guide)
    log_px = torch.logsumexp(log_p, 0)
    elbo = (log_q.exp() * (log_p - log_q)).sum(0)
    assert torch.allclose(log_q.exp().sum(0), torch.ones(x.shape[0], dtype=x.dtype))
    return log_px, elbo


@pytest.mark.parametrize("latent_dims,hidden_dims", [((3,), ()), ((3, 2), ()), ((3,), (4, 4))])
def test_bounds_against_enumeration(float64, latent_dims, hidden_dims):
    torch.manual_seed(1)
    sbn = tiny_sbn(latent_dims, hidden_dims)
    x = torch.bernoulli(torch.full((5, 6), 0.4))
    log_px, elbo_exact = exact(sbn, x)
    assert (elbo_exact <= log_px + 1e-12).all()

    # relative standard deviation of the weights, for Monte Carlo error bars
    pyro.set_rng_seed(4)
    w = (log_weights(sbn.model, sbn.guide, x, 20000) - log_px).exp()
    rel_std = w.std(0) / w.mean(0)

    pyro.set_rng_seed(2)
    elbo_1k, iw_1k = iw_log_likelihoods(sbn.model, sbn.guide, x, 1000, batch_size=2, chunk_size=7)
    assert elbo_1k.shape == iw_1k.shape == (5,)
    # mean_k log w is an unbiased estimate of the ELBO
    assert torch.allclose(elbo_1k, elbo_exact, atol=0.25)
    # ELBO <= IW_1000 <= log p(x), up to Monte Carlo error (4 standard errors)
    se = rel_std / math.sqrt(1000)
    assert (iw_1k >= elbo_exact).all()
    assert (iw_1k <= log_px + 4 * se).all()
    assert ((iw_1k - log_px).abs() <= 4 * se + 1e-3).all()

    # the scalar helpers: negated means over the datapoints
    pyro.set_rng_seed(3)
    neg_elbo = negative_elbo(sbn.model, sbn.guide, x, 4000)
    assert neg_elbo == pytest.approx(-elbo_exact.mean().item(), abs=0.05)
    neg_iw = negative_iw_bound(sbn.model, sbn.guide, x, 1000, chunk_size=300)
    assert -log_px.mean().item() - 4 * se.max().item() <= neg_iw <= -elbo_exact.mean().item()


def test_one_sample_bound_is_the_elbo(float64):
    sbn = tiny_sbn((3, 2))
    x = torch.bernoulli(torch.full((4, 6), 0.5))
    elbo, iw = iw_log_likelihoods(sbn.model, sbn.guide, x, 1)
    assert torch.allclose(elbo, iw)


def test_log_weights_shape_and_value(float64):
    sbn = tiny_sbn((3,))
    x = torch.bernoulli(torch.full((4, 6), 0.5))
    log_w = log_weights(sbn.model, sbn.guide, x, 9)
    assert log_w.shape == (9, 4)
    assert torch.isfinite(log_w).all() and (log_w.exp() > 0).all()


def test_evaluate_sbn_on_mnist_sized_model():
    sbn = build_sbn("two_layer")
    x = torch.bernoulli(torch.full((30, 784), 0.2))
    out = evaluate_sbn(sbn, x, k=20, iw_size=10, chunk_size=7)
    assert out["k"] == 20 and out["iw_size"] == 10
    assert math.isfinite(out["neg_elbo"]) and math.isfinite(out["neg_iw"])
    # an untrained net on noise: a few hundred nats per image
    assert 100 < out["neg_iw"] < out["neg_elbo"] + 100


def test_num_samples_must_be_positive():
    sbn = tiny_sbn((3,))
    with pytest.raises(ValueError, match="num_samples"):
        iw_log_likelihoods(sbn.model, sbn.guide, torch.zeros(2, 6), 0)
