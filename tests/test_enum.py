# SPDX-License-Identifier: Apache-2.0
"""
Enumeration: model and guide sites marked for parallel enumeration are summed out, unbiased
against references summed out by hand, for every estimator, sequential and vectorized; a site
marked for enumeration that cannot be summed out (sequential, Monte Carlo, a guide site inside
pyro.markov, ...) raises NotImplementedError naming it, and is never sampled silently.
"""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate

from pyro_arm import IWELBO, TraceARM_ELBO
from pyro_arm.enum import MARGINAL_PREFIX, Expectation
from pyro_arm.executors import batch_dim
from tests.exact import assert_unbiased, exact_loss_and_grads

DATA = torch.tensor([1.0, 0.0])
MODES = [dict(), dict(num_particles=3, vectorize_particles=True, max_plate_nesting=1)]
METHODS = ["loss", "loss_and_grads", "differentiable_loss"]


def mixture_model(data, kind="parallel"):
    locs = torch.tensor([-1.0, 1.0])
    with pyro.plate("data", 2):
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(2)))
        c = pyro.sample("c", dist.Bernoulli(logits=torch.zeros(2)), infer={"enumerate": kind})
        pyro.sample("x", dist.Normal(locs[c.long()] + z, 1.0), obs=data)


def guide(data, kind=None):
    phi = pyro.param("phi", torch.zeros(2))
    with pyro.plate("data", 2):
        pyro.sample("z", dist.Bernoulli(logits=phi))


def raises_at(site, elbo, method, model, guide, *args):
    with pytest.raises(NotImplementedError, match=f"At site '{site}'.*enumeration"):
        getattr(elbo, method)(model, guide, *args)


@pytest.mark.parametrize("mode", MODES, ids=["seq", "vec"])
@pytest.mark.parametrize("method", METHODS)
def test_sequential_model_site_raises(method, mode):
    pyro.clear_param_store()
    raises_at("c", TraceARM_ELBO(**mode), method, mixture_model, guide, DATA, "sequential")


@pytest.mark.parametrize("mode", MODES, ids=["seq", "vec"])
def test_config_enumerate_model_runs(mode):
    """config_enumerate marks every discrete model site: those the guide samples take its
    values, the others are summed out."""

    def model(data):
        with pyro.plate("data", 2):
            z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(2)))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data)
        pyro.sample("g", dist.Categorical(logits=torch.zeros(3)))

    pyro.clear_param_store()
    loss = TraceARM_ELBO(**mode).loss(config_enumerate(model), guide, DATA)
    assert torch.isfinite(torch.tensor(loss))


def enum_guide(data, kind="parallel"):
    phi = pyro.param("phi", torch.zeros(2))
    with pyro.plate("data", 2):
        pyro.sample("z", dist.Bernoulli(logits=phi), infer={"enumerate": kind})
        pyro.sample("c", dist.Bernoulli(logits=phi))


def unmarked_model(data, kind=None):
    mixture_model(data, kind=None)


@pytest.mark.parametrize("mode", MODES, ids=["seq", "vec"])
def test_sequential_guide_site_raises(mode):
    pyro.clear_param_store()
    elbo = TraceARM_ELBO(**mode)
    raises_at("z", elbo, "loss_and_grads", unmarked_model, enum_guide, DATA, "sequential")


@pytest.mark.parametrize("mode", MODES, ids=["seq", "vec"])
def test_site_sampled_after_and_from_an_enumerated_guide_site_raises(mode):
    """A discrete site the guide samples from an enumerated value is refused, by name."""

    def dependent_guide(data):
        phi = pyro.param("phi", torch.zeros(2))
        with pyro.plate("data", 2):
            z = pyro.sample("z", dist.Bernoulli(logits=phi), infer={"enumerate": "parallel"})
            pyro.sample("c", dist.Bernoulli(logits=phi + z))

    pyro.clear_param_store()
    with pytest.raises(NotImplementedError, match="At site 'c'.*enumerated value"):
        TraceARM_ELBO(**mode).loss_and_grads(unmarked_model, dependent_guide, DATA)


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
@pytest.mark.parametrize("vectorize", [False, True], ids=["seq", "vec"])
def test_iwelbo_enumerated_site_raises(vectorize, kind):
    elbo = IWELBO(num_samples=2, vectorize_particles=vectorize, max_plate_nesting=1)
    pyro.clear_param_store()
    raises_at("c", elbo, "loss_and_grads", mixture_model, guide, DATA, kind)
    pyro.clear_param_store()
    raises_at("z", elbo, "loss_and_grads", unmarked_model, enum_guide, DATA, kind)


