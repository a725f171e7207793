# SPDX-License-Identifier: Apache-2.0
"""
IWELBO: unbiased for the importance-weighted bound against exact enumeration (K = 2, 3; every
estimator; sequential and vectorized), with power checks, and its argument checks.
"""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer.util import MultiFrameTensor
from pyro.poutine.util import site_is_subsample

from pyro_arm import IWELBO, iwelbo, multisample
from tests import iw_models
from tests.exact import assert_unbiased
from tests.iw_exact import exact_iw_loss_and_grads

pytestmark = pytest.mark.usefixtures("float64")

MODES = [(True, 200, 8000), (False, 1, 300)]


def reference(K):
    return lambda model, guide, *args, **kwargs: exact_iw_loss_and_grads(
        model, guide, K, *args, **kwargs
    )


@pytest.mark.parametrize("vectorize, num_particles, num_samples", MODES, ids=["vec", "seq"])
@pytest.mark.parametrize("estimator", ["vimco", "disarm", "arms"])
@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("case", list(iw_models.CASES))
def test_unbiased(case, K, estimator, vectorize, num_particles, num_samples):
    model, guide, args = iw_models.CASES[case]()
    elbo = IWELBO(
        num_samples=K,
        estimator=estimator,
        num_particles=num_particles,
        vectorize_particles=vectorize,
    )
    assert_unbiased(
        elbo, model, guide, args, num_samples=num_samples, seed=0, reference=reference(K)
    )


def check(estimator, K=2, case="one_layer", **kwargs):
    model, guide, args = iw_models.CASES[case]()
    elbo = IWELBO(
        num_samples=K, estimator=estimator, num_particles=200, vectorize_particles=True, **kwargs
    )
    assert_unbiased(elbo, model, guide, args, num_samples=16000, seed=0, reference=reference(K))


def test_checker_rejects_joint_bound_where_local(monkeypatch):
    check("disarm")
    monkeypatch.setattr(iwelbo, "_data_plate", lambda model_trace, guide_trace: (None, 1.0))
    with pytest.raises(AssertionError, match="biased components"):
        check("disarm")


def test_checker_rejects_vimco_baseline_including_own_sample(monkeypatch):
    def own_included(self):
        mean = self.log_w.mean(1, keepdim=True).expand_as(self.log_w)
        return iwelbo._log_mean_exp(self.log_w, 1).unsqueeze(1) - self.replaced(mean)

    check("vimco", K=3)
    monkeypatch.setattr(iwelbo._Bound, "vimco", own_included)
    with pytest.raises(AssertionError, match="biased components"):
        check("vimco", K=3)


def test_checker_rejects_missing_debiasing_factor(monkeypatch):
    check("arms", num_members=4)
    monkeypatch.setattr(multisample, "arms_debias", lambda logits, n: torch.ones_like(logits))
    with pytest.raises(AssertionError, match="biased components"):
        check("arms", num_members=4)


def test_checker_rejects_missing_explicit_log_q_term(monkeypatch):
    """Without the gradient of log q(z_k) inside the log-weights the estimate is biased."""
    original = iwelbo._Bound.log_weight

    def without_log_q_grad(self, particle, grad):
        if not grad:
            return original(self, particle, grad)
        costs = MultiFrameTensor()
        for sign, trace in ((1.0, particle.model_trace), (-1.0, particle.guide_trace)):
            for site in trace.nodes.values():
                if site["type"] == "sample" and not site_is_subsample(site):
                    log_prob = site["log_prob"] if sign > 0 else site["log_prob"].detach()
                    costs.add((site["cond_indep_stack"], sign * log_prob))
        return torch.as_tensor(costs.sum_to(particle.row_frames)) / self.scale

    check("disarm")
    monkeypatch.setattr(iwelbo._Bound, "log_weight", without_log_q_grad)
    with pytest.raises(AssertionError, match="biased components"):
        check("disarm")


@pytest.mark.parametrize("num_samples", [1, 0, 2.0, True])
def test_num_samples_must_be_at_least_two(num_samples):
    with pytest.raises(ValueError, match="num_samples >= 2"):
        IWELBO(num_samples=num_samples)


def test_num_samples_beyond_the_bound():
    """A bound of 10**7 samples would never finish: refused at once, in one line."""
    with pytest.raises(ValueError) as info:
        IWELBO(num_samples=10**7)
    assert str(info.value) == (
        "IWELBO: num_samples=10,000,000 is beyond 10,000, the most one bound may draw: each "
        "sample is a run of model and guide, and the leave-one-out bounds take 372,529 GiB per "
        "datapoint (float32), so a step would not finish (raise "
        "pyro_arm.estimators.MAX_NUM_SAMPLES to allow it)"
    )
    assert IWELBO(num_samples=10_000).num_samples == 10_000


