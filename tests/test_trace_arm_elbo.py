# SPDX-License-Identifier: Apache-2.0
"""
Unbiasedness of TraceARM_ELBO against exact gradients (enumeration, see tests/exact.py) on tiny
models covering the structures of docs/arm-in-pyro.md, for every estimator, sequential and
vectorized, one and several particles. Everything runs in float64.
"""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceGraph_ELBO
from torch.distributions import constraints

from pyro_arm import TraceARM_ELBO
from pyro_arm.estimators import ESTIMATORS, Estimator, arm, disarm
from tests.exact import assert_unbiased, exact_loss_and_grads

pytestmark = pytest.mark.usefixtures("float64")


def t(*values):
    return torch.tensor(values, dtype=torch.get_default_dtype())


# ---------------------------------------------------------------------------------------------
# Tiny models (<= 8 binary components). Each returns (model, guide, args).
# ---------------------------------------------------------------------------------------------


def one_layer():
    """One Bernoulli vector site in a data plate, learnable prior logits in the model."""
    data = t([1.0, 0.0, 1.0], [0.0, 0.0, 1.0])

    def model(data):
        prior = pyro.param("prior", t(0.3, -0.5, 0.8))
        w = pyro.param("w", t(1.5))
        with pyro.plate("data", 2):
            z = pyro.sample("z", dist.Bernoulli(logits=prior).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=w * (2 * z - 1) + 0.3).to_event(1), obs=data)

    def guide(data):
        phi = pyro.param("phi", t([0.2, -0.4, 1.0], [0.5, 0.1, -0.9]))
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Bernoulli(logits=phi).to_event(1))

    return model, guide, (data,)


def two_layer():
    """Two dependent layers per datapoint: model z2 -> z1 -> x, guide x -> z1 -> z2."""
    data = t([1.0, 0.0], [0.0, 1.0])

    def model(data):
        with pyro.plate("data", 2):
            z2 = pyro.sample("z2", dist.Bernoulli(logits=t(0.4, -0.3)).to_event(1))
            z1 = pyro.sample(
                "z1", dist.Bernoulli(logits=z2 @ t([1.2, -0.8], [0.5, 1.0]) - 0.2).to_event(1)
            )
            pyro.sample("x", dist.Bernoulli(logits=2.0 * z1 - 1.0).to_event(1), obs=data)

    def guide(data):
        a = pyro.param("a", t([0.7, -1.1], [0.4, 0.9]))
        b = pyro.param("b", t([1.3, -0.6], [-0.5, 0.8]))
        c = pyro.param("c", t(-0.2, 0.3))
        with pyro.plate("data", 2):
            z1 = pyro.sample("z1", dist.Bernoulli(logits=data @ a - 0.3).to_event(1))
            pyro.sample("z2", dist.Bernoulli(logits=z1 @ b + c).to_event(1))

    return model, guide, (data,)


def three_layer():
    """Three dependent layers, one datapoint (6 bits)."""
    data = t(1.0, 0.0, 1.0)

    def model(data):
        z3 = pyro.sample("z3", dist.Bernoulli(logits=t(0.2, -0.4)).to_event(1))
        z2 = pyro.sample("z2", dist.Bernoulli(logits=z3 @ t([1.0, -1.0], [0.5, 0.7])).to_event(1))
        z1 = pyro.sample("z1", dist.Bernoulli(logits=z2 @ t([0.9, 0.3], [-1.2, 0.6])).to_event(1))
        pyro.sample(
            "x",
            dist.Bernoulli(logits=z1 @ t([1.5, -1.0, 0.5], [-0.7, 1.0, 1.1])).to_event(1),
            obs=data,
        )

    def guide(data):
        a = pyro.param("a", t([0.8, -0.5], [0.2, 0.6], [-0.9, 0.4]))
        b = pyro.param("b", t([1.1, -0.4], [0.3, 0.9]))
        c = pyro.param("c", t([-0.6, 1.0], [0.8, -0.3]))
        d = pyro.param("d", t(0.1, -0.2))
        z1 = pyro.sample("z1", dist.Bernoulli(logits=data @ a).to_event(1))
        z2 = pyro.sample("z2", dist.Bernoulli(logits=z1 @ b + d).to_event(1))
        pyro.sample("z3", dist.Bernoulli(logits=z2 @ c).to_event(1))

    return model, guide, (data,)


