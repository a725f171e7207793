# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer.util import MultiFrameTensor, is_validation_enabled
from pyro.util import warn_if_nan

from pyro_arm import estimators
from pyro_arm.categorical import coupled
from pyro_arm.estimators import Estimator, copula_uniforms, disarm
from pyro_arm.multisample import arms
from pyro_arm.particle import Particle
from pyro_arm.signals import append_event_dims
from pyro_arm.sites import is_subsample_site
from pyro_arm.trace_arm_elbo import TraceARM_ELBO, _read, _warn_if_not_finite

_PARTICLE_PLATE = "num_particles_vectorized"


def _iw_estimators(num_members: int) -> dict[str, Estimator]:
    """The engine's estimators behind each ``IWELBO(estimator=...)``: ``K`` replicas (the bound's
    samples), Bernoulli members as in :data:`~pyro_arm.estimators.ESTIMATORS`."""

    def members(n, shape, logits):
        return copula_uniforms(num_members, shape, logits)

    return {
        "vimco": Estimator("vimco", False, None, replicas=True),
        "disarm": Estimator("disarm", True, disarm, replicas=True, categorical_grad=coupled),
        "arms": Estimator(
            "arms", True, arms, True, uniforms=members, replicas=True, categorical_grad=coupled
        ),
    }


class IWELBO(TraceARM_ELBO):
    r"""
    The importance-weighted bound (IWAE, Burda et al. 2016) for models with discrete latents,

    .. math::

        \mathcal{L}_K = \mathbb{E}\Big[\log \frac1K \sum_{k=1}^K w_k\Big], \qquad
        w_k = \frac{p(x, z_k)}{q(z_k \mid x)}, \quad z_1, \dots, z_K \sim q \text{ i.i.d.},

    with gradient estimators that give discrete guide sites a learning signal (Pyro's
    ``RenyiELBO(alpha=0)`` gives them none).

    **Which bound.** Where every sample site of model and guide lies inside one common outermost
    plate (the data plate of an autoencoder), the bound is formed per element :math:`n` of that
    plate, :math:`\sum_n s_n \log \frac1K \sum_k w_{k,n}`, each log-weight summed from that
    element's unscaled terms, and :math:`s_n` the scale of element :math:`n`, outside the log:
    the plate's subsample scale times any :class:`~pyro.poutine.scale` that varies along the
    plate only (a weight per datapoint). Every site must carry the same scales; a scale that
    differs between sites (the model's alone) or varies within an element is a ``ValueError``,
    since a scale inside the log makes the per-element bound ill-defined. Otherwise (a latent
    outside the plate) the bound is one joint bound over all sites, the scaled terms inside the
    log, as ``RenyiELBO(alpha=0)`` forms it.

    **Estimators.** With :math:`L` the bound of an element and :math:`L^{(k \to z')}` the bound
    with sample :math:`k` replaced by a run :math:`z'`:

    - ``"vimco"`` (Mnih & Rezende, 2016): every non-reparameterized guide site of sample
      :math:`k` gets the score function times :math:`L - L_{-k}`, where :math:`L_{-k}`
      replaces :math:`\log w_k` by the mean of the other log-weights. :math:`K` runs.
    - ``"disarm"`` (local DisARM, Dong, Mnih & Tucker, 2020): each Bernoulli site :math:`t`
      of sample :math:`k` gets DisARM with :math:`f(z_2) = L` and :math:`f(z_1) =
      L^{(k \to b)}`, :math:`b` the branch that sets :math:`t` to its antithetic twin and
      resamples the later sites from common random numbers (the scheme of
      :class:`~pyro_arm.TraceARM_ELBO`); other sites VIMCO. :math:`K (1 + T)` runs for
      :math:`T` Bernoulli sites.
    - ``"arms"`` (Dimitriev & Zhou, 2021): each Bernoulli site of sample :math:`k` draws
      ``num_members`` = :math:`n` antithetic members from the Dirichlet copula, and ARMS takes
      the :math:`n` bounds :math:`L^{(k \to b_j)}` (member 0 is sample :math:`k` itself);
      ``n = 2`` is ``"disarm"``. :math:`K (1 + T (n - 1))` runs.

    Every estimator adds the bound's gradient at the sampled values,
    :math:`\sum_k \bar w_k \nabla \log w_k` (:math:`\bar w` the normalized weights): the
    model's parameters, reparameterized sites, and the explicit :math:`-\log q(z_k)` of every
    guide site, whose mean is not zero in this bound.

    Sites marked for enumeration, in model or guide, raise :class:`NotImplementedError` naming
    the site (the bound does not sum them out).

    **Cost.** A particle runs model and guide :math:`K` times (plus the branches), and the
    leave-one-out bounds hold :math:`K^2` values per datapoint, so :math:`K` is bounded by
    :data:`pyro_arm.estimators.MAX_NUM_SAMPLES` (10,000): beyond it a step would not finish.

    :param int num_samples: :math:`K`, the samples inside the bound, from 2 to
        :data:`~pyro_arm.estimators.MAX_NUM_SAMPLES`.
    :param str estimator: ``"vimco"`` (default), ``"disarm"`` or ``"arms"``.
    :param int num_members: the ``"arms"`` members per Bernoulli site (``>= 2``, default 3).
    :param int num_particles: independent estimates of the bound, averaged.
    :param bool vectorize_particles: run the :math:`K` samples of every particle as one batched
        pass (and their branches as another), as :class:`~pyro_arm.TraceARM_ELBO` does.
    :param int max_plate_nesting: bound on nested :class:`pyro.plate` contexts.
    """

    def __init__(
        self,
        num_samples: int = 2,
        estimator: str = "vimco",
        num_particles: int = 1,
        vectorize_particles: bool = False,
        max_plate_nesting: float = float("inf"),
        num_members: int = 3,
        **kwargs: Any,
    ) -> None:
        check_iw_num_samples(num_samples)
        if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 2:
            raise ValueError(f"num_members must be an int >= 2, got {num_members!r}")
        estimators = _iw_estimators(num_members)
        if estimator not in estimators:
            valid = ", ".join(repr(name) for name in estimators)
            raise ValueError(f"Unknown estimator {estimator!r}; expected one of {valid}")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            **kwargs,
        )
        self.estimator = estimators[estimator]
        self.num_samples, self.num_members = num_samples, num_members
        self.model_grad = "base"

    _sums_out_enumeration = False

    def _tracks_dependencies(self) -> bool:
        return False

    def _replicas_share_subsamples(self) -> bool:
        return True  # the K samples of a bound share its elements

    def loss(self, model, guide, *args, **kwargs) -> float:
        """
        :returns: minus an estimate of the bound, from the same samples (and random numbers)
            that :meth:`loss_and_grads` and :meth:`differentiable_loss` use.
        """
        with torch.no_grad():
            particles = self._particles(model, guide, args, kwargs)
            bound = _Bound(self, particles)
            loss = _read(-bound.value(), particles)
        warn_if_nan(loss, "loss")
        return loss

    def _loss_and_surrogate(self, model, guide, args, kwargs):
        particles = self._particles(model, guide, args, kwargs)
        bound = _Bound(self, particles)
        self._run_branches(particles, model, guide, args, kwargs)
        loss = -bound.value()
        surrogate_loss = -bound.surrogate()
        if is_validation_enabled():
            checks = [check for particle in particles for check in particle.signals]
            _warn_if_not_finite(checks + [("surrogate loss", surrogate_loss.detach())])
        return loss, surrogate_loss, particles


