# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import pyro
import torch
from pyro.infer.elbo import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import MultiFrameTensor, is_validation_enabled, torch_item
from pyro.util import warn_if_inf, warn_if_nan

from pyro_arm.baselines import baseline_options, leave_one_out, site_baseline
from pyro_arm.batching import batched_pass_errors
from pyro_arm.costs import LogPMessenger, detached, model_costs
from pyro_arm.enum import (
    Enumeration,
    EnumerationCheck,
    Expectation,
    Unenumerated,
    expect_traces,
    marginalize_trace,
)
from pyro_arm.estimators import check_num_samples, get_estimator
from pyro_arm.executors import BranchExecutor
from pyro_arm.multisample import rloo_weights
from pyro_arm.particle import Particle, ParticleContext
from pyro_arm.sampler import SampleMessenger

#: The ``model_grad`` choices: the model-parameter gradient at the base run, or (``"arms"`` only)
#: averaged over every run.
MODEL_GRADS: tuple[str, ...] = ("base", "all")


class TraceARM_ELBO(ELBO):
    r"""
    An ELBO whose gradient gives every Bernoulli sample site of the guide the antithetic
    ARM estimator (Augment-REINFORCE-Merge [1]), or DisARM [2] or AR.

    For a guide site :math:`z \sim \mathrm{Bernoulli}(\sigma(\phi))` with independent
    components, a uniform :math:`u \sim U(0, 1)` of :math:`z`'s shape gives the sample
    :math:`z_2` and its antithetic twin :math:`z_1` (the pair of
    :func:`~pyro_arm.estimators.bernoulli_pair`, where it is defined), and with
    :math:`f = \log p(x, z) - \log q(z \mid x)`

    .. math::

        \nabla_\phi \mathbb{E}_q[f] = \mathbb{E}_u\big[(f(z_1) - f(z_2))(u - \tfrac12)\big]
        \quad \text{(ARM)}, \qquad
        \mathbb{E}_u\big[f(z_2)(1 - 2u)\big] \quad \text{(AR)},

    and DisARM integrates :math:`u` out given the pair:
    :math:`\mathbb{E}[\tfrac12 (f(z_1) - f(z_2))(1 - 2 z_2) 1[z_1 \ne z_2] \sigma(|\phi|)]`.
    The gradient flows from :math:`\phi` into whatever the logits depend on (guide parameters,
    upstream reparameterized samples); the explicit gradient of :math:`\log q(z)`, which has
    mean zero, is dropped at these sites.

    **Categorical sites.** ``Categorical`` and ``OneHotCategorical`` guide sites get the coupled
    stick-breaking pair with ``"arm"`` and ``"disarm"`` and CARMS with ``"arms"``
    (:mod:`pyro_arm.categorical`), as a site family of the same engine
    (:mod:`pyro_arm.families`); with ``"rloo"`` and ``"ar"`` they are score-function sites.

    **Several sites.** The signal of ARM site :math:`t` compares the base run with a branch that
    holds every site sampled before :math:`t` at its base value, sets :math:`t` to :math:`z_1`,
    and resamples the sites after :math:`t`, later Bernoulli sites from their base uniforms
    (common random numbers). The :math:`z_2` member of every pair is thus the base run itself,
    and :math:`T` ARM sites cost :math:`T + 1` runs of model and guide per particle (AR: one).
    The branch of the last site the guide samples runs the model alone. Every estimator is an
    entry of :data:`~pyro_arm.estimators.ESTIMATORS` (its rows, draw rule and reduction), run
    by the one engine of :mod:`pyro_arm.particle`.

    **Batched branches.** With ``vectorize_particles=True`` the particles run as one batched
    base pass, as in Pyro's vectorized ELBOs (code that reads a sampled value sees every
    particle at once), and the branches of all sites and particles as one more batched pass,
    off the gradient tape; where that pass reads a sampled value into Python, the branches run
    one by one, each over every particle. Otherwise each particle's branches run as one batched
    pass where that is proven equivalent to running them one by one, on every call
    (:mod:`pyro_arm.executors`): a pass that reads a sampled value into Python (``bool``,
    ``.item()``, ``.tolist()``, ``.numpy()``, ``torch.equal``, value-dependent shapes;
    :mod:`pyro_arm.reads`) is abandoned for the looped branches, and a code path not met before
    is checked against the looped branches first. Where the branches run one by one their cost
    grows with the square of the number of sites, which a warning says once for large models.

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

    **Enumeration.** Sites marked ``infer={"enumerate": "parallel"}`` (as ``config_enumerate``
    marks them) are summed out exactly, as in :class:`~pyro.infer.traceenum_elbo.TraceEnum_ELBO`
    (:mod:`pyro_arm.enum`). In the model, :math:`f` is :math:`\log p(x, z) - \log q(z \mid x)`
    with the enumerated variables summed out, one contracted term per plate set; in the guide,
    each cost term that an enumerated value :math:`c` reaches becomes its expectation
    :math:`\sum_c q(c \mid \cdot)\, t(c)` per plate element, differentiated exactly. So the
    other sites' signals come from the summed-out cost and stay plate-local where the enumerated
    variables are local to a plate. Enumeration dims sit left of every plate, those over
    particles and branches included. A discrete guide site sampled from an enumerated guide
    value, and ``"sequential"`` sites, raise :class:`NotImplementedError` naming the site; no
    site marked for enumeration is sampled.

    **Low precision.** With half-precision logits (``bfloat16``, ``float16``, as
    ``torch.autocast`` makes them) the uniforms are drawn and compared, and the estimator weights
    computed, in float32 (:func:`~pyro_arm.estimators.working_dtype`); a site written with
    ``probs=`` is sampled from its probs, so that probs of 0 and 1 give 0 and 1 exactly. The
    samples keep the site's dtype, the cost terms and the ELBO are summed in float32, and the
    gradients come back in the parameters' dtype. The log-densities themselves are those the
    distributions compute (in their own dtype).

    **Non-finite values.** Bernoulli logits that hold a NaN raise :class:`ValueError` naming
    the site, with or without Pyro's validation: the flags are read together with the loss
    (before any gradient is accumulated), so the check adds no read of the device
    (:meth:`differentiable_loss` reads them once). With validation on (the default), a signal
    or the surrogate loss that is NaN or infinite raises Pyro's ``warn_if_nan`` /
    ``warn_if_inf`` warning, naming the site.

    :param int num_particles: number of particles (samples) averaged in the estimate; a
        positive integer, else :class:`ValueError`.
    :param int max_plate_nesting: bound on nested :class:`pyro.plate` contexts; guessed by running
        model and guide once when vectorizing or enumerating and left unset.
    :param bool vectorize_particles: run particles and antithetic branches as batched passes;
        as with Pyro's ELBOs, the model and guide must broadcast over particles, and code that
        reads a sampled value sees every particle at once (a structure that depends on sampled
        values raises :class:`NotImplementedError` naming the site). Models that read sampled
        values into Python belong in the default mode, which handles them exactly.
    :param str estimator: ``"arm"`` (default), ``"disarm"``, ``"ar"``, or the multi-sample
        ``"rloo"`` and ``"arms"`` (:mod:`pyro_arm.multisample`); any name registered in
        :data:`pyro_arm.estimators.ESTIMATORS`.
    :param int num_samples: samples inside one estimate of ``"rloo"`` / ``"arms"`` (``>= 2``,
        default 2, at most :data:`~pyro_arm.estimators.MAX_NUM_SAMPLES`); not accepted by the
        other estimators.
    :param str model_grad: ``"base"`` gives model parameters the gradient at the base run;
        ``"all"`` (multi-sample estimators with branches: ``"arms"``) its average over every
        row. Default: ``"all"`` where allowed, else ``"base"``.
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
        model_grad: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(num_particles, numbers.Integral) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        self.estimator = get_estimator(estimator)
        self.num_samples = check_num_samples(self.estimator, num_samples)
        averages_rows = self.estimator.multi_sample and not self.estimator.replicas
        if model_grad is None:
            model_grad = "all" if averages_rows else "base"
        if model_grad not in MODEL_GRADS or (model_grad == "all" and not averages_rows):
            raise ValueError(
                "model_grad must be 'base', or 'all' with a multi-sample estimator that "
                f"branches ('arms'); got {model_grad!r}"
            )
        self.model_grad = model_grad
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            **kwargs,
        )
        #: runs the branches, batched where that is proven equivalent to running them looped
        self.executor = BranchExecutor()
        #: (model, guide) -> True where the model has sites to sum out by enumeration
        self._enumerating: dict = {}

    @property
    def runs(self) -> int:
        """Base runs per call: particles times the estimator's replicas."""
        return self.num_particles * self.estimator.num_replicas(self.num_samples)

    def _user_nesting(self) -> int:
        """``max_plate_nesting`` without the plate over particles that Pyro's ELBO adds."""
        return self.max_plate_nesting - int(self.vectorize_particles and self.num_particles > 1)

    def _guess_max_plate_nesting(self, model, guide, args, kwargs) -> None:
        # Draws no random numbers from the caller's stream, so the first call of `loss`,
        # `loss_and_grads` or `differentiable_loss` reports what a later one would; Bernoulli
        # sites are drawn by the library's sampler, which tolerates NaN logits.
        sampler = SampleMessenger(self.estimator, self.num_samples)
        with _fork_rng():
            super()._guess_max_plate_nesting(model, sampler(guide), args, kwargs)

    def _get_trace(self, model, guide, args, kwargs):
        """
        Returns a single trace from the guide, and the model that is run against it, as
        :class:`~pyro.infer.trace_elbo.Trace_ELBO` does; the guide it is given draws its
        Bernoulli sites with a :class:`~pyro_arm.sampler.SampleMessenger`. A site marked for
        enumeration raises :class:`NotImplementedError` (:mod:`pyro_arm.enum`).
        """
        nesting = self.max_plate_nesting
        if self.vectorize_particles:
            nesting = self._user_nesting() + int(self.runs > 1)
        check = EnumerationCheck(type(self).__name__, self._sums_out_enumeration)
        model, guide = check.model(model), check.guide(guide)
        model_trace, guide_trace = get_importance_trace("flat", nesting, model, guide, args, kwargs)
        marginalize_trace(model_trace, guide_trace)
        expect_traces(model_trace, guide_trace)
        return model_trace, guide_trace

    def _particles(self, model, guide, args, kwargs) -> list[Particle]:
        """
        The base runs of one call: one particle each, or all as one when vectorized. A model or
        guide found to mark sites for parallel enumeration runs enumerated from then on; on its
        first call, the base runs start again from the random state they started from.
        """
        key = (model, guide)
        state = None if key in self._enumerating else _rng_state()
        try:
            particles = self._base_runs(model, guide, args, kwargs)
            self._enumerating.setdefault(key, False)
            return particles
        except Unenumerated as exc:
            if self._enumerating.get(key):
                raise _not_enumerated(exc) from None
            self._enumerating[key] = True
            if state is not None:
                _set_rng_state(state)
        try:
            return self._base_runs(model, guide, args, kwargs)
        except Unenumerated as exc:
            raise _not_enumerated(exc) from None

    def _base_runs(self, model, guide, args, kwargs) -> list[Particle]:
        vectorized = self.vectorize_particles
        enumerates = self._enumerating.get((model, guide), False)
        if vectorized or enumerates:
            if self.max_plate_nesting == float("inf"):
                self._guess_max_plate_nesting(model, guide, args, kwargs)
        nesting = None
        if enumerates:
            nesting = self._user_nesting()
        if vectorized and self.runs > 1:
            plate = pyro.plate("num_particles_vectorized", self.runs, dim=self._particle_dim())
            model, guide = plate(model), plate(guide)
            nesting = None if nesting is None else nesting + 1
        if nesting is not None:  # enumeration outside the plate over particles, as in Pyro
            enumeration = Enumeration(nesting)
            model, guide = enumeration.model(model), enumeration.guide(guide)
        context = ParticleContext(
            model,
            guide,
            args,
            kwargs,
            self.estimator,
            self.num_samples,
            vectorized,
            self.model_grad == "all",
            {},
        )
        particles = []
        replicas = self.estimator.num_replicas(self.num_samples)
        for index in range(1 if vectorized else self.runs):
            subsamples = None
            if index % replicas and self._replicas_share_subsamples():
                first = particles[index - index % replicas].sampler
                subsamples = {n: v for n, v in first.values.items() if n not in first.order}
            sampler = SampleMessenger(self.estimator, self.num_samples, subsamples)
            # the sampler wraps the guide outside every plate, the particles' included
            with batched_pass_errors(sampler.order if vectorized else None):
                traces = self._get_trace(model, sampler(guide), args, kwargs)
            particles.append(Particle(context, *traces, sampler))
        if self._tracks_dependencies():
            for particle in particles:
                particle.track_dependencies()
        return particles

    #: whether the ELBO sums out the model sites marked for parallel enumeration
    _sums_out_enumeration = True

    def _replicas_share_subsamples(self) -> bool:
        """Whether the replicas of a particle reuse its first replica's plate subsamples."""
        return False

    def _tracks_dependencies(self) -> bool:
        """Whether the signals need the runs' dependencies (plate-local signals)."""
        return True

    def _particle_dim(self) -> int:
        return -self._user_nesting() - 1

    def _run_branches(self, particles: list[Particle], model, guide, args, kwargs) -> None:
        """Runs every particle's branches, by the rule of :mod:`pyro_arm.executors`."""
        self.executor.run(self, particles, model, guide, args, kwargs)

    def loss(self, model, guide, *args, **kwargs) -> float:
        """
        :returns: an estimate of the negative ELBO, from the same base runs (and random
            numbers) that :meth:`loss_and_grads` and :meth:`differentiable_loss` use; a
            multi-sample estimator averages every row.
        :rtype: float
        """
        with torch.no_grad():
            particles = self._particles(model, guide, args, kwargs)
            if self.estimator.multi_sample:
                self._run_branches(particles, model, guide, args, kwargs)
            loss = self._loss(particles)
            loss = _read(loss, particles)
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """
        :returns: a tensor whose value is the negative ELBO estimate and whose gradient is the
            estimate of the negative ELBO's gradient.
        """
        loss, surrogate_loss, particles = self._loss_and_surrogate(model, guide, args, kwargs)
        _read(torch.zeros(()), particles)
        warn_if_nan(surrogate_loss, "loss")
        return loss + (surrogate_loss - surrogate_loss.detach())

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """
        Estimates the negative ELBO and accumulates the estimate of its gradient into the
        ``.grad`` of the parameters of model and guide.

        :returns: an estimate of the negative ELBO.
        :rtype: float
        """
        loss, surrogate_loss, particles = self._loss_and_surrogate(model, guide, args, kwargs)
        loss = _read(loss, particles)
        if _trainable(particles) and surrogate_loss.requires_grad:
            surrogate_loss.backward(retain_graph=self.retain_graph)
        warn_if_nan(loss, "loss")
        return loss

    def _loss(self, particles: list[Particle]) -> torch.Tensor:
        """Minus the average ELBO over the base runs, or with ``multi_sample`` every row."""
        per_particle = self.runs if self.vectorize_particles else 1
        elbo, rows = 0.0, 0
        for particle in particles:
            elbo, rows = elbo + particle.elbo(), rows + per_particle
            if self.estimator.multi_sample:
                elbo = elbo + particle.branch_elbo
                rows += per_particle * particle.num_branches
        return -torch.as_tensor(elbo) / rows

    def _loss_and_surrogate(self, model, guide, args, kwargs):
        # All base runs come first, so that the random numbers behind the reported loss are
        # drawn exactly as in `loss`.
        particles = self._particles(model, guide, args, kwargs)
        self._run_branches(particles, model, guide, args, kwargs)
        weights, baseline_loss = self._score_weights(particles)
        surrogate_elbo = 0.0
        for particle, site_weights in zip(particles, weights):
            base_log_p = None
            if self.model_grad == "all" and particle.num_branches:
                base_log_p = _model_log_p(particle)
            surrogate_elbo = surrogate_elbo + particle.surrogate_elbo(site_weights, base_log_p)
        loss = self._loss(particles)
        surrogate_loss = (baseline_loss - torch.as_tensor(surrogate_elbo)) / self.runs
        if is_validation_enabled():
            checks = [check for particle in particles for check in particle.signals]
            _warn_if_not_finite(checks + [("surrogate loss", surrogate_loss.detach())])
        return loss, surrogate_loss, particles

    def _score_weights(self, particles: list[Particle]) -> tuple[list[dict], Any]:
        """
        The weights of every score-function site's draws (one per draw, detached), and the loss
        that trains the learned baselines (:mod:`pyro_arm.baselines`): ``f - b`` for one draw,
        ``b`` the site's own baseline or the leave-one-out mean of the other base runs'
        signals; :func:`~pyro_arm.multisample.rloo_weights` for several, or ``(f_k - b) / n``
        with the site's own baseline.
        """
        signals = []
        for particle in particles:
            site_signals = {}
            for name in particle.score_sites():
                if name not in particle.member_signals:
                    particle.member_signals[name] = [particle.score_signal(name)]
                dim = particle.guide_trace.nodes[name]["score_parts"].score_function.dim()
                site_signals[name] = particle.stacked_signals(name, dim, 0)
            signals.append(site_signals)
        baselines: list[dict] = [{} for _ in particles]
        baseline_loss = 0.0
        for i, particle in enumerate(particles):
            for name, f in signals[i].items():
                site = particle.guide_trace.nodes[name]
                options = baseline_options(site)
                if options.any:
                    baselines[i][name], loss = site_baseline(name, site, f.mean(0), options)
                    baseline_loss = baseline_loss + loss
        self._leave_one_out(signals, baselines)
        weights = []
        for i in range(len(particles)):
            site_weights = {}
            for name, f in signals[i].items():
                if f.size(0) > 1 and name not in baselines[i]:
                    site_weights[name] = rloo_weights(f)
                else:
                    site_weights[name] = (f - baselines[i].get(name, 0.0)) / f.size(0)
            weights.append({name: w.detach() for name, w in site_weights.items()})
        return weights, baseline_loss

    def _leave_one_out(self, signals: list, baselines: list) -> None:
        """
        Leave-one-out baselines among the base runs (the particles, or each particle's
        replicas) for the one-draw sites without a baseline of their own.
        """
        group = self.estimator.num_replicas(self.num_samples)
        if group == 1:
            group = self.num_particles
        if group < 2:
            return
        if self.vectorize_particles:
            dim = self._particle_dim()
            for name, f in signals[0].items():
                if name in baselines[0] or f.size(0) > 1 or f.dim() - 1 < -dim:
                    continue
                if f.size(dim) == self.runs:
                    baselines[0][name] = _grouped(leave_one_out, f[0], dim, group)
            return
        for start in range(0, len(signals), group):
            chunk = range(start, start + group)
            names = {name for i in chunk for name in signals[i]}
            for name in names:
                have = [
                    i
                    for i in chunk
                    if name in signals[i]
                    and name not in baselines[i]
                    and signals[i][name].size(0) == 1
                ]
                shapes = {signals[i][name].shape for i in have}
                if len(have) < 2 or len(shapes) != 1:
                    continue
                stacked = torch.stack([signals[i][name][0] for i in have])
                for i, baseline in zip(have, leave_one_out(stacked, 0)):
                    baselines[i][name] = baseline


