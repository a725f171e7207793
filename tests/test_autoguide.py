# SPDX-License-Identifier: Apache-2.0
"""
AutoDiscrete: the guide's structure (shapes, plates, subsampling, the families, the sites it
skips), its composition with Pyro's autoguides, its readouts, the errors, and that training it
with TraceARM_ELBO reaches the exact mean-field optimum of a model with coupled binary latents.
"""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from pyro.poutine.util import site_is_subsample

from pyro_arm import IWELBO, AutoDiscrete, TraceARM_ELBO
from pyro_arm.estimators import ESTIMATORS
from tests.exact import exact_elbo
from tests.test_trace_arm_elbo import WRONG

ESTIMATOR_KWARGS = {
    "arm": {},
    "disarm": {},
    "ar": {},
    "rloo": {"num_samples": 2},
    "arms": {"num_samples": 2},
}


def _sites(trace):
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }


def _plates(site):
    return sorted((f.name, f.dim, f.size) for f in site["cond_indep_stack"])


# ---------------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------------


def wrapped_model(data):
    """Bernoulli sites written every way a user writes them, in nested plates."""
    with pyro.plate("groups", 2, dim=-2):
        pyro.sample("g", dist.Bernoulli(probs=torch.tensor(0.3)))
        with pyro.plate("data", 4, dim=-1):
            z = pyro.sample("z", dist.Bernoulli(logits=torch.tensor([0.5, -1.0, 2.0])).to_event(1))
            m = pyro.sample(
                "m",
                dist.Bernoulli(logits=torch.zeros(3)).expand([2, 4, 3]).mask(data > 0).to_event(1),
            )
            pyro.sample("x", dist.Normal(z + m, 1.0).to_event(1), obs=data)
    pyro.sample("top", dist.Bernoulli(logits=torch.tensor([1.0, -1.0])).to_event(1))


def test_shapes_plates_and_event_dims_follow_the_model():
    data = torch.randn(2, 4, 3)
    guide = AutoDiscrete(wrapped_model)
    guide_trace = poutine.trace(guide).get_trace(data)
    model_trace = poutine.trace(poutine.replay(wrapped_model, guide_trace)).get_trace(data)
    guided = _sites(guide_trace)
    assert list(guided) == ["g", "z", "m", "top"]
    for name, site in guided.items():
        model_site = model_trace.nodes[name]
        assert site["value"].shape == model_site["value"].shape, name
        assert site["fn"].event_dim == model_site["fn"].event_dim, name
        assert site["fn"].batch_shape == model_site["fn"].batch_shape, name
        assert _plates(site) == _plates(model_site), name
    probs = guide.probs()
    assert {k: tuple(v.shape) for k, v in probs.items()} == {
        "g": (2, 1),
        "z": (2, 4, 3),
        "m": (2, 4, 3),
        "top": (2,),
    }
    # initialized at the prior's logits
    torch.testing.assert_close(probs["g"], torch.full((2, 1), 0.3))
    torch.testing.assert_close(probs["z"][1, 2], torch.tensor([0.5, -1.0, 2.0]).sigmoid())
    torch.testing.assert_close(probs["top"], torch.tensor([1.0, -1.0]).sigmoid())
    # a fresh trace of the whole model and guide passes Pyro's ELBO shape checks
    Trace_ELBO(max_plate_nesting=2).loss(wrapped_model, guide, data)


def test_init_logits_value_dict_and_callable():
    data = torch.randn(2, 4, 3)
    guide = AutoDiscrete(wrapped_model, init_logits=0.0)
    assert all((p == 0.5).all() for p in guide.probs(data).values())
    pyro.clear_param_store()
    guide = AutoDiscrete(wrapped_model, init_logits={"z": torch.tensor([3.0, 0.0, -3.0])})
    probs = guide.probs(data)
    torch.testing.assert_close(probs["z"][0, 0], torch.tensor([3.0, 0.0, -3.0]).sigmoid())
    torch.testing.assert_close(probs["g"], torch.full((2, 1), 0.3))  # the prior's
    pyro.clear_param_store()
    seen = []

    def init(site):
        seen.append(site["name"])
        return torch.tensor(1.0) if site["name"] == "top" else None

    guide = AutoDiscrete(wrapped_model, init_logits=init)
    torch.testing.assert_close(guide.probs(data)["top"], torch.tensor([1.0, 1.0]).sigmoid())
    assert seen == ["g", "z", "m", "top"]


def subsampled_model(data):
    with pyro.plate("data", 10, subsample_size=3) as ind:
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(2)).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(-1), 1.0), obs=data[ind])