def test_unmarked_site_is_sampled():
    """The same model without the mark runs (the refusal depends on the mark alone)."""
    pyro.clear_param_store()

    def model(data, kind=None):
        mixture_model(data, kind=None)

    def full_guide(data):
        phi = pyro.param("phi", torch.zeros(2))
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Bernoulli(logits=phi))
            pyro.sample("c", dist.Bernoulli(logits=phi))

    assert torch.isfinite(torch.tensor(TraceARM_ELBO().loss(model, full_guide, DATA)))


# ---------------------------------------------------------------------------------------------
# Parallel enumeration in the model: unbiased against references summed out by hand
# ---------------------------------------------------------------------------------------------

X = [0.3, 1.7, -0.5]


def mix_logits():
    return torch.tensor([0.2, -0.1])


def mixture(data):
    """A mixture assignment per datapoint, enumerated, beside a Bernoulli site per datapoint."""
    loc = pyro.param("loc", torch.tensor([-1.0, 1.0]))
    with pyro.plate("data", 3):
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(3)))
        c = pyro.sample("c", dist.Categorical(logits=mix_logits()), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(loc[c] + z, 1.0), obs=data)


def mixture_summed(data):
    loc = pyro.param("loc", torch.tensor([-1.0, 1.0]))
    with pyro.plate("data", 3):
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(3)))
        log_pc = mix_logits().log_softmax(-1)
        log_px = dist.Normal(loc + z.unsqueeze(-1), 1.0).log_prob(data.unsqueeze(-1))
        pyro.factor("x", (log_pc + log_px).logsumexp(-1))


def plate_guide(data, kind=None):
    phi = pyro.param("phi", torch.tensor([0.3, -0.2, 0.5]))
    with pyro.plate("data", 3):
        pyro.sample("z", dist.Bernoulli(logits=phi))


def global_mixture(data, kind="parallel"):
    """One enumerated global site that every datapoint reads."""
    loc = pyro.param("loc", torch.tensor([-1.0, 0.5, 1.0]))
    g_prior = dist.Categorical(logits=torch.tensor([0.1, -0.3, 0.2]))
    g = pyro.sample("g", g_prior, infer={"enumerate": kind})
    with pyro.plate("data", 3):
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(3)))
        pyro.sample("x", dist.Normal(loc[g] + z, 1.0), obs=data)


def global_mixture_summed(data, kind=None):
    loc = pyro.param("loc", torch.tensor([-1.0, 0.5, 1.0]))
    with pyro.plate("data", 3):
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(3)))
    log_pg = torch.tensor([0.1, -0.3, 0.2]).log_softmax(-1)
    log_px = dist.Normal(loc + z.unsqueeze(-1), 1.0).log_prob(data.unsqueeze(-1)).sum(0)
    pyro.factor("x", (log_pg + log_px).logsumexp(-1))


def trans():
    return torch.tensor([[1.0, -1.0], [-0.5, 0.8]])


def chain(data):
    """A two-state chain enumerated in the model, a Bernoulli guide site per step."""
    loc = pyro.param("loc", torch.tensor([-0.5, 1.0]))
    s = 0
    for t in range(len(data)):
        s = pyro.sample(f"s_{t}", dist.Categorical(logits=trans()[s]))
        z = pyro.sample(f"z_{t}", dist.Bernoulli(logits=torch.tensor(0.0)))
        pyro.sample(f"x_{t}", dist.Normal(loc[s] + z, 1.0), obs=data[t])