def _grouped(fn, signal: torch.Tensor, dim: int, group: int) -> torch.Tensor:
    """``fn(signal, dim)`` within consecutive groups of ``group`` entries along ``dim``."""
    dim = dim % signal.dim()
    shape = signal.shape
    grouped = signal.reshape(shape[:dim] + (-1, group) + shape[dim + 1 :])
    return fn(grouped, dim + 1).expand(grouped.shape).reshape(shape)


def _model_log_p(particle: Particle) -> torch.Tensor:
    """The model's log-density, with gradient, at the base run's detached values."""
    ctx, log_p = particle.context, LogPMessenger()
    with pyro.validation_enabled(False):
        model_costs(
            ctx.model,
            ctx.args,
            ctx.kwargs,
            MultiFrameTensor(),
            detached(particle.sampler.values),
            log_p,
            Expectation.of_trace(particle.guide_trace),
        )
    return torch.as_tensor(log_p.log_p)


def _trainable(particles: list[Particle]) -> bool:
    return any(
        site["type"] == "param"
        for particle in particles
        for trace in (particle.model_trace, particle.guide_trace)
        for site in trace.nodes.values()
    )


def _read(loss: torch.Tensor, particles: list[Particle]) -> float:
    """
    The loss as a float, in one read of the device that also tells whether any Bernoulli logits
    hold a NaN (the loss then reads as NaN); raises :class:`ValueError` naming the first such
    site.
    """
    flags = [(name, flag) for p in particles for name, flag in p.sampler.nan_logits.items()]
    if flags:
        bad = torch.stack([flag for _, flag in flags]).any()
        loss = loss + torch.where(bad, float("nan"), 0.0).to(loss.device)
    value = torch_item(loss)
    if flags and math.isnan(value):
        for name, flag in flags:
            if bool(flag):
                raise ValueError(
                    f"At site '{name}': the logits of its distribution hold NaN; "
                    "the guide computed them from non-finite inputs or parameters"
                )
    return value