def global_then_local():
    """A global Bernoulli sampled first, local ones in a plate depending on it."""
    data = t(1.0, 0.0, 1.0)

    def model(data):
        g = pyro.sample("g", dist.Bernoulli(logits=t(0.3)))
        with pyro.plate("data", 3):
            z = pyro.sample("z", dist.Bernoulli(logits=1.5 * g - 0.5))
            pyro.sample("x", dist.Bernoulli(logits=2.0 * z - 1.0 + 0.5 * g), obs=data)

    def guide(data):
        a = pyro.param("a", t(-0.4))
        b = pyro.param("b", t(0.9, -0.7, 0.4))
        c = pyro.param("c", t(1.2))
        g = pyro.sample("g", dist.Bernoulli(logits=a))
        with pyro.plate("data", 3):
            pyro.sample("z", dist.Bernoulli(logits=b + c * g))

    return model, guide, (data,)


def local_then_global():
    """
    Local sites sampled BEFORE a global guide site that depends on all of them: the "later
    guide site outside the plate" case where plate-local signals (Pyro's Trace_ELBO) are biased.
    """
    data = t(1.0, 0.0, 1.0)

    def model(data):
        g = pyro.sample("g", dist.Bernoulli(logits=t(0.0)))
        with pyro.plate("data", 3):
            z = pyro.sample("z", dist.Bernoulli(logits=3.0 * g - 1.5))
            pyro.sample("x", dist.Bernoulli(logits=4.0 * z - 2.0), obs=data)

    def guide(data):
        b = pyro.param("b", t(0.5, -0.5, 0.3))
        a = pyro.param("a", t(2.0))
        with pyro.plate("data", 3):
            z = pyro.sample("z", dist.Bernoulli(logits=b))
        pyro.sample("g", dist.Bernoulli(logits=a * (z.sum(-1, keepdim=True) - 1.5)))

    return model, guide, (data,)


def nested_plates():
    """A site in an outer plate and a site in outer x inner plates depending on it."""
    data = t([1.0, 0.0], [0.0, 0.0])

    def model(data):
        with pyro.plate("outer", 2, dim=-2):
            w = pyro.sample("w", dist.Bernoulli(logits=t(0.2)))
            with pyro.plate("inner", 2, dim=-1):
                z = pyro.sample("z", dist.Bernoulli(logits=w - 0.5))
                pyro.sample("x", dist.Bernoulli(logits=2.0 * z - 1.0 + w), obs=data)

    def guide(data):
        a = pyro.param("a", t([0.6], [-0.8]))
        b = pyro.param("b", t([0.3, -0.4], [1.0, 0.2]))
        c = pyro.param("c", t(1.1))
        with pyro.plate("outer", 2, dim=-2):
            w = pyro.sample("w", dist.Bernoulli(logits=a))
            with pyro.plate("inner", 2, dim=-1):
                pyro.sample("z", dist.Bernoulli(logits=b + c * w))

    return model, guide, (data,)


def sequential_plates():
    """
    A sequential plate (a Python loop over ``pyro.plate``) holding a vectorized plate, then a
    global site after the loop that depends on every local value.
    """
    data = t([1.0, 0.0], [0.0, 1.0])

    def model(data):
        total = 0.0
        for i in pyro.plate("groups", 2):
            with pyro.plate(f"items_{i}", 2):
                z = pyro.sample(f"z_{i}", dist.Bernoulli(logits=t(0.2 - i)))
                pyro.sample(f"x_{i}", dist.Bernoulli(logits=2.0 * z - 1.0), obs=data[i])
                total = total + z.sum(-1, keepdim=True)
        pyro.sample("g", dist.Bernoulli(logits=total - 1.0))

    def guide(data):
        a = pyro.param("a", t([0.4, -0.3], [0.1, 0.7]))
        c = pyro.param("c", t(0.5))
        total = 0.0
        for i in pyro.plate("groups", 2):
            with pyro.plate(f"items_{i}", 2):
                z = pyro.sample(f"z_{i}", dist.Bernoulli(logits=a[i]))
                total = total + z.sum(-1, keepdim=True)
        pyro.sample("g", dist.Bernoulli(logits=c * total - 0.5))

    return model, guide, (data,)


def subsampled():
    """
    A plate of 4 with a random subsample_size 2 and two local layers per datapoint: the branch
    runs must reuse the base run's subsample (a fixed subsample= would hide that bug).
    """
    data = t(1.0, 0.0, 1.0, 1.0)

    def model(data):
        with pyro.plate("data", 4, subsample_size=2) as ind:
            z1 = pyro.sample("z1", dist.Bernoulli(logits=t(0.3)))
            z2 = pyro.sample("z2", dist.Bernoulli(logits=2.0 * z1 - 1.0))
            pyro.sample("x", dist.Bernoulli(logits=3.0 * z2 - 1.5 + z1), obs=data[ind])

    def guide(data):
        a = pyro.param("a", t(1.0, -0.8, 0.4, 1.5))
        b = pyro.param("b", t(-0.5, 0.7, 0.2, -1.0))
        with pyro.plate("data", 4, subsample_size=2) as ind:
            z1 = pyro.sample("z1", dist.Bernoulli(logits=a[ind]))
            pyro.sample("z2", dist.Bernoulli(logits=b[ind] + 1.2 * z1))

    return model, guide, (data,)


