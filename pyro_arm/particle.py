# SPDX-License-Identifier: Apache-2.0
"""
One particle of :class:`~pyro_arm.TraceARM_ELBO`: a base run of model and guide (all particles
at once when vectorized), its ARM samples, and everything computed from them: the ELBO, the
signals of the guide's sites, the antithetic branches, and the surrogate whose gradient is the
estimate.

A :class:`ParticleContext` holds what every particle of one call shares, decided once per call:
the model and guide (wrapped in Pyro's plate over particles when vectorized), their arguments,
the estimator, and whether passes are batched. When they are, every pass is batched: the base
pass over particles, and the antithetic branches of all ARM sites as one more pass with a plate
over branches, off the gradient tape; errors of value-dependent control flow in them become
:class:`NotImplementedError` (:mod:`pyro_arm.batching`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import pyro
import torch
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer.util import MultiFrameTensor
from pyro.poutine import Trace

from pyro_arm.batching import batched_pass_errors, check_all_seen
from pyro_arm.costs import CostMessenger, costs_of, run_costs, trace_cost_terms
from pyro_arm.dependencies import (
    Dependencies,
    needs_dependencies,
    structure_key,
    trace_dependencies,
)
from pyro_arm.estimators import Estimator
from pyro_arm.messengers import BaseSampleMessenger, BatchedBranchMessenger, BranchMessenger
from pyro_arm.signals import append_event_dims, local_signal, select_branch, signal_frames

_BRANCH_PLATE = "_arm_branches"


class ParticleContext(NamedTuple):
    """
    What the particles of one call share.

    :param model: the model, in Pyro's plate over particles when vectorized.
    :param guide: the guide, likewise.
    :param args: the call's positional arguments.
    :param kwargs: the call's keyword arguments.
    :param estimator: the estimator of the ARM sites' logits gradient.
    :param branch_dim: when vectorized, the dim of the plate over branches: left of every plate
        of the model, the particles' plate (at ``-max_plate_nesting``) included, so that
        ``-max_plate_nesting - 1``; ``None``: every pass runs unbatched, branches one by one.
    :param known_dependencies: the :class:`~pyro_arm.dependencies.Dependencies` traced so far in
        the call, by :func:`~pyro_arm.dependencies.structure_key`; only runs whose replay read no
        value into Python are kept (see :meth:`Particle.track_dependencies`).
    """

    model: Callable
    guide: Callable
    args: tuple
    kwargs: dict
    estimator: Estimator
    branch_dim: Optional[int]
    known_dependencies: dict

    @property
    def vectorized(self) -> bool:
        """Whether every pass is batched (see the module docstring)."""
        return self.branch_dim is not None


class Particle:
    """
    A base run of model and guide and its ARM samples, which computes its ELBO and a surrogate
    whose gradient is the gradient estimate.

    :param context: what the particles of the call share.
    :param model_trace: the base run's model trace, log-densities computed.
    :param guide_trace: the base run's guide trace, score parts computed.
    :param sampler: the handler that sampled the base run's ARM sites.
    """

    def __init__(
        self,
        context: ParticleContext,
        model_trace: Trace,
        guide_trace: Trace,
        sampler: BaseSampleMessenger,
    ) -> None:
        self.context = context
        self.model_trace, self.guide_trace = model_trace, guide_trace
        self.sampler = sampler
        self.arm_sites = sampler.arm_sites
        self.dependencies: Optional[Dependencies] = None
        # detached cost terms, at least float32, made once and shared by the ELBO and signals
        self.terms = trace_cost_terms(model_trace, guide_trace)
        self.costs = costs_of(self.terms)
        # the last sample site of the guide, factors included
        self.last_site = next(
            (n for n, s in reversed(guide_trace.nodes.items()) if s["type"] == "sample"), None
        )
        #: (what, value) of every signal computed, for the non-finite warnings
        self.signals: list[tuple[str, torch.Tensor]] = []

    def elbo(self) -> torch.Tensor:
        """The ELBO of the run (detached), summed in at least float32."""
        return torch.as_tensor(sum(value.sum() for value in self.costs.values()))

    def track_dependencies(self) -> None:
        """
        Traces the run's dependencies, for runs whose signals need them. A run of the same
        structure as an earlier run of the call reuses its dependencies when that run's replay
        read no value into Python: its control flow did not depend on the sampled values, so
        neither do the dependencies (the sequential particles, and the n samples of ``"rloo"``,
        then cost one replay per call instead of one each).
        """
        if not needs_dependencies(self.guide_trace, self.arm_sites):
            return
        ctx = self.context
        key = structure_key(self.guide_trace)
        self.dependencies = ctx.known_dependencies.get(key)
        if self.dependencies is None:
            self.dependencies = trace_dependencies(
                ctx.model, ctx.guide, self.sampler.values, ctx.args, ctx.kwargs
            )
            if not self.dependencies.control:
                ctx.known_dependencies[key] = self.dependencies

    def score_sites(self) -> list[str]:
        """The guide's score-function sites: sampled, not ARM, not reparameterized."""
        return [
            name
            for name, site in self.guide_trace.nodes.items()
            if site["type"] == "sample"
            and not site["is_observed"]
            and name not in self.arm_sites
            and not is_identically_zero(site["score_parts"].score_function)
        ]

    def frames(self, name: str) -> frozenset:
        deps = self.dependencies
        depends_on = None if deps is None or name in deps.control else deps.guide
        return signal_frames(self.guide_trace, name, depends_on)

    def score_signals(self) -> dict:
        """
        The signal of each score-function site: the cost terms that depend on it, summed down to
        its plate-local frames.
        """
        signals = {}
        deps = None if self.dependencies is None else self.dependencies.costs
        control = frozenset() if self.dependencies is None else self.dependencies.control
        for name in self.score_sites():
            costs = self.costs
            if deps is not None and name not in control:  # only the terms that depend on it
                costs = costs_of(self.terms, lambda key, name=name: name in deps[key])
            signals[name] = torch.as_tensor(costs.sum_to(self.frames(name)))
            self.signals.append((f"signal of site '{name}'", signals[name]))
        return signals

    def surrogate_elbo(self, score_signals: dict):
        """
        :param score_signals: the signal, baseline subtracted, of each score-function site.
        """
        surrogate = 0.0
        for site in self.model_trace.nodes.values():
            if site["type"] == "sample":
                surrogate = surrogate + site["log_prob_sum"]
        for name, site in self.guide_trace.nodes.items():
            if site["type"] != "sample" or name in self.arm_sites:
                continue
            if site["is_observed"]:  # a factor: its log-density, pathwise
                surrogate = surrogate - site["log_prob_sum"]
                continue
            _, score_function, entropy_term = site["score_parts"]
            if not is_identically_zero(entropy_term):
                surrogate = surrogate - entropy_term.sum()
            if name in score_signals:
                surrogate = surrogate + (score_function * score_signals[name].detach()).sum()
        return surrogate + self.arm_surrogate()

    def arm_surrogate(self):
        """The ARM sites' part of the surrogate: the estimate (detached) times the logits."""
        if not self.arm_sites:
            return 0.0
        frames = {name: self.frames(name) for name in self.arm_sites}
        branch_signals = {}
        if self.context.estimator.antithetic:
            branch_signals = self.branch_signals(frames)
        surrogate = 0.0
        for name, arm in self.arm_sites.items():
            f2 = local_signal(self.costs, frames[name], arm.event_dim)
            f1 = branch_signals.get(name)
            self.signals += [(f"signal of site '{name}'", f2)]
            if f1 is not None:
                self.signals += [(f"antithetic signal of site '{name}'", f1)]
            grad = self.context.estimator.logits_grad(f1, f2, arm.u, arm.estimator_logits)
            surrogate = surrogate + (grad.detach() * arm.logits).sum()
        return surrogate

    def branch_signals(self, frames: dict) -> dict:
        """The signal of each ARM site in the branch that flips it, event dims appended."""
        if not self.context.vectorized or len(self.arm_sites) == 1:
            return {
                name: local_signal(self.branch_costs(name), frames[name], arm.event_dim)
                for name, arm in self.arm_sites.items()
            }
        return self.batched_branch_signals(frames)

    def batched_branch_signals(self, frames: dict) -> dict:
        """:meth:`branch_signals` of all ARM sites from one batched pass."""
        ctx, names = self.context, list(self.arm_sites)
        branches = pyro.plate(_BRANCH_PLATE, len(names), dim=ctx.branch_dim)
        flips = BatchedBranchMessenger(self.sampler, names, ctx.branch_dim)
        with self._pass_errors(flips.seen):
            costs = run_costs(branches(ctx.model), flips(branches(ctx.guide)), ctx.args, ctx.kwargs)
        check_all_seen(self.sampler.order, flips.seen)
        branch_frame = next(f for key in costs for f in key if f.name == _BRANCH_PLATE)
        signals = {}
        for index, (name, arm) in enumerate(self.arm_sites.items()):
            signal = costs.sum_to(frames[name] | {branch_frame})
            # the branch plate is the leftmost of -branch_dim batch dims
            signal = select_branch(signal, index, -ctx.branch_dim)
            signals[name] = append_event_dims(signal, arm.event_dim)
        return signals

    def branch_costs(self, name: str) -> MultiFrameTensor:
        """The costs of the branch that flips ARM site ``name``."""
        if name == self.last_site:
            costs = self.model_branch_costs(name)
            if costs is not None:
                return costs
        ctx = self.context
        flip = BranchMessenger(self.sampler, name)
        with self._pass_errors(flip.seen):
            return run_costs(ctx.model, flip(ctx.guide), ctx.args, ctx.kwargs)

    def model_branch_costs(self, name: str) -> Optional[MultiFrameTensor]:
        """
        The costs of the branch that flips the guide's last site ``name``. Nothing (no sample, no
        factor) follows it: only its own log q and the model change, unless the flip makes the
        model sample a site the base run lacks; then the guide would sample it too, and this
        returns ``None`` (the branch must run guide and model).
        """
        ctx, costs = self.context, MultiFrameTensor()
        flip = BranchMessenger(self.sampler, name)
        with self._pass_errors(flip.seen), torch.no_grad(), pyro.validation_enabled(False):
            with CostMessenger(costs, 1.0):
                flip(ctx.model)(*ctx.args, **ctx.kwargs)
            if _has_new_latent_site(flip):
                return None
            site = self.guide_trace.nodes[name]
            log_q = site["fn"].log_prob(self.arm_sites[name].z1)
            log_q = scale_and_mask(log_q, site["scale"], site["mask"])
        flipped = f"guide:{name}"
        for term in self.terms:
            if term.key == flipped:
                costs.add((term.stack, -log_q.to(term.value.dtype)))
            elif term.key.startswith("guide:"):
                costs.add((term.stack, term.value))
        return costs

    def _pass_errors(self, seen: list):
        """:func:`~pyro_arm.batching.batched_pass_errors` for a pass of this particle."""
        return batched_pass_errors(seen if self.context.vectorized else None)


def _has_new_latent_site(flip: BranchMessenger) -> bool:
    """Whether a branch sampled a latent site that the base run lacks."""
    return bool(flip.fresh)
