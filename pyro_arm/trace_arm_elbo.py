# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

import numbers
from typing import Any, Optional

import torch
from pyro.infer.elbo import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.util import check_if_enumerated, warn_if_inf, warn_if_nan

from pyro_arm.baselines import baseline_options, leave_one_out, site_baseline
from pyro_arm.batching import batched_pass_errors
from pyro_arm.estimators import check_num_samples, get_estimator
from pyro_arm.messengers import BaseSampleMessenger
from pyro_arm.particle import Particle, ParticleContext

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

    **Low precision.** With half-precision logits (``bfloat16``, ``float16``, as
    ``torch.autocast`` makes them) the uniforms are drawn and compared, and the estimator weights
    computed, in float32 (:func:`~pyro_arm.estimators.working_dtype`); a site written with
    ``probs=`` is sampled from its probs, so that probs of 0 and 1 give 0 and 1 exactly. The
    samples keep the site's dtype, the cost terms and the ELBO are summed in float32, and the
    gradients come back in the parameters' dtype. The log-densities themselves are those the
    distributions compute (in their own dtype).

    **Non-finite values.** With Pyro's validation on (the default), a signal or the surrogate
    loss that is NaN or infinite raises Pyro's ``warn_if_nan`` / ``warn_if_inf`` warning, naming
    the site (one read of the device per step; off with validation, like Pyro's other checks).

    :param int num_particles: number of particles (samples) averaged in the estimate; a
        positive integer, else :class:`ValueError`.
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
    :param str model_grad: ``"base"`` gives model parameters the gradient at the base run;
        ``"all"`` (``"arms"`` only) its average over every run (base and branches). Default:
        ``"all"`` for ``"arms"`` (measured better in training, see the README), else ``"base"``.
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
        # --- multi-sample estimators (issue 8): see pyro_arm.multisample_elbo
        self.num_samples = check_num_samples(self.estimator, num_samples)
        if model_grad is None:
            model_grad = "all" if estimator == "arms" else "base"
        if model_grad not in MODEL_GRADS or (model_grad == "all" and estimator != "arms"):
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

    def _get_trace(self, model, guide, args, kwargs):
        """
        Returns a single trace from the guide, and the model that is run against it, as
        :class:`~pyro.infer.trace_elbo.Trace_ELBO` does; :meth:`_particles` hands it a guide
        whose ARM sites a :class:`~pyro_arm.messengers.BaseSampleMessenger` samples.
        """
        model_trace, guide_trace = get_importance_trace(
            "flat", self.max_plate_nesting, model, guide, args, kwargs
        )
        if is_validation_enabled():
            check_if_enumerated(guide_trace)
        return model_trace, guide_trace

    def _context(self, model, guide, args, kwargs) -> ParticleContext:
        """What the particles of one call share; decides once whether passes are batched."""
        branch_dim = None
        if self.vectorize_particles:
            if self.max_plate_nesting == float("inf"):
                self._guess_max_plate_nesting(model, guide, args, kwargs)
            model = self._vectorized_num_particles(model)
            guide = self._vectorized_num_particles(guide)
            # left of every plate of the model, the particles' plate (-max_plate_nesting) included
            branch_dim = -self.max_plate_nesting - 1
        return ParticleContext(model, guide, args, kwargs, self.estimator, branch_dim, {})

    def _sampler(self) -> BaseSampleMessenger:
        """The handler that samples a base run's ARM sites (the multi-sample passes swap it)."""
        return BaseSampleMessenger()

    def _particles(self, model, guide, args, kwargs) -> list[Particle]:
        """The base runs of one call: one particle each, or all particles as one when
        vectorized."""
        context = self._context(model, guide, args, kwargs)
        particles = []
        for _ in range(1 if context.vectorized else self.num_particles):
            sampler = self._sampler()
            # the sampler wraps the guide outside every plate, the particles' included
            with batched_pass_errors(sampler.order if context.vectorized else None):
                traces = self._get_trace(context.model, sampler(context.guide), args, kwargs)
            particles.append(Particle(context, *traces, sampler))
        return particles

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
            elbo = sum(particle.elbo() for particle in self._particles(model, guide, args, kwargs))
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
        particles = self._particles(model, guide, args, kwargs)
        for particle in particles:
            particle.track_dependencies()
        score_signals, baseline_loss = self._score_signals(particles)
        elbo = surrogate_elbo = 0.0
        for particle, signals in zip(particles, score_signals):
            elbo = elbo + particle.elbo()
            surrogate_elbo = surrogate_elbo + particle.surrogate_elbo(signals)
        trainable = any(
            site["type"] == "param"
            for particle in particles
            for trace in (particle.model_trace, particle.guide_trace)
            for site in trace.nodes.values()
        )
        loss = -torch.as_tensor(elbo) / self.num_particles
        surrogate_loss = (baseline_loss - torch.as_tensor(surrogate_elbo)) / self.num_particles
        if is_validation_enabled():
            checks = [check for particle in particles for check in particle.signals]
            _warn_if_not_finite(checks + [("surrogate loss", surrogate_loss.detach())])
        return loss, surrogate_loss, trainable

    def _score_signals(self, particles: list[Particle]) -> tuple[list, Any]:
        """
        The signal of every score-function site of every particle, less its baseline (see
        :mod:`pyro_arm.baselines`), and the loss that trains the learned baselines.
        """
        signals = [particle.score_signals() for particle in particles]
        baselines = [{} for _ in particles]
        baseline_loss = 0.0
        for i, particle in enumerate(particles):
            for name, signal in signals[i].items():
                site = particle.guide_trace.nodes[name]
                options = baseline_options(site)
                if options.any:
                    baselines[i][name], loss = site_baseline(name, site, signal, options)
                    baseline_loss = baseline_loss + loss
        if self.num_particles > 1:
            self._leave_one_out(signals, baselines)
        centred = [
            {name: signal - baselines[i].get(name, 0.0) for name, signal in signals[i].items()}
            for i in range(len(particles))
        ]
        return centred, baseline_loss

    def _leave_one_out(self, signals: list, baselines: list) -> None:
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


def _fork_rng():
    """Forks the random number generators of the CPU and of any initialised CUDA device."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)
