# SPDX-License-Identifier: Apache-2.0
"""
The estimator engine: an estimator registered from outside the package runs in both executors,
the rows each estimator needs, the choice of executor in the default mode, non-finite logits
and non-finite signals of the multi-sample estimators.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_arm import (
    ESTIMATORS,
    Estimator,
    TraceARM_ELBO,
    register_estimator,
    trace_arm_elbo,
)
from pyro_arm.multisample import rloo
from tests import tiny_models
from tests.exact import assert_unbiased

pytestmark = pytest.mark.usefixtures("float64")


def independent_uniforms(n, shape, logits):
    """``n`` independent uniforms per component: members are independent samples."""
    return torch.rand((n, *shape), dtype=logits.dtype, device=logits.device)


def own_included(f, z, logits):
    """A wrong estimator: each member's baseline is the mean of all members, its own included."""
    return ((f - f.mean(0)) * (z - torch.sigmoid(logits))).sum(0)


@pytest.fixture
def registered():
    """Registers two estimators of this module and removes them afterwards."""
    before = dict(ESTIMATORS)
    register_estimator(
        Estimator("independent_members", True, rloo, True, uniforms=independent_uniforms)
    )
    register_estimator(
        Estimator("own_included", True, own_included, True, uniforms=independent_uniforms)
    )
    yield
    ESTIMATORS.clear()
    ESTIMATORS.update(before)


MODES = [(True, 200, 8000), (False, 1, 300)]


@pytest.mark.parametrize("vectorize, num_particles, num_samples", MODES, ids=["vec", "seq"])
@pytest.mark.parametrize("case", ["one_layer", "two_layer", "categorical_bernoulli"])
def test_estimator_registered_from_outside(registered, case, vectorize, num_particles, num_samples):
    """RLOO among independent members of each Bernoulli site, later sites from common random
    numbers: unbiased in both executors with no change to the package."""
    model, guide, args = tiny_models.CASES[case]()
    elbo = TraceARM_ELBO(
        estimator="independent_members",
        num_samples=3,
        num_particles=num_particles,
        vectorize_particles=vectorize,
    )
    assert_unbiased(elbo, model, guide, args, num_samples=num_samples, seed=0)


def test_checker_rejects_wrong_outside_estimator(registered):
    model, guide, args = tiny_models.one_layer()
    elbo = TraceARM_ELBO(
        estimator="own_included", num_samples=3, num_particles=200, vectorize_particles=True
    )
    with pytest.raises(AssertionError, match="biased components"):
        assert_unbiased(elbo, model, guide, args, num_samples=8000, seed=0)


def test_rows_per_particle():
    """ARM/DisARM 1 + T, AR 1, RLOO n, ARMS 1 + T (n - 1) (here T = 2 Bernoulli sites and one
    other score-function site)."""
    n = 4
    rows = {name: ESTIMATORS[name] for name in ("arm", "disarm", "ar", "rloo", "arms")}
    assert rows["arm"].rows([2, 2], 1) == 3
    assert rows["disarm"].rows([2, 2], 1) == 3
    assert rows["ar"].rows([1, 1], 1) == 1
    assert rows["rloo"].rows([], 3, n) == n
    assert rows["arms"].rows([n, n], 1, n) == 1 + 3 * (n - 1)


def counted_runs(elbo, model, guide, args, calls=2):
    """Runs of the guide per call of ``loss_and_grads``, from the second call on."""
    runs = []

    def counted(*a, **k):
        runs.append(1)
        return guide(*a, **k)

    for _ in range(calls):
        runs.clear()
        elbo.loss_and_grads(model, counted, *args)
    return len(runs)


def chain(num_steps: int, reads_value: bool = False):
    """A binary Markov chain of ``num_steps`` Bernoulli sites over a batch of 4."""
    data = torch.ones(4, num_steps)

    def model():
        with pyro.plate("batch", 4, dim=-1):
            z = torch.zeros(4)
            for t in pyro.markov(range(num_steps)):
                z = pyro.sample(f"z_{t}", dist.Bernoulli(logits=2 * z - 1))
                loc = z + 1.0 if reads_value and z[0].item() > 0.5 else z
                pyro.sample(f"x_{t}", dist.Normal(loc, 1.0), obs=data[:, t])

    def guide():
        phi = pyro.param("phi", torch.zeros(num_steps))
        with pyro.plate("batch", 4, dim=-1):
            for t in pyro.markov(range(num_steps)):
                pyro.sample(f"z_{t}", dist.Bernoulli(logits=phi[t].expand(4)))

    return model, guide, ()


def test_default_mode_batches_branches_once_safe():
    """The first call proves its batched pass against 1 + T looped runs; later calls run 1 + 1."""
    model, guide, args = chain(6)
    elbo = TraceARM_ELBO(estimator="disarm")
    assert counted_runs(elbo, model, guide, args) == 2
    assert list(elbo.executor.branch_dims.values()) == [-2]
    assert not elbo.executor.looped


def test_default_mode_stays_looped_for_value_dependent_structure():
    """A model that reads a sampled value into Python keeps its looped branches."""
    model, guide, args = chain(20, reads_value=True)
    elbo = TraceARM_ELBO(estimator="disarm")
    with pytest.warns(UserWarning, match="one by one"):
        assert counted_runs(elbo, model, guide, args, calls=1) > 2
    assert counted_runs(elbo, model, guide, args) == 20  # the last branch runs the model alone


