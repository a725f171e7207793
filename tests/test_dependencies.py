# SPDX-License-Identifier: Apache-2.0
"""
Dependency tracking (pyro_arm/dependencies.py) and the dependency-aware plate-local signals it
gives: a global guide site sampled after plate-local ones keeps their signals per-element when it
ignores them, and coarsens them (unbiased, where Pyro's ELBOs are not) when it reads them.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_arm import TraceARM_ELBO, particle
from pyro_arm.dependencies import Dependencies, needs_dependencies, trace_dependencies
from pyro_arm.estimators import get_estimator
from pyro_arm.sampler import SampleMessenger
from pyro_arm.signals import signal_frames
from tests import tiny_models
from tests.exact import assert_unbiased
from tests.tiny_models import CONFIGS, config_id

pytestmark = pytest.mark.usefixtures("float64")


def base_run(case):
    """A base run of a tiny model: (model, guide, args, guide trace, sampler)."""
    model, guide, args = getattr(tiny_models, case)()
    sampler = SampleMessenger(get_estimator("arm"))
    guide_trace = pyro.poutine.trace(sampler(guide)).get_trace(*args)
    return model, guide, args, guide_trace, sampler


def test_trace_dependencies_follow_values():
    model, guide, args, _, sampler = base_run("global_after_locals_reading_them")
    deps = trace_dependencies(model, guide, sampler.values, args, {})
    assert deps.guide == {"z": frozenset({"z"}), "g": frozenset({"z", "g"})}
    assert deps.costs["model:x"] == frozenset({"z", "g"})
    assert deps.costs["guide:g"] == frozenset({"z", "g"})

    model, guide, args, _, sampler = base_run("global_after_locals_ignoring_them")
    deps = trace_dependencies(model, guide, sampler.values, args, {})
    assert deps.guide == {"z": frozenset({"z"}), "g": frozenset({"g"})}


def test_held_values_carry_their_parameters_provenance():
    """A later site whose distribution reads an earlier one depends on it even though the
    replay holds its value (it would be resampled)."""
    model, guide, args, _, sampler = base_run("categorical_in_plate")
    deps = trace_dependencies(model, guide, sampler.values, args, {})
    assert deps.guide["z"] == frozenset({"c", "z"})
    assert deps.costs["model:z"] == frozenset({"c", "z"})


@pytest.mark.parametrize(
    "case, needed",
    [
        ("one_layer", False),  # an SBN's shape: no tracking, no extra pass
        ("two_layer", False),
        ("global_before_locals", False),
        ("global_after_locals_ignoring_them", True),
        ("global_after_locals_reading_them", True),
        ("categorical_in_plate", True),  # a score-function site
    ],
)
def test_needs_dependencies(case, needed):
    _, _, _, guide_trace, sampler = base_run(case)
    assert needs_dependencies(guide_trace, sampler.samples) is needed


@pytest.mark.parametrize("reads", [False, True])
def test_signal_frames(reads):
    """Per-element over the plate unless the later global reads the locals."""
    case = "global_after_locals_" + ("reading_them" if reads else "ignoring_them")
    model, guide, args, guide_trace, sampler = base_run(case)
    deps = trace_dependencies(model, guide, sampler.values, args, {})
    frames = signal_frames(guide_trace, "z", deps.guide)
    assert [f.name for f in frames] == ([] if reads else ["data"])
    assert [f.name for f in signal_frames(guide_trace, "z")] == []  # without dependencies


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize(
    "case", ["global_after_locals_ignoring_them", "global_after_locals_reading_them"]
)
def test_unbiased_global_after_locals(case, config):
    estimator, vectorize, num_particles, num_samples = config
    model, guide, args = getattr(tiny_models, case)()
    elbo = TraceARM_ELBO(
        num_particles=num_particles, vectorize_particles=vectorize, estimator=estimator
    )
    assert_unbiased(elbo, model, guide, args, num_samples=num_samples, seed=0)


def ignore_dependencies(model, guide, values, args, kwargs) -> Dependencies:
    """A wrong tracker that sees no dependency between sites: Pyro's per-element rule."""
    deps = trace_dependencies(model, guide, values, args, kwargs)
    return Dependencies({name: frozenset({name}) for name in deps.guide}, deps.costs)