def check_iw_num_samples(num_samples: int) -> None:
    """
    :raises ValueError: unless ``num_samples`` is an int from 2 to
        :data:`~pyro_arm.estimators.MAX_NUM_SAMPLES`.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"IWELBO needs num_samples >= 2 (an int), got {num_samples!r}")
    if num_samples > estimators.MAX_NUM_SAMPLES:
        gib = num_samples**2 * 4 / 2**30
        raise ValueError(
            f"IWELBO: num_samples={num_samples:,} is beyond {estimators.MAX_NUM_SAMPLES:,}, the "
            "most one bound may draw: each sample is a run of model and guide, and the "
            f"leave-one-out bounds take {gib:,.0f} GiB per datapoint (float32), so a step would "
            "not finish (raise pyro_arm.estimators.MAX_NUM_SAMPLES to allow it)"
        )


class _Bound:
    """
    The bound of one call: its form (per element of the data plate, or joint), the log-weights
    of every sample and branch laid out as ``(P, K, *element)``, and the surrogate whose
    gradient is the estimate.
    """

    def __init__(self, elbo: IWELBO, particles: list[Particle]) -> None:
        self.elbo, self.particles = elbo, particles
        self.K, self.P = elbo.num_samples, elbo.num_particles
        first = particles[0]
        self.frame, self.scale = _data_plate(first.model_trace, first.guide_trace)
        frames = set() if self.frame is None else {self.frame}
        if elbo.vectorize_particles:
            frames |= {
                f
                for site in first.guide_trace.nodes.values()
                if site["type"] == "sample"
                for f in site["cond_indep_stack"]
                if f.name == _PARTICLE_PLATE
            }
        for particle in particles:
            particle.row_frames = frozenset(frames)
        self.dim = elbo._particle_dim() if elbo.vectorize_particles else None
        self.log_w = self.stack([self.log_weight(p, grad=False) for p in particles])

    def unscaled(self, value) -> torch.Tensor:
        """``value`` (scaled terms summed per element) without the scale of each element."""
        return torch.as_tensor(value) / self.scale

    def log_weight(self, particle: Particle, grad: bool) -> torch.Tensor:
        """A base run's log-weights, summed down to the row frames, unscaled in the local form;
        with ``grad``, from the traces' log-densities with their gradient."""
        if not grad:
            return self.unscaled(particle.costs.sum_to(particle.row_frames))
        costs = MultiFrameTensor()
        for sign, trace in ((1.0, particle.model_trace), (-1.0, particle.guide_trace)):
            for site in trace.nodes.values():
                if site["type"] == "sample" and not is_subsample_site(site):
                    costs.add((site["cond_indep_stack"], sign * site["log_prob"]))
        return self.unscaled(costs.sum_to(particle.row_frames))

    def stack(self, values: list) -> torch.Tensor:
        """Values of the ``P K`` runs (a list of per-run tensors, or one tensor over the
        particle plate) as ``(P, K, *element)``."""
        if self.dim is None:
            value = torch.stack(torch.broadcast_tensors(*[torch.as_tensor(v) for v in values]))
        else:
            (value,) = values
            value = torch.as_tensor(value)
            if value.dim() < -self.dim:
                value = value.reshape((1,) * (-self.dim - value.dim()) + value.shape)
            value = value.movedim(self.dim, 0)
            value = value.expand((self.P * self.K,) + value.shape[1:])
        return value.reshape((self.P, self.K) + value.shape[1:])

    def unstack(self, value: torch.Tensor, index: int) -> torch.Tensor:
        """The inverse of :meth:`stack` for run ``index`` (all runs when vectorized)."""
        value = value.reshape((self.P * self.K,) + value.shape[2:])
        if self.dim is None:
            return value[index]
        return value.movedim(0, self.dim)

    def value(self) -> torch.Tensor:
        """The bound, averaged over particles (detached)."""
        return (self.scale * _log_mean_exp(self.log_w, 1)).sum() / self.P

    def replaced(self, log_w_k: torch.Tensor) -> torch.Tensor:
        """``(P, K, *element)``: the bound with sample ``k`` replaced by ``log_w_k[:, k]``."""
        log_w = self.log_w.unsqueeze(1).expand((self.P, self.K) + self.log_w.shape[1:]).clone()
        diagonal = torch.arange(self.K)
        log_w[:, diagonal, diagonal] = log_w_k
        return _log_mean_exp(log_w, 2)

    def vimco(self) -> torch.Tensor:
        """VIMCO's signal ``L - L_{-k}``, ``(P, K, *element)``."""
        others = (self.log_w.sum(1, keepdim=True) - self.log_w) / (self.K - 1)
        return _log_mean_exp(self.log_w, 1).unsqueeze(1) - self.replaced(others)

    def surrogate(self) -> torch.Tensor:
        """The surrogate bound, averaged over particles, whose gradient is the estimate."""
        log_w = self.stack([self.log_weight(p, grad=True) for p in self.particles])
        surrogate = (self.scale * _log_mean_exp(log_w, 1)).sum()
        vimco, members = None, {}
        for index, particle in enumerate(self.particles):
            for name, site in particle.guide_trace.nodes.items():
                if site["type"] != "sample" or site["is_observed"]:
                    continue
                if name in particle.samples:
                    s = particle.samples[name]
                    if name not in members:
                        members[name] = self.members(name, s.z.size(0))
                    dims, event_dim = s.family.layout(s)
                    f = [self.site_signal(m, index, event_dim) for m in members[name]]
                    f = torch.stack([m.reshape((1,) * (dims - m.dim()) + m.shape) for m in f])
                    particle.signals.append((f"signal of site '{name}'", f))
                    surrogate = surrogate + s.family.surrogate(self.elbo.estimator, f, s)
                elif not is_identically_zero(site["score_parts"].score_function):
                    vimco = self.vimco() if vimco is None else vimco
                    signal = self.site_signal(vimco * self.scale, index, 0)
                    particle.signals.append((f"signal of site '{name}'", signal))
                    score = site["score_parts"].score_function  # unscaled, as in Pyro
                    surrogate = surrogate + (signal.detach() * score).sum()
        return surrogate / self.P

    def members(self, name: str, num: int) -> list[torch.Tensor]:
        """The scaled bound with each sample's site ``name`` set to each of its ``num``
        members (member 0: the bound itself), each ``(P, K, *element)``."""
        values = [_log_mean_exp(self.log_w, 1).unsqueeze(1).expand_as(self.log_w)]
        for j in range(1, num):
            log_w = self.stack([p.member_signals[name][j] for p in self.particles])
            values.append(self.replaced(self.unscaled(log_w)))
        return [value * self.scale for value in values]

    def site_signal(self, value: torch.Tensor, index: int, event_dim: int) -> torch.Tensor:
        """A ``(P, K, *element)`` signal laid out for run ``index``'s site."""
        return append_event_dims(self.unstack(value, index), event_dim)


