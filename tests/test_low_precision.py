# SPDX-License-Identifier: Apache-2.0
"""
Low-precision logits (bfloat16, float16, and bfloat16 under ``torch.autocast`` on the CPU): the
uniforms, the pair and the estimator weights are computed in float32, the costs and the ELBO are
summed in float32, and gradients come back in the parameters' dtype; the same for the
multi-sample estimators (RLOO, and ARMS with its copula drawn in float32).
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_arm import TraceARM_ELBO
from pyro_arm.estimators import bernoulli_pair, get_estimator
from pyro_arm.sampler import SampleMessenger
from tests.exact import bonferroni_z, draw_estimates, exact_loss_and_grads

LOW = [torch.bfloat16, torch.float16]
N = 2_000_000  # draws per binomial test: at logits -12 (p = 6.1e-6) about 12 ones
Z = 5.0


def sample_pair(guide):
    """(z1, z2) of the one ARM site of ``guide``, from the base sampler."""
    sampler = SampleMessenger(get_estimator("arm"))
    sampler(guide)()
    (sample,) = sampler.samples.values()
    return sample.z[1], sample.z[0]


def assert_binomial(z: torch.Tensor, p: float):
    """The number of ones of ``z`` is within Z binomial standard deviations of ``n p``."""
    n, ones = z.numel(), float(z.float().sum())
    assert abs(ones - n * p) <= Z * math.sqrt(n * p * (1 - p)) + 1e-9, (ones, n * p)


def site_guide(dtype, logits=None, probs=None):
    def guide():
        param = torch.full((N,), logits if probs is None else probs).to(dtype)
        fn = dist.Bernoulli(logits=param) if probs is None else dist.Bernoulli(probs=param)
        pyro.sample("z", fn.to_event(1))

    return guide


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("logits", [-12.0, 0.0, 12.0])
def test_sampling_probabilities_at_logits(dtype, logits):
    z1, z2 = sample_pair(site_guide(dtype, logits=logits))
    assert z1.dtype == z2.dtype == dtype
    p = torch.sigmoid(torch.tensor(logits, dtype=torch.float64)).item()
    assert_binomial(z2, p)
    assert_binomial(z1, p)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("probs", [0.0, 1.0])
def test_sampling_probabilities_at_probs_0_and_1(dtype, probs):
    z1, z2 = sample_pair(site_guide(dtype, probs=probs))
    assert bool((z1 == probs).all()) and bool((z2 == probs).all())


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_checker_rejects_uniforms_in_the_logits_dtype(dtype):
    """Power: the same binomial test rejects the old sampler (uniforms drawn and compared in
    the logits' dtype; 1.96e-3 instead of 6.1e-6 in bfloat16 at logits -12)."""
    logits = torch.full((N,), -12.0, dtype=dtype)
    _, z2 = bernoulli_pair(torch.rand(N, dtype=dtype), logits)
    p = torch.sigmoid(torch.tensor(-12.0, dtype=torch.float64)).item()
    with pytest.raises(AssertionError):
        assert_binomial(z2, p)
    # probs=0 through torch's logits, which clamp the probs to the dtype's epsilon
    clamped = dist.Bernoulli(probs=torch.zeros(N, dtype=dtype)).logits.float()
    _, z2 = bernoulli_pair(torch.rand(N), clamped)
    assert not bool((z2 == 0).all())


@pytest.mark.parametrize("logits", [-12.0, 0.0, 12.0])
def test_sampling_under_autocast(logits):
    encoder = torch.nn.Linear(1, 1)
    with torch.no_grad():
        encoder.weight.zero_()
        encoder.bias.fill_(logits)

    def guide():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            phi = encoder(torch.ones(N, 1)).squeeze(-1)
        assert phi.dtype == torch.bfloat16
        pyro.sample("z", dist.Bernoulli(logits=phi).to_event(1))

    z1, z2 = sample_pair(guide)
    p = torch.sigmoid(torch.tensor(logits, dtype=torch.float64)).item()
    assert_binomial(z2, p)
    assert_binomial(z1, p)


# ---------------------------------------------------------------------------------------------
# Gradients against exact enumeration (the reference runs the same model in float64)
# ---------------------------------------------------------------------------------------------

X = [0.5, -1.0]


def tiny(dtype):
    """Two data points, one Bernoulli each; the guide's logits (exact in every dtype) are cast
    to ``dtype``, the model computes its likelihood in float64."""

    def model():
        with pyro.plate("data", 2):
            z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(2, dtype=dtype)))
            loc = 2 * z.to(torch.float64) - 1
            pyro.sample("x", dist.Normal(loc, 1.0), obs=torch.tensor(X, dtype=torch.float64))

    def guide():
        phi = pyro.param("phi", torch.tensor([0.5, -1.25], dtype=torch.float64))
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Bernoulli(logits=phi.to(dtype)))

    return model, guide