def chain_summed(data):
    loc = pyro.param("loc", torch.tensor([-0.5, 1.0]))
    zs = [pyro.sample(f"z_{t}", dist.Bernoulli(logits=torch.tensor(0.0))) for t in range(len(data))]
    log_alpha = trans()[0].log_softmax(-1)
    for t in range(len(data)):
        if t:
            log_alpha = (log_alpha.unsqueeze(-1) + trans().log_softmax(-1)).logsumexp(0)
        log_alpha = log_alpha + dist.Normal(loc + zs[t], 1.0).log_prob(data[t])
    pyro.factor("x", log_alpha.logsumexp(-1))


def chain_guide(data):
    phi = pyro.param("phi", torch.tensor([0.3, -0.2, 0.5]))
    for t in range(len(data)):
        pyro.sample(f"z_{t}", dist.Bernoulli(logits=phi[t]))


def mixture_with_categorical(data):
    """The mixture, with a categorical site per datapoint that the guide samples (score
    function)."""
    loc = pyro.param("loc", torch.tensor([-1.0, 1.0]))
    with pyro.plate("data", 3):
        w = pyro.sample("w", dist.Categorical(logits=torch.zeros(3)))
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(3)))
        c = pyro.sample("c", dist.Categorical(logits=mix_logits()), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(loc[c] + z + 0.5 * w, 1.0), obs=data)


def mixture_with_categorical_summed(data):
    loc = pyro.param("loc", torch.tensor([-1.0, 1.0]))
    with pyro.plate("data", 3):
        w = pyro.sample("w", dist.Categorical(logits=torch.zeros(3)))
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(3)))
        log_pc = mix_logits().log_softmax(-1)
        mean = loc + (z + 0.5 * w).unsqueeze(-1)
        log_px = dist.Normal(mean, 1.0).log_prob(data.unsqueeze(-1))
        pyro.factor("x", (log_pc + log_px).logsumexp(-1))


def categorical_guide(data):
    psi = pyro.param("psi", torch.tensor([[0.2, -0.4, 0.1], [0.0, 0.3, -0.2], [0.5, 0.0, 0.0]]))
    phi = pyro.param("phi", torch.tensor([0.3, -0.2, 0.5]))
    with pyro.plate("data", 3):
        pyro.sample("w", dist.Categorical(logits=psi))
        pyro.sample("z", dist.Bernoulli(logits=phi))


CASES = {
    "mixture": (mixture, mixture_summed, plate_guide),
    "global": (global_mixture, global_mixture_summed, plate_guide),
    "chain": (config_enumerate(chain), chain_summed, chain_guide),
    "categorical": (mixture_with_categorical, mixture_with_categorical_summed, categorical_guide),
}
ESTIMATORS = ["arm", "disarm", "ar", "rloo", "arms"]


def summed_reference(summed):
    return lambda model, guide, *args: exact_loss_and_grads(summed, guide, *args)