@pytest.mark.parametrize("vectorize", [False, True], ids=["seq", "vec"])
def test_subsampling_moves_only_the_subsampled_rows(vectorize):
    data = torch.linspace(-2.0, 3.0, 10)
    subsample = torch.tensor([1, 4, 7])
    guide = AutoDiscrete(
        subsampled_model,
        create_plates=lambda data: pyro.plate("data", 10, subsample=subsample),
    )
    elbo = TraceARM_ELBO(estimator="ar", num_particles=2, vectorize_particles=vectorize)
    svi = SVI(subsampled_model, guide, pyro.optim.SGD({"lr": 0.1}), elbo)
    before = guide.probs(data)["z"].clone()
    assert before.shape == (10, 2)
    svi.step(data)
    moved = (guide.probs()["z"] != before).any(-1)
    assert moved.nonzero().flatten().tolist() == subsample.tolist()


def test_random_subsample_moves_as_many_rows_as_its_size():
    data = torch.linspace(-2.0, 3.0, 10)
    guide = AutoDiscrete(subsampled_model)
    elbo = TraceARM_ELBO(estimator="ar")
    svi = SVI(subsampled_model, guide, pyro.optim.SGD({"lr": 0.1}), elbo)  # no momentum
    for _ in range(3):
        before = guide.probs(data)["z"].clone()
        svi.step(data)
        assert int((guide.probs()["z"] != before).any(-1).sum()) == 3


def categorical_model(data):
    with pyro.plate("data", 3):
        c = pyro.sample("c", dist.Categorical(logits=torch.tensor([0.0, 1.0, -1.0])))
        h = pyro.sample("h", dist.OneHotCategorical(logits=torch.zeros(2, 4)).to_event(1))
        b = pyro.sample("b", dist.Bernoulli(0.4))
        loc = c + (h * torch.arange(4.0)).sum((-1, -2)) + b
        pyro.sample("x", dist.Normal(loc, 1.0), obs=data)


def test_categorical_and_one_hot_sites():
    data = torch.tensor([0.5, 3.0, 6.0])
    guide = AutoDiscrete(categorical_model)
    guide_trace = poutine.trace(guide).get_trace(data)
    assert guide_trace.nodes["c"]["value"].shape == (3,)
    assert guide_trace.nodes["h"]["value"].shape == (3, 2, 4)
    assert guide_trace.nodes["h"]["fn"].event_dim == 2
    probs = guide.probs()
    assert probs["c"].shape == (3, 3) and probs["h"].shape == (3, 2, 4)
    torch.testing.assert_close(probs["c"][0], torch.tensor([0.0, 1.0, -1.0]).softmax(-1))
    torch.testing.assert_close(probs["h"].sum(-1), torch.ones(3, 2))
    median = guide.median()
    assert median["c"].tolist() == [1, 1, 1]
    assert median["h"].shape == (3, 2, 4) and (median["h"].sum(-1) == 1).all()
    assert median["b"].tolist() == [0.0, 0.0, 0.0]
    elbo = TraceARM_ELBO(estimator="disarm", num_particles=2, vectorize_particles=True)
    svi = SVI(categorical_model, guide, pyro.optim.Adam({"lr": 0.1}), elbo)
    for _ in range(3):
        assert torch.isfinite(torch.tensor(svi.step(data)))
    assert not torch.equal(guide.probs()["c"], probs["c"])


def test_enumerated_sites_are_left_to_the_elbo():
    def model(data):
        z = pyro.sample("z", dist.Bernoulli(0.3))
        with pyro.plate("data", 3):
            y = pyro.sample(
                "y", dist.Categorical(torch.ones(3) / 3), infer={"enumerate": "parallel"}
            )
            pyro.sample("x", dist.Normal(y + z, 1.0), obs=data)

    pyro.clear_param_store()
    data = torch.tensor([0.0, 1.0, 3.0])
    guide = AutoDiscrete(model)
    guide(data)
    assert list(guide.probs()) == ["z"]
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), TraceEnum_ELBO(max_plate_nesting=1))
    for _ in range(3):
        assert torch.isfinite(torch.tensor(svi.step(data)))


def test_predictive():
    data = torch.randn(2, 4, 3)
    guide = AutoDiscrete(wrapped_model)
    for parallel in [False, True]:
        samples = Predictive(wrapped_model, guide=guide, num_samples=5, parallel=parallel)(data)
        assert samples["z"].shape == (5, 2, 4, 3)
        assert samples["g"].shape == (5, 2, 1)
        assert samples["x"].shape == (5, 2, 4, 3)


