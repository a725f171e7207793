# SPDX-License-Identifier: Apache-2.0
"""RLOO and ARMS (pyro_arm.multisample) against exact gradients, DisARM and the copula's laws."""

import itertools
import math

import pytest
import torch
from scipy import stats

from pyro_arm.estimators import bernoulli_pair, disarm
from pyro_arm.multisample import (
    arms,
    arms_debias,
    arms_samples,
    arms_uniforms,
    arms_weights,
    rloo,
    rloo_weights,
)

# Both sides of 0 (the copula's flip), and m = sigmoid(-|logit|) below and above 2^-(n-1).
LOGITS = [-1.5, 1.0, 2.5]
NUM_DRAWS = 40_000
Z = 4.0  # |z| bound for a correct estimator (about 40 z-scores in this file)
Z_POWER = 8.0  # |z| a wrong estimator must reach under the same checker


def f_joint(z):
    """(z.w - c)^2: the components interact, so each one's signal depends on the others."""
    w = torch.tensor([1.0, -2.0, 1.5], dtype=z.dtype)
    return (z @ w - 0.7) ** 2


def exact_grad(f, logits):
    logits = logits.detach().requires_grad_()
    zs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=logits.shape[-1])))
    zs = zs.to(logits.dtype)
    log_q = torch.distributions.Bernoulli(logits=logits).log_prob(zs).sum(-1)
    (grad,) = torch.autograd.grad((log_q.exp() * f(zs)).sum(), logits)
    return grad


def joint_b(t, n):
    """The paper's B_n(t) = P(u_j < t, u_k < t) = (2 t^(1/(n-1)) - 1)_+^(n-1)."""
    return (2 * t ** (1 / (n - 1)) - 1).clamp(min=0) ** (n - 1)


def iid_samples(n, logits, gen):
    u = torch.rand((n, NUM_DRAWS) + logits.shape, generator=gen, dtype=logits.dtype)
    return (u < torch.sigmoid(logits)).to(logits.dtype)


def copula_samples(n, logits, gen):
    u = arms_uniforms(n, (NUM_DRAWS,) + logits.shape, generator=gen, dtype=logits.dtype)
    return arms_samples(u, logits)


def unflipped_samples(n, logits, gen):
    """Wrong sampler: the lower tail decides z = 1 whatever the sign of the logits."""
    u = arms_uniforms(n, (NUM_DRAWS,) + logits.shape, generator=gen, dtype=logits.dtype)
    return (u < torch.sigmoid(logits)).to(logits.dtype)


def arms_no_debias(f, z, logits):
    """Wrong weight: the copula samples with plain RLOO weights (debiasing factor dropped)."""
    return rloo(f, z, logits)


def arms_unflipped_debias(f, z, logits):
    """Wrong weight: c = p(1-p) / (p - B_n(p)) for both signs of the logits."""
    p, n = torch.sigmoid(logits), f.shape[0]
    c = p * (1 - p) / (p - joint_b(p, n))
    return (c * rloo_weights(f) * z).sum(0)


def arms_squared_debias(f, z, logits):
    """Wrong weight: the debiasing factor applied twice."""
    return arms_debias(logits, f.shape[0]) * arms(f, z, logits)


def z_scores(estimator, sampler, n, seed=0, f=f_joint):
    """(mean - exact) / standard error per component, over NUM_DRAWS independent estimates."""
    logits = torch.tensor(LOGITS, dtype=torch.float64)
    z = sampler(n, logits, torch.Generator().manual_seed(seed))
    g = estimator(f(z).unsqueeze(-1), z, logits)
    se = g.std(0) / math.sqrt(g.shape[0])
    return (g.mean(0) - exact_grad(f, logits)) / se


@pytest.mark.parametrize("n", [2, 3, 4, 8])
@pytest.mark.parametrize(
    "estimator, sampler", [(rloo, iid_samples), (arms, copula_samples)], ids=["rloo", "arms"]
)
def test_unbiased(estimator, sampler, n):
    z = z_scores(estimator, sampler, n)
    assert z.abs().max() < Z, z


WRONG = {
    "no-debias": (arms_no_debias, copula_samples),
    "squared-debias": (arms_squared_debias, copula_samples),
    "unflipped-debias": (arms_unflipped_debias, copula_samples),
    "unflipped-samples": (arms, unflipped_samples),
}


