# SPDX-License-Identifier: Apache-2.0
"""
Checks of the exact importance-weighted bound reference (:mod:`tests.iw_exact`) on the models of
:mod:`tests.iw_models`, and of Pyro's ``RenyiELBO(alpha=0)`` giving a discrete guide no gradient.
"""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch

from tests import iw_models
from tests.exact import exact_elbo, param_tensors
from tests.iw_exact import (
    exact_iw_bound,
    exact_iw_loss_and_grads,
    iw_form,
    sample_iw_bounds,
)

CASES = list(iw_models.CASES)


def _case(name):
    return iw_models.CASES[name]()


@pytest.mark.parametrize("name", CASES)
def test_declared_form_is_detected(name, float64):
    model, guide, args = _case(name)
    assert iw_form(model, guide, *args) == iw_models.FORMS[name]


@pytest.mark.parametrize("form", [None, "joint"])
@pytest.mark.parametrize("name", CASES)
def test_one_sample_bound_is_the_elbo(name, form, float64):
    model, guide, args = _case(name)
    bound = exact_iw_bound(model, guide, 1, *args, form=form)
    elbo = exact_elbo(model, guide, *args)
    assert bound.item() == pytest.approx(elbo.item(), abs=1e-7)
    params = list(param_tensors().values())
    for g_bound, g_elbo in zip(
        torch.autograd.grad(bound, params, allow_unused=True),
        torch.autograd.grad(elbo, params, allow_unused=True),
    ):
        if g_bound is None or g_elbo is None:
            assert g_bound is None and g_elbo is None
        else:
            assert torch.allclose(g_bound, g_elbo, atol=1e-7)


@pytest.mark.parametrize("name", CASES)
def test_bound_increases_with_k(name, float64):
    model, guide, args = _case(name)
    values = [exact_iw_bound(model, guide, K, *args).item() for K in (1, 2, 3)]
    assert values[0] + 1e-4 < values[1] < values[2] - 1e-4, values


@pytest.mark.parametrize("name", CASES)
def test_local_bound_is_tighter_than_joint(name, float64):
    """On a local model the per-element bound is above the joint one (without subsampling,
    where the joint bound puts the subsample scale inside the log)."""
    model, guide, args = _case(name)
    local = exact_iw_bound(model, guide, 2, *args).item()
    joint = exact_iw_bound(model, guide, 2, *args, form="joint").item()
    if iw_models.FORMS[name] == "joint":
        assert local == joint
    elif name != "subsampled":
        assert local > joint + 1e-3


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("name", CASES)
def test_value_matches_monte_carlo(name, K, float64):
    model, guide, args = _case(name)
    expected = exact_iw_bound(model, guide, K, *args).item()
    draws = sample_iw_bounds(model, guide, K, 19998, *args)
    se = draws.std().item() / math.sqrt(len(draws))
    assert abs(draws.mean().item() - expected) < 5 * se, (draws.mean().item(), expected, se)


@pytest.mark.parametrize("name", ["two_layer", "normal_beside_bernoulli", "subsampled"])
def test_gradient_matches_monte_carlo(name, float64):
    """The score function plus the gradient at fixed draws (which holds the guide's
    ``-sum_k wbar_k grad log q(z_k)`` term), averaged over many draws, agrees with the exact
    gradient."""
    K, batches, per_batch = 3, 40, 600
    model, guide, args = _case(name)
    loss, exact = exact_iw_loss_and_grads(model, guide, K, *args)
    params = param_tensors()
    rows = []
    for _ in range(batches):
        _, surrogate = sample_iw_bounds(model, guide, K, per_batch, *args, surrogate=True)
        grads = torch.autograd.grad(-surrogate, list(params.values()), allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for p, g in zip(params.values(), grads)
                ]
            )
        )
    rows = torch.stack(rows)
    mean, se = rows.mean(0), rows.std(0) / math.sqrt(batches)
    expected = torch.cat([exact[n].reshape(-1) for n in params])
    assert (expected.abs() > 1e-3).any()
    assert ((mean - expected).abs() <= 5 * se + 1e-9).all(), torch.stack([expected, mean, se])


def test_hermite_nodes_suffice(float64):
    """Ten Gauss-Hermite nodes per reparameterized site and sample agree with twenty (to about
    4e-8 in the value and 3e-7 in the gradient at K = 3)."""
    model, guide, args = _case("normal_beside_bernoulli")
    for K in (2, 3):
        loss10, grads10 = exact_iw_loss_and_grads(model, guide, K, *args, num_hermite_nodes=10)
        loss20, grads20 = exact_iw_loss_and_grads(model, guide, K, *args, num_hermite_nodes=20)
        assert loss10 == pytest.approx(loss20, abs=1e-7)
        for n in grads10:
            assert torch.allclose(grads10[n], grads20[n], atol=1e-6)


def test_local_form_refuses_other_scales(float64):
    model, guide, args = _case("one_layer")
    with pytest.raises(ValueError, match="scale"):
        exact_iw_bound(poutine.scale(model, scale=2.0), guide, 2, *args)
    # the joint form puts the scale inside the log, as RenyiELBO(alpha=0) does
    exact_iw_bound(poutine.scale(model, scale=2.0), guide, 2, *args, form="joint")


def test_renyi_alpha0_gives_discrete_guide_no_gradient(float64):
    """
    ``RenyiELBO(alpha=0)``, Pyro's importance-weighted bound, multiplies the score-function term
    of a non-reparameterized site by ``alpha``: the guide of a sigmoid belief net gets exactly zero
    gradient, while the bound's exact gradient for those parameters is clearly nonzero.
    """
    K = 3
    model, guide, args = iw_models.sigmoid_belief_net()
    _, exact = exact_iw_loss_and_grads(model, guide, K, *args)
    for name in ("v", "c"):
        assert exact[name].abs().max() > 1e-2, exact[name]

    elbo = pyro.infer.RenyiELBO(
        alpha=0, num_particles=K, vectorize_particles=True, max_plate_nesting=1
    )
    params = param_tensors()
    for _ in range(20):
        for p in params.values():
            p.grad = None
        elbo.loss_and_grads(model, guide, *args)
        for name in ("v", "c"):
            assert params[name].grad is None or not params[name].grad.any()
        # the model's parameters do get a gradient: the zero is specific to the guide
        assert params["w"].grad is not None and params["w"].grad.abs().sum() > 0
