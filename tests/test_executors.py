# SPDX-License-Identifier: Apache-2.0
"""
The default mode's choice of executor (:mod:`pyro_arm.executors`): models that read a sampled
value into Python, in every way that does not raise on a batched tensor, get unbiased gradients
from every estimator, on the first call and on every later one, also where the read starts only
after some calls; a build that batches regardless is biased on the same test.
"""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_arm import TraceARM_ELBO, executors
from pyro_arm.reads import ReadGuard, SampledValueRead
from tests.exact import assert_unbiased

pytestmark = pytest.mark.usefixtures("float64")

#: Ways of reading "does z hold a one?" into Python; each is the sign of the likelihood.
READS = {
    "bool": lambda z: bool(z.any()),
    "all": lambda z: not bool((z < 0.5).all()),
    "if": lambda z: True if z.sum() > 0 else False,
    "item": lambda z: z.sum().item() > 0,
    "int": lambda z: int(z.sum()) > 0,
    "float": lambda z: float(z.max()) > 0,
    "tolist": lambda z: 1.0 in z.tolist(),
    "numpy": lambda z: bool(z.numpy().any()),
    "equal": lambda z: not torch.equal(z, torch.zeros(2, dtype=z.dtype)),
}

ESTIMATORS = {
    "arm": dict(estimator="arm"),
    "disarm": dict(estimator="disarm"),
    "ar": dict(estimator="ar"),
    "rloo": dict(estimator="rloo", num_samples=3),
    "arms": dict(estimator="arms", num_samples=3),
}


def reading(read: str, score_site: bool = False, after: int = 0):
    """
    Three guide sites after ``z1``; the likelihood's sign is whether ``z1`` holds a one, read
    into Python by ``READS[read]`` from the ``after``-th run of the model on (before that, the
    same sign is computed with tensor ops that broadcast). With ``score_site`` the last site is
    a Categorical (a score-function site beside the antithetic ones).
    """
    runs = [0]

    def sign(z1):
        runs[0] += 1
        if runs[0] <= after:
            return torch.where(z1.any(-1), 1.0, -1.0)
        return 1.0 if READS[read](z1) else -1.0

    def model():
        z1 = pyro.sample("z1", dist.Bernoulli(logits=torch.zeros(2)).to_event(1))
        z2 = pyro.sample("z2", dist.Bernoulli(logits=z1.sum(-1) - 0.5))
        if score_site:
            z3 = pyro.sample("z3", dist.Categorical(logits=torch.zeros(3))).to(z1.dtype)
        else:
            z3 = pyro.sample("z3", dist.Bernoulli(logits=torch.tensor(0.2)))
        loc = sign(z1) * (z1.sum(-1) + 2.0 * z2 - z3)
        pyro.sample("x", dist.Normal(loc, 1.0), obs=torch.tensor(1.5))

    def guide():
        phi = pyro.param("phi", torch.tensor([0.4, -0.3]))
        psi = pyro.param("psi", torch.tensor(0.1))
        z1 = pyro.sample("z1", dist.Bernoulli(logits=phi).to_event(1))
        pyro.sample("z2", dist.Bernoulli(logits=psi + z1.sum(-1) - 1.0))
        if score_site:
            chi = pyro.param("chi", torch.tensor([0.3, -0.2, 0.1]))
            pyro.sample("z3", dist.Categorical(logits=chi))
        else:
            pyro.sample("z3", dist.Bernoulli(logits=pyro.param("chi", torch.tensor(-0.2))))

    return model, guide, ()


@pytest.fixture
def calls():
    """Calls of the ELBO per check (the power check rejects batching regardless at this size)."""
    return NUM_CALLS