def assert_gradients_unbiased(elbo, model, guide, reference_model, reference_guide, calls):
    """The gradient estimates of ``(model, guide)`` are unbiased for the exact gradient of the
    reference, within a Bonferroni z of the standard error (the loss is left out: the model's
    prior is evaluated in the low dtype)."""
    _, exact = exact_loss_and_grads(reference_model, reference_guide)
    pyro.set_rng_seed(0)
    labels, samples = draw_estimates(elbo, model, guide, num_calls=calls, names=list(exact))
    exact = torch.cat([g.reshape(-1).double() for g in exact.values()])
    mean, se = samples[:, 1:].mean(0), samples[:, 1:].std(0) / math.sqrt(calls)
    z = bonferroni_z(len(exact))
    assert ((mean - exact).abs() <= z * se + 1e-6).all(), (labels, mean, exact, se)
    return mean, exact, se


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("estimator", ["arm", "disarm", "ar"])
def test_gradients_unbiased(dtype, estimator):
    elbo = TraceARM_ELBO(num_particles=200, vectorize_particles=True, estimator=estimator)
    model, guide = tiny(dtype)
    reference = tiny(torch.float64)
    mean, exact, se = assert_gradients_unbiased(elbo, model, guide, *reference, calls=50)
    assert (exact.abs() > 10 * se).all(), "the check would have no power"


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("estimator", ["rloo", "arms"])
def test_multisample_gradients_unbiased(dtype, estimator):
    elbo = TraceARM_ELBO(
        num_particles=200, vectorize_particles=True, estimator=estimator, num_samples=3
    )
    model, guide = tiny(dtype)
    reference = tiny(torch.float64)
    mean, exact, se = assert_gradients_unbiased(elbo, model, guide, *reference, calls=50)
    assert (exact.abs() > 10 * se).all(), "the check would have no power"


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("logits", [-12.0, 12.0])
def test_copula_sampling_probabilities_at_logits(dtype, logits):
    """Every one of the n = 3 copula samples is Bernoulli(sigmoid(logits)): the copula's
    uniforms are ordered and compared in float32, not in the logits' dtype."""
    sampler = SampleMessenger(get_estimator("arms"), 3)
    sampler(site_guide(dtype, logits=logits))()
    (copula,) = sampler.samples.values()
    assert copula.z.dtype == dtype and copula.v.dtype == torch.float32
    p = torch.sigmoid(torch.tensor(logits, dtype=torch.float64)).item()
    for z in copula.z:
        assert_binomial(z, p)


def test_gradient_in_the_parameters_dtype():
    def guide():
        phi = pyro.param("phi", torch.tensor([0.5, -1.25], dtype=torch.bfloat16))
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Bernoulli(logits=phi))

    model, _ = tiny(torch.bfloat16)
    TraceARM_ELBO(num_particles=4, vectorize_particles=True).loss_and_grads(model, guide)
    grad = pyro.param("phi").unconstrained().grad
    assert grad.dtype == torch.bfloat16 and bool(torch.isfinite(grad).all())


