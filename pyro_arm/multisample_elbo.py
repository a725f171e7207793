# SPDX-License-Identifier: Apache-2.0
r"""
The multi-sample estimators of :class:`~pyro_arm.TraceARM_ELBO`: ``estimator="rloo"`` and
``estimator="arms"`` with ``num_samples=n`` (:math:`n \ge 2`). The estimator math lives in
:mod:`pyro_arm.multisample`; this module runs the samples and keeps their bookkeeping.

**RLOO** (REINFORCE with leave-one-out baselines). Each particle draws :math:`n` independent
joint samples of the guide (:math:`n` runs of guide and model). Every non-reparameterized guide
site, Bernoulli included, gets :math:`\sum_k \nabla \log q(z_k)\,\frac1n(f_k - \frac1{n-1}
\sum_{j \ne k} f_j)`, where :math:`f_k` is sample :math:`k`'s Rao-Blackwellized, plate-local
signal (the score-function machinery of :class:`~pyro_arm.TraceARM_ELBO`, per plate element).
A site's own ``infer={"baseline": ...}`` replaces the leave-one-out baseline. Model
parameters and reparameterized sites get the average of their gradients over the :math:`n`
samples. With ``vectorize_particles=True`` the :math:`n` samples of every particle run as one
batched pass (a particle plate of size ``num_particles * n``). Cost: :math:`n` runs.

**ARMS** (Dimitriev & Zhou, 2021). Every Bernoulli guide site :math:`t` draws :math:`n`
correlated samples :math:`z_{t,0}, \dots, z_{t,n-1}` from the Dirichlet copula
(:func:`~pyro_arm.multisample.arms_uniforms`, ordered by
:func:`~pyro_arm.multisample.arms_lower_tail`); the base run takes :math:`z_{t,0}`. Every other
non-reparameterized site :math:`s` draws :math:`n - 1` more independent samples given the base
run's upstream values. *Scheme for several sites*, as the antithetic branches of ARM/DisARM:
the branch :math:`(t, k)`, :math:`k = 1, \dots, n - 1`, holds every site sampled before
:math:`t` at its base value, sets :math:`t` to its sample :math:`k`, and resamples the sites
after :math:`t`, later Bernoulli sites from their base uniform :math:`v_{0}` (common random
numbers), other sites afresh. The signals :math:`f_{t,0}` (base run) and :math:`f_{t,k}`
(branch :math:`(t, k)`) are plate-local (the frames rule of :mod:`pyro_arm.signals`); given the
upstream values and the downstream random numbers, each :math:`f_{t,k}` is a fixed function of
:math:`z_{t,k}`, so :func:`~pyro_arm.multisample.arms` of the :math:`n` signals is unbiased for
Bernoulli sites, and RLOO (:func:`~pyro_arm.multisample.rloo_weights` times
:math:`\nabla \log q(s_k)`, all :math:`s_k` scored under the base run's distribution) for the
others. Cost: :math:`1 + T(n - 1)` runs for :math:`T` non-reparameterized guide sites; with
``vectorize_particles=True`` the base runs of all particles are one batched pass and all
:math:`T(n-1)` branches of all particles one more, off the gradient tape. For :math:`n = 2`
and the copula pair :math:`(w, 1 - w)`, the samples, branches and guide gradient are DisARM's
(with ``model_grad="base"``, the whole gradient). Model parameters get the gradient at the base
run (``model_grad="base"``) or its average over the base run and every branch
(``model_grad="all"``, the default: the branches' model log-densities go on the tape, with the
guide's values detached, plus one more model run at the base run's detached values). A
non-Bernoulli site's own ``infer={"baseline": ...}`` replaces its leave-one-out baseline: its
weights are :math:`\frac1n (f_{s,k} - b)`, and a decaying average or a learned baseline is fed
the mean of the :math:`n` signals.

The reported loss is the :math:`-\mathrm{ELBO}` estimate averaged over every run: every
branch's joint sample is marginally a sample of the guide.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import pyro
import torch
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer.util import MultiFrameTensor
from pyro.poutine.messenger import Messenger

from pyro_arm.baselines import baseline_options, leave_one_out, site_baseline
from pyro_arm.batching import batched_pass_errors, check_all_seen
from pyro_arm.costs import CostMessenger, ReplayValuesMessenger, run_costs
from pyro_arm.messengers import ARMSample, BaseSampleMessenger, BranchReplayMessenger
from pyro_arm.multisample import arms, arms_lower_tail, arms_uniforms, rloo_weights
from pyro_arm.particle import Particle
from pyro_arm.signals import append_event_dims, select_branch
from pyro_arm.sites import bernoulli_logits, estimator_logits, is_arm_site, is_subsample_site
from pyro_arm.trace_arm_elbo import TraceARM_ELBO

_SAMPLE_PLATE = "_arms_branches"


def multisample_loss_and_surrogate(elbo: TraceARM_ELBO, model, guide, args, kwargs):
    """
    ``(loss, surrogate_loss, trainable)`` of a multi-sample ``elbo`` (``elbo.num_samples`` set),
    as :meth:`TraceARM_ELBO._loss_and_surrogate` returns them.
    """
    kind = _RLOOPass if elbo.estimator.name == "rloo" else _ARMSPass
    sample_pass = kind(elbo)
    result = sample_pass.loss_and_surrogate(model, guide, args, kwargs)
    # keep a guessed value
    elbo.max_plate_nesting = (
        sample_pass.max_plate_nesting - _particle_dims(sample_pass) + _particle_dims(elbo)
    )
    return result


def grouped_leave_one_out(signal: torch.Tensor, dim: int, group: int) -> torch.Tensor:
    """
    :func:`~pyro_arm.baselines.leave_one_out` within consecutive groups of ``group`` entries
    along ``dim`` (of size ``num_groups * group``).
    """
    dim = dim % signal.dim()
    shape = signal.shape
    grouped = signal.reshape(shape[:dim] + (-1, group) + shape[dim + 1 :])
    return leave_one_out(grouped, dim + 1).reshape(shape)


def copula_uniforms(n: int, shape, dtype, device) -> torch.Tensor:
    """The copula draw of one Bernoulli site (a seam for tests): ``(n, *shape)`` uniforms."""
    return arms_uniforms(n, shape, dtype=dtype, device=device)


def _particle_dims(elbo: TraceARM_ELBO) -> int:
    """1 where Pyro's ELBO adds a vectorized particle plate to ``max_plate_nesting``, else 0."""
    return int(elbo.vectorize_particles and elbo.num_particles > 1)