@pytest.mark.parametrize("vectorize", [True, False], ids=["vec", "seq"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("case", list(CASES))
def test_unbiased_enumerated(case, estimator, vectorize, float64):
    model, summed, guide = CASES[case]
    num_particles = 50 if vectorize else 2
    elbo = TraceARM_ELBO(
        num_particles=num_particles, vectorize_particles=vectorize, estimator=estimator
    )
    num_samples = 4000 if vectorize else 200
    reference = summed_reference(summed)
    data = (torch.tensor(X),)
    assert_unbiased(elbo, model, guide, data, num_samples=num_samples, reference=reference)


@pytest.mark.slow
def test_checker_rejects_sampling_the_enumerated_site(float64):
    """The same check rejects the ELBO whose model samples the global site from its prior."""
    elbo = TraceARM_ELBO(num_particles=50, vectorize_particles=True)
    with pytest.raises(AssertionError, match="loss"):
        assert_unbiased(
            elbo,
            global_mixture,
            plate_guide,
            (torch.tensor(X), None),
            num_samples=4000,
            reference=summed_reference(global_mixture_summed),
        )


@pytest.mark.parametrize("vectorize", [False, True], ids=["seq", "vec"])
def test_signals_stay_plate_local(vectorize):
    """A mixture assignment per datapoint sums out into one term per datapoint, so datapoint
    ``n``'s signal holds datapoint ``n``'s terms; a global enumerated site into one term."""
    for model, expect in [(mixture, (3,)), (global_mixture, ())]:
        pyro.clear_param_store()
        elbo = TraceARM_ELBO(num_particles=2, vectorize_particles=vectorize)
        particle = elbo._particles(model, plate_guide, (torch.tensor(X),), {})[0]
        nodes = particle.model_trace.nodes
        assert not {"c", "g", "x"} & set(nodes), "the contracted sites are replaced"
        terms = [site for name, site in nodes.items() if name.startswith(MARGINAL_PREFIX)]
        assert len(terms) == 1
        plates = {f.name for f in terms[0]["cond_indep_stack"]} - {"num_particles_vectorized"}
        assert plates == ({"data"} if expect else set())
        signal = torch.as_tensor(particle.base_signal("z"))
        assert signal.shape[-1:] == (3,)
        if expect:  # one term per datapoint
            assert terms[0]["log_prob"].shape[-1:] == expect


def subsampled_mixture(data):
    loc = pyro.param("loc", torch.tensor([-1.0, 1.0]))
    with pyro.plate("data", 3, subsample_size=2) as idx:
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(2)))
        c = pyro.sample("c", dist.Categorical(logits=mix_logits()), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(loc[c] + z, 1.0), obs=data[idx])


def subsampled_mixture_summed(data):
    loc = pyro.param("loc", torch.tensor([-1.0, 1.0]))
    with pyro.plate("data", 3, subsample_size=2) as idx:
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(2)))
        log_px = dist.Normal(loc + z.unsqueeze(-1), 1.0).log_prob(data[idx].unsqueeze(-1))
        pyro.factor("x", (mix_logits().log_softmax(-1) + log_px).logsumexp(-1))


def subsampled_guide(data):
    phi = pyro.param("phi", torch.tensor([0.3, -0.2, 0.5]))
    with pyro.plate("data", 3, subsample_size=2) as idx:
        pyro.sample("z", dist.Bernoulli(logits=phi[idx]))


@pytest.mark.parametrize(
    "vectorize, estimator", [(True, "arm"), (False, "disarm")], ids=["vec-arm", "seq-disarm"]
)
def test_unbiased_subsampled_mixture(vectorize, estimator, float64):
    """The subsample scale multiplies the summed-out terms, as in TraceEnum_ELBO."""
    elbo = TraceARM_ELBO(
        num_particles=50 if vectorize else 2, vectorize_particles=vectorize, estimator=estimator
    )
    reference = summed_reference(subsampled_mixture_summed)
    data = (torch.tensor(X),)
    num_samples = 4000 if vectorize else 200
    assert_unbiased(
        elbo,
        subsampled_mixture,
        subsampled_guide,
        data,
        num_samples=num_samples,
        reference=reference,
    )


def test_branches_batch_beside_enumeration():
    """The branches of the chain run as one batched pass, its plate left of the enumeration
    dims, proven equal to the looped branches."""
    elbo = TraceARM_ELBO(num_particles=2)
    model, _, guide = CASES["chain"]
    for _ in range(2):
        elbo.loss_and_grads(model, guide, torch.tensor(X))
    assert batch_dim(elbo.executor, model, guide) is not None, elbo.executor.looped


# ---------------------------------------------------------------------------------------------
# Parallel enumeration in the guide, beside antithetic sites: unbiased against exact references
# (the reference enumerates every guide site, the enumerated ones included)
# ---------------------------------------------------------------------------------------------


