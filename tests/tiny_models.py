# SPDX-License-Identifier: Apache-2.0
"""
Tiny models (<= 8 binary components) covering the structures where ARM inside an ELBO goes
wrong, shared by the test modules. Each function returns ``(model, guide, args)``;
:data:`CASES` maps names to them. Tensors are made in the default dtype (the tests run them
in float64).
"""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch.distributions import constraints

#: The configurations the exact-enumeration tests run every tiny model in:
# (estimator, vectorize_particles, num_particles, num_samples)
CONFIGS = [
    ("arm", True, 200, 10000),
    ("disarm", True, 200, 10000),
    ("ar", True, 200, 10000),
    ("arm", False, 1, 240),
    ("disarm", False, 2, 160),
]


#: The vectorized configurations at the checker's smallest size (30 calls): the fast test tier
#: runs these, the full tier also the ones above (tests/conftest.py).
FAST_CONFIGS = [
    ("arm", True, 100, 3000),
    ("disarm", True, 100, 3000),
    ("ar", True, 100, 3000),
]


def config_id(c):
    return f"{c[0]}-{'vec' if c[1] else 'seq'}-P{c[2]}"


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


# ---------------------------------------------------------------------------------------------
# Models: structure decided at the last site, factors, empty programs, globals after
# locals, Categorical sites with baselines.
# ---------------------------------------------------------------------------------------------


def switch_at_last_site():
    """
    The last guide site decides whether another site exists: ``e`` is sampled only when
    ``s == 1``, so the flip of ``s`` in a base run with ``s == 0`` adds a site (sequential only).
    """
    data = t(1.0)

    def model(data):
        s = pyro.sample("s", dist.Bernoulli(logits=t(0.2)))
        logit = t(-1.0)
        if s.item() == 1.0:
            e = pyro.sample("e", dist.Bernoulli(logits=t(-0.4)))
            logit = 3.0 * e - 0.5
        pyro.sample("x", dist.Bernoulli(logits=logit), obs=data)

    def guide(data):
        q_s = pyro.param("q_s", t(0.3))
        q_e = pyro.param("q_e", t(-0.8))
        s = pyro.sample("s", dist.Bernoulli(logits=q_s))
        if s.item() == 1.0:
            pyro.sample("e", dist.Bernoulli(logits=q_e))

    return model, guide, (data,)


def factor_in_guide():
    """A ``pyro.factor`` in the guide that reads a latent value and a param."""
    data = t(1.0, 0.0)

    def model(data):
        with pyro.plate("data", 2):
            z = pyro.sample("z", dist.Bernoulli(logits=t(0.3)))
            pyro.sample("x", dist.Bernoulli(logits=2.0 * z - 1.0), obs=data)

    def guide(data):
        phi = pyro.param("phi", t(0.4, -0.6))
        w = pyro.param("w", t(0.7))
        with pyro.plate("data", 2):
            z = pyro.sample("z", dist.Bernoulli(logits=phi))
            pyro.factor("f", w * (z - 0.5), has_rsample=False)

    return model, guide, (data,)


def empty():
    """A model and guide without any site."""

    def model():
        pass

    def guide():
        pass

    return model, guide, ()


def _locals_and_global(global_first: bool, reads_locals: bool, size: int = 3):
    data = torch.linspace(0.0, 1.0, size).round()

    def model(data):
        g = pyro.sample("g", dist.Bernoulli(logits=t(0.2)))
        with pyro.plate("data", size):
            z = pyro.sample("z", dist.Bernoulli(logits=t(-0.3)))
            pyro.sample("x", dist.Bernoulli(logits=3.0 * z - 1.5 + g), obs=data)

    def guide(data):
        b = pyro.param("b", 0.4 * torch.linspace(-1.0, 1.0, size))
        a = pyro.param("a", t(0.6))
        if global_first:
            pyro.sample("g", dist.Bernoulli(logits=a))
        with pyro.plate("data", size):
            z = pyro.sample("z", dist.Bernoulli(logits=b))
        if not global_first:
            logits = a * (z.sum(-1, keepdim=True) - 1.0) if reads_locals else a
            pyro.sample("g", dist.Bernoulli(logits=logits))

    return model, guide, (data,)


def global_after_locals_ignoring_them(size: int = 3):
    """A global guide site sampled after the plate-local ones, that does not read them."""
    return _locals_and_global(global_first=False, reads_locals=False, size=size)


def global_before_locals(size: int = 3):
    """The same model, with the global sampled first (the reference ordering for variance)."""
    return _locals_and_global(global_first=True, reads_locals=False, size=size)


def global_after_locals_reading_them(size: int = 3):
    """A global guide site sampled after the plate-local ones, whose logits read them."""
    return _locals_and_global(global_first=False, reads_locals=True, size=size)