def masked_scaled():
    """poutine.mask, Distribution.mask (model and guide) and poutine.scale."""
    data = t(1.0, 0.0, 1.0)
    m1 = torch.tensor([True, True, False])
    m2 = torch.tensor([True, False, True])

    def model(data):
        with poutine.scale(scale=2.5), pyro.plate("data", 3):
            with poutine.mask(mask=m1):
                z = pyro.sample("z", dist.Bernoulli(logits=t(0.4)))
            y = pyro.sample("y", dist.Bernoulli(logits=z - 0.5).mask(m2))
            pyro.sample("x", dist.Bernoulli(logits=2.0 * y - 1.0 + z), obs=data)

    def guide(data):
        a = pyro.param("a", t(0.7, -0.9, 0.3))
        b = pyro.param("b", t(-0.4, 0.8, 1.1))
        with poutine.scale(scale=2.5), pyro.plate("data", 3):
            z = pyro.sample("z", dist.Bernoulli(logits=a).mask(m2))
            with poutine.mask(mask=m1):
                pyro.sample("y", dist.Bernoulli(logits=b + z))

    return model, guide, (data,)


def probs_expand_to_event():
    """probs= (the ARM gradient is with respect to the logits), .expand and .to_event."""
    data = t([1.0, 0.0, 1.0], [0.0, 1.0, 1.0])

    def model(data):
        with pyro.plate("data", 2):
            z = pyro.sample("z", dist.Bernoulli(probs=t(0.4)).expand([2, 3]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=2.0 * z - 1.0).to_event(1), obs=data)

    def guide(data):
        p = pyro.param("p", t(0.3, 0.8, 0.55), constraint=constraints.unit_interval)
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Bernoulli(probs=p).expand([2, 3]).to_event(1))

    return model, guide, (data,)


def categorical_bernoulli():
    """A Categorical (score function) before and after Bernoulli sites."""
    data = t(1.0, 0.0)

    def model(data):
        c = pyro.sample("c", dist.Categorical(logits=t(0.1, -0.3, 0.2)))
        z = pyro.sample(
            "z", dist.Bernoulli(logits=t([0.5, -1.0], [1.0, 0.2], [-0.6, 0.8])[c]).to_event(1)
        )
        d = pyro.sample("d", dist.Categorical(logits=torch.stack([z.sum(-1), -z.sum(-1)], -1)))
        pyro.sample(
            "x", dist.Bernoulli(logits=2.0 * z - 1.0 + d.unsqueeze(-1)).to_event(1), obs=data
        )

    def guide(data):
        cl = pyro.param("cl", t(0.4, -0.2, 0.1))
        zl = pyro.param("zl", t([0.3, -0.8], [1.2, 0.4], [-0.5, 0.6]))
        dl = pyro.param("dl", t(0.7, -0.3))
        c = pyro.sample("c", dist.Categorical(logits=cl))
        z = pyro.sample("z", dist.Bernoulli(logits=zl[c]).to_event(1))
        pyro.sample("d", dist.Categorical(logits=dl + t(1.0, -1.0) * z[..., :1]))

    return model, guide, (data,)


def arm_opt_out():
    """A Bernoulli site with infer={"arm": False} (score function) beside an ARM site."""
    data = t(1.0, 0.0)

    def model(data):
        y = pyro.sample("y", dist.Bernoulli(logits=t(0.2, -0.3)).to_event(1))
        z = pyro.sample("z", dist.Bernoulli(logits=y - 0.5).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=2.0 * z - 1.0 + y).to_event(1), obs=data)

    def guide(data):
        a = pyro.param("a", t(0.5, -0.7))
        b = pyro.param("b", t(-0.3, 0.9))
        y = pyro.sample("y", dist.Bernoulli(logits=a).to_event(1), infer={"arm": False})
        pyro.sample("z", dist.Bernoulli(logits=b + y).to_event(1))

    return model, guide, (data,)


