# SPDX-License-Identifier: Apache-2.0
"""
TraceARM_ELBO with the multi-sample estimators (pyro_arm/particle.py): validation of
``num_samples``, unbiasedness against exact enumeration on every tiny model for n = 2, 3, 4
(vectorized and sequential), the checker's power against a wrong
copula weight, ARMS-2 = DisARM, and gradient variance at equal evaluations. Everything runs
in float64.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.testing.rejection_gamma import ShapeAugmentedGamma
from pyro.infer import Trace_ELBO, TraceGraph_ELBO

from pyro_arm import TraceARM_ELBO, multisample, trace_arm_elbo
from tests import tiny_models
from tests.exact import assert_unbiased, draw_estimates
from tests.tiny_models import CASES

pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize("estimator", ["rloo", "arms"])
@pytest.mark.parametrize("num_samples", [1, 0, -3, 2.0, True])
def test_num_samples_below_two_raises(estimator, num_samples):
    with pytest.raises(ValueError, match="num_samples >= 2"):
        TraceARM_ELBO(estimator=estimator, num_samples=num_samples)


@pytest.mark.parametrize("estimator", ["rloo", "arms"])
def test_num_samples_beyond_the_bound_raises(estimator):
    """An estimate of 10**7 samples would never finish: refused at once, in one line."""
    with pytest.raises(ValueError) as info:
        TraceARM_ELBO(estimator=estimator, num_samples=10**7)
    assert str(info.value) == (
        f"estimator {estimator!r}: num_samples=10,000,000 is beyond 10,000, the most one "
        "estimate may draw: each sample is a run of model and guide, so a step would not "
        "finish (raise pyro_arm.estimators.MAX_NUM_SAMPLES to allow it)"
    )
    assert TraceARM_ELBO(estimator=estimator, num_samples=10_000).num_samples == 10_000


@pytest.mark.parametrize("estimator", ["arm", "disarm", "ar"])
def test_num_samples_rejected_by_other_estimators(estimator):
    with pytest.raises(ValueError, match="'rloo', 'arms'"):
        TraceARM_ELBO(estimator=estimator, num_samples=4)


def test_num_samples_default():
    assert TraceARM_ELBO(estimator="arms").num_samples == 2
    assert TraceARM_ELBO(estimator="arms").model_grad == "all"  # the measured default
    assert TraceARM_ELBO(estimator="rloo").model_grad == "base"
    assert TraceARM_ELBO(estimator="arms", model_grad="base").model_grad == "base"
    assert TraceARM_ELBO(estimator="rloo", num_samples=5).num_samples == 5
    assert TraceARM_ELBO(estimator="disarm").num_samples is None


def _elbo(estimator, vectorize, n):
    # vectorized: several particles in the same batched pass as the samples and branches
    particles = 20 if vectorize else 1
    elbo = TraceARM_ELBO(
        estimator=estimator, num_samples=n, vectorize_particles=vectorize, num_particles=particles
    )
    return elbo, (800 if vectorize else 200)


# The fast tier: every case at the checker's smallest size (30 calls), vectorized, and one case
# sequential; test_unbiased_vectorized and test_unbiased_sequential run the larger sizes.
FAST = [(case, True) for case in CASES] + [("one_layer", False)]


@pytest.mark.parametrize("estimator", ["rloo", "arms"])
@pytest.mark.parametrize(
    "case, vectorize", FAST, ids=[f"{c}-{'vec' if v else 'seq'}" for c, v in FAST]
)
def test_unbiased_fast(case, vectorize, estimator):
    model, guide, args = CASES[case]()
    elbo, _ = _elbo(estimator, vectorize, 3)
    assert_unbiased(elbo, model, guide, args, num_samples=30 * elbo.num_particles, seed=0)


# The full grid, both modes: vectorized (one batched pass per call, 20 particles) and
# sequential (one branch at a time, ~10x the time per sample, so 200 single-particle calls).
# Tolerances are assert_unbiased's (from the measured standard errors).
@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("estimator", ["rloo", "arms"])
@pytest.mark.parametrize("case", list(CASES))
def test_unbiased_vectorized(case, estimator, n):
    model, guide, args = CASES[case]()
    elbo, num_samples = _elbo(estimator, True, n)
    assert_unbiased(elbo, model, guide, args, num_samples=num_samples, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("estimator", ["rloo", "arms"])
@pytest.mark.parametrize("case", list(CASES))
def test_unbiased_sequential(case, estimator, n):
    model, guide, args = CASES[case]()
    elbo, num_samples = _elbo(estimator, False, n)
    assert_unbiased(elbo, model, guide, args, num_samples=num_samples, seed=1)


@pytest.mark.parametrize("n", [3, 4])
def test_checker_rejects_wrong_copula_weight(n, monkeypatch):
    # without the debiasing factor, the correlated leave-one-out baseline biases ARMS
    model, guide, args = CASES["one_layer"]()
    elbo = TraceARM_ELBO(
        estimator="arms", num_samples=n, vectorize_particles=True, num_particles=100
    )
    assert_unbiased(elbo, model, guide, args, num_samples=4000, seed=0)
    monkeypatch.setattr(multisample, "arms_debias", lambda logits, n: torch.ones_like(logits))
    with pytest.raises(AssertionError, match="biased components"):
        assert_unbiased(elbo, model, guide, args, num_samples=4000, seed=0)


def _antithetic_uniforms(n, shape, generator=None, dtype=None, device=None):
    u = torch.rand(shape, dtype=dtype, device=device)  # as DisARM draws its uniforms
    return torch.stack([u, 1 - u])


@pytest.mark.parametrize("vectorize", [False, True], ids=["seq", "vec"])
@pytest.mark.parametrize(
    "case", ["one_layer", "two_layer", "three_layer", "global_then_local", "local_then_global"]
)
def test_arms_two_samples_is_disarm(case, vectorize, monkeypatch):
    monkeypatch.setattr(multisample, "arms_uniforms", _antithetic_uniforms)
    model, guide, args = CASES[case]()
    pyro.clear_param_store()
    TraceGraph_ELBO().loss(model, guide, *args)  # creates the params
    kwargs = dict(vectorize_particles=vectorize, num_particles=3 if vectorize else 1)
    rows = []
    for elbo in (
        TraceARM_ELBO(estimator="disarm", **kwargs),
        TraceARM_ELBO(estimator="arms", num_samples=2, model_grad="base", **kwargs),
    ):
        pyro.set_rng_seed(5)
        _, samples = draw_estimates(elbo, model, guide, args, {}, 5)
        rows.append(samples[:, 1:])  # gradients (the loss of ARMS averages both runs)
    assert rows[0].abs().sum() > 0
    torch.testing.assert_close(rows[1], rows[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "estimator, model_grad", [("disarm", "all"), ("rloo", "all"), ("arms", "every")]
)
def test_model_grad_validation(estimator, model_grad):
    with pytest.raises(ValueError, match="model_grad must be"):
        TraceARM_ELBO(estimator=estimator, model_grad=model_grad)


@pytest.mark.parametrize("vectorize", [False, True], ids=["seq", "vec"])
@pytest.mark.parametrize("case", ["one_layer", "subsampled", "bernoulli_then_normal"])
def test_model_grad_base_unbiased(case, vectorize):
    """``model_grad="base"`` (the grids above run the default, ``"all"``)."""
    model, guide, args = CASES[case]()
    elbo, num_samples = _elbo("arms", vectorize, 3)
    elbo.model_grad = "base"
    assert_unbiased(elbo, model, guide, args, num_samples=num_samples, seed=2)


@pytest.mark.parametrize("vectorize", [False, True], ids=["seq", "vec"])
def test_model_grad_all_changes_only_model_params(vectorize):
    model, guide, args = CASES["one_layer"]()
    pyro.clear_param_store()
    TraceGraph_ELBO().loss(model, guide, *args)  # creates the params
    grads = {}
    for model_grad in ("base", "all"):
        elbo = TraceARM_ELBO(estimator="arms", num_samples=3, model_grad=model_grad)
        elbo.vectorize_particles = vectorize
        pyro.set_rng_seed(3)
        labels, grads[model_grad] = draw_estimates(elbo, model, guide, args, {}, 4)
    guide_cols = [i for i, name in enumerate(labels) if name.startswith("phi")]
    model_cols = [i for i, name in enumerate(labels) if name.startswith(("prior", "w"))]
    torch.testing.assert_close(grads["all"][:, guide_cols], grads["base"][:, guide_cols])
    assert not torch.allclose(grads["all"][:, model_cols], grads["base"][:, model_cols])


# (vectorize_particles, num_particles, num_samples) for the site-baseline checks
BASELINE_MODES = [(False, 1, 800), (True, 100, 6000)]
BASELINE_PARAMS = ["cl", "zl"]  # a learned baseline's own params have their own loss
BASELINE_KINDS = ["decaying_avg", "value", "nn"]


@pytest.mark.parametrize(
    "kind, mode",
    [("decaying_avg", BASELINE_MODES[0])] + [(k, BASELINE_MODES[1]) for k in BASELINE_KINDS],
    ids=["decaying_avg-seq", "decaying_avg-vec", "value-vec", "nn-vec"],
)
def test_arms_uses_site_baseline_unbiased(kind, mode):
    """A Categorical's own infer["baseline"] replaces its leave-one-out baseline under ARMS."""
    vectorize, num_particles, num_samples = mode
    model, guide, args = tiny_models.categorical_in_plate(kind)
    elbo = TraceARM_ELBO(
        estimator="arms",
        num_samples=3,
        num_particles=num_particles,
        vectorize_particles=vectorize,
    )
    calls = []
    original = trace_arm_elbo.site_baseline

    def spy(*a, **k):
        calls.append(a[0])
        return original(*a, **k)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(trace_arm_elbo, "site_baseline", spy)
        assert_unbiased(
            elbo, model, guide, args, num_samples=num_samples, seed=0, params=BASELINE_PARAMS
        )
    assert calls and set(calls) == {"c"}


