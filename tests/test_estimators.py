# SPDX-License-Identifier: Apache-2.0
"""The pure estimator functions of pyro_arm.estimators against exact gradients (float64)."""

import itertools
import math

import pytest
import torch

from pyro_arm.estimators import (
    ESTIMATORS,
    Estimator,
    ar,
    arm,
    bernoulli_pair,
    disarm,
    get_estimator,
)

LOGITS = [0.7, -1.3, 0.1, 2.5]
NUM_SAMPLES = 200_000
Z = 4.5


def f_joint(z):
    """A nonlinear function of the whole vector z (components interact)."""
    w = torch.tensor([1.0, -2.0, 0.5, 1.5], dtype=z.dtype)
    return (z @ w - 0.3) ** 2 + 3.0 * z[..., 0] * z[..., 2] - z[..., 1] * z[..., 3]


def exact_grad(f, logits):
    logits = logits.detach().requires_grad_()
    d = logits.shape[-1]
    zs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)), dtype=logits.dtype)
    log_q = torch.distributions.Bernoulli(logits=logits).log_prob(zs).sum(-1)
    expectation = (log_q.exp() * f(zs)).sum()
    (grad,) = torch.autograd.grad(expectation, logits)
    return grad


def draw(logits, n, seed):
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand((n,) + logits.shape, generator=gen, dtype=logits.dtype)
    z1, z2 = bernoulli_pair(u, logits)
    f1 = f_joint(z1).unsqueeze(-1).expand_as(u)
    f2 = f_joint(z2).unsqueeze(-1).expand_as(u)
    return f1, f2, u


def mean_se(samples):
    return samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])


@pytest.fixture
def logits():
    return torch.tensor(LOGITS, dtype=torch.float64)


def test_bernoulli_pair(logits):
    gen = torch.Generator().manual_seed(1)
    u = torch.rand(100_000, 4, generator=gen, dtype=torch.float64)
    z1, z2 = bernoulli_pair(u, logits)
    assert z1.dtype == z2.dtype == torch.float64
    p = torch.sigmoid(logits)
    # z2 is the ordinary sample, z1 the sample made from 1 - u.
    assert torch.equal(z2, (u < p).double())
    assert torch.equal(z1, ((1 - u) < p).double())
    for z in (z1, z2):
        mean, se = z.mean(0), z.std(0) / math.sqrt(z.shape[0])
        assert ((mean - p).abs() <= Z * se + 1e-12).all()
    # antithetic: the pair is never (0, 0) when p > 1/2, never (1, 1) when p < 1/2
    pos = logits > 0
    assert ((z1 + z2)[:, pos] >= 1).all()
    assert ((z1 + z2)[:, ~pos] <= 1).all()


@pytest.mark.parametrize("name", ["arm", "disarm", "ar"])
@pytest.mark.parametrize("seed", [0, 1])
def test_unbiased(name, seed, logits):
    exact = exact_grad(f_joint, logits)
    f1, f2, u = draw(logits, NUM_SAMPLES, seed)
    est = ESTIMATORS[name]
    samples = est.logits_grad(f1 if est.antithetic else None, f2, u, logits)
    assert samples.shape == u.shape
    mean, se = mean_se(samples)
    assert ((mean - exact).abs() <= Z * se + 1e-9).all(), (name, mean, exact, se)
    assert exact.abs().min() > 10 * se.max(), "the check would have no power"


@pytest.mark.parametrize(
    "wrong",
    [
        lambda f1, f2, u, logits: -arm(f1, f2, u, logits),  # flipped sign
        lambda f1, f2, u, logits: f1 - f2,  # missing (u - 1/2)
        lambda f1, f2, u, logits: (
            disarm(f1, f2, u, logits) / torch.sigmoid(logits.abs()) * torch.sigmoid(logits)
        ),  # sigmoid(phi) instead of sigmoid(|phi|)
        lambda f1, f2, u, logits: f2 * (1 - u),  # AR with a wrong weight
    ],
)
def test_wrong_estimators_are_detected(wrong, logits):
    exact = exact_grad(f_joint, logits)
    f1, f2, u = draw(logits, NUM_SAMPLES, 0)
    mean, se = mean_se(wrong(f1, f2, u, logits))
    assert ((mean - exact).abs() > Z * se + 1e-9).any()


def test_disarm_variance_below_arm(logits):
    f1, f2, u = draw(logits, NUM_SAMPLES, 2)
    var_arm = arm(f1, f2, u, logits).var(0)
    var_disarm = disarm(f1, f2, u, logits).var(0)
    # DisARM is ARM with u integrated out given the pair: never more variance.
    assert (var_disarm <= var_arm * 1.01).all(), (var_disarm, var_arm)
    assert (var_disarm < 0.9 * var_arm).any()


def test_disarm_is_arm_conditioned_on_the_pair(logits):
    """E[ARM | z1, z2] = DisARM: compare the averages within each (z1, z2) cell."""
    f1, f2, u = draw(logits, NUM_SAMPLES, 3)
    a = arm(f1, f2, u, logits)
    d = disarm(f1, f2, u, logits)
    z1, z2 = bernoulli_pair(u, logits)
    for i in range(logits.shape[0]):
        for c1, c2 in itertools.product([0.0, 1.0], repeat=2):
            cell = (z1[:, i] == c1) & (z2[:, i] == c2)
            if cell.sum() < 1000:
                continue
            # within a cell f1 - f2 still varies with the other components; weight by it
            diff = (f1 - f2)[cell, i]
            ma, mb = a[cell, i].mean(), d[cell, i].mean()
            se = (a[cell, i] - d[cell, i]).std() / math.sqrt(int(cell.sum()))
            assert (ma - mb).abs() <= Z * se + 1e-9, (i, c1, c2, ma, mb, diff.mean())


def test_ar_ignores_f1(logits):
    f1, f2, u = draw(logits, 10, 0)
    assert torch.equal(ar(None, f2, u, logits), ar(f1, f2, u, logits))


def test_registry():
    assert set(ESTIMATORS) >= {"arm", "disarm", "ar"}
    assert ESTIMATORS["arm"].antithetic and ESTIMATORS["disarm"].antithetic
    assert not ESTIMATORS["ar"].antithetic
    assert isinstance(get_estimator("disarm"), Estimator)
    with pytest.raises(ValueError, match="arm.*disarm.*ar"):
        get_estimator("rebar")