def make_encoder() -> torch.nn.Linear:
    """An encoder whose outputs (0.75, -1.0) are exact in bfloat16."""
    encoder = torch.nn.Linear(2, 1)
    with torch.no_grad():
        encoder.weight.copy_(torch.tensor([[0.5, -1.25]]))
        encoder.bias.fill_(0.25)
    return encoder


def autocast_case(encoder: torch.nn.Linear, autocast: bool):
    """Model and guide with the guide's encoder under bfloat16 autocast or not."""
    x = torch.eye(2)

    def model():
        with pyro.plate("data", 2):
            z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(2)))
            pyro.sample("x", dist.Normal(2 * z.float() - 1, 1.0), obs=torch.tensor(X))

    def guide():
        pyro.module("encoder", encoder)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            phi = encoder(x).squeeze(-1)
        assert phi.dtype == (torch.bfloat16 if autocast else torch.float32)
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Bernoulli(logits=phi))

    return model, guide


@pytest.mark.parametrize("estimator", ["arm", "disarm"])
def test_gradients_unbiased_under_autocast(estimator):
    encoder = make_encoder()
    elbo = TraceARM_ELBO(num_particles=200, vectorize_particles=True, estimator=estimator)
    model, guide = autocast_case(encoder, True)
    reference = autocast_case(encoder, False)
    mean, exact, se = assert_gradients_unbiased(elbo, model, guide, *reference, calls=50)
    assert (exact.abs() > 10 * se).all(), "the check would have no power"


# ---------------------------------------------------------------------------------------------
# The ELBO value: 200 units, logits in the low dtype
# ---------------------------------------------------------------------------------------------

D = 200


def wide(dtype):
    gen = torch.Generator().manual_seed(0)
    phi = torch.randint(-16, 17, (D,), generator=gen) / 8.0  # exact in every dtype
    prior = torch.randint(-16, 17, (D,), generator=gen) / 8.0
    x = torch.randn(D, generator=gen)

    def model():
        z = pyro.sample("z", dist.Bernoulli(logits=prior.to(dtype)).to_event(1))
        pyro.sample("x", dist.Normal(2 * z.float() - 1, 1.0).to_event(1), obs=x)

    def guide():
        pyro.sample("z", dist.Bernoulli(logits=phi.to(dtype)).to_event(1))

    q = torch.sigmoid(phi.double())

    def f(z):
        lp = dist.Bernoulli(logits=prior.double()).log_prob(torch.full((D,), z))
        lp = lp + dist.Normal(2 * z - 1, 1.0).log_prob(x.double())
        return lp - dist.Bernoulli(logits=phi.double()).log_prob(torch.full((D,), z))

    exact_loss = -(q * f(1.0) + (1 - q) * f(0.0)).sum().item()
    return model, guide, exact_loss


def mean_loss(elbo, model, guide, calls=20):
    pyro.set_rng_seed(0)
    losses = torch.tensor([elbo.loss(model, guide) for _ in range(calls)], dtype=torch.float64)
    return losses.mean().item(), losses.std().item() / math.sqrt(calls)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_elbo_value(dtype):
    """Measured: 459.26 +- 0.12 (bf16 and fp16) against the exact 459.14 with 1000 particles."""
    model, guide, exact = wide(dtype)
    elbo = TraceARM_ELBO(num_particles=200, vectorize_particles=True, max_plate_nesting=0)
    mean, se = mean_loss(elbo, model, guide)
    assert abs(mean - exact) <= Z * se, (mean, exact, se)


def test_checker_rejects_elbo_summed_in_half_precision():
    """Power: Pyro's Trace_ELBO sums the log-densities in the logits' dtype; in float16 the
    sum over 1000 particles overflows."""
    model, guide, exact = wide(torch.float16)
    elbo = Trace_ELBO(num_particles=1000, vectorize_particles=True, max_plate_nesting=0)
    with pytest.warns(UserWarning, match="NaN"):
        mean, se = mean_loss(elbo, model, guide, calls=2)
    assert not abs(mean - exact) <= Z * se