def _user_nesting(elbo: TraceARM_ELBO) -> float:
    """The ``max_plate_nesting`` the user gave (or guessed), without the particle plate."""
    return elbo.max_plate_nesting - _particle_dims(elbo)


def _trainable(particles: list[Particle]) -> bool:
    return any(
        site["type"] == "param"
        for particle in particles
        for trace in (particle.model_trace, particle.guide_trace)
        for site in trace.nodes.values()
    )


# ------------------------------------------------------------------------------------- RLOO


class ScoreOnlySampler(BaseSampleMessenger):
    """Records a run like :class:`BaseSampleMessenger` but takes no ARM site: Pyro samples every
    site, so every non-reparameterized site is a score-function site."""

    def _pyro_sample(self, msg) -> None:
        return


class _RLOOPass(TraceARM_ELBO):
    """``num_particles * n`` score-function runs, leave-one-out within each particle's n."""

    def __init__(self, elbo: TraceARM_ELBO) -> None:
        super().__init__(
            num_particles=elbo.num_particles * elbo.num_samples,
            max_plate_nesting=_user_nesting(elbo),
            vectorize_particles=elbo.vectorize_particles,
            estimator="ar",
            retain_graph=elbo.retain_graph,
        )
        self.group = elbo.num_samples

    def loss_and_surrogate(self, model, guide, args, kwargs):
        return TraceARM_ELBO._loss_and_surrogate(self, model, guide, args, kwargs)

    def _sampler(self) -> BaseSampleMessenger:
        return ScoreOnlySampler()

    def _leave_one_out(self, signals: list, baselines: list) -> None:
        n = self.group
        if not self.vectorize_particles:
            for i in range(0, len(signals), n):
                s = slice(i, i + n)
                super()._leave_one_out(signals[s], baselines[s])
            return
        dim = -self.max_plate_nesting  # the particles plate: particle p, sample k at p * n + k
        for name, signal in signals[0].items():
            if name in baselines[0] or signal.dim() < -dim:
                continue
            if signal.size(dim) == self.num_particles:
                baselines[0][name] = grouped_leave_one_out(signal, dim, n)