# ---------------------------------------------------------------------------------------------
# Composition: spike-and-slab regression with AutoGuideList(AutoNormal, AutoDiscrete)
# ---------------------------------------------------------------------------------------------


def spike_and_slab(X, y):
    with pyro.plate("features", X.shape[-1]):
        gamma = pyro.sample("gamma", dist.Bernoulli(0.2))
        beta = pyro.sample("beta", dist.Normal(0.0, 1.0))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((gamma * beta) @ X.T, 0.5), obs=y)


def spike_and_slab_data():
    X = torch.randn(60, 6)
    y = X @ torch.tensor([2.0, 0.0, 0.0, -1.5, 0.0, 0.0]) + 0.5 * torch.randn(60)
    return X, y


def spike_and_slab_guide():
    guide = AutoGuideList(spike_and_slab)
    guide.append(AutoNormal(poutine.block(spike_and_slab, hide=["gamma"])))
    guide.append(AutoDiscrete(poutine.block(spike_and_slab, expose=["gamma"])))
    return guide


@pytest.mark.parametrize("vectorize", [False, True], ids=["seq", "vec"])
@pytest.mark.parametrize("estimator", list(ESTIMATOR_KWARGS))
def test_autoguidelist_with_autonormal_every_estimator(estimator, vectorize):
    X, y = spike_and_slab_data()
    guide = spike_and_slab_guide()
    elbo = TraceARM_ELBO(
        estimator=estimator,
        num_particles=2,
        vectorize_particles=vectorize,
        **ESTIMATOR_KWARGS[estimator],
    )
    svi = SVI(spike_and_slab, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
    for _ in range(5):
        assert torch.isfinite(torch.tensor(svi.step(X, y)))
    names = set(pyro.get_param_store().keys())
    assert names == {
        "AutoGuideList.0.locs.beta",
        "AutoGuideList.0.scales.beta",
        "AutoGuideList.1.logits.gamma",
    }
    assert guide.median(X, y)["gamma"].shape == (6,)


def test_autoguidelist_finds_the_true_features():
    X, y = spike_and_slab_data()
    guide = spike_and_slab_guide()
    elbo = TraceARM_ELBO(estimator="disarm", num_particles=4, vectorize_particles=True)
    svi = SVI(spike_and_slab, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
    for _ in range(150):
        svi.step(X, y)
    pip = guide[1].probs()["gamma"]
    assert (pip[[0, 3]] > 0.95).all(), pip
    assert (pip[[1, 2, 4, 5]] < 0.5).all(), pip


def test_iwelbo():
    data = torch.linspace(-2.0, 3.0, 10)
    guide = AutoDiscrete(subsampled_model)
    for estimator in ["vimco", "disarm"]:
        svi = SVI(
            subsampled_model,
            guide,
            pyro.optim.Adam({"lr": 0.05}),
            IWELBO(num_samples=3, estimator=estimator),
        )
        for _ in range(3):
            assert torch.isfinite(torch.tensor(svi.step(data)))


def test_readme_no_guide_variant_runs(capsys):
    """The README's AutoDiscrete variant of the quick start, on 30 steps in place of 300."""
    from tests.test_tutorials import ROOT, quick_start

    readme = (ROOT / "README.md").read_text()
    namespace = {"__name__": "quick_start"}
    for heading in ("## Quick start", "**No guide to write.**"):
        code = quick_start(readme, heading)
        assert "range(300)" in code
        exec(compile(code.replace("range(300)", "range(30)"), "README.md", "exec"), namespace)
    assert "q(z = 1) of datapoint 0 after 30 steps: tensor([" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_error_without_discrete_sites():
    def model():
        pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))

    with pytest.raises(ValueError, match="AutoDiscrete guides discrete sites only.*'w'"):
        AutoDiscrete(model)()
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="no latent Bernoulli"):
        AutoDiscrete(poutine.block(model, hide=["w"]))()


def test_error_names_the_unsupported_site():
    def model():
        pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("n", dist.Poisson(3.0))

    with pytest.raises(ValueError, match="At site 'n'.*not Poisson"):
        AutoDiscrete(model)()


def test_error_names_the_continuous_site_and_the_remedy():
    X, y = spike_and_slab_data()
    with pytest.raises(ValueError, match=r"At site 'beta'.*poutine\.block"):
        AutoDiscrete(spike_and_slab)(X, y)


# ---------------------------------------------------------------------------------------------
# Optimality: training reaches the exact mean-field optimum
# ---------------------------------------------------------------------------------------------

