# SPDX-License-Identifier: Apache-2.0
"""
Enumeration: model sites marked for parallel enumeration are summed out, unbiased against
references summed out by hand, for every estimator, sequential and vectorized; every other
site marked for enumeration raises NotImplementedError naming it (never sampled silently).
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import config_enumerate

from pyro_arm import IWELBO, TraceARM_ELBO
from pyro_arm.enum import MARGINAL_PREFIX
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


@pytest.mark.parametrize("mode", MODES, ids=["seq", "vec"])
@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_enumerated_guide_site_raises(kind, mode):
    def enum_guide(data):
        phi = pyro.param("phi", torch.zeros(2))
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Bernoulli(logits=phi), infer={"enumerate": kind})
            pyro.sample("c", dist.Bernoulli(logits=phi))

    def model(data):
        mixture_model(data, kind=None)

    pyro.clear_param_store()
    raises_at("z", TraceARM_ELBO(**mode), "loss_and_grads", model, enum_guide, DATA)


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
@pytest.mark.parametrize("vectorize", [False, True], ids=["seq", "vec"])
def test_iwelbo_enumerated_site_raises(vectorize, kind):
    elbo = IWELBO(num_samples=2, vectorize_particles=vectorize, max_plate_nesting=1)
    pyro.clear_param_store()
    raises_at("c", elbo, "loss_and_grads", mixture_model, guide, DATA, kind)


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