def posterior_mixture(data):
    loc = pyro.param("loc", torch.tensor([-1.0, 1.0]))
    with pyro.plate("data", 3):
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(3)))
        c = pyro.sample("c", dist.Categorical(logits=mix_logits()))
        pyro.sample("x", dist.Normal(loc[c] + z, 1.0), obs=data)


def posterior_mixture_guide(data):
    """A Bernoulli site per datapoint, then the assignment enumerated, read from it."""
    phi = pyro.param("phi", torch.tensor([0.3, -0.2, 0.5]))
    psi = pyro.param("psi", torch.tensor([[0.2, -0.4], [0.0, 0.3], [0.5, 0.1]]))
    with pyro.plate("data", 3):
        z = pyro.sample("z", dist.Bernoulli(logits=phi))
        logits = psi + z.unsqueeze(-1) * torch.tensor([0.0, 1.0])
        pyro.sample("c", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})


def shift():
    return torch.tensor([0.0, 0.7])


def both_sides(data):
    """Per datapoint an antithetic site, a score-function site (``infer={"arm": False}``) and a
    site the model enumerates; a global site the guide enumerates."""
    loc = pyro.param("loc", torch.tensor([-1.0, 0.5, 1.0]))
    g = pyro.sample("g", dist.Categorical(logits=torch.tensor([0.1, -0.3, 0.2])))
    with pyro.plate("data", 3):
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(3)))
        s = pyro.sample("s", dist.Bernoulli(logits=torch.full((3,), -0.5)))
        m = pyro.sample("m", dist.Bernoulli(logits=torch.zeros(3)), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(loc[g] + z + 0.5 * s + shift()[m.long()], 1.0), obs=data)


def both_sides_summed(data):
    loc = pyro.param("loc", torch.tensor([-1.0, 0.5, 1.0]))
    g = pyro.sample("g", dist.Categorical(logits=torch.tensor([0.1, -0.3, 0.2])))
    with pyro.plate("data", 3):
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(3)))
        s = pyro.sample("s", dist.Bernoulli(logits=torch.full((3,), -0.5)))
        mean = (loc[g] + z + 0.5 * s).unsqueeze(-1) + shift()
        log_px = dist.Normal(mean, 1.0).log_prob(data.unsqueeze(-1))
        pyro.factor("x", (log_px + math.log(0.5)).logsumexp(-1))


def both_sides_guide(data):
    psi = pyro.param("psi", torch.tensor([0.3, -0.1, 0.2]))
    phi = pyro.param("phi", torch.tensor([0.3, -0.2, 0.5]))
    eta = pyro.param("eta", torch.tensor([-0.4, 0.1, 0.2]))
    with pyro.plate("data", 3):
        z = pyro.sample("z", dist.Bernoulli(logits=phi))
        pyro.sample("s", dist.Bernoulli(logits=eta + 0.5 * z), infer={"arm": False})
    # read from every datapoint's z: their signals are summed over the plate
    pyro.sample("g", dist.Categorical(logits=psi + 0.3 * z.sum()), infer={"enumerate": "parallel"})


def reparameterized_after(data):
    """A global Bernoulli site, a global site enumerated from it, and a reparameterized site
    sampled from the enumerated value (as the SS-VAE's guide samples its latent code)."""
    loc = pyro.param("loc", torch.tensor([-1.0, 1.0]))
    b = pyro.sample("b", dist.Bernoulli(logits=torch.tensor(0.2)))
    c = pyro.sample("c", dist.Categorical(logits=mix_logits()))
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", 3):
        pyro.sample("x", dist.Normal(loc[c] + w + b, 1.0), obs=data)


def reparameterized_after_guide(data):
    phi = pyro.param("phi", torch.tensor(0.3))
    psi = pyro.param("psi", torch.tensor([0.2, -0.4]))
    mu = pyro.param("mu", torch.tensor([0.4, -0.3]))
    b = pyro.sample("b", dist.Bernoulli(logits=phi))
    logits = psi + b.unsqueeze(-1)
    c = pyro.sample("c", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})
    pyro.sample("w", dist.Normal(mu[c], 0.8))