def _log_mean_exp(value: torch.Tensor, dim: int) -> torch.Tensor:
    return value.logsumexp(dim) - math.log(value.size(dim))


def _data_plate(model_trace, guide_trace) -> tuple[Optional[Any], Union[float, torch.Tensor]]:
    """
    The plate the bound is formed per element of, and the scale of each element: the outermost
    vectorized plate common to every sample site of model and guide (the particles' plate aside),
    or ``None`` and scale 1 for a joint bound.

    :returns: ``(frame, scale)``; ``scale`` a float, or a tensor of the plate's size along its
        dim (1 along the dims to its right) where it varies per element.
    :raises ValueError: if the sites of a per-element bound carry different scales, or a scale
        that varies within an element.
    """
    common: Optional[set] = None
    sites = []
    for role, trace in (("model", model_trace), ("guide", guide_trace)):
        for site in trace.nodes.values():
            if site["type"] != "sample" or is_subsample_site(site):
                continue
            frames = {
                f for f in site["cond_indep_stack"] if f.vectorized and f.name != _PARTICLE_PLATE
            }
            common = frames if common is None else common & frames
            sites.append((f"{role} site '{site['name']}'", site))
    if not common:
        return None, 1.0
    frame = min(common, key=lambda f: f.dim)
    scales = {name: _element_scale(name, site, frame) for name, site in sites}
    try:
        values = torch.broadcast_tensors(*scales.values())
    except RuntimeError:  # per-element scales of different sizes
        values = None
    if values is None or not all(torch.equal(v, values[0]) for v in values):
        named = ", ".join(f"{name} {_describe(s)}" for name, s in scales.items())
        raise ValueError(
            f"IWELBO forms the bound per element of plate '{frame.name}', which needs the same "
            f"scale of each element at every site of model and guide; got {named}. "
            "poutine.scale at some sites makes that bound ill-defined"
        )
    scale = values[0]
    if all(s.numel() == 1 for s in scales.values()):
        return frame, float(scale)
    return frame, scale.reshape((-1,) + (1,) * (-frame.dim - 1))


