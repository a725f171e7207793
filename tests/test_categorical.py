# SPDX-License-Identifier: Apache-2.0
"""
Categorical and OneHotCategorical guide sites (pyro_arm/categorical.py, pyro_arm/families.py):
the stick-breaking marginals and the pair weights against their definitions, unbiasedness
against exact enumeration (coupled pair, CARMS, RLOO; sequential and vectorized), power checks
(no weight, a clipped weight, the explicit log q term kept), and for two classes the identity
with DisARM on the equivalent Bernoulli. Everything runs in float64.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_arm import IWELBO, TraceARM_ELBO, categorical, families
from pyro_arm.multisample import arms_uniforms
from tests import categorical_models
from tests.exact import assert_unbiased, draw_estimates
from tests.iw_exact import exact_iw_loss_and_grads

pytestmark = pytest.mark.usefixtures("float64")


def test_stick_breaking_marginals_are_the_categorical():
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-4.0, 1.0, 1.0, 0.5]])
    order, eta = categorical.stick_breaking(logits)
    p = torch.sigmoid(eta)
    stay = torch.cat([torch.ones(3, 1), (1 - p).cumprod(-1)], -1)
    sorted_q = stay * torch.cat([p, torch.ones(3, 1)], -1)
    q = torch.zeros_like(sorted_q).scatter(-1, order, sorted_q)
    assert torch.allclose(q, logits.softmax(-1))
    assert (p[..., :-1] <= 1 / 3 + 1e-12).all()  # sorted ascending


@pytest.mark.parametrize("m", [2, 3, 4])
def test_pair_weights_are_the_density_ratio(m):
    """E[w(z_j, z_k) 1[z_j = r, z_k = s]] = q(r) q(s) for r != s, by Monte Carlo."""
    torch.manual_seed(0)
    logits = torch.tensor([0.3, -1.2, 2.0, 0.0])
    order, eta = categorical.stick_breaking(logits)
    num = 200_000
    u = arms_uniforms(m, (num, 3)) if m > 2 else None
    if u is None:
        u = torch.rand(num, 3)
        u = torch.stack([u, 1 - u])
    r = categorical.positions(u, eta)
    w = categorical.pair_weights(r[:2], eta)[0, 1]  # members 0 and 1
    rj, rk = r[0], r[1]
    q_sorted = logits.softmax(-1)[order]
    for a in range(4):
        for b in range(4):
            if a == b:
                continue
            hits = w * ((rj == a) & (rk == b))
            mean, se = hits.mean(), hits.std() / math.sqrt(num)
            assert abs(mean - q_sorted[a] * q_sorted[b]) < 5 * se + 1e-4, (a, b, mean)


def test_pair_weight_for_two_classes_is_disarm():
    eta = torch.tensor([[-0.7], [0.0], [-3.0]])
    r = torch.tensor([[0, 0, 1], [1, 1, 0]])
    w = categorical.pair_weights(r, eta)[0, 1]
    assert torch.allclose(w, torch.sigmoid(eta.abs()).squeeze(-1))


def _elbo(estimator, vectorize, n=None):
    particles = 100 if vectorize else 1
    elbo = TraceARM_ELBO(
        estimator=estimator, num_samples=n, vectorize_particles=vectorize, num_particles=particles
    )
    return elbo, (6000 if vectorize else 300)


ESTIMATORS = [("disarm", None), ("arm", None), ("arms", 3), ("rloo", 3)]
FAST = {
    ("amortized", "disarm", "vec"),
    ("one_hot_probs", "arms", "vec"),
    ("amortized", "disarm", "seq"),
}


def _params():
    cases = []
    for case in categorical_models.CASES:
        for estimator, n in ESTIMATORS:
            for mode in ("vec", "seq"):
                marks = () if (case, estimator, mode) in FAST else (pytest.mark.slow,)
                cases.append(pytest.param(case, estimator, n, mode, marks=marks))
    return cases


@pytest.mark.parametrize("case, estimator, n, mode", _params())
def test_unbiased(case, estimator, n, mode):
    model, guide, args = categorical_models.CASES[case]()
    elbo, num_samples = _elbo(estimator, mode == "vec", n)
    assert_unbiased(elbo, model, guide, args, num_samples=num_samples, seed=0)


def test_sites_get_members():
    """Categorical sites have members under the coupled estimators, none under RLOO and AR
    or when they opt out."""
    from pyro_arm.sampler import SampleMessenger

    model, guide, args = categorical_models.beside_bernoulli()
    for name, expected in [("disarm", {"c", "z"}), ("arms", {"c", "z"}), ("rloo", set())]:
        sampler = SampleMessenger(TraceARM_ELBO(estimator=name).estimator, 3)
        sampler(guide)(*args)
        assert set(sampler.samples) == expected, name
    sampler = SampleMessenger(TraceARM_ELBO(estimator="ar").estimator)
    sampler(guide)(*args)
    assert set(sampler.samples) == {"z"}

    def opted_out(data):
        cl = pyro.param("cl")
        with pyro.plate("data", 2):
            pyro.sample("c", dist.Categorical(logits=cl), infer={"arm": False})

    sampler = SampleMessenger(TraceARM_ELBO(estimator="disarm").estimator)
    sampler(opted_out)(*args)
    assert not sampler.samples


# ---------------------------------------------------------------------------------------------
# Power checks: the same test rejects wrong estimators.


def _check_amortized(n_calls=6000):
    model, guide, args = categorical_models.amortized()
    elbo = TraceARM_ELBO(estimator="disarm", vectorize_particles=True, num_particles=100)
    assert_unbiased(elbo, model, guide, args, num_samples=n_calls, seed=0)


def test_checker_rejects_coupled_pair_without_weight(monkeypatch):
    _check_amortized()
    monkeypatch.setattr(categorical, "pair_log_weights", lambda eta, m: torch.zeros_like(eta))
    with pytest.raises(AssertionError, match="biased components"):
        _check_amortized()


def test_checker_rejects_clipped_weight(monkeypatch):
    """The pair's weights lie in [1/2, 4/3] here, so the reference's clip to [0.01, 10] never
    binds; a clip that binds (at 0.6) is rejected."""
    original = categorical.pair_log_weights

    def clipped(eta, m):
        return original(eta, m).clamp(max=math.log(0.6))

    monkeypatch.setattr(categorical, "pair_log_weights", clipped)
    with pytest.raises(AssertionError, match="biased components"):
        _check_amortized()


def _two_class_sites(kind: str, logit: float = 0.0):
    """One variable per datapoint, two classes: a Bernoulli with logits ``phi``, or a
    Categorical with logits ``(0, phi)``; the same model in the class (or value) 1."""
    data = torch.tensor([1.0, 0.0, 1.0])

    def value(z):
        return z.to(data.dtype) if kind == "categorical" else z

    def model(data):
        with pyro.plate("data", 3):
            z = pyro.sample("z", _site(kind, torch.tensor([0.2, -0.4, 0.0])))
            pyro.sample("x", dist.Normal(3.0 * value(z) - 1.0, 1.0), obs=data)

    def guide(data):
        phi = pyro.param("phi", torch.tensor([logit, logit + 0.5, logit - 0.3]))
        with pyro.plate("data", 3):
            pyro.sample("z", _site(kind, phi))

    return model, guide, (data,)


def _site(kind, phi):
    if kind == "bernoulli":
        return dist.Bernoulli(logits=phi)
    return dist.Categorical(logits=torch.stack([torch.zeros_like(phi), phi], -1))


def _grads(kind, estimator="disarm", calls=400, seed=0, n=None, **kwargs):
    model, guide, args = _two_class_sites(kind)
    pyro.clear_param_store()
    elbo = TraceARM_ELBO(estimator=estimator, num_samples=n, **kwargs)
    guide(*args)  # creates the param
    pyro.set_rng_seed(seed)
    _, samples = draw_estimates(elbo, model, guide, args, {}, calls, names=["phi"])
    return samples[:, 1:]


@pytest.mark.parametrize("vectorize", [False, True], ids=["seq", "vec"])
def test_two_classes_is_disarm_on_the_bernoulli(vectorize):
    """With the same random numbers, the Categorical site's gradient is DisARM's on the
    Bernoulli, call by call (the pair is the same, its members swapped where phi > 0)."""
    kwargs = dict(vectorize_particles=vectorize, num_particles=4 if vectorize else 1)
    bernoulli = _grads("bernoulli", calls=50, **kwargs)
    cat = _grads("categorical", calls=50, **kwargs)
    assert bernoulli.abs().sum() > 0
    assert torch.allclose(cat, bernoulli, atol=1e-10)


VECTORIZED = dict(vectorize_particles=True, num_particles=20)


@pytest.mark.slow
def test_two_classes_variance_below_rloo():
    """Near logit 0 the coupled pair has at most half the variance of RLOO with two samples
    (measured: about 0.2), and the variance of DisARM on the Bernoulli."""
    pair = _grads("categorical", calls=1500, **VECTORIZED).var(0).sum()
    rloo = _grads("categorical", "rloo", calls=300, n=2, **VECTORIZED).var(0).sum()
    bernoulli = _grads("bernoulli", calls=1500, seed=1, **VECTORIZED).var(0).sum()
    print(f"two classes, variance coupled pair / DisARM on the Bernoulli: {pair / bernoulli:.3f}")
    print(f"two classes, variance coupled pair / RLOO-2: {pair / rloo:.3f}")
    assert pair <= 0.5 * rloo
    assert 0.8 <= pair / bernoulli <= 1.25


def test_checker_rejects_explicit_log_q_kept(monkeypatch):
    """Keeping the explicit gradient of -log q(z) at the site leaves the mean but adds variance
    (two classes: more than 1.5x here)."""
    lean = _grads("categorical", calls=300, **VECTORIZED).var(0).sum()
    surrogate = families.CategoricalFamily.surrogate

    def with_log_q(self, estimator, f, sample):
        index = sample.z[0]
        log_q = sample.logits.expand(index.shape + sample.logits.shape[-1:])
        log_q = log_q.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return surrogate(self, estimator, f, sample) - log_q.sum()

    monkeypatch.setattr(families.CategoricalFamily, "surrogate", with_log_q)
    kept = _grads("categorical", calls=300, **VECTORIZED).var(0).sum()
    print(f"two classes, variance with the explicit term / without: {kept / lean:.3f}")
    assert kept > 1.5 * lean


# ---------------------------------------------------------------------------------------------
# IWELBO: the local coupled pair inside the bound.


@pytest.mark.parametrize(
    "case, vectorize",
    [
        ("amortized", True),
        pytest.param("amortized", False, marks=pytest.mark.slow),
        pytest.param("beside_bernoulli", True, marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("estimator", ["disarm", pytest.param("arms", marks=pytest.mark.slow)])
def test_iwelbo_unbiased(case, vectorize, estimator):
    model, guide, args = categorical_models.CASES[case]()
    K = 2
    elbo = IWELBO(
        num_samples=K,
        estimator=estimator,
        num_particles=100 if vectorize else 1,
        vectorize_particles=vectorize,
    )

    def reference(model, guide, *args, **kwargs):
        return exact_iw_loss_and_grads(model, guide, K, *args, **kwargs)

    assert_unbiased(
        elbo,
        model,
        guide,
        args,
        num_samples=6000 if vectorize else 300,
        seed=0,
        reference=reference,
    )


# ---------------------------------------------------------------------------------------------
# The engine's checks and low precision apply to categorical sites as to Bernoulli sites.


@pytest.mark.parametrize("vectorize", [False, True], ids=["seq", "vec"])
def test_nan_logits_name_the_site(vectorize):
    model, guide, args = categorical_models.amortized()
    guide(*args)
    pyro.param("b").data[1] = float("nan")
    elbo = TraceARM_ELBO(estimator="disarm", vectorize_particles=vectorize, num_particles=2)
    with pyro.validation_enabled(False), pytest.raises(ValueError, match="site 'c'.*NaN"):
        elbo.loss_and_grads(model, guide, *args)


def test_low_precision_logits():
    """bfloat16 logits: members drawn in float32, finite gradients of the logits' dtype."""

    def guide():
        phi = pyro.param("phi", torch.zeros(4, 3, dtype=torch.bfloat16))
        with pyro.plate("data", 4):
            pyro.sample("c", dist.OneHotCategorical(logits=phi))

    def model_one_hot():
        with pyro.plate("data", 4):
            c = pyro.sample("c", dist.OneHotCategorical(logits=torch.zeros(3)))
            value = (c.double() * torch.arange(3.0, dtype=torch.float64)).sum(-1)
            pyro.sample("x", dist.Normal(value, 1.0), obs=torch.ones(4, dtype=torch.float64))

    elbo = TraceARM_ELBO(estimator="disarm", vectorize_particles=True, num_particles=8)
    elbo.loss_and_grads(model_one_hot, guide)
    grad = pyro.param("phi").unconstrained().grad
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()
