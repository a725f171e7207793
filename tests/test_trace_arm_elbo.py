# SPDX-License-Identifier: Apache-2.0
"""
Unbiasedness of TraceARM_ELBO against exact gradients (enumeration, see tests/exact.py) on tiny
models covering the structures where ARM inside an ELBO goes wrong, for every estimator,
sequential and vectorized, one and several particles. Everything runs in float64.
"""

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceGraph_ELBO

from pyro_arm import TraceARM_ELBO, costs, particle
from pyro_arm.estimators import ESTIMATORS, Estimator, arm, disarm
from tests import tiny_models
from tests.exact import assert_unbiased, exact_elbo, exact_loss_and_grads
from tests.tiny_models import (
    CASES,
    CONFIGS,
    FAST_CONFIGS,
    config_id,
    local_then_global,
    subsampled,
    two_layer,
    value_dependent_structure,
)

pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize("config", CONFIGS + FAST_CONFIGS, ids=config_id)
@pytest.mark.parametrize("case", list(CASES))
def test_unbiased(case, config):
    estimator, vectorize, num_particles, num_samples = config
    model, guide, args = CASES[case]()
    elbo = TraceARM_ELBO(
        num_particles=num_particles, vectorize_particles=vectorize, estimator=estimator
    )
    assert_unbiased(elbo, model, guide, args, num_samples=num_samples, seed=0)


@pytest.mark.parametrize("method", ["differentiable_loss", "module"])
def test_unbiased_differentiable_loss(method):
    model, guide, args = two_layer()
    elbo = TraceARM_ELBO(num_particles=100, vectorize_particles=True)
    assert_unbiased(elbo, model, guide, args, num_samples=4000, seed=1, method=method)


@pytest.mark.parametrize("estimator", ["arm", "disarm", "ar"])
def test_value_dependent_structure_sequential(estimator):
    model, guide, args = value_dependent_structure()
    elbo = TraceARM_ELBO(num_particles=4, estimator=estimator)
    assert_unbiased(elbo, model, guide, args, num_samples=400, seed=0)


@pytest.mark.parametrize("num_particles", [1, 100])
@pytest.mark.parametrize("estimator", ["arm", "ar"])
def test_value_dependent_structure_vectorized(estimator, num_particles):
    """
    Vectorized: either right, or a NotImplementedError that names a site (with one particle the
    base pass runs, and the batched pass of branches meets the control flow).
    """
    model, guide, args = value_dependent_structure()
    elbo = TraceARM_ELBO(num_particles=num_particles, vectorize_particles=True, estimator=estimator)
    try:
        assert_unbiased(elbo, model, guide, args, num_samples=4000, seed=0)
    except NotImplementedError as e:
        assert any(name in str(e) for name in ["switch", "branch_a", "branch_b"]), str(e)
        assert "vectorize_particles" in str(e)


# ---------------------------------------------------------------------------------------------
# The checker has power: the same check rejects wrong estimators and a biased ELBO.
# ---------------------------------------------------------------------------------------------

WRONG = {
    "flipped_sign": Estimator("flipped_sign", True, lambda f1, f2, u, lg: -arm(f1, f2, u, lg)),
    "no_u_factor": Estimator("no_u_factor", True, lambda f1, f2, u, lg: f1 - f2),
    # DisARM with sigmoid(phi) in place of sigmoid(|phi|): biased only where logits < 0
    "disarm_signed": Estimator(
        "disarm_signed",
        True,
        lambda f1, f2, u, lg: disarm(f1, f2, u, lg) / torch.sigmoid(lg.abs()) * torch.sigmoid(lg),
    ),
    # AR with weight (1/2 - u): half the gradient
    "ar_half": Estimator("ar_half", False, lambda f1, f2, u, lg: f2 * (0.5 - u)),
}


@pytest.mark.parametrize("case", ["one_layer", "two_layer"])
@pytest.mark.parametrize("wrong", list(WRONG))
def test_checker_rejects_wrong_estimator(wrong, case, monkeypatch):
    monkeypatch.setitem(ESTIMATORS, wrong, WRONG[wrong])
    model, guide, args = CASES[case]()
    elbo = TraceARM_ELBO(num_particles=100, vectorize_particles=True, estimator=wrong)
    with pytest.raises(AssertionError, match="biased components"):
        assert_unbiased(elbo, model, guide, args, num_samples=4000, seed=0)


@pytest.mark.parametrize("elbo_class", [Trace_ELBO, TraceGraph_ELBO])
def test_pyro_is_biased_on_later_global_site(elbo_class):
    """Pyro's plate-local signals are biased when a later guide site outside the plate reads
    the local ones (b[1] is off by about 0.03): the same check rejects them."""
    model, guide, args = local_then_global()
    elbo = elbo_class(num_particles=1000, vectorize_particles=True, max_plate_nesting=1)
    with pytest.raises(AssertionError, match=r"biased components \[.*'b\[1\]'"):
        assert_unbiased(elbo, model, guide, args, num_samples=60000, seed=0)


@pytest.mark.parametrize("estimator", ["arm", "disarm"])
def test_arm_unbiased_on_later_global_site(estimator):
    """TraceARM_ELBO passes there, with a standard error small enough to see Pyro's bias."""
    model, guide, args = local_then_global()
    elbo = TraceARM_ELBO(num_particles=2000, vectorize_particles=True, estimator=estimator)
    report = assert_unbiased(elbo, model, guide, args, num_samples=100000, seed=0)
    b1 = report.names.index("b[1]")
    assert report.z * report.se[b1] < 0.03, report.table()