def normal_then_bernoulli():
    """A reparameterized Normal, then Bernoulli logits depending on it."""
    data = t(1.0, 0.0)

    def model(data):
        y = pyro.sample("y", dist.Normal(t(0.0), t(1.0)))
        z = pyro.sample("z", dist.Bernoulli(logits=y.unsqueeze(-1) * t(1.0, -1.0)).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=2.0 * z - 1.0).to_event(1), obs=data)

    def guide(data):
        loc = pyro.param("loc", t(0.3))
        scale = pyro.param("scale", t(0.8), constraint=constraints.positive)
        w = pyro.param("w", t(0.9, -0.5))
        y = pyro.sample("y", dist.Normal(loc, scale))
        pyro.sample("z", dist.Bernoulli(logits=w * y.unsqueeze(-1) + 0.2).to_event(1))

    return model, guide, (data,)


def bernoulli_then_normal():
    """Bernoulli sites first, then a reparameterized Normal whose loc depends on them."""
    data = t(0.7)

    def model(data):
        z = pyro.sample("z", dist.Bernoulli(logits=t(0.2, -0.4)).to_event(1))
        y = pyro.sample("y", dist.Normal(z @ t(1.0, -1.5), t(1.0)))
        pyro.sample("x", dist.Normal(y, t(0.5)), obs=data)

    def guide(data):
        a = pyro.param("a", t(0.6, -0.3))
        m = pyro.param("m", t(0.8, -1.2))
        s = pyro.param("s", t(0.7), constraint=constraints.positive)
        z = pyro.sample("z", dist.Bernoulli(logits=a).to_event(1))
        pyro.sample("y", dist.Normal(z @ m + 0.1, s))

    return model, guide, (data,)


def value_dependent_structure():
    """Which sites exist depends on a sampled value (needs Python control flow)."""
    data = t(1.0)

    def model(data):
        s = pyro.sample("switch", dist.Bernoulli(logits=t(0.3)))
        if s.item() == 1.0:
            z = pyro.sample("branch_a", dist.Bernoulli(logits=t(0.5, -0.5)).to_event(1))
            logit = z.sum() - 1.0
        else:
            z = pyro.sample("branch_b", dist.Bernoulli(logits=t(-0.2)))
            logit = 2.0 * z - 0.5
        pyro.sample("x", dist.Bernoulli(logits=logit), obs=data)

    def guide(data):
        a = pyro.param("sa", t(0.4))
        b = pyro.param("ba", t(-0.6, 0.9))
        c = pyro.param("bb", t(0.7))
        s = pyro.sample("switch", dist.Bernoulli(logits=a))
        if s.item() == 1.0:
            pyro.sample("branch_a", dist.Bernoulli(logits=b).to_event(1))
        else:
            pyro.sample("branch_b", dist.Bernoulli(logits=c))

    return model, guide, (data,)


def plate_size_equals_event_size():
    """Plate of 2 over an event of 2: right-aligned broadcasting of the signal would misalign."""
    data = t([1.0, 1.0], [0.0, 0.0])

    def model(data):
        with pyro.plate("data", 2):
            z = pyro.sample("z", dist.Bernoulli(logits=t(0.1, -0.2)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=3.0 * z - 1.5).to_event(1), obs=data)

    def guide(data):
        phi = pyro.param("phi", t([0.3, -0.6], [0.9, 0.2]))
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Bernoulli(logits=phi).to_event(1))

    return model, guide, (data,)


CASES = {
    f.__name__: f
    for f in [
        one_layer,
        two_layer,
        three_layer,
        global_then_local,
        local_then_global,
        nested_plates,
        sequential_plates,
        subsampled,
        masked_scaled,
        probs_expand_to_event,
        categorical_bernoulli,
        arm_opt_out,
        normal_then_bernoulli,
        bernoulli_then_normal,
        plate_size_equals_event_size,
    ]
}

# (estimator, vectorize_particles, num_particles, num_samples)
CONFIGS = [
    ("arm", True, 200, 10000),
    ("disarm", True, 200, 10000),
    ("ar", True, 200, 10000),
    ("arm", False, 1, 240),
    ("disarm", False, 2, 160),
]


def config_id(c):
    return f"{c[0]}-{'vec' if c[1] else 'seq'}-P{c[2]}"


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
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
    messengers = pytest.importorskip("pyro_arm.messengers")
    branch = getattr(messengers, "BranchMessenger", None)
    if branch is None:
        pytest.skip("no sequential BranchMessenger to break")
    from pyro.poutine.subsample_messenger import _Subsample

    original = branch._pyro_sample

    def fresh_subsample(self, msg):
        if isinstance(msg["fn"], _Subsample):
            return  # let Pyro draw a new subsample
        original(self, msg)

    monkeypatch.setattr(branch, "_pyro_sample", fresh_subsample)
    model, guide, args = subsampled()
    elbo = TraceARM_ELBO(num_particles=1, estimator="disarm")
    with pytest.raises(AssertionError, match="biased components"):
        assert_unbiased(elbo, model, guide, args, num_samples=300, seed=0)