def sums_over_everything():
    """A model that sums a sample over all its dims (no plate): a batched pass of branches
    would mix the branches, which the probe detects."""

    def model():
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(3)).to_event(1))
        w = pyro.sample("w", dist.Bernoulli(logits=torch.zeros(3)).to_event(1))
        pyro.sample("x", dist.Normal(z.sum() + 2 * w.sum(), 1.0), obs=torch.tensor(2.0))

    def guide():
        phi = pyro.param("phi", torch.tensor([0.3, -0.2, 0.1]))
        psi = pyro.param("psi", torch.tensor([-0.4, 0.5, 0.0]))
        pyro.sample("z", dist.Bernoulli(logits=phi).to_event(1))
        pyro.sample("w", dist.Bernoulli(logits=psi).to_event(1))

    return model, guide, ()


def test_probe_keeps_a_model_that_breaks_batching_looped():
    model, guide, args = sums_over_everything()
    elbo = TraceARM_ELBO(estimator="disarm", num_particles=2)
    assert_unbiased(elbo, model, guide, args, num_samples=4000, seed=0)
    assert (model, guide) in elbo.executor.looped


def test_checker_rejects_batching_a_model_that_breaks_it(monkeypatch):
    """Power: without the probe's comparison the same model is batched and biased."""
    monkeypatch.setattr(trace_arm_elbo.Particle, "differs_from", lambda self, other: False)
    model, guide, args = sums_over_everything()
    elbo = TraceARM_ELBO(estimator="disarm", num_particles=2)
    with pytest.raises(AssertionError, match="biased components"):
        assert_unbiased(elbo, model, guide, args, num_samples=4000, seed=0)


ALL = [
    dict(estimator="arm"),
    dict(estimator="disarm"),
    dict(estimator="ar"),
    dict(estimator="rloo", num_samples=3),
    dict(estimator="arms", num_samples=3),
]


def nan_guide():
    phi = pyro.param("phi", torch.tensor([0.5, float("nan"), -0.5]))
    with pyro.plate("data", 3):
        pyro.sample("z", dist.Bernoulli(logits=phi))


def nan_model():
    with pyro.plate("data", 3):
        pyro.sample("z", dist.Bernoulli(logits=torch.zeros(3)))


@pytest.mark.parametrize("vectorize", [False, True], ids=["seq", "vec"])
@pytest.mark.parametrize("options", ALL, ids=[o["estimator"] for o in ALL])
def test_nan_logits_raise_naming_the_site(options, vectorize):
    """One NaN element of the logits: a ValueError naming the site, with validation off, before
    any gradient is accumulated."""
    pyro.enable_validation(False)
    elbo = TraceARM_ELBO(num_particles=2, vectorize_particles=vectorize, **options)
    for method in ("loss", "loss_and_grads", "differentiable_loss"):
        pyro.clear_param_store()
        with pytest.raises(ValueError, match="site 'z'.*NaN"):
            getattr(elbo, method)(nan_model, nan_guide)
        assert pyro.param("phi").unconstrained().grad is None


def test_finite_logits_do_not_raise():
    """Power: the same model with finite logits runs."""
    pyro.enable_validation(False)

    def guide():
        phi = pyro.param("phi", torch.tensor([0.5, 1.0, -0.5]))
        with pyro.plate("data", 3):
            pyro.sample("z", dist.Bernoulli(logits=phi))

    for options in ALL:
        assert math.isfinite(TraceARM_ELBO(**options).loss_and_grads(nan_model, guide))


def inf_model():
    z = pyro.sample("z_inf", dist.Bernoulli(logits=torch.tensor(0.0)))
    pyro.factor("forbidden", torch.where(z == 1, -math.inf, 0.0))


def inf_guide():
    phi = pyro.param("phi", torch.tensor(0.0))
    pyro.sample("z_inf", dist.Bernoulli(logits=phi))


def check_multisample_signal_warnings(elbo):
    """Whenever the gradient is not finite, a warning names the site."""
    seen = 0
    for seed in range(10):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            elbo.loss_and_grads(inf_model, inf_guide)
        grad = pyro.param("phi").unconstrained().grad
        if not bool(torch.isfinite(grad).all()):
            seen += 1
            messages = [str(w.message) for w in caught if "'z_inf'" in str(w.message)]
            assert messages, [str(w.message) for w in caught]
    assert seen > 0, "the case never occurred"


@pytest.mark.parametrize("estimator", ["rloo", "arms"])
def test_multisample_signals_warn_naming_the_site(estimator):
    check_multisample_signal_warnings(TraceARM_ELBO(estimator=estimator, num_samples=2))


@pytest.mark.parametrize("estimator", ["rloo", "arms"])
def test_checker_rejects_silent_multisample_signals(estimator, monkeypatch):
    monkeypatch.setattr(trace_arm_elbo, "_warn_if_not_finite", lambda values: None)
    with pytest.raises(AssertionError):
        check_multisample_signal_warnings(TraceARM_ELBO(estimator=estimator, num_samples=2))