# ------------------------------------------------------------------------------------- ARMS


class Copula(NamedTuple):
    """The n correlated samples of one Bernoulli site: ordered uniforms, logits, samples."""

    v: torch.Tensor
    logits: torch.Tensor
    z: torch.Tensor
    event_dim: int
    #: the logits as the estimators see them (detached, in the working dtype)
    estimator_logits: torch.Tensor


class CopulaSampleMessenger(BaseSampleMessenger):
    """
    Draws each Bernoulli (ARM) site's ``n`` copula samples and gives the base run sample 0;
    :attr:`copulas` maps the site's name to its :class:`Copula`.
    """

    def __init__(self, num_samples: int) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.copulas: dict[str, Copula] = {}

    def _pyro_sample(self, msg) -> None:
        if msg["value"] is not None or not is_arm_site(msg):
            return
        fn = msg["fn"]
        weights_logits = estimator_logits(fn)  # before fn.logits: it tells probs= sites apart
        logits = bernoulli_logits(fn)
        u = copula_uniforms(
            self.num_samples, fn.shape(), weights_logits.dtype, weights_logits.device
        )
        v = arms_lower_tail(u, weights_logits)
        z = (v < torch.sigmoid(weights_logits)).to(logits.dtype)
        name, event_dim = msg["name"], fn.event_dim
        self.copulas[name] = Copula(v, logits, z, event_dim, weights_logits)
        self.arm_sites[name] = ARMSample(v[0], logits, z[1], z[0], event_dim, weights_logits)
        msg["value"] = z[0]


