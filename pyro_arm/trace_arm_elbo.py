# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Optional

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer.elbo import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import MultiFrameTensor, is_validation_enabled, torch_item
from pyro.poutine import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_if_enumerated, warn_if_nan

from pyro_arm.baselines import baseline_options, leave_one_out, site_baseline
from pyro_arm.dependencies import Dependencies, needs_dependencies, trace_dependencies
from pyro_arm.estimators import Estimator, check_num_samples, get_estimator
from pyro_arm.messengers import BaseSampleMessenger, BranchMessenger
from pyro_arm.signals import (
    append_event_dims,
    cost_terms,
    local_signal,
    select_branch,
    signal_frames,
)

_BRANCH_PLATE = "_arm_branches"


class _Run:
    """
    A base run of model and guide (of all particles, when vectorized) and its ARM samples,
    which computes its ELBO and a surrogate whose gradient is the gradient estimate.
    """

    def __init__(self, model, guide, model_trace: Trace, guide_trace: Trace, sampler):
        self.model, self.guide = model, guide
        self.model_trace, self.guide_trace = model_trace, guide_trace
        self.sampler: BaseSampleMessenger = sampler
        self.arm_sites = sampler.arm_sites
        self.dependencies: Optional[Dependencies] = None
        # the last sample site of the guide, factors included
        self.last_site = next(
            (n for n, s in reversed(guide_trace.nodes.items()) if s["type"] == "sample"), None
        )

    def elbo(self) -> torch.Tensor:
        elbo = self.model_trace.log_prob_sum() - self.guide_trace.log_prob_sum()
        return torch.as_tensor(elbo)

    def track_dependencies(self, args, kwargs) -> None:
        """Traces the run's dependencies, for runs whose signals need them."""
        if needs_dependencies(self.guide_trace, self.arm_sites):
            self.dependencies = trace_dependencies(
                self.model, self.guide, self.sampler.values, args, kwargs
            )

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
            if deps is None or name in control:  # every cost term
                keep = None
            else:
                keep = lambda key, name=name: name in deps[key]  # noqa: E731
            costs = cost_terms(self.model_trace, self.guide_trace, keep=keep)
            signals[name] = torch.as_tensor(costs.sum_to(self.frames(name)))
        return signals

    def surrogate_elbo(
        self, estimator: Estimator, branch_dim: Optional[int], args, kwargs, score_signals: dict
    ):
        """
        :param branch_dim: the dim of a plate over branches, to run all branches as one
            batched pass, or ``None`` to run them one by one.
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
        if not self.arm_sites:
            return surrogate
        costs = cost_terms(self.model_trace, self.guide_trace)
        frames = {name: self.frames(name) for name in self.arm_sites}
        branch_signals = {}
        if estimator.antithetic:
            branch_signals = self.branch_signals(frames, branch_dim, args, kwargs)
        for name, arm in self.arm_sites.items():
            base_signal = local_signal(costs, frames[name], arm.event_dim)
            grad = estimator.logits_grad(branch_signals.get(name), base_signal, arm.u, arm.logits)
            surrogate = surrogate + (grad.detach() * arm.logits).sum()
        return surrogate

    def branch_signals(self, frames: dict, branch_dim: Optional[int], args, kwargs) -> dict:
        """The signal of each ARM site in the branch that flips it, event dims appended."""
        names = list(self.arm_sites)
        if branch_dim is None or len(names) == 1:
            return {
                name: local_signal(
                    self.branch_costs(name, args, kwargs), frames[name], arm.event_dim
                )
                for name, arm in self.arm_sites.items()
            }
        branches = pyro.plate(_BRANCH_PLATE, len(names), dim=branch_dim)
        flips = BranchMessenger(self.sampler, names, branch_dim)
        with _batched_pass_errors(flips.seen):
            costs = _run_costs(branches(self.model), flips(branches(self.guide)), args, kwargs)
        missing = [name for name in self.sampler.order if name not in flips.seen]
        if missing:
            raise NotImplementedError(
                f"Site '{missing[0]}' of the base run did not appear in an antithetic branch: "
                "the guide's structure depends on sampled values, which a vectorized pass "
                "cannot follow; use vectorize_particles=False"
            )
        branch_frame = next(f for key in costs for f in key if f.name == _BRANCH_PLATE)
        signals = {}
        for index, (name, arm) in enumerate(self.arm_sites.items()):
            signal = costs.sum_to(frames[name] | {branch_frame})
            signals[name] = append_event_dims(
                select_branch(signal, index, -branch_dim), arm.event_dim
            )
        return signals

    def branch_costs(self, name: str, args, kwargs) -> MultiFrameTensor:
        """The costs of the branch that flips ARM site ``name``."""
        flip = BranchMessenger(self.sampler, [name])
        if name != self.last_site:
            return _run_costs(self.model, flip(self.guide), args, kwargs)
        # Nothing (no sample, no factor) follows the last site: only its own log q and the
        # model change, unless the flip makes the model sample a site the base run lacks;
        # then the guide would sample it too, and the branch runs guide and model.
        with torch.no_grad(), pyro.validation_enabled(False):
            model_trace = poutine.trace(flip(self.model)).get_trace(*args, **kwargs)
            model_trace = prune_subsample_sites(model_trace)
            if _has_new_latent_site(model_trace, self.sampler.values):
                flip = BranchMessenger(self.sampler, [name])
                return _run_costs(self.model, flip(self.guide), args, kwargs)
            model_trace.compute_log_prob()
            site = self.guide_trace.nodes[name]
            log_q = site["fn"].log_prob(self.arm_sites[name].z1)
            log_q = scale_and_mask(log_q, site["scale"], site["mask"])
        return cost_terms(model_trace, self.guide_trace, {name: log_q})


class TraceARM_ELBO(ELBO):
    r"""
    An ELBO whose gradient gives every Bernoulli sample site of the guide the antithetic
    ARM estimator (Augment-REINFORCE-Merge [1]), or DisARM [2] or AR.

    For a guide site :math:`z \sim \mathrm{Bernoulli}(\sigma(\phi))` with independent
    components, a uniform :math:`u \sim U(0, 1)` of :math:`z`'s shape gives the sample
    :math:`z_2 = 1[u < \sigma(\phi)]` and its antithetic twin :math:`z_1 = 1[u > \sigma(-\phi)]`,
    and with :math:`f = \log p(x, z) - \log q(z \mid x)`

    .. math::

        \nabla_\phi \mathbb{E}_q[f] = \mathbb{E}_u\big[(f(z_1) - f(z_2))(u - \tfrac12)\big]
        \quad \text{(ARM)}, \qquad
        \mathbb{E}_u\big[f(z_2)(1 - 2u)\big] \quad \text{(AR)},

    and DisARM integrates :math:`u` out given the pair:
    :math:`\mathbb{E}[\tfrac12 (f(z_1) - f(z_2))(1 - 2 z_2) 1[z_1 \ne z_2] \sigma(|\phi|)]`.
    The gradient flows from :math:`\phi` into whatever the logits depend on (guide parameters,
    upstream reparameterized samples); the explicit gradient of :math:`\log q(z)`, which has
    mean zero, is dropped at these sites.

    **Several sites.** The signal of ARM site :math:`t` compares the base run with a branch that
    holds every site sampled before :math:`t` at its base value, sets :math:`t` to :math:`z_1`,
    and resamples the sites after :math:`t`, later Bernoulli sites from their base uniforms
    (common random numbers). The :math:`z_2` member of every pair is thus the base run itself,
    and :math:`T` ARM sites cost :math:`T + 1` runs of model and guide per particle (AR: one).
    The branch of the last site the guide samples runs the model alone. With
    ``vectorize_particles=True`` the particles run as one batched base pass, and the branches
    of all sites and particles as one more batched pass, off the gradient tape.

    **Plate-local signals.** Each cost term is summed down to the plates it shares with site
    :math:`t`, so datapoint :math:`n`'s logits are driven by datapoint :math:`n`'s terms. Where a
    guide site sampled after :math:`t`, outside one of :math:`t`'s plates, depends on
    :math:`t`'s value, that plate is summed over instead (see :mod:`pyro_arm.signals`);
    dependencies are tracked by provenance (:mod:`pyro_arm.dependencies`) in one extra replay
    without gradient, only for runs that can need them. Subsample scales, ``poutine.scale`` and
    both kinds of mask enter the signal through the scaled, masked log-densities; the weight is
    not scaled.

    **Score-function sites** (other non-reparameterized sites, including Bernoulli sites that
    opt out with ``infer={"arm": False}``) get :math:`\nabla \log q(z)\,(f_z - b)`, where
    :math:`f_z` holds only the cost terms that depend on :math:`z`, plate-local by the same rule
    (as in :class:`~pyro.infer.tracegraph_elbo.TraceGraph_ELBO`), and :math:`b` is the site's
    ``infer={"baseline": {...}}`` baseline with ``TraceGraph_ELBO``'s options, or else, with
    several particles, the leave-one-out mean of the other particles' signals
    (:mod:`pyro_arm.baselines`). Model parameters get the ordinary gradient at the sampled
    values, reparameterized sites are pathwise, and observed guide sites (``pyro.factor``) enter
    the cost and their own pathwise gradient.

    :param int num_particles: number of particles (samples) averaged in the estimate.
    :param int max_plate_nesting: bound on nested :class:`pyro.plate` contexts; guessed by running
        model and guide once when vectorizing and left unset.
    :param bool vectorize_particles: run particles and antithetic branches as batched passes;
        requires a structure that does not depend on sampled values (violations raise
        :class:`NotImplementedError` naming the site).
    :param str estimator: ``"arm"`` (default), ``"disarm"`` or ``"ar"``; any name registered in
        :data:`pyro_arm.estimators.ESTIMATORS`; the multi-sample ``"rloo"`` and ``"arms"`` are
        described in :mod:`pyro_arm.multisample_elbo`.
    :param int num_samples: samples inside one estimate of ``"rloo"`` / ``"arms"`` (``>= 2``,
        default 2); not accepted by the other estimators.
    :param str model_grad: with ``"arms"``: ``"base"`` (default) gives model parameters the
        gradient at the base run, ``"all"`` its average over every run (base and branches).
    :param kwargs: other keyword arguments of :class:`~pyro.infer.elbo.ELBO`.

    References

    [1] ARM: Augment-REINFORCE-Merge Gradient for Stochastic Binary Networks,
        Mingzhang Yin, Mingyuan Zhou (ICLR 2019)

    [2] DisARM: An Antithetic Gradient Estimator for Binary Latent Variables,
        Zhe Dong, Andriy Mnih, George Tucker (NeurIPS 2020)
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = False,
        estimator: str = "arm",
        num_samples: Optional[int] = None,
        model_grad: str = "base",
        **kwargs: Any,
    ) -> None:
        self.estimator = get_estimator(estimator)
        # --- multi-sample estimators (issue 8): see pyro_arm.multisample_elbo
        self.num_samples = check_num_samples(self.estimator, num_samples)
        if model_grad not in ("base", "all") or (model_grad == "all" and estimator != "arms"):
            raise ValueError(
                f"model_grad must be 'base', or 'all' with estimator='arms'; got {model_grad!r}"
            )
        self.model_grad = model_grad
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            **kwargs,
        )

    def _guess_max_plate_nesting(self, model, guide, args, kwargs) -> None:
        # Draws no random numbers from the caller's stream, so the first call of `loss`,
        # `loss_and_grads` or `differentiable_loss` reports what a later one would.
        with _fork_rng():
            super()._guess_max_plate_nesting(model, guide, args, kwargs)

    def _get_trace(self, model, guide, args, kwargs) -> _Run:
        sampler = BaseSampleMessenger()
        batched = self.vectorize_particles and self.num_particles > 1
        with _batched_pass_errors(sampler.order if batched else None):
            model_trace, guide_trace = get_importance_trace(
                "flat", self.max_plate_nesting, model, sampler(guide), args, kwargs
            )
        if is_validation_enabled():
            check_if_enumerated(guide_trace)
        return _Run(model, guide, model_trace, guide_trace, sampler)

    def loss(self, model, guide, *args, **kwargs) -> float:
        """
        :returns: an estimate of the negative ELBO, from the same base runs (and random
            numbers) that :meth:`loss_and_grads` and :meth:`differentiable_loss` use.
        :rtype: float
        """
        if self.num_samples is not None:  # multi-sample estimators (issue 8)
            with torch.no_grad():
                loss = torch_item(self._loss_and_surrogate(model, guide, args, kwargs)[0])
            warn_if_nan(loss, "loss")
            return loss
        with torch.no_grad():
            elbo = sum(run.elbo() for run in self._get_traces(model, guide, args, kwargs))
        loss = -torch_item(elbo) / self.num_particles
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """
        :returns: a tensor whose value is the negative ELBO estimate and whose gradient is the
            ARM estimate of the negative ELBO's gradient.
        """
        loss, surrogate_loss, _ = self._loss_and_surrogate(model, guide, args, kwargs)
        warn_if_nan(surrogate_loss, "loss")
        return loss + (surrogate_loss - surrogate_loss.detach())

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """
        Estimates the negative ELBO and accumulates the estimate of its gradient into the
        ``.grad`` of the parameters of model and guide.

        :returns: an estimate of the negative ELBO.
        :rtype: float
        """
        loss, surrogate_loss, trainable = self._loss_and_surrogate(model, guide, args, kwargs)
        if trainable and surrogate_loss.requires_grad:
            surrogate_loss.backward(retain_graph=self.retain_graph)
        loss = torch_item(loss)
        warn_if_nan(loss, "loss")
        return loss

    def _loss_and_surrogate(self, model, guide, args, kwargs):
        if self.num_samples is not None:  # multi-sample estimators (issue 8)
            from pyro_arm.multisample_elbo import multisample_loss_and_surrogate

            return multisample_loss_and_surrogate(self, model, guide, args, kwargs)
        # All base runs come first, so that the random numbers behind the reported loss are
        # drawn exactly as in `loss`.
        runs = list(self._get_traces(model, guide, args, kwargs))
        for run in runs:
            run.track_dependencies(args, kwargs)
        score_signals, baseline_loss = self._score_signals(runs)
        branch_dim = -self.max_plate_nesting - 1 if self.vectorize_particles else None
        elbo = surrogate_elbo = 0.0
        for run, signals in zip(runs, score_signals):
            elbo = elbo + run.elbo().detach()
            surrogate_elbo = surrogate_elbo + run.surrogate_elbo(
                self.estimator, branch_dim, args, kwargs, signals
            )
        trainable = any(
            site["type"] == "param"
            for run in runs
            for trace in (run.model_trace, run.guide_trace)
            for site in trace.nodes.values()
        )
        loss = -torch.as_tensor(elbo) / self.num_particles
        surrogate_loss = (baseline_loss - torch.as_tensor(surrogate_elbo)) / self.num_particles
        return loss, surrogate_loss, trainable

    def _score_signals(self, runs: list) -> tuple[list, Any]:
        """
        The signal of every score-function site of every run, less its baseline (see
        :mod:`pyro_arm.baselines`), and the loss that trains the learned baselines.
        """
        signals = [run.score_signals() for run in runs]
        baselines = [{} for _ in runs]
        baseline_loss = 0.0
        for i, run in enumerate(runs):
            for name, signal in signals[i].items():
                options = baseline_options(run.guide_trace.nodes[name])
                if options.any:
                    site = run.guide_trace.nodes[name]
                    baselines[i][name], loss = site_baseline(name, site, signal, options)
                    baseline_loss = baseline_loss + loss
        if self.num_particles > 1:
            self._leave_one_out(signals, baselines, runs)
        centred = [
            {name: signal - baselines[i].get(name, 0.0) for name, signal in signals[i].items()}
            for i in range(len(runs))
        ]
        return centred, baseline_loss

    def _leave_one_out(self, signals: list, baselines: list, runs: list) -> None:
        """Leave-one-out baselines across particles for the sites without their own."""
        if self.vectorize_particles:
            dim = -self.max_plate_nesting  # the particles plate (see ELBO)
            for name, signal in signals[0].items():
                if name in baselines[0] or signal.dim() < -dim:
                    continue
                if signal.size(dim) == self.num_particles:
                    baselines[0][name] = leave_one_out(signal, dim)
            return
        names = {name for particle in signals for name in particle}
        for name in names:
            have = [
                i
                for i, particle in enumerate(signals)
                if name in particle and name not in baselines[i]
            ]
            shapes = {signals[i][name].shape for i in have}
            if len(have) < 2 or len(shapes) != 1:
                continue
            stacked = torch.stack([signals[i][name] for i in have])
            for i, baseline in zip(have, leave_one_out(stacked, 0)):
                baselines[i][name] = baseline