FIELD = (-0.5, 0.3, -1.0)
WEIGHTS = (1.0, -1.0, 0.5)


def coupled(x):
    """Three binary latents with pairwise couplings and one observation."""
    z = pyro.sample("z", dist.Bernoulli(logits=torch.tensor(FIELD)).to_event(1))
    z1, z2, z3 = z.unbind(-1)
    pyro.factor("coupling", 1.5 * z1 * z2 - 1.0 * z1 * z3 + 0.8 * z2 * z3)
    pyro.sample("x", dist.Normal((z * torch.tensor(WEIGHTS)).sum(-1), 1.0), obs=x)


def exact_mean_field_optimum(x, init_logits=None):
    """Maximizes the exact (enumerated) ELBO of AutoDiscrete over its logits."""
    guide = AutoDiscrete(coupled, init_logits=init_logits)
    guide(x)
    params = [p for _, p in pyro.get_param_store().named_parameters()]
    optim = torch.optim.LBFGS(
        params, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        optim.zero_grad()
        loss = -exact_elbo(coupled, guide, x)
        loss.backward()
        return loss

    optim.step(closure)
    return guide.probs()["z"]


def train_probs(x, estimator, num_steps=1000, seed=0):
    """AutoDiscrete trained by TraceARM_ELBO; the mean of the last quarter's probabilities."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoDiscrete(coupled)
    optim = pyro.optim.ExponentialLR(
        {
            "optimizer": torch.optim.Adam,
            "optim_args": {"lr": 0.05},
            "gamma": 0.02 ** (1 / num_steps),
        }
    )
    elbo = TraceARM_ELBO(estimator=estimator, num_particles=4, vectorize_particles=True)
    svi = SVI(coupled, guide, optim, elbo)
    tail = []
    for step in range(num_steps):
        svi.step(x)
        optim.step()
        if step >= num_steps * 3 // 4:
            tail.append(guide.probs()["z"])
    return torch.stack(tail).mean(0)


#: Over 8 seeds (DisARM), the trained probabilities' errors had standard deviations 0.0074,
#: 0.0056 and 0.0049 and means within 0.004 of zero (ARM, 6 seeds: at most 0.0042 and 0.006;
#: largest error of all 14 runs 0.018): the tolerance is four of the largest standard
#: deviations, and a third of the largest gap between the mean-field optimum and the posterior
#: marginals.
TOLERANCE = 0.03


def test_exact_mean_field_optimum_is_unique_and_not_the_posterior(float64):
    x = torch.tensor(0.7)
    optimum = exact_mean_field_optimum(x)
    for init in ([3.0, -3.0, 3.0], [-3.0, 3.0, -3.0], [3.0, 3.0, 3.0], [-3.0, -3.0, -3.0]):
        pyro.clear_param_store()
        torch.testing.assert_close(exact_mean_field_optimum(x, torch.tensor(init)), optimum)
    posterior = _posterior_marginals(x)
    assert (optimum - posterior).abs().max() > 2.5 * TOLERANCE, (optimum, posterior)


def _posterior_marginals(x):
    values = torch.tensor([[(k >> i) & 1 for i in range(3)] for k in range(8)]).to(x.dtype)
    log_joint = torch.stack(
        [
            poutine.trace(poutine.condition(coupled, data={"z": z})).get_trace(x).log_prob_sum()
            for z in values
        ]
    )
    return (log_joint - log_joint.logsumexp(0)).exp() @ values


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["disarm", "arm"])
def test_training_reaches_the_exact_mean_field_optimum(estimator, float64):
    x = torch.tensor(0.7)
    optimum = exact_mean_field_optimum(x)
    trained = train_probs(x, estimator)
    assert (trained - optimum).abs().max() < TOLERANCE, (trained, optimum)


@pytest.mark.slow
def test_checker_rejects_a_biased_estimator(float64, monkeypatch):
    """ARM without its (u - 1/2) factor is biased, and its fixed point is not the optimum.
    (A bias that only rescales each logit's gradient, such as DisARM with sigmoid(phi) in place
    of sigmoid(|phi|), keeps the fixed point: this test cannot see it.)"""
    monkeypatch.setitem(ESTIMATORS, "no_u_factor", WRONG["no_u_factor"])
    x = torch.tensor(0.7)
    optimum = exact_mean_field_optimum(x)
    trained = train_probs(x, "no_u_factor")
    assert (trained - optimum).abs().max() > TOLERANCE, (trained, optimum)
