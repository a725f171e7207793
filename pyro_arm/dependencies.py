# SPDX-License-Identifier: Apache-2.0
"""
Which cost terms and which later guide sites depend on the value of each guide sample site.

Dependencies are tracked by provenance, as in Pyro's
:class:`~pyro.infer.tracegraph_elbo.TraceGraph_ELBO` and
:func:`pyro.infer.inspect.get_dependencies`: every sampled (non-observed) value is wrapped in a
:class:`~pyro.ops.provenance.ProvenanceTensor` carrying its site's name, torch ops propagate the
union of their inputs' provenance, and so the provenance of a site's value or log-density names
every sampled site it was computed from, directly or through other sites.

:func:`trace_dependencies` replays a run of guide and model under this tracking once, without
gradient, holding every sampled value (plate subsamples included) at its value in the run. It is
only needed for models that have score-function sites or a guide site sampled after, and outside
a plate of, an earlier one; :func:`needs_dependencies` tells, from the run's guide trace alone.
Runs of one call with the same :func:`structure_key` share one replay while it reads no value into
Python (:meth:`pyro_arm.particle.Particle.track_dependencies`).

Provenance follows values, not Python control flow (``if c == 1:`` sampling a site); the sites
whose values are read into Python (``.item()``, ``bool``, ``int``, ``float``, ``.tolist()``,
``.numpy()``, ``torch.equal``, value-dependent shapes: :func:`~pyro_arm.reads.is_read`) during the
replay are listed in :attr:`Dependencies.control`, and the signals of
those sites assume the worst (every cost term, every later site dependent).
"""

from __future__ import annotations

from typing import NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.ops.provenance import get_provenance, track_provenance
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from torch.overrides import TorchFunctionMode

from pyro_arm.enum import marginalize_trace
from pyro_arm.reads import is_read
from pyro_arm.sites import is_subsample_site


class Dependencies(NamedTuple):
    """
    :param guide: guide site name -> the sampled guide sites its value depends on (itself
        included).
    :param costs: ``"model:name"`` / ``"guide:name"`` -> the sampled guide sites the site's
        log-density depends on.
    """

    guide: dict[str, frozenset]
    costs: dict[str, frozenset]
    control: frozenset = frozenset()


class _ControlFlowReads(TorchFunctionMode):
    """Records the provenance of every tensor read into Python (:func:`~pyro_arm.reads.is_read`)."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: frozenset = frozenset()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if is_read(func, args, kwargs, result):
            self.sources = self.sources | get_provenance(args) | get_provenance(kwargs)
        return result


class TrackProvenance(Messenger):
    """Holds sampled values at ``values`` (when given) and tags each with its site's name."""

    def __init__(self, values: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None:
            return
        if msg["name"] in self.values:
            msg["value"] = self.values[msg["name"]]

    def _pyro_post_sample(self, msg) -> None:
        if msg["is_observed"] or is_subsample_site(msg):
            return
        # A held value carries no provenance of its distribution's parameters: take theirs
        # from its log-density, as a value sampled afresh would carry them.
        upstream = get_provenance(msg["fn"].log_prob(msg["value"]))
        msg["value"] = track_provenance(msg["value"], upstream | {msg["name"]})


def needs_dependencies(guide_trace: Trace, arm_sites) -> bool:
    """
    Whether a run needs :func:`trace_dependencies`: it has a score-function site (sampled, not
    ARM, not reparameterized), or a guide site sampled after an ARM site outside one of its
    vectorized plates.
    """
    frames_so_far = None
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or is_subsample_site(site):
            continue
        enumerated = site["infer"].get("_enumerate_dim") is not None
        if name not in arm_sites and not site["fn"].has_rsample and not enumerated:
            return True
        stack = set(site["cond_indep_stack"])
        if frames_so_far is not None and not frames_so_far <= stack:
            return True
        if name in arm_sites:
            vectorized = {f for f in stack if f.vectorized}
            frames_so_far = vectorized if frames_so_far is None else frames_so_far | vectorized
    return False


def structure_key(guide_trace: Trace) -> tuple:
    """
    The structure of a run, as far as its dependencies can tell runs apart: each sampled guide
    site's name, value shape and plates, in order.
    """
    return tuple(
        (name, tuple(site["value"].shape), tuple(site["cond_indep_stack"]))
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    )


def trace_dependencies(model, guide, values: dict, args, kwargs) -> Dependencies:
    """
    Replays guide and model with every sampled value held at ``values`` and tracked by
    provenance, and returns their :class:`Dependencies`.
    """
    tracker = TrackProvenance(values)
    reads = _ControlFlowReads()
    with torch.no_grad(), pyro.validation_enabled(False), tracker, reads:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        guide_trace.compute_log_prob()
        model_trace.compute_log_prob()
    guide_deps = {}
    costs = {}
    for prefix, trace in (("guide", guide_trace), ("model", model_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            costs[f"{prefix}:{name}"] = get_provenance(site["log_prob"])
            if prefix == "guide" and not site["is_observed"]:
                guide_deps[name] = get_provenance(site["value"])
    # the contracted terms of enumerated sites depend on what any site they contract does
    for name, taken in marginalize_trace(model_trace, guide_trace).items():
        costs[f"model:{name}"] = frozenset().union(*(costs[f"model:{n}"] for n in taken))
    # a term's expectation over the guide's enumerated sites depends on what their
    # probabilities do
    factors = [
        (site["cond_indep_stack"], get_provenance(site["log_prob"]))
        for site in guide_trace.nodes.values()
        if site["type"] == "sample" and site["infer"].get("_enumerate_dim") is not None
    ]
    if factors:
        for prefix, trace in (("guide", guide_trace), ("model", model_trace)):
            for name, site in trace.nodes.items():
                if site["type"] == "sample":
                    plates = set(site["cond_indep_stack"])
                    for stack, sources in factors:
                        if set(stack) <= plates:
                            costs[f"{prefix}:{name}"] |= sources
    return Dependencies(guide_deps, costs, reads.sources)
