# SPDX-License-Identifier: Apache-2.0
"""
Errors raised inside a batched pass: only value-dependent control flow becomes
NotImplementedError; any other error keeps its type and message, with a note naming the site.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_arm import TraceARM_ELBO
from pyro_arm.batching import is_control_flow_error


def model_with(fail):
    def model():
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(2)).to_event(1))
        fail(z)
        pyro.sample("x", dist.Normal(z.sum(-1), 1.0), obs=torch.tensor(1.0))

    def guide():
        phi = pyro.param("phi", torch.zeros(2))
        pyro.sample("z", dist.Bernoulli(logits=phi).to_event(1))

    return model, guide


def branch_on_value(z):
    if z[..., 0] > 0:
        pass


def shape_bug(z):
    torch.ones(3) + z  # a user's own shape bug


def out_of_memory(z):
    raise torch.OutOfMemoryError("CUDA out of memory (simulated)")


@pytest.mark.parametrize("fail", [branch_on_value, lambda z: z[..., 0].item()])
def test_control_flow_becomes_not_implemented(fail):
    model, guide = model_with(fail)
    elbo = TraceARM_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=0)
    with pytest.raises(NotImplementedError, match="(?s)after site 'z'.*vectorize_particles=False"):
        elbo.loss_and_grads(model, guide)


@pytest.mark.parametrize(
    "fail, error, message",
    [
        (shape_bug, RuntimeError, "must match the size"),
        (out_of_memory, torch.OutOfMemoryError, "simulated"),
    ],
)
def test_other_errors_keep_their_type_and_message(fail, error, message):
    model, guide = model_with(fail)
    elbo = TraceARM_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=0)
    with pytest.raises(error, match=message) as info:
        elbo.loss_and_grads(model, guide)
    assert not isinstance(info.value, NotImplementedError)
    assert any("batched pass" in note for note in getattr(info.value, "__notes__", []))


def test_is_control_flow_error():
    for fail in (
        lambda: bool(torch.zeros(3)),
        lambda: torch.zeros(3).item(),
        lambda: float(torch.zeros(3)),
    ):
        with pytest.raises((RuntimeError, ValueError)) as info:
            fail()
        assert is_control_flow_error(info.value)
    assert not is_control_flow_error(RuntimeError("The size of tensor a (3) must match"))
    assert not is_control_flow_error(TypeError("cannot be converted to Scalar"))