def _warn_if_not_finite(values: list[tuple[str, torch.Tensor]]) -> None:
    """
    Pyro's NaN and inf warnings (:func:`~pyro.util.warn_if_nan`, :func:`~pyro.util.warn_if_inf`)
    for each value that is not finite, naming it; one read of the device for all of them.
    """
    values = [(what, value) for what, value in values if torch.is_tensor(value)]
    if not values:
        return
    finite = torch.stack([torch.isfinite(value).all() for _, value in values]).tolist()
    for (what, value), ok in zip(values, finite):
        if not ok:
            warn_if_nan(value, what)
            warn_if_inf(value, what)


def _not_enumerated(exc: Unenumerated) -> NotImplementedError:
    return NotImplementedError(
        f"At site '{exc}': the site is marked for parallel enumeration, and Pyro's enumeration "
        "did not enumerate it"
    )


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


def _rng_state() -> tuple:
    """The state of the random number generators of the CPU and of any initialised CUDA
    device."""
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in _cuda_devices()]


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for device, cuda_state in zip(_cuda_devices(), cuda):
        torch.cuda.set_rng_state(cuda_state, device)


def _fork_rng():
    """Forks the random number generators of the CPU and of any initialised CUDA device."""
    return torch.random.fork_rng(devices=_cuda_devices())