def test_checker_rejects_site_baseline_including_own_sample(monkeypatch):
    """A baseline equal to the mean of the n signals (each sample's own included) is biased
    (the weights are computed alike in both modes: checked vectorized)."""
    vectorize = True
    monkeypatch.setattr(
        trace_arm_elbo, "site_baseline", lambda name, site, signal, options: (signal, 0.0)
    )
    model, guide, args = tiny_models.categorical_in_plate("value")
    elbo = TraceARM_ELBO(
        estimator="arms",
        num_samples=2,
        num_particles=100 if vectorize else 1,
        vectorize_particles=vectorize,
    )
    with pytest.raises(AssertionError, match=r"biased components \[.*'cl\["):
        assert_unbiased(elbo, model, guide, args, num_samples=6000 if vectorize else 1500, seed=0)


def test_partly_reparameterized_site_takes_one_draw():
    """A site with both a pathwise and a score-function part (a rejection sampler) takes no
    extra draws in the branches (their score would not be its score function): ``"arms"`` gives
    its parameter the gradient ``Trace_ELBO`` gives, draw for draw."""

    def model():
        with pyro.plate("n", 1000):
            pyro.sample("y", dist.Gamma(0.5, 1.0).expand([1000]))

    def guide():
        a = pyro.param("a", torch.tensor(1.5))
        with pyro.plate("n", 1000):
            pyro.sample("y", ShapeAugmentedGamma(a, torch.tensor(1.0)).expand([1000]))

    grads = []
    for elbo in [Trace_ELBO(), TraceARM_ELBO(estimator="arms")]:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        elbo.loss_and_grads(model, guide)
        grads.append(pyro.param("a").grad.item())
    assert grads[1] == pytest.approx(grads[0], rel=1e-6)
