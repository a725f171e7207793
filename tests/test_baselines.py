# SPDX-License-Identifier: Apache-2.0
"""
Baselines of score-function sites (pyro_arm/baselines.py): the pure functions, then a Categorical
site with each kind of baseline (TraceGraph_ELBO's options) and with leave-one-out across
particles, unbiased against exact enumeration, and a power check rejecting a baseline that
includes the particle's own signal.
"""

import pyro
import pytest
import torch

from pyro_arm import TraceARM_ELBO, trace_arm_elbo
from pyro_arm.baselines import (
    BaselineOptions,
    baseline_options,
    decaying_average,
    leave_one_out,
    site_baseline,
)
from tests import tiny_models
from tests.exact import assert_unbiased

pytestmark = pytest.mark.usefixtures("float64")

GUIDE_PARAMS = ["cl", "zl"]  # the baseline's own params have their own loss


def test_leave_one_out_is_the_mean_of_the_others():
    signals = torch.tensor([[1.0, 2.0], [3.0, 5.0], [8.0, -1.0]])
    expected = torch.stack([signals[[j for j in range(3) if j != i]].mean(0) for i in range(3)])
    assert torch.allclose(leave_one_out(signals, 0), expected)
    assert torch.allclose(leave_one_out(signals.T, -1), expected.T)


def test_decaying_average():
    assert torch.allclose(
        decaying_average(torch.tensor(2.0), torch.tensor(4.0), 0.9), torch.tensor(2.2)
    )


def test_baseline_options():
    site = {"name": "c", "infer": {"baseline": {"use_decaying_avg_baseline": True}}}
    assert baseline_options(site) == BaselineOptions(use_decaying_avg_baseline=True)
    assert not baseline_options({"name": "c", "infer": {}}).any
    with pytest.raises(ValueError, match="Unrecognized baseline options"):
        baseline_options({"name": "c", "infer": {"baseline": {"beta": 0.5}}})
    both = {"nn_baseline": torch.nn.Identity(), "baseline_value": torch.tensor(0.0)}
    with pytest.raises(ValueError, match="cannot use baseline_value and nn_baseline"):
        baseline_options({"name": "c", "infer": {"baseline": both}})


def test_site_baseline_decaying_average_in_param_store():
    """As TraceGraph_ELBO: the previous average is the baseline, the new one is stored."""
    options = BaselineOptions(use_decaying_avg_baseline=True, baseline_beta=0.5)
    site = {"name": "c"}
    signal = torch.tensor([2.0, 4.0])
    baseline, loss = site_baseline("c", site, signal, options)
    assert torch.equal(baseline, torch.zeros(2)) and loss == 0.0
    stored = pyro.get_param_store()["__baseline_avg_downstream_cost_c"]
    assert torch.allclose(stored, torch.tensor([1.0, 2.0]))
    baseline, _ = site_baseline("c", site, signal, options)
    assert torch.allclose(baseline, torch.tensor([1.0, 2.0]))


def test_site_baseline_value_and_shape_check():
    options = BaselineOptions(baseline_value=torch.tensor([1.0, 1.0]))
    baseline, loss = site_baseline("c", {"name": "c"}, torch.tensor([2.0, 4.0]), options)
    assert torch.equal(baseline, torch.ones(2)) and loss.item() == 1.0 + 9.0
    options = BaselineOptions(baseline_value=torch.ones(3))
    with pytest.raises(ValueError, match="baseline at site 'c'"):
        site_baseline("c", {"name": "c"}, torch.tensor([2.0, 4.0]), options)


# (vectorize_particles, num_particles, num_samples)
MODES = [(False, 1, 1200), (False, 3, 1200), (True, 200, 10000)]


def mode_id(mode):
    return f"{'vec' if mode[0] else 'seq'}-P{mode[1]}"


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
@pytest.mark.parametrize("kind", tiny_models.BASELINE_KINDS)
def test_unbiased_categorical_with_baseline(kind, mode):
    """Every baseline kind, and leave-one-out (kind "none" with several particles)."""
    vectorize, num_particles, num_samples = mode
    model, guide, args = tiny_models.categorical_in_plate(kind)
    elbo = TraceARM_ELBO(num_particles=num_particles, vectorize_particles=vectorize)
    assert_unbiased(elbo, model, guide, args, num_samples=num_samples, seed=0, params=GUIDE_PARAMS)


@pytest.mark.parametrize("vectorize", [False, True])
def test_checker_rejects_baseline_including_own_particle(vectorize, monkeypatch):
    """A mean over all particles, the particle's own included, is biased."""
    monkeypatch.setattr(trace_arm_elbo, "leave_one_out", lambda s, d: s.mean(d, keepdim=True))
    model, guide, args = tiny_models.categorical_in_plate()
    elbo = TraceARM_ELBO(num_particles=2, vectorize_particles=vectorize)
    with pytest.raises(AssertionError, match=r"biased components \[.*'cl\["):
        assert_unbiased(elbo, model, guide, args, num_samples=4000, seed=0)


@pytest.mark.parametrize(
    "module, options",
    [(trace_arm_elbo, {}), (trace_arm_elbo, {"estimator": "arms", "num_samples": 3})],
    ids=["arm", "arms"],
)
def test_nn_baseline_is_registered_and_trained(module, options, monkeypatch):
    """The module registered with pyro.module gets the gradient of its squared-error loss, and
    a few steps bring the baseline closer to the signal (ARMS: a non-Bernoulli site's own
    baseline replaces its leave-one-out one)."""
    errors = []
    original = module.site_baseline

    def capture(*args, **kwargs):
        baseline, loss = original(*args, **kwargs)
        errors.append(loss.item())
        return baseline, loss

    monkeypatch.setattr(module, "site_baseline", capture)
    model, guide, args = tiny_models.categorical_in_plate("nn")
    elbo = TraceARM_ELBO(num_particles=50, vectorize_particles=True, **options)
    svi = pyro.infer.SVI(model, guide, pyro.optim.SGD({"lr": 0.01}), elbo)
    for _ in range(60):
        svi.step(*args)
    names = set(pyro.get_param_store().keys())
    assert {"c_baseline$$$linear.weight", "c_baseline$$$linear.bias"} <= names
    first, last = sum(errors[:10]) / 10, sum(errors[-10:]) / 10
    assert last < 0.5 * first, (first, last)