GUIDE_CASES = {
    "posterior": (posterior_mixture, posterior_mixture, posterior_mixture_guide),
    "both_sides": (config_enumerate(both_sides, "parallel"), both_sides_summed, both_sides_guide),
    "reparameterized": (reparameterized_after, reparameterized_after, reparameterized_after_guide),
}


@pytest.mark.parametrize("vectorize", [True, False], ids=["vec", "seq"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("case", list(GUIDE_CASES))
def test_unbiased_enumerated_guide(case, estimator, vectorize, float64):
    model, summed, guide = GUIDE_CASES[case]
    elbo = TraceARM_ELBO(
        num_particles=50 if vectorize else 2, vectorize_particles=vectorize, estimator=estimator
    )
    assert_unbiased(
        elbo,
        model,
        guide,
        (torch.tensor(X),),
        num_samples=4000 if vectorize else 200,
        reference=summed_reference(summed),
    )


@pytest.mark.slow
def test_checker_rejects_weights_without_their_gradient(float64, monkeypatch):
    """The same check rejects the expectation whose guide probabilities carry no gradient."""
    call = Expectation.__call__
    monkeypatch.setattr(
        Expectation, "__call__", lambda self, v, s, grad=True: call(self, v, s, grad=False)
    )
    model, summed, guide = GUIDE_CASES["posterior"]
    elbo = TraceARM_ELBO(num_particles=50, vectorize_particles=True)
    with pytest.raises(AssertionError, match="psi"):
        assert_unbiased(
            elbo,
            model,
            guide,
            (torch.tensor(X),),
            num_samples=4000,
            reference=summed_reference(summed),
        )


def test_enumerated_guide_terms_are_expectations():
    """The enumerated guide site's term is its expected log-density, per datapoint, and the
    ELBO of a run is that of the guide with the site summed out by hand."""
    pyro.clear_param_store()
    data = torch.tensor(X)
    elbo = TraceARM_ELBO(num_particles=1)
    particle = elbo._particles(posterior_mixture, posterior_mixture_guide, (data,), {})[0]
    z = particle.sampler.values["z"]
    log_q = (pyro.param("psi") + z.unsqueeze(-1) * torch.tensor([0.0, 1.0])).log_softmax(-1)
    log_pc = mix_logits().log_softmax(-1)
    loc = pyro.param("loc")
    log_px = dist.Normal(loc + z.unsqueeze(-1), 1.0).log_prob(data.unsqueeze(-1))
    per_point = (log_q.exp() * (log_pc + log_px - log_q)).sum(-1)
    log_pz = dist.Bernoulli(logits=torch.zeros(3)).log_prob(z)
    log_qz = dist.Bernoulli(logits=pyro.param("phi")).log_prob(z)
    expected = (per_point + log_pz - log_qz).sum()
    assert torch.allclose(particle.elbo(), expected.detach(), atol=1e-5)
    c_term = particle.guide_trace.nodes["c"]["log_prob"]
    assert c_term.shape == (3,)
    assert torch.allclose(c_term.detach(), (log_q.exp() * log_q).sum(-1).detach(), atol=1e-6)


@pytest.mark.parametrize("case", ["mixture", "guide"])
def test_first_call_draws_as_later_calls(case):
    """The call that finds the enumeration marks draws the random numbers a later call would."""
    model, guide = {
        "mixture": (mixture, plate_guide),
        "guide": (posterior_mixture, posterior_mixture_guide),
    }[case]
    pyro.clear_param_store()
    elbo, data = TraceARM_ELBO(), torch.tensor(X)
    losses = []
    for _ in range(2):
        pyro.set_rng_seed(3)
        losses.append(elbo.loss(model, guide, data))
    assert losses[0] == losses[1]


def chain_guide_enumerated(data):
    """Three Bernoulli sites, then a global site enumerated from them."""
    phi = pyro.param("phi", torch.tensor([0.3, -0.2, 0.5]))
    psi = pyro.param("psi", torch.tensor([0.2, -0.4]))
    zs = [pyro.sample(f"z_{t}", dist.Bernoulli(logits=phi[t])) for t in range(3)]
    logits = psi + sum(zs).unsqueeze(-1) * torch.tensor([0.0, 0.5])
    pyro.sample("c", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})


def chain_model_enumerated(data):
    loc = pyro.param("loc", torch.tensor([-1.0, 1.0]))
    zs = [pyro.sample(f"z_{t}", dist.Bernoulli(logits=torch.tensor(0.0))) for t in range(3)]
    c = pyro.sample("c", dist.Categorical(logits=mix_logits()))
    with pyro.plate("data", 3):
        pyro.sample("x", dist.Normal(loc[c] + zs[0] + 0.5 * zs[1] - 0.5 * zs[2], 1.0), obs=data)


def test_branches_batch_beside_guide_enumeration(float64):
    """The branches run as one batched pass beside an enumerated guide site, proven equal to the
    looped branches, and unbiased."""
    elbo = TraceARM_ELBO(num_particles=2, estimator="disarm")
    model, guide, data = chain_model_enumerated, chain_guide_enumerated, (torch.tensor(X),)
    pyro.clear_param_store()
    for _ in range(2):
        elbo.loss_and_grads(model, guide, *data)
    assert batch_dim(elbo.executor, model, guide) is not None, elbo.executor.looped
    assert_unbiased(elbo, model, guide, data, num_samples=200)


# ---------------------------------------------------------------------------------------------
# pyro.markov: recycled enumeration dims, told apart by their ids
# ---------------------------------------------------------------------------------------------


def markov_chain(data):
    """``chain`` under ``pyro.markov``, which recycles the enumeration dims of its states."""
    loc = pyro.param("loc", torch.tensor([-0.5, 1.0]))
    s = 0
    for t in pyro.markov(range(len(data))):
        s = pyro.sample(f"s_{t}", dist.Categorical(logits=trans()[s]))
        z = pyro.sample(f"z_{t}", dist.Bernoulli(logits=torch.tensor(0.0)))
        pyro.sample(f"x_{t}", dist.Normal(loc[s] + z, 1.0), obs=data[t])


def no_latent_guide(data):
    pass


def hmm(data):
    loc = pyro.param("loc", torch.tensor([-0.5, 1.0]))
    s = 0
    for t in pyro.markov(range(len(data))):
        s = pyro.sample(f"s_{t}", dist.Categorical(logits=trans()[s]))
        pyro.sample(f"x_{t}", dist.Normal(loc[s], 1.0), obs=data[t])


@pytest.mark.parametrize("vectorize", [False, True], ids=["seq", "vec"])
def test_markov_chain_in_the_model_is_exact(vectorize):
    """A 40-step chain under pyro.markov (its dims recycled, more variables than letters):
    the loss and gradient are TraceEnum_ELBO's."""

    data = torch.linspace(-1.0, 2.0, 40)
    model = config_enumerate(hmm)
    kwargs = dict(num_particles=2, vectorize_particles=True) if vectorize else {}
    results = []
    for elbo in [TraceEnum_ELBO(max_plate_nesting=0, **kwargs), TraceARM_ELBO(**kwargs)]:
        pyro.clear_param_store()
        loss = elbo.loss_and_grads(model, no_latent_guide, data)
        results.append((loss, pyro.param("loc").unconstrained().grad.clone()))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert torch.allclose(results[1][1], results[0][1], rtol=1e-4)


@pytest.mark.parametrize("vectorize", [True, False], ids=["vec", "seq"])
def test_unbiased_markov_chain(vectorize, float64):
    elbo = TraceARM_ELBO(
        num_particles=50 if vectorize else 2, vectorize_particles=vectorize, estimator="disarm"
    )
    assert_unbiased(
        elbo,
        config_enumerate(markov_chain),
        chain_guide,
        (torch.tensor(X),),
        num_samples=4000 if vectorize else 200,
        reference=summed_reference(chain_summed),
    )


def test_guide_enumerated_inside_markov_raises():
    def markov_guide(data):
        s = 0
        for t in pyro.markov(range(len(data))):
            s = pyro.sample(f"s_{t}", dist.Categorical(logits=trans()[s]))

    pyro.clear_param_store()
    with pytest.raises(NotImplementedError, match="At site 's_0'.*pyro.markov"):
        TraceARM_ELBO().loss(hmm, config_enumerate(markov_guide), torch.tensor(X))


# ---------------------------------------------------------------------------------------------
# Masks, Monte Carlo enumeration and enumeration more global in the model than in the guide
# ---------------------------------------------------------------------------------------------


def masked_enumerated_site(data):
    """A site enumerated under poutine.mask: its masked elements contribute nothing."""
    with pyro.plate("data", 3), poutine.mask(mask=torch.tensor([True, True, False])):
        y = pyro.sample("y", dist.Categorical(torch.tensor([0.3, 0.3, 0.4])))
        pyro.sample("x", dist.Bernoulli(torch.tensor([0.2, 0.5, 0.9])[y]), obs=data)


def mask_from_enumerated_value(data):
    """An enumerated value that reaches the likelihood only through a mask."""
    locs = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 10.0]])
    with pyro.plate("data", len(data), dim=-2):
        which = pyro.sample("which", dist.Categorical(logits=torch.tensor([0.0, -1.0, 2.0])))
        with pyro.plate("components", 3, dim=-1) as k:
            with poutine.mask(mask=which == k):
                obs = data.unsqueeze(-2)
                pyro.sample("x", dist.Normal(locs, torch.tensor([2.0, 1.0])).to_event(1), obs=obs)


