# SPDX-License-Identifier: Apache-2.0
"""
IWELBO: unbiased for the importance-weighted bound against exact enumeration (K = 2, 3; every
estimator; sequential and vectorized), with power checks, and its argument checks.
"""

import pyro
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


def test_unknown_estimator():
    with pytest.raises(ValueError, match="Unknown estimator 'arm'.*vimco"):
        IWELBO(num_samples=2, estimator="arm")


def test_scale_inside_the_data_plate_is_an_error():
    model, guide, args = iw_models.one_layer()
    with pytest.raises(ValueError, match="ill-defined"):
        IWELBO(num_samples=2).loss(poutine.scale(model, scale=2.0), guide, *args)


def test_svi_trains_the_encoder():
    """SVI on the bound moves the guide's parameters (RenyiELBO(alpha=0) would not)."""
    model, guide, args = iw_models.sigmoid_belief_net()
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), IWELBO(num_samples=3))
    svi.step(*args)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    for _ in range(20):
        svi.step(*args)
    assert all(not torch.equal(before[k], pyro.param(k).detach()) for k in before)