# The flip matters less as n grows (both tails of the copula get antithetic), and not at all for
# n = 2, where the unflipped variants equal ARMS.
@pytest.mark.parametrize(
    "wrong, n",
    [("no-debias", n) for n in (2, 3, 4, 8)]
    + [("squared-debias", n) for n in (2, 3, 4, 8)]
    + [(w, n) for w in ("unflipped-debias", "unflipped-samples") for n in (3, 4)],
)
def test_wrong_copula_weight_rejected(wrong, n):
    estimator, sampler = WRONG[wrong]
    z = z_scores(estimator, sampler, n)
    assert z.abs().max() > Z_POWER, z


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_arms_two_samples_is_disarm(dtype):
    """On the antithetic pair (z2, z1) of one uniform, ARMS-2 is DisARM to the bit."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.tensor([-30.0, -2.0, -0.3, 0.0, 0.3, 2.0, 30.0], dtype=dtype)
    u = torch.rand((5000,) + logits.shape, generator=gen, dtype=dtype)
    z1, z2 = bernoulli_pair(u, logits)
    f1, f2 = torch.randn((2,) + u.shape, generator=gen, dtype=dtype)
    expected = disarm(f1, f2, u, logits)
    assert torch.equal(arms(torch.stack([f2, f1]), torch.stack([z2, z1]), logits), expected)
    assert torch.equal(arms(torch.stack([f1, f2]), torch.stack([z1, z2]), logits), expected)
    assert expected.count_nonzero() > 1000  # not vacuous
    assert torch.equal(arms_debias(logits, 2), torch.sigmoid(logits.abs()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_arms_two_uniforms_are_disarm_pair(dtype):
    """The 2-sample copula is (u, 1 - u) to the bit, and its samples are DisARM's (z2, z1) for
    the uniform that takes the rarer value's lower tail: u where logits < 0, else 1 - u."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.tensor([-2.0, -0.3, 0.0, 0.3, 2.0], dtype=dtype)
    u = arms_uniforms(2, (20_000,) + logits.shape, generator=gen, dtype=dtype)
    assert torch.equal(u[1], 1 - u[0])
    z1, z2 = bernoulli_pair(torch.where(logits < 0, u[0], u[1]), logits)
    z = arms_samples(u, logits)
    assert torch.equal(z, torch.stack([z2, z1]))
    f = f_joint(z[..., :3])[..., None].expand_as(z)
    expected = disarm(f[1], f[0], torch.where(logits < 0, u[0], u[1]), logits)
    assert torch.equal(arms(f, z, logits), expected)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_copula_marginals_uniform(n):
    """Each u_k is U(0, 1) (KS); the same test rejects (1 - d_k)^n and 1 - d_k."""
    u = arms_uniforms(n, (20_000,), generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    pvalues = [stats.kstest(u_k.numpy(), "uniform").pvalue for u_k in u]
    assert min(pvalues) > 1e-3, pvalues
    wrongs = [u[0] ** (n / (n - 1))] + ([u[0] ** (1 / (n - 1))] if n > 2 else [])
    for wrong in wrongs:
        assert stats.kstest(wrong.numpy(), "uniform").pvalue < 1e-10


@pytest.mark.parametrize("n", [3, 4, 8])
def test_copula_antithetic(n):
    """At most one u_k below 2^-(n-1) (always), and the uniforms are negatively correlated."""
    num = 20_000
    u = arms_uniforms(n, (num,), generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    below = (u < 2.0 ** -(n - 1)).sum(0)
    assert below.max() == 1 and below.sum() > 100  # the second check makes the first non-vacuous
    corr = torch.corrcoef(u)[0, 1:]
    assert (corr < -Z / math.sqrt(num)).all(), corr


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_copula_pair_joint(n):
    """The empirical P(z_j = z_k = 1) matches the one implied by the debiasing factor,
    J = p - p(1-p)/c, lies below p^2 (negative correlation), and rejects the unflipped J."""
    logits = torch.tensor([-3.0, -1.5, -0.3, 0.0, 0.3, 1.5, 3.0], dtype=torch.float64)
    u = arms_uniforms(n, (40_000,) + logits.shape, generator=torch.Generator().manual_seed(n))
    z = arms_samples(u.to(logits.dtype), logits)
    pairs = [(j, k) for j in range(n) for k in range(j + 1, n)]
    per_draw = torch.stack([z[j] * z[k] for j, k in pairs]).mean(0)
    mean, se = per_draw.mean(0), per_draw.std(0) / math.sqrt(per_draw.shape[0])
    p = torch.sigmoid(logits)
    joint = p - p * (1 - p) / arms_debias(logits, n)
    assert ((mean - joint).abs() < Z * se + 1e-12).all(), (mean - joint) / se
    assert (joint < p**2).all()
    mid = logits.abs() < 2  # far out, p^2 - J is too small to show at this sample size
    assert (p**2 - mean > Z * se)[mid].all(), (p**2 - mean) / se
    if n > 2:  # the unflipped joint is off where 0 < logits (and close again for large p)
        assert ((mean - joint_b(p, n)).abs() / se)[(logits > 0) & (logits < 2)].min() > Z_POWER
    if n == 2:
        assert (joint.abs() < 1e-12)[logits <= 0].all() and (mean[logits < 0] == 0).all()


def variance_and_se(g):
    """Per-component variance of the estimates and its standard error (from the 4th moment)."""
    c = g - g.mean(0)
    var = (c**2).mean(0)
    return var, (((c**4).mean(0) - var**2) / g.shape[0]).sqrt()


@pytest.mark.parametrize(
    "logits, f",
    [
        ([-2.0, -0.5, 0.0, 0.5, 2.0], lambda z: (z - 0.45) ** 2),  # five one-component problems
        (LOGITS, lambda z: f_joint(z).unsqueeze(-1)),  # one layer of three interacting units
    ],
    ids=["one-component", "one-layer"],
)
def test_arms_variance_below_rloo(logits, f):
    """At n = 4 evaluations, Var[ARMS] < Var[RLOO] in every component by more than Z of the
    difference's standard error."""
    logits, n = torch.tensor(logits, dtype=torch.float64), 4
    z = iid_samples(n, logits, torch.Generator().manual_seed(1))
    var_rloo, se_rloo = variance_and_se(rloo(f(z), z, logits))
    z = copula_samples(n, logits, torch.Generator().manual_seed(2))
    var_arms, se_arms = variance_and_se(arms(f(z), z, logits))
    margin = (var_rloo - var_arms) / (se_rloo**2 + se_arms**2).sqrt()
    assert (margin > Z).all(), (var_arms / var_rloo, margin)


def test_rloo_weights():
    f = torch.tensor([[3.0, -1.0], [0.5, 2.0], [-2.0, 4.0], [1.0, 1.0]], dtype=torch.float64)
    n = f.shape[0]
    naive = torch.stack([(f[k] - (f.sum(0) - f[k]) / (n - 1)) / n for k in range(n)])
    torch.testing.assert_close(rloo_weights(f), naive, rtol=0, atol=1e-15)
    torch.testing.assert_close(rloo_weights(f).sum(0), torch.zeros(2, dtype=f.dtype))
    torch.testing.assert_close(rloo_weights(f + 1e6), rloo_weights(f), rtol=0, atol=1e-9)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_arms_debias_is_papers_factor(n):
    """sigmoid(|phi|) / (1 - r) equals p(1-p) / (p - J), J = B_n(p) for phi < 0 and
    2p - 1 + B_n(1-p) otherwise; it is below 1 (negative correlation) and finite far out."""
    logits = torch.linspace(-8, 8, 161, dtype=torch.float64)
    p = torch.sigmoid(logits)
    joint = torch.where(logits < 0, joint_b(p, n), 2 * p - 1 + joint_b(1 - p, n))
    c = arms_debias(logits, n)
    torch.testing.assert_close(c, p * (1 - p) / (p - joint), rtol=1e-9, atol=0)
    assert (c < 1).all()
    far = arms_debias(torch.tensor([-200.0, 200.0]), n)
    assert torch.equal(far, torch.ones(2))


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_weights_times_score(n):
    """The weights multiply the score z_k - p (as in a surrogate loss on log q(z_k)) and give
    the same estimate as the sum over w_k z_k that rloo and arms compute."""
    logits = torch.tensor(LOGITS, dtype=torch.float64)
    z = copula_samples(n, logits, torch.Generator().manual_seed(3))
    f, score = f_joint(z).unsqueeze(-1), z - torch.sigmoid(logits)
    torch.testing.assert_close((arms_weights(f, logits) * score).sum(0), arms(f, z, logits))
    torch.testing.assert_close((rloo_weights(f) * score).sum(0), rloo(f, z, logits))


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_samples_rejected(n):
    f, logits = torch.zeros(n, 3), torch.zeros(3)
    for call in (
        lambda: rloo_weights(f),
        lambda: rloo(f, f, logits),
        lambda: arms(f, f, logits),
        lambda: arms_uniforms(n, (3,)),
        lambda: arms_debias(logits, n),
    ):
        with pytest.raises(ValueError, match="num_samples >= 2"):
            call()