def test_pyro_trace_elbo_passes_where_it_is_unbiased():
    """Sanity of the reference: Pyro's own Trace_ELBO passes on an ordinary model."""
    model, guide, args = two_layer()
    elbo = Trace_ELBO(num_particles=200, vectorize_particles=True, max_plate_nesting=1)
    assert_unbiased(elbo, model, guide, args, num_samples=20000, seed=0)


def test_exact_reference_structure():
    """The exact reference sees every leaf of a value-dependent guide, with weights summing
    to one, and does not depend on the order of sites in the enumeration."""
    from tests.exact import leaves

    model, guide, args = value_dependent_structure()
    ls = list(leaves(model, guide, *args))
    assert len(ls) == 4 + 2  # switch=1: 4 values of branch_a; switch=0: 2 values of branch_b
    total = sum(leaf.log_weight.exp() for leaf in ls)
    assert abs(total.item() - 1.0) < 1e-12

    pyro.clear_param_store()
    model, guide, args = subsampled()
    ls = list(leaves(model, guide, *args))
    assert len(ls) == 6 * 16
    assert abs(sum(leaf.log_weight.exp() for leaf in ls).item() - 1.0) < 1e-12
    loss, grads = exact_loss_and_grads(model, guide, *args)
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_checker_detects_branch_subsample_not_reused(monkeypatch):
    """
    White-box power check of the subsampled case: a sequential branch that draws a fresh random
    subsample (instead of reusing the base run's) is caught by the same test configuration.
    """
    from pyro.poutine.util import site_is_subsample

    from pyro_arm.costs import ReplayValuesMessenger as replay
    from pyro_arm.sampler import BranchMessenger as branch

    for handler in (branch, replay):  # the branches of guide and model, and of the model alone
        original = handler._pyro_sample

        def fresh_subsample(self, msg, original=original):
            if site_is_subsample(msg):
                return  # let Pyro draw a new subsample
            original(self, msg)

        monkeypatch.setattr(handler, "_pyro_sample", fresh_subsample)
    model, guide, args = subsampled()
    elbo = TraceARM_ELBO(num_particles=1, estimator="disarm")
    with pytest.raises(AssertionError, match="biased components"):
        assert_unbiased(elbo, model, guide, args, num_samples=300, seed=0)


# ---------------------------------------------------------------------------------------------
# Structure decided at the last site, factors in the guide, empty programs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["arm", "disarm"])
def test_switch_at_last_site(estimator):
    """The flip of the last guide site adds a site: its branch runs guide and model."""
    model, guide, args = tiny_models.switch_at_last_site()
    elbo = TraceARM_ELBO(num_particles=4, estimator=estimator)
    assert_unbiased(elbo, model, guide, args, num_samples=4000, seed=0)


def test_checker_rejects_model_only_branch_at_switch(monkeypatch):
    """The old behaviour (the model alone draws the added site from its prior) is biased."""
    monkeypatch.setattr(particle, "_has_new_latent_site", lambda *_: False)
    model, guide, args = tiny_models.switch_at_last_site()
    elbo = TraceARM_ELBO(num_particles=4)
    with pytest.raises(AssertionError, match=r"biased components \[.*'q_s'"):
        assert_unbiased(elbo, model, guide, args, num_samples=4000, seed=0)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("validation", [True, False])
def test_factor_in_guide(config, validation):
    estimator, vectorize, num_particles, num_samples = config
    pyro.enable_validation(validation)
    model, guide, args = tiny_models.factor_in_guide()
    elbo = TraceARM_ELBO(
        num_particles=num_particles, vectorize_particles=vectorize, estimator=estimator
    )
    assert_unbiased(elbo, model, guide, args, num_samples=num_samples, seed=0)


def test_checker_rejects_factor_left_out_of_signals(monkeypatch):
    """A signal without the guide's factor terms (they read z) is biased."""
    original = costs.trace_cost_terms

    def without_factor(model_trace, guide_trace, *rest, **kwargs):
        guide_trace = guide_trace.copy()
        guide_trace.remove_node("f")
        return original(model_trace, guide_trace, *rest, **kwargs)

    monkeypatch.setattr(particle, "trace_cost_terms", without_factor)
    model, guide, args = tiny_models.factor_in_guide()
    elbo = TraceARM_ELBO(num_particles=200, vectorize_particles=True)
    with pytest.raises(AssertionError, match=r"biased components \[.*'phi"):
        assert_unbiased(elbo, model, guide, args, num_samples=10000, seed=0)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_empty_model_and_guide(config):
    """Nothing to estimate: the loss is exactly 0 by every method, with no error."""
    estimator, vectorize, num_particles, _ = config
    model, guide, args = tiny_models.empty()
    elbo = TraceARM_ELBO(
        num_particles=num_particles, vectorize_particles=vectorize, estimator=estimator
    )
    assert exact_elbo(model, guide, *args) == 0.0
    assert elbo.loss(model, guide, *args) == 0.0
    assert elbo.loss_and_grads(model, guide, *args) == 0.0
    assert elbo.differentiable_loss(model, guide, *args).item() == 0.0
