# SPDX-License-Identifier: Apache-2.0
"""
The registry of gradient estimators: what each one draws and how it turns costs into gradients.

An estimator of :class:`~pyro_arm.TraceARM_ELBO` is fully described by one :class:`Estimator`:

- **rows**: how many runs of model and guide a particle needs. Each Bernoulli site draws
  ``m`` *members* from ``m`` uniforms (:attr:`Estimator.uniforms`), member 0 being the base
  run's value; every other score-function site draws ``m_s`` values (:attr:`Estimator.draws`).
  A particle runs the base run and one *branch* per site ``t`` and member ``k >= 1``, so
  :math:`1 + \\sum_t (m_t - 1)` rows (:meth:`Estimator.rows`: ARM/DisARM :math:`1 + T`, AR 1,
  ARMS :math:`1 + T(n - 1)`), times :attr:`Estimator.replicas` independent base runs (RLOO:
  ``n`` rows).
- **draw rule**: in the branch ``(t, k)`` every site sampled before ``t`` keeps its base value,
  ``t`` takes member ``k``, and later sites are resampled, Bernoulli sites from their base
  uniforms (common random numbers): :class:`~pyro_arm.sampler.BranchMessenger`.
- **reduction**: a Bernoulli site's ``m`` plate-local signals give the logits gradient
  (:meth:`Estimator.site_grad`); a categorical site's weight its members' :math:`\\log q`
  (:attr:`Estimator.categorical_grad`, the coupled pair and CARMS of
  :mod:`pyro_arm.categorical`; each site family draws and reduces by
  :mod:`pyro_arm.families`); another score-function site's ``m_s`` signals weight its scores
  (leave-one-out); the loss averages the base runs, or with ``multi_sample`` every row.

The logits-gradient functions are pure tensor functions, checked alone against exact
gradients. For :math:`z \\sim \\mathrm{Bernoulli}(\\sigma(\\phi))`, one uniform :math:`u` and the
pair of :func:`bernoulli_pair` (:math:`z_2` the sample, :math:`z_1` its antithetic twin):

- ARM (Yin & Zhou, 2019): :math:`(f(z_1) - f(z_2)) (u - \\tfrac12)`;
- DisARM (Dong, Mnih & Tucker, 2020), ARM with :math:`u` integrated out given the pair:
  :math:`\\tfrac12 (f(z_1) - f(z_2)) (1 - 2 z_2)\\, 1[z_1 \\ne z_2]\\, \\sigma(|\\phi|)`;
- AR (one evaluation): :math:`f(z_2) (1 - 2u)`;
- RLOO and ARMS over ``n`` samples: :mod:`pyro_arm.multisample`.

:func:`register_estimator` adds an estimator by name, from the library or from user code.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from pyro_arm import categorical, multisample


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """
    The dtype the uniforms, the pair and the estimator weights are computed in: at least float32
    (half-precision logits, as ``torch.autocast`` makes them, would round the uniforms and the
    probabilities), float64 for float64 logits.
    """
    return torch.promote_types(dtype, torch.float32)


def bernoulli_pair(u: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """
    The antithetic pair made from one uniform draw:

    - ``z2 = 1[u < sigmoid(logits)]``, the ordinary sample (the base run's value);
    - ``z1 = 1[u > sigmoid(-logits)]``, its antithetic twin (the sample made from ``1 - u``),
      computed as ``1[1 - u < sigmoid(logits)]``.

    :param u: uniforms in (0, 1), of the sample's shape.
    :param logits: logits broadcastable to ``u``, in the dtype of ``u`` (see :func:`working_dtype`).
    :returns: ``(z1, z2)`` in ``logits.dtype``, of the broadcast shape of ``u`` and ``logits``.
    """
    probs = torch.sigmoid(logits)
    z1 = (1 - u < probs).to(probs.dtype)
    z2 = (u < probs).to(probs.dtype)
    return z1, z2


def arm(f1: Tensor, f2: Tensor, u: Tensor, logits: Tensor) -> Tensor:
    """ARM: ``(f(z1) - f(z2)) * (u - 1/2)``."""
    return (f1 - f2) * (u - 0.5)


def disarm(f1: Tensor, f2: Tensor, u: Tensor, logits: Tensor) -> Tensor:
    """DisARM: ``1/2 (f(z1) - f(z2)) (1 - 2 z2) 1[z1 != z2] sigmoid(|logits|)``."""
    z1, z2 = bernoulli_pair(u, logits)
    weight = 0.5 * (1 - 2 * z2) * (z1 != z2).to(z2.dtype) * torch.sigmoid(logits.abs())
    return (f1 - f2) * weight


def ar(f1: Optional[Tensor], f2: Tensor, u: Tensor, logits: Tensor) -> Tensor:
    """AR (Augment-REINFORCE), one evaluation: ``f(z2) * (1 - 2u)``. ``f1`` is ignored."""
    return f2 * (1 - 2 * u)


def pair_uniforms(n: Optional[int], shape: torch.Size, logits: Tensor) -> Tensor:
    """The uniforms ``(u, 1 - u)`` of an antithetic pair, shape ``(2, *shape)``."""
    u = torch.rand(shape, dtype=logits.dtype, device=logits.device)
    return torch.stack([u, 1 - u])


def one_uniform(n: Optional[int], shape: torch.Size, logits: Tensor) -> Tensor:
    """One uniform per component, shape ``(1, *shape)``."""
    return torch.rand((1, *shape), dtype=logits.dtype, device=logits.device)


def copula_uniforms(n: int, shape: torch.Size, logits: Tensor) -> Tensor:
    """ARMS's ``n`` uniforms from the Dirichlet copula, ordered by
    :func:`~pyro_arm.multisample.arms_lower_tail`: ``(n, *shape)``."""
    u = multisample.arms_uniforms(n, shape, dtype=logits.dtype, device=logits.device)
    return multisample.arms_lower_tail(u, logits)


class Estimator(NamedTuple):
    """
    A named gradient estimator: its rows, its draw rule and its reduction.

    :param name: the name users pass as ``TraceARM_ELBO(estimator=name)``.
    :param antithetic: a pair estimator that needs ``f(z1)``: two members per Bernoulli site.
    :param logits_grad: the per-component logits gradient of a Bernoulli site: for a pair
        estimator ``(f1, f2, u, logits)`` (``f1`` is ``None`` unless antithetic); with
        ``multi_sample``, ``(f, z, logits)`` over a leading member dim. ``None``: Bernoulli sites
        are score-function sites like any other.
    :param multi_sample: takes ``num_samples`` (``n >= 2``); its loss averages every row.
    :param uniforms: ``(n, shape, logits) -> (m, *shape)`` uniforms of a Bernoulli site's ``m``
        members, member ``k`` being ``1[v_k < sigmoid(logits)]``; ``None``: the pair
        ``(u, 1 - u)`` if antithetic, else ``u`` alone.
    :param draws: other score-function sites draw ``n`` values too (branches), with
        leave-one-out weights; else they draw one.
    :param replicas: each particle is ``n`` independent base runs, with leave-one-out
        baselines among them.
    :param categorical_grad: the reduction of a Categorical or OneHotCategorical site,
        ``(f, r, eta) -> a``: the weights of its members' :math:`\\log q(z_k)` from their
        signals, sorted stick-breaking positions and decision logits
        (:mod:`pyro_arm.categorical`); its members come from :attr:`uniforms` drawn per
        decision. ``None``: categorical sites are score-function sites.
    """

    name: str
    antithetic: bool
    logits_grad: Optional[Callable[..., Tensor]]
    multi_sample: bool = False
    uniforms: Optional[Callable[..., Tensor]] = None
    draws: bool = False
    replicas: bool = False
    categorical_grad: Optional[Callable[..., Tensor]] = None

    def member_uniforms(self, n: Optional[int], shape: torch.Size, logits: Tensor) -> Tensor:
        """The uniforms of a Bernoulli site's members, ``(m, *shape)``."""
        if self.uniforms is not None:
            return self.uniforms(n, shape, logits)
        return (pair_uniforms if self.antithetic else one_uniform)(n, shape, logits)

    def site_grad(self, f: Tensor, v: Tensor, z: Tensor, logits: Tensor) -> Tensor:
        """
        The logits gradient of a Bernoulli site from its members' signals ``f`` (``(m, ...)``),
        uniforms ``v``, values ``z`` and (detached, working-dtype) logits.
        """
        if self.multi_sample:
            return self.logits_grad(f, z, logits)
        return self.logits_grad(f[1] if self.antithetic else None, f[0], v[0], logits)

    def num_draws(self, n: Optional[int]) -> int:
        """Values drawn per score-function site (member 0 is the base run's)."""
        return n if self.draws else 1

    def num_replicas(self, n: Optional[int]) -> int:
        """Independent base runs per particle."""
        return n if self.replicas else 1

    def rows(self, members: list[int], num_score: int, n: Optional[int] = None) -> int:
        """
        Runs of model and guide per particle, for Bernoulli sites with ``members`` members each
        and ``num_score`` other score-function sites.
        """
        branches = sum(m - 1 for m in members) + num_score * (self.num_draws(n) - 1)
        return self.num_replicas(n) * (1 + branches)


#: The estimators :class:`~pyro_arm.TraceARM_ELBO` knows by name.
ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(estimator: Estimator) -> Estimator:
    """Adds ``estimator`` to :data:`ESTIMATORS` under its name (replacing one of that name)."""
    ESTIMATORS[estimator.name] = estimator
    return estimator


register_estimator(Estimator("arm", True, arm, categorical_grad=categorical.coupled))
register_estimator(Estimator("disarm", True, disarm, categorical_grad=categorical.coupled))
register_estimator(Estimator("ar", False, ar))
register_estimator(Estimator("rloo", False, None, multi_sample=True, replicas=True))
register_estimator(
    Estimator(
        "arms",
        True,
        multisample.arms,
        True,
        uniforms=copula_uniforms,
        draws=True,
        categorical_grad=categorical.coupled,
    )
)


def get_estimator(name: str) -> Estimator:
    """Looks an estimator up by name, or raises :class:`ValueError` listing the valid names."""
    try:
        return ESTIMATORS[name]
    except (KeyError, TypeError):
        valid = ", ".join(repr(k) for k in ESTIMATORS)
        raise ValueError(f"Unknown estimator {name!r}; expected one of {valid}") from None


#: The most samples one estimate may draw (``num_samples`` of the multi-sample estimators and of
#: :class:`~pyro_arm.IWELBO`). Every sample is a run of model and guide, milliseconds in Pyro
#: even for a tiny model when run one by one (a row of every site when vectorized), so 10,000
#: samples already take seconds per step; beyond that a step does not finish in useful time, nor
#: IWELBO's leave-one-out bounds (``K^2`` values per datapoint) fit in memory. Raise it to allow
#: more.
MAX_NUM_SAMPLES = 10_000


def check_num_samples(estimator: Estimator, num_samples: Optional[int]) -> Optional[int]:
    """
    Validates ``num_samples`` for ``estimator``: an int from 2 to :data:`MAX_NUM_SAMPLES`
    (default 2) for a multi-sample estimator, ``None`` for the others.

    :raises ValueError: on ``num_samples < 2`` or ``> MAX_NUM_SAMPLES`` with a multi-sample
        estimator, or on ``num_samples`` passed to an estimator that does not take it (naming
        those that do).
    """
    if not estimator.multi_sample:
        if num_samples is not None:
            takes = ", ".join(repr(e.name) for e in ESTIMATORS.values() if e.multi_sample)
            raise ValueError(
                f"estimator {estimator.name!r} does not take num_samples; the estimators "
                f"that do: {takes}"
            )
        return None
    if num_samples is None:
        return 2
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(
            f"estimator {estimator.name!r} needs num_samples >= 2 (an int), got {num_samples!r}"
        )
    if num_samples > MAX_NUM_SAMPLES:
        raise ValueError(
            f"estimator {estimator.name!r}: num_samples={num_samples:,} is beyond "
            f"{MAX_NUM_SAMPLES:,}, the most one estimate may draw: each sample is a run of model "
            "and guide, so a step would not finish (raise "
            "pyro_arm.estimators.MAX_NUM_SAMPLES to allow it)"
        )
    return num_samples