def check(read, options, num_samples, score_site=False, after=0):
    model, guide, args = reading(read, score_site, after)
    elbo = TraceARM_ELBO(**options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert_unbiased(elbo, model, guide, args, num_samples=num_samples, seed=1)
    return elbo, model, guide


#: The case of the fast tier.
FAST = {("equal", "disarm")}

#: Calls of the ELBO per check.
NUM_CALLS = 1000


def _grid():
    """Every read with every estimator; the fast tier keeps :data:`FAST`."""
    for read in READS:
        for estimator in ESTIMATORS:
            marks = () if (read, estimator) in FAST else pytest.mark.slow
            yield pytest.param(read, estimator, marks=marks, id=f"{read}-{estimator}")


@pytest.mark.parametrize("read, estimator", list(_grid()))
def test_reads_unbiased(read, estimator, calls):
    elbo, model, guide = check(read, ESTIMATORS[estimator], calls)
    if estimator != "ar":
        assert (model, guide) in elbo.executor.looped


@pytest.mark.parametrize(
    "read, estimator",
    [
        pytest.param("equal", "disarm", marks=pytest.mark.slow),
        pytest.param("equal", "arm", marks=pytest.mark.slow),
        pytest.param("equal", "ar", marks=pytest.mark.slow),
        pytest.param("numpy", "rloo", marks=pytest.mark.slow),
        pytest.param("numpy", "arms", marks=pytest.mark.slow),
        pytest.param("item", "disarm", marks=pytest.mark.slow),
    ],
)
def test_reads_beside_score_site_unbiased(read, estimator, calls):
    check(read, ESTIMATORS[estimator], calls, score_site=True)


@pytest.mark.parametrize(
    "read, estimator",
    [
        ("bool", "disarm"),
        pytest.param("equal", "disarm", marks=pytest.mark.slow),
        pytest.param("bool", "rloo", marks=pytest.mark.slow),
        pytest.param("equal", "arms", marks=pytest.mark.slow),
    ],
)
def test_read_starting_after_some_calls_unbiased(read, estimator, calls):
    """The first calls read nothing (and are batched); the read starts later."""
    elbo, model, guide = check(read, ESTIMATORS[estimator], calls, after=200)
    assert (model, guide) in elbo.executor.looped


def test_broadcasting_model_is_batched():
    """The same model without the read: proven once, then every call is one batched pass."""
    model, guide, args = reading("bool", after=10**9)
    elbo = TraceARM_ELBO(estimator="disarm")
    for _ in range(3):
        elbo.loss_and_grads(model, guide, *args)
    assert executors.batch_dim(elbo.executor, model, guide) == -1
    assert len(elbo.executor.proven[(model, guide)]) == 1


@pytest.mark.parametrize("estimator", ["disarm", pytest.param("arms", marks=pytest.mark.slow)])
def test_checker_rejects_batching_regardless(estimator, monkeypatch, calls):
    """Power: a build that batches whatever the model reads is biased on the same test."""
    monkeypatch.setattr(executors, "ReadGuard", _Blind)
    monkeypatch.setattr(executors.Particle, "differs_from", lambda self, other: False)
    with pytest.raises(AssertionError, match="biased components"):
        check("bool", ESTIMATORS[estimator], calls)


class _Blind(ReadGuard):
    """A guard that sees no read."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_guard_flags_reads_of_sampled_values_only():
    def model():
        data = torch.tensor([1.0, 2.0])
        assert data.max().item() == 2.0  # a read of data: allowed
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(2)).to_event(1))
        _ = z.shape, z.dim(), len(z), z.numel(), z.dtype  # metadata: allowed
        (z + data).tolist()

    with pytest.raises(SampledValueRead, match="tolist.*after site 'z'"):
        with ReadGuard():
            model()


@pytest.mark.parametrize(
    "read",
    [
        lambda z: z.nonzero(),
        lambda z: z[z > 0],
        lambda z: z.unique(),
        lambda z: torch.where(z > 0),
        lambda z: z.masked_select(z > 0),
    ],
    ids=["nonzero", "mask", "unique", "where", "masked_select"],
)
def test_guard_flags_value_dependent_shapes(read):
    with pytest.raises(SampledValueRead):
        with ReadGuard():
            read(pyro.sample("z", dist.Bernoulli(logits=torch.zeros(3)).to_event(1)))


def test_guard_follows_in_place_writes():
    with pytest.raises(SampledValueRead):
        with ReadGuard():
            z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(3)).to_event(1))
            buffer = torch.zeros(3)
            buffer[0] = z[1]
            buffer.tolist()


def test_guard_fingerprint_tells_code_paths_apart():
    def run(path):
        guard = ReadGuard()
        with guard:
            z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(2, 3)).to_event(2))
            z.sum() if path else z.sum(-1)
        return guard.fingerprint

    assert run(True) == run(True) != run(False)


def agreeing_read_model():
    """A model that reads its sampled values into Python, the same for every particle and
    branch (as Pyro's ``obs_mask`` test asserts on them)."""
    z1 = pyro.sample("z1", dist.Bernoulli(logits=torch.zeros(2)).to_event(1))
    z2 = pyro.sample("z2", dist.Bernoulli(logits=z1.sum(-1) - 0.5))
    assert ((z2 == 0) | (z2 == 1)).all()
    pyro.sample("x", dist.Normal(z1.sum(-1) + 2.0 * z2, 1.0), obs=torch.tensor(1.5))


def agreeing_read_guide():
    phi = pyro.param("phi", torch.tensor([0.4, -0.3]))
    z1 = pyro.sample("z1", dist.Bernoulli(logits=phi).to_event(1))
    pyro.sample("z2", dist.Bernoulli(logits=z1.sum(-1) - 1.0))


def test_vectorized_read_runs_branches_one_by_one(float64):
    """With vectorize_particles=True a read sees every particle at once, as in Pyro's vectorized
    ELBOs; the branches, whose batched pass reads, run one by one and stay unbiased."""
    elbo = TraceARM_ELBO(estimator="disarm", num_particles=10, vectorize_particles=True)
    model, guide = agreeing_read_model, agreeing_read_guide
    assert_unbiased(elbo, model, guide, num_samples=1000)
    assert "read" in elbo.executor.looped[(model, guide)]


def test_guard_allows_validation_of_distributions():
    """Argument and sample checks of torch.distributions read values only to raise."""
    pyro.enable_validation(True)
    with ReadGuard():
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(3)).to_event(1))
        dist.Normal(z, 1.0).log_prob(torch.ones(3))
        dist.Bernoulli(logits=2 * z - 1).log_prob(z)


def global_sites_guide(data):
    phi = pyro.param("phi", torch.tensor([0.3, -0.2, 0.5]))
    for t in range(3):
        pyro.sample(f"z_{t}", dist.Bernoulli(logits=phi[t]))


def global_sites_model(data):
    zs = [pyro.sample(f"z_{t}", dist.Bernoulli(logits=torch.tensor(0.0))) for t in range(3)]
    with pyro.plate("data", 3):
        pyro.sample("x", dist.Normal(zs[0] + 0.5 * zs[1] - 0.5 * zs[2], 1.0), obs=data)


def test_global_sites_beside_a_data_plate_batch():
    """Global sites' signals, summed over a data plate, keep its singleton dim in a batched pass
    and not in a looped one: the proof compares them as equal."""
    elbo = TraceARM_ELBO(num_particles=2, estimator="disarm")
    data = torch.tensor([0.3, 1.7, -0.5])
    for _ in range(2):
        elbo.loss_and_grads(global_sites_model, global_sites_guide, data)
    dim = executors.batch_dim(elbo.executor, global_sites_model, global_sites_guide)
    assert dim is not None, elbo.executor.looped