#: Messages of the errors that torch raises when code converts a batched tensor to a Python
#: number or bool: the signature of value-dependent control flow.
_CONTROL_FLOW_ERRORS = (
    "cannot be converted to Scalar",
    "Boolean value of Tensor with more than one value is ambiguous",
    "only one element tensors can be converted to Python scalars",
)


def is_control_flow_error(exc: BaseException) -> bool:
    """Whether ``exc`` is what torch raises when code reads a batched tensor as one number."""
    return isinstance(exc, (RuntimeError, ValueError)) and any(
        message in str(exc) for message in _CONTROL_FLOW_ERRORS
    )


@contextmanager
def _batched_pass_errors(seen: Optional[list]):
    """
    Turns an error of value-dependent control flow that user code raises inside a batched pass
    into a clear error naming the last site of ``seen``; inactive when ``seen`` is None. Any
    other error (out of memory, a shape bug) keeps its type and message, with a note added.
    """
    try:
        yield
    except (RuntimeError, ValueError) as exc:
        if seen is None:
            raise
        where = f"after site '{seen[-1]}'" if seen else "before the first site"
        if not is_control_flow_error(exc):
            exc.add_note(f"(raised {where} in a batched pass of particles or antithetic branches)")
            raise
        raise NotImplementedError(
            f"Model or guide failed {where} in a batched pass of particles or antithetic "
            f"branches: {exc}. Code that converts a sampled value to a Python number or "
            "branches on it (.item(), `if z:`) cannot run vectorized; "
            "use vectorize_particles=False"
        ) from exc


def _has_new_latent_site(model_trace: Trace, values: dict) -> bool:
    """Whether the model sampled a latent site that the base run of the guide lacks."""
    return any(
        site["type"] == "sample" and not site["is_observed"] and name not in values
        for name, site in model_trace.nodes.items()
    )


def _fork_rng():
    """Forks the random number generators of the CPU and of any initialised CUDA device."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


def _run_costs(model, guide, args, kwargs) -> MultiFrameTensor:
    """Runs guide and model once, without gradient or validation, and returns the costs."""
    with torch.no_grad(), pyro.validation_enabled(False):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        return cost_terms(model_trace, guide_trace)
