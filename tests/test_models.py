# SPDX-License-Identifier: Apache-2.0
"""Sigmoid belief nets: architectures, sites, broadcasting, and a few SVI steps per estimator."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceGraph_ELBO

from pyro_arm import TraceARM_ELBO
from pyro_arm.sbn.models import ARCHITECTURES, SigmoidBeliefNet, build_sbn, parse_architecture

NAMES = ["linear", "two_layer", "nonlinear", "linear-200-200-200"]


def linear_shapes(layers):
    return [tuple(layer.weight.shape) for layer in layers]


def test_architectures():
    assert set(ARCHITECTURES) == {"linear", "two_layer", "nonlinear"}
    lin = build_sbn("linear")
    assert lin.latent_dims == (200,) and lin.hidden_dims == ()
    assert linear_shapes(lin.encoders[0]) == [(200, 784)]
    assert linear_shapes(lin.decoders[0]) == [(784, 200)]
    two = build_sbn("two_layer")
    assert two.latent_dims == (200, 200)
    assert linear_shapes(two.encoders[1]) == [(200, 200)]
    nonlin = build_sbn("nonlinear")
    assert linear_shapes(nonlin.encoders[0]) == [(200, 784), (200, 200), (200, 200)]
    assert linear_shapes(nonlin.decoders[0]) == [(200, 200), (200, 200), (784, 200)]
    deep = build_sbn("linear-200-100-50")
    assert deep.latent_dims == (200, 100, 50) and deep.latent_names == ("z1", "z2", "z3")
    assert deep.prior_logits.shape == (50,)
    assert build_sbn("nonlinear-200-200").hidden_dims == (200, 200)


@pytest.mark.parametrize("name", ["", "linear-", "linear-0", "deep", "linear-20x", None, "Linear"])
def test_unknown_architecture(name):
    with pytest.raises(ValueError, match="unknown model"):
        parse_architecture(name)


def test_output_bias_init():
    mean = torch.linspace(0, 1, 784)
    sbn = build_sbn("nonlinear", x_mean=mean)
    bias = sbn.decoders[0][-1].bias
    assert torch.allclose(bias, torch.logit(mean.clamp(1e-3, 1 - 1e-3)))
    assert bias.abs().max() < 7.0
    with pytest.raises(ValueError, match="784"):
        sbn.init_output_bias(torch.zeros(10))


def test_sites_and_shapes():
    sbn = build_sbn("linear-200-100")
    x = torch.bernoulli(torch.full((7, 784), 0.3))
    guide = poutine.trace(sbn.guide).get_trace(x)
    model = poutine.trace(poutine.replay(sbn.model, trace=guide)).get_trace(x)
    latents = [n for n, s in guide.nodes.items() if s["type"] == "sample" and n != "data"]
    assert latents == ["z1", "z2"]  # the guide samples z1 | x, then z2 | z1
    assert [n for n in model.nodes if n in ("z1", "z2", "x")] == ["z2", "z1", "x"]
    for trace in (guide, model):
        for name, d in (("z1", 200), ("z2", 100)):
            site = trace.nodes[name]
            assert site["value"].shape == (7, d)
            assert site["fn"].batch_shape == (7,) and site["fn"].event_shape == (d,)
            assert isinstance(site["fn"].base_dist, pyro.distributions.Bernoulli)
            assert [f.name for f in site["cond_indep_stack"]] == ["data"]
    assert model.nodes["x"]["is_observed"] and model.nodes["x"]["fn"].event_shape == (784,)


@pytest.mark.parametrize("name", NAMES)
def test_broadcasts_over_particle_dims(name):
    sbn = build_sbn(name)
    x = torch.bernoulli(torch.full((5, 784), 0.3))
    with pyro.plate("branches", 2, dim=-3), pyro.plate("particles", 3, dim=-2):
        guide = poutine.trace(sbn.guide).get_trace(x)
        model = poutine.trace(poutine.replay(sbn.model, trace=guide)).get_trace(x)
    guide.compute_log_prob()
    model.compute_log_prob()
    for i, d in enumerate(sbn.latent_dims):
        assert guide.nodes[f"z{i + 1}"]["value"].shape == (2, 3, 5, d)
        assert model.nodes[f"z{i + 1}"]["log_prob"].shape == (2, 3, 5)
    assert model.nodes["x"]["log_prob"].shape == (2, 3, 5)
    assert model.nodes["_RETURN"]["value"].shape == (2, 3, 5, 784)


def test_reconstruct_and_sample():
    sbn = build_sbn("two_layer", x_mean=torch.full((784,), 0.1))
    x = torch.bernoulli(torch.full((4, 784), 0.3))
    r = sbn.reconstruct(x)
    s = sbn.sample(6)
    assert r.shape == (4, 784) and s.shape == (6, 784)
    assert ((r >= 0) & (r <= 1)).all() and ((s >= 0) & (s <= 1)).all()


def elbos():
    out = {
        "trace": lambda: Trace_ELBO(max_plate_nesting=1),
        "tracegraph": lambda: TraceGraph_ELBO(max_plate_nesting=1),
        "trace-vec3": lambda: Trace_ELBO(
            num_particles=3, vectorize_particles=True, max_plate_nesting=1
        ),
        "tracegraph-vec3": lambda: TraceGraph_ELBO(
            num_particles=3, vectorize_particles=True, max_plate_nesting=1
        ),
    }
    for est in ("arm", "disarm", "ar"):
        out[est] = lambda est=est: TraceARM_ELBO(estimator=est)
        out[f"{est}-vec3"] = lambda est=est: TraceARM_ELBO(
            estimator=est, num_particles=3, vectorize_particles=True
        )
    return out


ELBOS = elbos()


def svi_steps(sbn, elbo, x, steps=3):
    opt = torch.optim.Adam(sbn.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in sbn.named_parameters()}
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        losses.append(elbo.loss_and_grads(sbn.model, sbn.guide, x))
        opt.step()
    changed = {n: not torch.equal(before[n], p) for n, p in sbn.named_parameters()}
    return losses, changed


@pytest.mark.parametrize("elbo", list(ELBOS))
@pytest.mark.parametrize("name", NAMES)
def test_svi_steps(name, elbo):
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((6, 784), 0.2))
    sbn = build_sbn(name, x_mean=x.mean(0))
    losses, changed = svi_steps(sbn, ELBOS[elbo](), x)
    assert all(math.isfinite(v) for v in losses)
    assert all(changed.values()), [n for n, c in changed.items() if not c]


@pytest.mark.parametrize("local", [False, True])
@pytest.mark.parametrize("elbo", ["trace", "tracegraph", "arm", "disarm-vec3"])
def test_module_local_params_either_way(local, elbo):
    x = torch.bernoulli(torch.full((4, 784), 0.2))
    with pyro.settings.context(module_local_params=local):
        sbn = build_sbn("two_layer")
        losses, changed = svi_steps(sbn, ELBOS[elbo](), x, steps=2)
    assert all(math.isfinite(v) for v in losses) and all(changed.values())


def test_svi_with_pyro_optim():
    """The model also trains through pyro.infer.SVI and the param store."""
    x = torch.bernoulli(torch.full((4, 784), 0.2))
    sbn = build_sbn("linear")
    before = sbn.encoders[0][0].weight.detach().clone()
    svi = pyro.infer.SVI(sbn.model, sbn.guide, pyro.optim.Adam({"lr": 1e-2}), TraceARM_ELBO())
    for _ in range(2):
        assert math.isfinite(svi.step(x))
    assert not torch.equal(before, sbn.encoders[0][0].weight)


def test_training_reduces_loss_on_tiny_data():
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((8, 20), 0.5))
    sbn = SigmoidBeliefNet(x_dim=20, latent_dims=(4,), x_mean=x.mean(0))
    elbo = TraceARM_ELBO(estimator="disarm")
    start = sum(elbo.loss(sbn.model, sbn.guide, x) for _ in range(20)) / 20
    svi_steps(sbn, elbo, x, steps=150)
    end = sum(elbo.loss(sbn.model, sbn.guide, x) for _ in range(20)) / 20
    assert end < start - 5