def test_unknown_estimator():
    with pytest.raises(ValueError, match="Unknown estimator 'arm'.*vimco"):
        IWELBO(num_samples=2, estimator="arm")


def test_scale_inside_the_data_plate_is_an_error():
    model, guide, args = iw_models.one_layer()
    with pytest.raises(ValueError, match="ill-defined"):
        IWELBO(num_samples=2).loss(poutine.scale(model, scale=2.0), guide, *args)


#: Weights per datapoint of the data plate (of 2: the subsample's in ``subsampled``).
WEIGHTS = (0.5, 3.0)


def weighted(case: str, weights: tuple):
    """A local-form case with ``poutine.scale`` by a weight per datapoint on model and guide."""
    model, guide, args = iw_models.CASES[case]()
    scale = torch.tensor(weights)
    return poutine.scale(model, scale=scale), poutine.scale(guide, scale=scale), args


def check_weighted(estimator, case, K=2):
    model, guide, args = weighted(case, WEIGHTS)
    elbo = IWELBO(num_samples=K, estimator=estimator, num_particles=200, vectorize_particles=True)
    assert_unbiased(elbo, model, guide, args, num_samples=8000, seed=0, reference=reference(K))


@pytest.mark.parametrize("estimator", ["vimco", "disarm", "arms"])
@pytest.mark.parametrize("case", ["one_layer", "two_layer", "subsampled"])
def test_a_weight_per_datapoint_multiplies_its_bound(case, estimator):
    """A per-datapoint tensor scale multiplies that datapoint's bound, outside the log."""
    check_weighted(estimator, case)


def test_a_weight_per_datapoint_sequential():
    model, guide, args = weighted("two_layer", WEIGHTS)
    elbo = IWELBO(num_samples=2, estimator="disarm")
    assert_unbiased(elbo, model, guide, args, num_samples=300, seed=0, reference=reference(2))


@pytest.mark.parametrize("estimator", ["vimco", "disarm"])
def test_a_weight_per_datapoint_in_a_joint_bound(estimator):
    """Beside a global latent the bound is joint: the weights act inside the log."""
    model, guide, args = iw_models.global_and_weighted_local()
    elbo = IWELBO(num_samples=2, estimator=estimator, num_particles=200, vectorize_particles=True)
    assert_unbiased(elbo, model, guide, args, num_samples=8000, seed=0, reference=reference(2))


def test_checker_rejects_a_weight_inside_the_log(monkeypatch):
    """The same check fails for the bound with the weights inside the log."""
    check_weighted("disarm", "one_layer")
    original = iwelbo._data_plate
    monkeypatch.setattr(iwelbo, "_data_plate", lambda *traces: (original(*traces)[0], 1.0))
    with pytest.raises(AssertionError, match="biased components"):
        check_weighted("disarm", "one_layer")


def test_a_weight_on_the_model_alone_is_an_error():
    model, guide, args = iw_models.one_layer()
    with pytest.raises(ValueError) as info:
        IWELBO(num_samples=2).loss(
            poutine.scale(model, scale=torch.tensor([1.0, 3.0])), guide, *args
        )
    message = str(info.value)
    assert message.startswith("IWELBO forms the bound per element of plate 'data', which needs")
    assert "model site 'z' [1, 3], model site 'x' [1, 3], guide site 'z' 1." in message
    assert "ill-defined" in message and "\n" not in message


def test_a_scale_that_varies_within_a_datapoint_is_an_error():
    def model():
        with pyro.plate("data", 2, dim=-2):
            z = pyro.sample("z", dist.Bernoulli(0.5))
            with pyro.plate("pixels", 3, dim=-1):
                pyro.sample("x", dist.Bernoulli(0.2 + 0.6 * z), obs=torch.ones(2, 3))

    def guide():
        p = pyro.param("p", torch.tensor(0.3))
        with pyro.plate("data", 2, dim=-2):
            pyro.sample("z", dist.Bernoulli(p))

    scale = torch.tensor([[1.0, 2.0, 3.0]])
    elbo = IWELBO(num_samples=2, max_plate_nesting=2)
    with pytest.raises(ValueError) as info:
        elbo.loss(poutine.scale(model, scale=scale), poutine.scale(guide, scale=scale))
    assert str(info.value) == (
        "IWELBO forms the bound per element of plate 'data'; the scale of the model site 'z' "
        "(shape (1, 3)) varies within an element, which makes that bound ill-defined: a scale "
        "may vary along that plate only"
    )


def test_svi_trains_the_encoder():
    """SVI on the bound moves the guide's parameters (RenyiELBO(alpha=0) would not)."""
    model, guide, args = iw_models.sigmoid_belief_net()
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), IWELBO(num_samples=3))
    svi.step(*args)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    for _ in range(20):
        svi.step(*args)
    assert all(not torch.equal(before[k], pyro.param(k).detach()) for k in before)