class LinearBaseline(torch.nn.Module):
    """A learned baseline per datapoint, from the datapoint's observation."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, 1)
        with torch.no_grad():
            self.linear.weight.fill_(0.5)
            self.linear.bias.fill_(3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.unsqueeze(-1)).squeeze(-1)


#: The kinds of baseline :func:`categorical_in_plate` can give its Categorical site.
BASELINE_KINDS = ("none", "decaying_avg", "value", "nn")


def _baseline_options(kind: str, data: torch.Tensor, net: torch.nn.Module) -> dict:
    if kind == "decaying_avg":
        return {"use_decaying_avg_baseline": True, "baseline_beta": 0.8}
    if kind == "value":
        return {"baseline_value": t(-2.0, -1.5)}
    if kind == "nn":
        return {"nn_baseline": pyro.module("c_baseline", net), "nn_baseline_input": data}
    return {}


def categorical_in_plate(baseline: str = "none"):
    """
    A Categorical guide site per datapoint, then a Bernoulli site that reads it: the Categorical
    is a score-function site (``infer={"arm": False}``), with the baseline of kind ``baseline`` (see
    :data:`BASELINE_KINDS`; an ``nn_baseline`` is registered with :func:`pyro.module`).
    """
    data = t(1.0, 0.0)
    net = LinearBaseline()  # made once, registered by every run of the guide

    def model(data):
        with pyro.plate("data", 2):
            c = pyro.sample("c", dist.Categorical(logits=t(0.1, -0.2, 0.3)))
            z = pyro.sample("z", dist.Bernoulli(logits=t(-1.0, 0.0, 1.0)[c]))
            pyro.sample("x", dist.Bernoulli(logits=2.0 * z - 1.0 + 0.5 * c), obs=data)

    def guide(data):
        cl = pyro.param("cl", t([0.4, -0.2, 0.1], [-0.3, 0.6, 0.0]))
        zl = pyro.param("zl", t(0.5, -0.5, 0.2))
        options = _baseline_options(baseline, data, net)
        infer = {"arm": False, "baseline": options} if options else {"arm": False}
        with pyro.plate("data", 2):
            c = pyro.sample("c", dist.Categorical(logits=cl), infer=infer)
            pyro.sample("z", dist.Bernoulli(logits=zl[c]))

    return model, guide, (data,)


ISSUE_7_CASES = {
    f.__name__: f
    for f in [
        factor_in_guide,
        global_after_locals_ignoring_them,
        global_after_locals_reading_them,
        categorical_in_plate,
    ]
}


def categorical_beside_noisy_site():
    """
    A Categorical site (a score-function site, ``infer={"arm": False}``) beside an independent
    Bernoulli site whose cost terms are large and noisy: a Rao-Blackwellized signal of the
    Categorical leaves them out.
    """
    data = t(0.5, 9.0)

    def model(data):
        c = pyro.sample("c", dist.Categorical(logits=t(0.0, 0.0, 0.0)))
        pyro.sample("y", dist.Normal(c.to(data.dtype), 1.0), obs=data[0])
        b = pyro.sample("b", dist.Bernoulli(logits=t(0.0)))
        pyro.sample("x", dist.Normal(10.0 * b, 1.0), obs=data[1])

    def guide(data):
        cl = pyro.param("cl", t(0.3, -0.2, 0.1))
        bl = pyro.param("bl", t(0.0))
        pyro.sample("c", dist.Categorical(logits=cl), infer={"arm": False})
        pyro.sample("b", dist.Bernoulli(logits=bl))

    return model, guide, (data,)


def categorical_switch():
    """
    A Categorical guide site (a score-function site, ``infer={"arm": False}``) whose value only
    steers Python control flow: site ``e`` exists
    only when ``c == 0`` (sequential only), so provenance alone cannot see that ``e``'s terms
    depend on ``c``.
    """
    data = t(1.0)

    def model(data):
        c = pyro.sample("c", dist.Categorical(logits=t(0.2, -0.1)))
        logit = t(-1.0)
        if c.item() == 0:
            e = pyro.sample("e", dist.Bernoulli(logits=t(0.3)))
            logit = 3.0 * e - 1.0
        pyro.sample("x", dist.Bernoulli(logits=logit), obs=data)

    def guide(data):
        cl = pyro.param("cl", t(0.4, -0.3))
        el = pyro.param("el", t(-0.5))
        c = pyro.sample("c", dist.Categorical(logits=cl), infer={"arm": False})
        if c.item() == 0:
            pyro.sample("e", dist.Bernoulli(logits=el))

    return model, guide, (data,)


# ---------------------------------------------------------------------------------------------
# A one-layer sigmoid belief net on synthetic data, for training loops (SVI, devices).
# ---------------------------------------------------------------------------------------------

X_DIM, Z_DIM, N = 8, 3, 16


def synthetic_data(dtype=None):
    """Binary data from two noisy prototypes."""
    gen = torch.Generator().manual_seed(123)  # built on the CPU, then moved to the default device
    protos = torch.tensor(
        [[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0, 1]], dtype=torch.float, device="cpu"
    )
    which = torch.arange(N, device="cpu") % 2
    flips = torch.rand(N, X_DIM, generator=gen, device="cpu") < 0.1
    data = (protos[which] + flips.float()) % 2
    return data.to(dtype=dtype or torch.get_default_dtype(), device=torch.get_default_device())


def sbn():
    """A one-layer sigmoid belief net with an amortized guide (params start near zero)."""

    def model(data):
        prior = pyro.param("prior", torch.zeros(Z_DIM))
        w = pyro.param("w", 0.1 * torch.ones(Z_DIM, X_DIM))
        b = pyro.param("b", torch.zeros(X_DIM))
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(logits=prior).expand([Z_DIM]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=z @ w + b).to_event(1), obs=data)

    def guide(data):
        v = pyro.param("v", 0.1 * torch.ones(X_DIM, Z_DIM))
        c = pyro.param("c", torch.zeros(Z_DIM))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=data @ v + c).to_event(1))

    return model, guide


def decrease(losses, k=20):
    first = sum(losses[:k]) / k
    last = sum(losses[-k:]) / k
    return first, last