@pytest.mark.parametrize(
    "model, data",
    [
        (masked_enumerated_site, torch.tensor([0.0, 1.0, 1.0])),
        (mask_from_enumerated_value, torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 3.0]])),
    ],
    ids=["masked_site", "mask_from_value"],
)
def test_masks_as_in_trace_enum_elbo(model, data):
    model = config_enumerate(model)
    expected = TraceEnum_ELBO(max_plate_nesting=2).loss(model, no_latent_guide, data)
    assert TraceARM_ELBO(max_plate_nesting=2).loss(model, no_latent_guide, data) == pytest.approx(
        expected, rel=1e-6
    )


@pytest.mark.parametrize("side", ["model", "guide"])
def test_monte_carlo_enumeration_raises(side):
    infer = {"enumerate": "parallel", "num_samples": 10}

    def model():
        pyro.sample("x", dist.Bernoulli(0.2), infer=infer if side == "model" else {})

    def guide():
        if side == "guide":
            pyro.sample("x", dist.Bernoulli(0.7), infer=infer)

    pyro.clear_param_store()
    with pytest.raises(NotImplementedError, match="At site 'x'.*Monte Carlo enumeration"):
        TraceARM_ELBO(max_plate_nesting=0).loss(model, guide)


def test_model_enumeration_more_global_than_the_guides_raises():
    """A global site summed out in the model whose likelihood reads a site the guide enumerates
    per datapoint (TraceEnum_ELBO refuses it too)."""

    @config_enumerate
    def model():
        a = pyro.sample("a", dist.Categorical(torch.tensor([0.45, 0.55])))
        with pyro.plate("b_axis", 2):
            b = pyro.sample("b", dist.Categorical(torch.tensor([0.6, 0.4])))
            pyro.sample("c", dist.Normal(a + b, 1.0), obs=torch.tensor([1.0, 2.0]))

    @config_enumerate
    def guide():
        with pyro.plate("b_axis", 2):
            pyro.sample("b", dist.Categorical(torch.tensor([0.8, 0.2])))

    pyro.clear_param_store()
    with pytest.raises(NotImplementedError, match="no more global than guide enumeration"):
        TraceARM_ELBO(max_plate_nesting=1).loss(model, guide)