def _element_scale(name: str, site: dict, frame: Any) -> torch.Tensor:
    """
    The scale of each element of ``frame`` at ``site``: a tensor of one value, or of one value
    per element of the plate.

    :raises ValueError: if the site's scale varies within an element (along another dim).
    """
    scale = torch.as_tensor(site["scale"]).detach()
    if scale.numel() == 1:
        return scale.reshape(())
    rank = max(scale.dim(), -frame.dim)
    scale = scale.reshape((1,) * (rank - scale.dim()) + scale.shape)
    per_element = scale.movedim(frame.dim, 0).reshape(scale.shape[frame.dim], -1)
    if not bool((per_element == per_element[:, :1]).all()):
        raise ValueError(
            f"IWELBO forms the bound per element of plate '{frame.name}'; the scale of the {name} "
            f"(shape {tuple(site['scale'].shape)}) varies within an element, "
            "which makes that bound ill-defined: a scale may vary along that plate only"
        )
    return per_element[:, 0]


def _describe(scale: torch.Tensor) -> str:
    """A scale in a message: its value, or its first values."""
    values = scale.reshape(-1).tolist()
    if len(values) == 1:
        return f"{values[0]:g}"
    shown = ", ".join(f"{v:g}" for v in values[:4])
    return f"[{shown}{', ...' if len(values) > 4 else ''}]"