class SampleSetMessenger(BranchReplayMessenger):
    """
    Replays a :class:`CopulaSampleMessenger` base run as the branches ``(site, k)``: sites
    before ``site`` at their base values (and the plates' subsamples), ``site`` at its sample
    ``k`` (a Bernoulli site's copula sample, another site's fresh draw), later Bernoulli sites
    from their base uniforms, other later sites afresh.

    :param branches: ``(site, k)`` pairs, one per branch.
    :param branch_dim: the dim of the plate over branches, or ``None`` for one branch.

    After the run, :attr:`drawn` maps each flipped non-Bernoulli site to its fresh draw (with
    the branch dim when batched).
    """

    def __init__(
        self,
        base: CopulaSampleMessenger,
        branches: list[tuple[str, int]],
        branch_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.flips = [base.position[name] for name, _ in branches]
        self.ks = [k for _, k in branches]
        self.branch_dim = branch_dim
        self.seen: list[str] = []
        self.drawn: dict[str, torch.Tensor] = {}

    def _new_site(self, msg) -> None:
        if self.branch_dim is not None:
            raise NotImplementedError(
                f"Site '{msg['name']}' appeared in a branch but not in the base run: the "
                "guide's structure depends on sampled values, which a vectorized pass cannot "
                "follow; use vectorize_particles=False"
            )
        # else a new site downstream of the flip: sampled afresh by Pyro

    def _replay(self, msg, position: int) -> None:
        name = msg["name"]
        copula = self.base.copulas.get(name)
        fn = msg["fn"]
        if self.branch_dim is None:
            flip, k = self.flips[0], self.ks[0]
            if position < flip:
                msg["value"] = self.base.values[name]
            elif position == flip:
                msg["value"] = copula.z[k] if copula is not None else self._draw(msg)
            elif copula is not None:
                msg["value"] = _common_random_sample(fn, copula)
            return
        msg["value"] = self._batched_value(msg, position, copula)

    def _draw(self, msg) -> torch.Tensor:
        value = msg["fn"](*msg["args"], **msg["kwargs"])
        self.drawn[msg["name"]] = value
        return value

    def _batched_value(self, msg, position: int, copula: Optional[Copula]) -> torch.Tensor:
        fn = msg["fn"]
        device = self.base.values[msg["name"]].device
        shape = (-1,) + (1,) * (-self.branch_dim - 1 + fn.event_dim)
        flips = torch.tensor(self.flips, device=device).reshape(shape)
        before, at = flips > position, flips == position
        if copula is None:
            own = after = self._draw(msg)
        else:
            own = copula.z[torch.tensor(self.ks, device=device)]
            while own.dim() < -self.branch_dim + fn.event_dim:
                own = own.unsqueeze(1)
            after = _common_random_sample(fn, copula)
        return torch.where(before, self.base.values[msg["name"]], torch.where(at, own, after))


def _common_random_sample(fn, copula: Copula) -> torch.Tensor:
    """A Bernoulli sample of ``fn`` from the base sample's uniforms (where the shapes agree)."""
    v = copula.v[0]
    if bernoulli_logits(fn) is None or torch.broadcast_shapes(v.shape, fn.shape()) != fn.shape():
        return fn()
    return (v < torch.sigmoid(estimator_logits(fn))).to(copula.z.dtype)


class _ARMSPass(TraceARM_ELBO):
    """Base runs with copula samples, then the branches of :class:`SampleSetMessenger`."""

    def __init__(self, elbo: TraceARM_ELBO) -> None:
        super().__init__(
            num_particles=elbo.num_particles,
            max_plate_nesting=_user_nesting(elbo),
            vectorize_particles=elbo.vectorize_particles,
            estimator="disarm",
            retain_graph=elbo.retain_graph,
        )
        self.n = elbo.num_samples
        self.model_grad = elbo.model_grad

    def _sampler(self) -> BaseSampleMessenger:
        return CopulaSampleMessenger(self.n)

    def loss_and_surrogate(self, model, guide, args, kwargs):
        particles = self._particles(model, guide, args, kwargs)
        per_particle = self.num_particles if self.vectorize_particles else 1
        elbo = surrogate_elbo = baseline_loss = 0.0
        evaluations = 0
        for particle in particles:
            particle.track_dependencies()
            sets = SampleSets(particle, self.n, self.model_grad == "all")
            elbo = elbo + particle.elbo() + sets.branch_elbo
            evaluations += per_particle * (1 + len(sets.branches))
            surrogate_elbo = surrogate_elbo + sets.surrogate_elbo()
            baseline_loss = baseline_loss + sets.baseline_loss
        loss = -torch.as_tensor(elbo) / evaluations
        surrogate_loss = (baseline_loss - torch.as_tensor(surrogate_elbo)) / self.num_particles
        return loss, surrogate_loss, _trainable(particles)


class SampleSets:
    """
    The ``n`` samples of every non-reparameterized guide site of one base run: runs the
    branches ``(t, k)``, ``k = 1 .. n - 1`` (one by one, or as one batched pass when the
    particle's context is vectorized), keeps each site's ``n`` plate-local signals and builds the
    surrogate ELBO.
    """

    def __init__(self, run: Particle, n: int, model_grad_all: bool = False) -> None:
        self.run = run
        ctx = run.context
        self.model_grad_all = model_grad_all
        self.branch_log_p: torch.Tensor | float = 0.0  # the branches' model log-densities
        sampler = run.sampler
        score = set(run.score_sites())
        self.sites = [s for s in sampler.order if s in sampler.copulas or s in score]
        self.branches = [(site, k) for site in self.sites for k in range(1, n)]
        self.frames = {site: run.frames(site) for site in self.sites}
        self.signals = {site: [run.costs.sum_to(self.frames[site])] for site in self.sites}
        self.draws: dict[str, list] = {site: [] for site in score}
        self.branch_elbo: torch.Tensor | float = 0.0
        #: the loss that trains the sites' learned baselines (set by :meth:`surrogate_elbo`)
        self.baseline_loss: torch.Tensor | float = 0.0
        if not self.branches:
            return
        if ctx.vectorized:
            self._run_batched(ctx.branch_dim)
        else:
            for branch in self.branches:
                self._run_branch(branch)

    def _run_branch(self, branch: tuple[str, int]) -> None:
        site, _ = branch
        handler = SampleSetMessenger(self.run.sampler, [branch])
        costs = self._costs(self.run.context.model, handler(self.run.context.guide))
        self.branch_elbo = self.branch_elbo + sum(v.sum() for v in costs.values())
        self.signals[site].append(costs.sum_to(self.frames[site]))
        if site in self.draws:
            self.draws[site].append(handler.drawn[site])

    def _costs(self, model, guide) -> MultiFrameTensor:
        ctx = self.run.context
        if not self.model_grad_all:
            return run_costs(model, guide, ctx.args, ctx.kwargs)
        costs, log_p = _costs_with_model_grad(model, guide, ctx.args, ctx.kwargs)
        self.branch_log_p = self.branch_log_p + log_p
        return costs

    def _run_batched(self, branch_dim: int) -> None:
        run, num = self.run, len(self.branches)
        plate = pyro.plate(_SAMPLE_PLATE, num, dim=branch_dim)
        handler = SampleSetMessenger(run.sampler, self.branches, branch_dim)
        with batched_pass_errors(handler.seen):
            costs = self._costs(plate(run.context.model), handler(plate(run.context.guide)))
        check_all_seen(run.sampler.order, handler.seen)
        frame = next(f for key in costs for f in key if f.name == _SAMPLE_PLATE)
        self.branch_elbo = _branch_total(costs, frame, num, -branch_dim)
        summed = {site: costs.sum_to(self.frames[site] | {frame}) for site in self.sites}
        for index, (site, _) in enumerate(self.branches):
            self.signals[site].append(select_branch(summed[site], index, -branch_dim))
            if site in self.draws:
                drawn = handler.drawn[site]
                event_dim = run.guide_trace.nodes[site]["fn"].event_dim
                self.draws[site].append(drawn.select(drawn.dim() + branch_dim - event_dim, index))

    def surrogate_elbo(self):
        """The surrogate ELBO of the base run whose gradient is the estimate."""
        run = self.run
        copulas = run.sampler.copulas
        surrogate = 0.0
        for site in run.model_trace.nodes.values():
            if site["type"] == "sample":
                surrogate = surrogate + site["log_prob_sum"]
        if self.model_grad_all and self.branches:
            # model params: the average over base and branches; guide gradients unchanged
            ctx = run.context
            base = _model_log_p(ctx.model, run.sampler.values, ctx.args, ctx.kwargs)
            runs = 1 + len(self.branches)
            surrogate = surrogate + (base + self.branch_log_p) / runs - base
        for name, site in run.guide_trace.nodes.items():
            if site["type"] != "sample" or name in copulas:
                continue
            if site["is_observed"]:  # a factor: its log-density, pathwise
                surrogate = surrogate - site["log_prob_sum"]
                continue
            entropy_term = site["score_parts"].entropy_term
            if not is_identically_zero(entropy_term):
                surrogate = surrogate - entropy_term.sum()
        for name in self.sites:
            site = run.guide_trace.nodes[name]
            if name in copulas:
                copula = copulas[name]
                f = _stack(self.signals[name], copula.z.dim() - 1, copula.event_dim)
                grad = arms(f, copula.z, copula.estimator_logits)
                surrogate = surrogate + (grad.detach() * copula.logits).sum()
                continue
            scores = [site["score_parts"].score_function] + [
                scale_and_mask(site["fn"].log_prob(value), site["scale"], site["mask"])
                for value in self.draws[name]
            ]
            weights = self._score_weights(
                name, site, _stack(self.signals[name], scores[0].dim(), 0)
            )
            for weight, score in zip(weights, scores):
                surrogate = surrogate + (weight * score).sum()
        return surrogate

    def _score_weights(self, name: str, site: dict, signals: torch.Tensor) -> torch.Tensor:
        """
        The weights of the ``n`` scores of a non-Bernoulli site: leave-one-out
        (:func:`~pyro_arm.multisample.rloo_weights`), or ``(f_k - b) / n`` with the site's own
        ``infer["baseline"]`` ``b`` (fed and trained by the mean of the ``n`` signals).
        """
        options = baseline_options(site)
        if not options.any:
            return rloo_weights(signals).detach()
        baseline, loss = site_baseline(name, site, signals.mean(0), options)
        self.baseline_loss = self.baseline_loss + loss
        return ((signals - baseline) / signals.size(0)).detach()


class _LogPMessenger(Messenger):
    """Sums the model's scaled, masked log-densities, with gradient, into :attr:`log_p`."""

    def __init__(self) -> None:
        super().__init__()
        self.log_p: torch.Tensor | float = 0.0

    def _pyro_post_sample(self, msg) -> None:
        if is_subsample_site(msg):
            return
        log_prob = msg["fn"].log_prob(msg["value"], *msg["args"], **msg["kwargs"])
        self.log_p = self.log_p + scale_and_mask(log_prob, msg["scale"], msg["mask"]).sum()


def _detached(values: dict) -> dict:
    return {name: value.detach() for name, value in values.items()}


def _model_log_p(model, values: dict, args, kwargs, costs=None) -> torch.Tensor:
    """
    The model's log-density, with gradient, at the detached guide ``values``; with ``costs``,
    also adds its cost terms there (as :func:`~pyro_arm.costs.run_costs` does).
    """
    log_p = _LogPMessenger()
    with pyro.validation_enabled(False), ReplayValuesMessenger(_detached(values)), log_p:
        if costs is None:
            model(*args, **kwargs)
        else:
            with CostMessenger(costs, 1.0):
                model(*args, **kwargs)
    return torch.as_tensor(log_p.log_p)


def _costs_with_model_grad(model, guide, args, kwargs) -> tuple[MultiFrameTensor, torch.Tensor]:
    """
    Like :func:`~pyro_arm.costs.run_costs`, but the model runs with gradient at the guide's
    detached values; returns the costs and the model's log-density.
    """
    costs, values = MultiFrameTensor(), {}
    with torch.no_grad(), pyro.validation_enabled(False), CostMessenger(costs, -1.0, values):
        guide(*args, **kwargs)
    return costs, _model_log_p(model, values, args, kwargs, costs)


def _stack(signals: list, dim: int, event_dim: int) -> torch.Tensor:
    """The n signals of a site as one ``(n, ...)`` tensor with ``dim`` dims after the first."""
    padded = []
    for signal in signals:
        signal = append_event_dims(torch.as_tensor(signal), event_dim)
        padded.append(signal.reshape((1,) * (dim - signal.dim()) + signal.shape))
    return torch.stack(torch.broadcast_tensors(*padded))


def _branch_total(costs: MultiFrameTensor, frame, num: int, nesting: int) -> torch.Tensor:
    """The sum of every branch's costs (a term without the branch dim counts once per branch)."""
    total = costs.sum_to(frozenset({frame}))
    if torch.is_tensor(total) and total.dim() >= nesting and total.size(-nesting) == num:
        return total.sum()
    return torch.as_tensor(total).sum() * num
