# SPDX-License-Identifier: Apache-2.0
"""
One particle of :class:`~pyro_arm.TraceARM_ELBO`: a base run of model and guide (all particles
at once when vectorized), its branches, the plate-local signals of its sites and the surrogate
whose gradient is the estimate.

The particle's rows are its base run and one branch ``(t, k)`` per site ``t`` and member
``k >= 1`` (:meth:`Particle.plan`, from the :class:`~pyro_arm.estimators.Estimator`). Two
executors run the branches over the same plan:

- looped (:meth:`Particle.run_looped`): branch by branch, following value-dependent structure
  (a site the base run lacked is sampled afresh); the branch of the guide's last site runs the
  model alone unless the flip adds a latent site;
- batched (:meth:`Particle.run_batched`): every branch in one pass, along a plate over branches
  left of every other plate, off the gradient tape; value-dependent control flow fails there
  and becomes :class:`NotImplementedError` (:mod:`pyro_arm.batching`).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, NamedTuple, Optional

import pyro
import torch
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer.util import MultiFrameTensor
from pyro.poutine import Trace

from pyro_arm.batching import batched_pass_errors, check_all_seen
from pyro_arm.costs import (
    LogPMessenger,
    costs_of,
    detached,
    model_costs,
    run_costs,
    trace_cost_terms,
)
from pyro_arm.dependencies import (
    Dependencies,
    needs_dependencies,
    structure_key,
    trace_dependencies,
)
from pyro_arm.estimators import Estimator
from pyro_arm.reads import ReadGuard
from pyro_arm.sampler import BranchMessenger, SampleMessenger
from pyro_arm.signals import append_event_dims, select_branch, signal_frames

_BRANCH_PLATE = "_arm_branches"


class ParticleContext(NamedTuple):
    """
    What the particles of one call share.

    :param model: the model, in a plate over particles when vectorized.
    :param guide: the guide, likewise.
    :param args: the call's positional arguments.
    :param kwargs: the call's keyword arguments.
    :param estimator: the estimator.
    :param num_samples: its ``n`` (``None`` for a pair estimator).
    :param vectorized: whether the base runs of all particles are one batched pass.
    :param model_grad_all: model parameters get their gradient averaged over every row.
    :param known_dependencies: the :class:`~pyro_arm.dependencies.Dependencies` traced so far in
        the call, by :func:`~pyro_arm.dependencies.structure_key` (runs whose replay read no
        value into Python).
    """

    model: Callable
    guide: Callable
    args: tuple
    kwargs: dict
    estimator: Estimator
    num_samples: Optional[int]
    vectorized: bool
    model_grad_all: bool
    known_dependencies: dict


class Particle:
    """
    A base run of model and guide and its branches.

    :param context: what the particles of the call share.
    :param model_trace: the base run's model trace, log-densities computed.
    :param guide_trace: the base run's guide trace, score parts computed.
    :param sampler: the handler that drew the base run.
    """

    def __init__(
        self,
        context: ParticleContext,
        model_trace: Trace,
        guide_trace: Trace,
        sampler: SampleMessenger,
    ) -> None:
        self.context = context
        self.model_trace, self.guide_trace = model_trace, guide_trace
        self.sampler = sampler
        self.samples = sampler.samples
        self.dependencies: Optional[Dependencies] = None
        self.row_frames: Optional[frozenset] = None
        # detached cost terms, at least float32, shared by the ELBO and the signals
        self.terms = trace_cost_terms(model_trace, guide_trace)
        self.costs = costs_of(self.terms)
        #: the guide's enumerated sites
        self.enumerated = {
            n
            for n, s in guide_trace.nodes.items()
            if (s.get("infer") or {}).get("_enumerate_dim") is not None
        }
        # the last sample site of the guide, factors included
        self.last_site = next(
            (n for n, s in reversed(guide_trace.nodes.items()) if s["type"] == "sample"), None
        )
        #: each branched site's signals, member 0 (the base run) first
        self.member_signals: dict[str, list] = {}
        #: each branched score-function site's draws in the branches
        self.draws: dict[str, list] = {}
        self.num_branches = 0
        self.branch_elbo: torch.Tensor | float = 0.0
        self.branch_log_p: torch.Tensor | float = 0.0
        #: (what, value) of every signal computed, for the non-finite warnings
        self.signals: list[tuple[str, torch.Tensor]] = []

    def elbo(self) -> torch.Tensor:
        """The ELBO of the base run (detached), summed in at least float32."""
        return torch.as_tensor(sum(value.sum() for value in self.costs.values()))

    def track_dependencies(self) -> None:
        """
        Traces the run's dependencies, for runs whose signals need them. A run of the same
        structure as an earlier run of the call reuses its dependencies when that run's replay
        read no value into Python: its control flow did not depend on the sampled values, so
        neither do the dependencies.
        """
        if not needs_dependencies(self.guide_trace, self.samples):
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
        """The guide's score-function sites: sampled, not Bernoulli-estimated, not
        reparameterized."""
        return [
            name
            for name, site in self.guide_trace.nodes.items()
            if site["type"] == "sample"
            and not site["is_observed"]
            and name not in self.samples
            and not is_identically_zero(site["score_parts"].score_function)
        ]

    def frames(self, name: str) -> frozenset:
        """The plates a site's signal keeps: :attr:`row_frames` when set (every site then gets
        its row's costs summed down to them), else the plate-local rule of
        :func:`~pyro_arm.signals.signal_frames`."""
        if self.row_frames is not None:
            return self.row_frames
        deps = self.dependencies
        depends_on = None if deps is None or name in deps.control else deps.guide
        return signal_frames(self.guide_trace, name, depends_on)

    def score_signal(self, name: str):
        """A score-function site's signal in the base run: the cost terms that depend on it,
        summed down to its plate-local frames."""
        deps = self.dependencies
        costs = self.costs
        if deps is not None and name not in deps.control:  # only the terms that depend on it
            costs = costs_of(self.terms, lambda key: name in deps.costs[key])
        return torch.as_tensor(costs.sum_to(self.frames(name)))

    def plan(self) -> list[tuple[str, int]]:
        """The branches ``(site, k)`` of the particle, in the guide's order."""
        draws = self.context.estimator.num_draws(self.context.num_samples)
        score = set(self.score_sites()) if draws > 1 else set()
        branches = []
        for name in self.sampler.order:
            if name in self.samples:
                branches += [(name, k) for k in range(1, self.samples[name].z.size(0))]
            elif name in score:
                branches += [(name, k) for k in range(1, draws)]
        return branches

    def run_branches(self, branch_dim: Optional[int], guard: Optional[ReadGuard] = None) -> None:
        """Runs the plan: batched along ``branch_dim`` (the runs of model and guide under
        ``guard``, when given); looped when ``None`` or one branch."""
        plan = self.plan()
        self.num_branches = len(plan)
        names = list(self.samples) + [name for name, _ in plan if name not in self.samples]
        self.member_signals = {name: [self.base_signal(name)] for name in names}
        self.draws = {name: [] for name, _ in plan if name not in self.samples}
        self.branch_elbo = self.branch_log_p = 0.0
        if not plan:
            return
        if branch_dim is None or len(plan) == 1:  # one branch: the model alone may do
            self.run_looped(plan)
        else:
            self.run_batched(plan, branch_dim, guard)

    def base_signal(self, name: str):
        if name in self.samples:
            return self.costs.sum_to(self.frames(name))
        return self.score_signal(name)

    def run_looped(self, plan: list[tuple[str, int]]) -> None:
        """Runs the branches one by one."""
        for name, k in plan:
            costs = None
            if name == self.last_site and name in self.samples and not self.enumerated:
                costs = self._model_only_branch(name, k)
            if costs is None:
                handler = BranchMessenger(self.sampler, [(name, k)])
                costs = self._run_branch(handler, lambda fn: fn)
                if name in self.draws:
                    self.draws[name].append(handler.drawn[name])
            self.branch_elbo = self.branch_elbo + sum(v.sum() for v in costs.values())
            self.member_signals[name].append(costs.sum_to(self.frames(name)))

    def run_batched(
        self, plan: list[tuple[str, int]], branch_dim: int, guard: Optional[ReadGuard] = None
    ) -> None:
        """Runs every branch as one batched pass along a plate at ``branch_dim``, model and
        guide under ``guard`` when given."""
        plate = pyro.plate(_BRANCH_PLATE, len(plan), dim=branch_dim)
        handler = BranchMessenger(self.sampler, plan, branch_dim)
        with batched_pass_errors(handler.seen), guard or nullcontext():
            costs = self._run_branch(handler, plate)
        check_all_seen(self.sampler.order, handler.seen)
        frame = next(f for key in costs for f in key if f.name == _BRANCH_PLATE)
        self.branch_elbo = _branch_total(costs, frame, len(plan), -branch_dim)
        summed = {name: costs.sum_to(self.frames(name) | {frame}) for name, _ in plan}
        for index, (name, _) in enumerate(plan):
            self.member_signals[name].append(select_branch(summed[name], index, -branch_dim))
            if name in self.draws:
                drawn = handler.drawn[name]
                event_dim = self.guide_trace.nodes[name]["fn"].event_dim
                self.draws[name].append(drawn.select(drawn.dim() + branch_dim - event_dim, index))

    def _run_branch(self, handler: BranchMessenger, wrap: Callable) -> MultiFrameTensor:
        """The costs of guide and model under ``handler``."""
        ctx = self.context
        log_p = LogPMessenger() if ctx.model_grad_all else None
        costs = run_costs(wrap(ctx.model), handler(wrap(ctx.guide)), ctx.args, ctx.kwargs, log_p)
        if log_p is not None:
            self.branch_log_p = self.branch_log_p + log_p.log_p
        return costs

    def _model_only_branch(self, name: str, k: int) -> Optional[MultiFrameTensor]:
        """
        The costs of the branch that sets the guide's last site ``name`` to member ``k``.
        Nothing follows it in the guide: only its own log q and the model change, unless the
        flip makes the model sample a latent site the base run lacks; then the guide would
        sample it too, and this returns ``None`` (the branch must run guide and model).
        """
        ctx, costs = self.context, MultiFrameTensor()
        values = detached(self.sampler.values)
        values[name] = self.samples[name].z[k]
        log_p = LogPMessenger() if ctx.model_grad_all else None
        with pyro.validation_enabled(False):
            seen = model_costs(ctx.model, ctx.args, ctx.kwargs, costs, values, log_p)
        if _has_new_latent_site(seen, values):
            return None
        if log_p is not None:
            self.branch_log_p = self.branch_log_p + log_p.log_p
        site = self.guide_trace.nodes[name]
        with torch.no_grad():
            log_q = site["fn"].log_prob(values[name])
            log_q = scale_and_mask(log_q, site["scale"], site["mask"])
        flipped = f"guide:{name}"
        for term in self.terms:
            if term.key == flipped:
                costs.add((term.stack, -log_q.to(term.value.dtype)))
            elif term.key.startswith("guide:"):
                costs.add((term.stack, term.value))
        return costs

    def stacked_signals(self, name: str, dim: int, event_dim: int) -> torch.Tensor:
        """A site's member signals as one ``(m, ...)`` tensor with ``dim`` dims after the
        first, ``event_dim`` trailing singleton dims included."""
        padded = []
        for k, signal in enumerate(self.member_signals[name]):
            signal = append_event_dims(torch.as_tensor(signal), event_dim)
            what = "signal" if k == 0 else f"signal of member {k}"
            self.signals.append((f"{what} of site '{name}'", signal))
            padded.append(signal.reshape((1,) * (dim - signal.dim()) + signal.shape))
        return torch.stack(torch.broadcast_tensors(*padded))

    def surrogate_elbo(self, score_weights: dict, base_log_p: Optional[torch.Tensor] = None):
        """
        The surrogate ELBO of the base run whose gradient is the estimate.

        :param score_weights: each score-function site's weights, one per draw (detached).
        :param base_log_p: with ``model_grad_all``, the model's log-density at the base run's
            detached values.
        """
        surrogate = 0.0
        for site in self.model_trace.nodes.values():
            if site["type"] == "sample":
                surrogate = surrogate + site["log_prob_sum"]
        if base_log_p is not None:  # model parameters: the average over every row
            rows = 1 + sum(len(s) - 1 for s in self.member_signals.values())
            surrogate = surrogate + (base_log_p + self.branch_log_p) / rows - base_log_p
        estimator = self.context.estimator
        for name, site in self.guide_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if name in self.samples:  # the site family's reduction of its members' signals
                s = self.samples[name]
                f = self.stacked_signals(name, *s.family.layout(s))
                surrogate = surrogate + s.family.surrogate(estimator, f, s)
                continue
            if site["is_observed"]:  # a factor: its log-density, pathwise
                surrogate = surrogate - site["log_prob_sum"]
                continue
            entropy_term = site["score_parts"].entropy_term
            if not is_identically_zero(entropy_term):
                surrogate = surrogate - entropy_term.sum()
            if name in score_weights:
                # Pyro's score function is neither scaled nor masked: the draws' alike
                scores = [site["score_parts"].score_function] + [
                    site["fn"].log_prob(value) for value in self.draws.get(name, [])
                ]
                for weight, score in zip(score_weights[name], scores):
                    surrogate = surrogate + (weight * score).sum()
        return surrogate

    def differs_from(self, member_signals: dict, atol: float = 1e-4) -> bool:
        """Whether ``member_signals`` (of the same particle's branches run by another executor)
        differ from this particle's where both are deterministic (no fresh draw at or after the
        flip)."""
        fresh = [
            p
            for n, p in self.sampler.position.items()
            if n not in self.samples and n not in self.enumerated
        ]
        for name, signals in self.member_signals.items():
            if any(p >= self.sampler.position[name] for p in fresh):
                continue
            for a, b in zip(signals[1:], member_signals[name][1:]):
                # a batched pass keeps the singleton dims of the plates a signal sums over
                a, b = torch.as_tensor(a).squeeze(), torch.as_tensor(b).squeeze()
                if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=atol):
                    return True
        return False


def _has_new_latent_site(seen: dict, values: dict) -> bool:
    """Whether a model-only branch met a latent site that the base run lacks."""
    return bool(set(seen) - set(values))


def _branch_total(costs: MultiFrameTensor, frame, num: int, nesting: int) -> torch.Tensor:
    """The sum of every branch's costs (a term without the branch dim counts once per branch)."""
    total = costs.sum_to(frozenset({frame}))
    if torch.is_tensor(total) and total.dim() >= nesting and total.size(-nesting) == num:
        return total.sum()
    return torch.as_tensor(total).sum() * num