def test_checker_rejects_per_element_signals_when_global_reads_locals(monkeypatch):
    monkeypatch.setattr(particle, "trace_dependencies", ignore_dependencies)
    model, guide, args = tiny_models.global_after_locals_reading_them()
    elbo = TraceARM_ELBO(num_particles=1000, vectorize_particles=True)
    with pytest.raises(AssertionError, match=r"biased components \[.*'b\["):
        assert_unbiased(elbo, model, guide, args, num_samples=NUM_POWER_SAMPLES, seed=0)


NUM_POWER_SAMPLES = 40000


def test_no_dependency_pass_without_need(monkeypatch):
    """On an SBN's shape the dependency pass never runs."""

    def fail(*args, **kwargs):
        raise AssertionError("dependency pass ran")

    monkeypatch.setattr(particle, "trace_dependencies", fail)
    model, guide, args = tiny_models.two_layer()
    for vectorize in (False, True):
        TraceARM_ELBO(num_particles=2, vectorize_particles=vectorize).loss_and_grads(
            model, guide, *args
        )


def test_control_flow_reads_are_recorded():
    model, guide, args, _, sampler = base_run("categorical_switch")
    deps = trace_dependencies(model, guide, sampler.values, args, {})
    assert deps.control == frozenset({"c"})
    model, guide, args, _, sampler = base_run("global_after_locals_reading_them")
    assert trace_dependencies(model, guide, sampler.values, args, {}).control == frozenset()


@pytest.mark.parametrize("num_particles", [1, 2])
def test_unbiased_categorical_steering_control_flow(num_particles):
    model, guide, args = tiny_models.categorical_switch()
    elbo = TraceARM_ELBO(num_particles=num_particles)
    assert_unbiased(elbo, model, guide, args, num_samples=2000, seed=0)


def test_checker_rejects_provenance_only_signal_under_control_flow(monkeypatch):
    """Provenance alone (control-flow reads ignored) leaves e's terms out of c's signal."""

    def without_control(*args, **kwargs):
        return trace_dependencies(*args, **kwargs)._replace(control=frozenset())

    monkeypatch.setattr(particle, "trace_dependencies", without_control)
    model, guide, args = tiny_models.categorical_switch()
    with pytest.raises(AssertionError, match=r"biased components \[.*'cl\["):
        assert_unbiased(TraceARM_ELBO(num_particles=1), model, guide, args, num_samples=2000)


def _count_replays(monkeypatch) -> list:
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return trace_dependencies(*args, **kwargs)

    monkeypatch.setattr(particle, "trace_dependencies", counted)
    return calls


@pytest.mark.parametrize(
    "options", [{"num_particles": 3}, {"estimator": "rloo", "num_samples": 4}], ids=["P3", "rloo4"]
)
def test_one_replay_per_call_without_control_flow_reads(options, monkeypatch):
    """Sequential runs of one structure share the replay of the first (no Python reads)."""
    calls = _count_replays(monkeypatch)
    model, guide, args = tiny_models.categorical_in_plate()
    TraceARM_ELBO(**options).loss_and_grads(model, guide, *args)
    assert len(calls) == 1


def test_replay_per_run_under_control_flow_reads(monkeypatch):
    """A run whose replay read a value into Python is never reused: each run has its own."""
    calls = _count_replays(monkeypatch)
    model, guide, args = tiny_models.categorical_switch()
    TraceARM_ELBO(num_particles=3).loss_and_grads(model, guide, *args)
    assert len(calls) == 3


@pytest.mark.parametrize(
    "read",
    [
        lambda c: torch.equal(c, torch.tensor(1)),
        lambda c: c.numpy().item() == 1,
        lambda c: c.tolist() == 1,
        lambda c: bool(torch.isin(c, torch.tensor([1])).all()),
        lambda c: len(c.reshape(1).nonzero()) > 0,
    ],
    ids=["equal", "numpy", "tolist", "all", "nonzero"],
)
def test_every_kind_of_read_is_recorded(read):
    """Reads that return Python data or value-shaped tensors name the site they read."""

    def guide():
        c = pyro.sample("c", dist.Categorical(logits=torch.zeros(3)))
        pyro.sample("z", dist.Bernoulli(logits=torch.tensor(1.0 if read(c) else -1.0)))

    values = {"c": torch.tensor(1), "z": torch.tensor(0.0)}
    deps = trace_dependencies(lambda: None, guide, values, (), {})
    assert deps.control == frozenset({"c"})
