# SPDX-License-Identifier: Apache-2.0
"""
The lean pass of pyro_arm/costs.py makes exactly the plate-keyed costs that the traces of the
same run give (every wrapper, mask and scale honoured), without building a Trace.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.enum import get_importance_trace

from pyro_arm import TraceARM_ELBO, costs
from pyro_arm.costs import ReplayValuesMessenger, costs_of, run_costs, trace_cost_terms
from pyro_arm.estimators import get_estimator
from pyro_arm.sampler import SampleMessenger
from tests import tiny_models
from tests.exact import assert_unbiased

pytestmark = pytest.mark.usefixtures("float64")

CASES = list(tiny_models.CASES) + ["factor_in_guide", "categorical_in_plate"]


def both_costs(case):
    """The costs of one base run from its traces, and from the lean pass held at its values."""
    model, guide, args = getattr(tiny_models, case)()
    sampler = SampleMessenger(get_estimator("arm"))
    model_trace, guide_trace = get_importance_trace(
        "flat", float("inf"), model, sampler(guide), args, {}
    )
    from_traces = costs_of(trace_cost_terms(model_trace, guide_trace))
    lean = run_costs(model, ReplayValuesMessenger(sampler.values)(guide), args, {})
    return from_traces, lean


def assert_same_costs(a, b):
    assert set(a) == set(b)
    for key in a:
        # the same terms, added in another order (guide first): equal to rounding
        torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12, msg=str(key))


@pytest.mark.parametrize("case", CASES)
def test_lean_pass_matches_the_traces(case):
    from_traces, lean = both_costs(case)
    assert_same_costs(from_traces, lean)


def test_checker_rejects_costs_without_scale_and_mask(monkeypatch):
    """Power: a lean pass that ignores ``scale`` and ``mask`` differs on the masked, scaled
    model."""
    monkeypatch.setattr(costs, "scale_and_mask", lambda log_prob, scale, mask: log_prob)
    from_traces, lean = both_costs("masked_scaled")
    with pytest.raises(AssertionError):
        assert_same_costs(from_traces, lean)


def test_lean_pass_builds_no_trace(monkeypatch):
    """No Trace, no pruning, no second walk: the pass never touches pyro.poutine.Trace."""
    model, guide, args = tiny_models.two_layer()

    def fail(*args, **kwargs):
        raise AssertionError("a Trace was built")

    monkeypatch.setattr(pyro.poutine.trace_struct.Trace, "__init__", fail)
    result = run_costs(model, guide, args, {})
    assert len(result) > 0


def newton_model(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    pyro.sample("b", dist.Bernoulli(0.5))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)


def newton_guide(data):
    """A guide that differentiates inside (one Newton step from 0), as a Laplace guide does."""
    p = pyro.param("p", torch.tensor(0.3), constraint=dist.constraints.unit_interval)
    x = torch.zeros((), requires_grad=True)
    log_p = dist.Normal(0.0, 10.0).log_prob(x)
    log_p = log_p + dist.Normal(x, 1.0).log_prob(data).sum()
    g = torch.autograd.grad(log_p, [x], create_graph=True)[0]
    h = torch.autograd.grad(g, [x], create_graph=True)[0]
    pyro.sample("loc", dist.Normal(x.detach() - g / h, 1.0))
    pyro.sample("b", dist.Bernoulli(p))


def test_guide_that_differentiates_inside(float64):
    """The branch runs, without gradient, retry such a guide with gradient: unbiased."""
    pyro.clear_param_store()
    data = torch.tensor([0.0, 1.0, 3.0])
    assert_unbiased(
        TraceARM_ELBO(num_particles=2), newton_model, newton_guide, (data,), num_samples=200
    )
