# SPDX-License-Identifier: Apache-2.0
"""
Gradient estimators for the logits of independent Bernoulli variables, as pure tensor functions.

Every estimator here returns, per component, an unbiased estimate of
:math:`\\partial_\\phi \\mathbb{E}_{z \\sim \\mathrm{Bernoulli}(\\sigma(\\phi))}[f(z)]`
from one uniform draw :math:`u \\sim U(0, 1)` and the evaluations of :math:`f` at the sample
:math:`z_2` and, for antithetic estimators, at its antithetic twin :math:`z_1`, the pair that
:func:`bernoulli_pair` makes from :math:`u` (where the pair is defined):

- ARM (Yin & Zhou, 2019): :math:`(f(z_1) - f(z_2)) (u - \\tfrac12)`;
- DisARM (Dong, Mnih & Tucker, 2020), ARM with :math:`u` integrated out given the pair:
  :math:`\\tfrac12 (f(z_1) - f(z_2)) (1 - 2 z_2)\\, 1[z_1 \\ne z_2]\\, \\sigma(|\\phi|)`;
- AR (one evaluation): :math:`f(z_2) (1 - 2u)`.

The functions know nothing about Pyro: ``f1`` and ``f2`` are the signals (already broadcast to the
shape of ``u``), so each estimator can be checked alone against an exact gradient. New estimators
slot in by adding an :class:`Estimator` to :data:`ESTIMATORS`. :class:`~pyro_arm.TraceARM_ELBO`
calls them with ``u``, ``logits`` and the signals in :func:`working_dtype` (at least float32).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from pyro_arm import multisample


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """
    The dtype the uniforms, the pair and the estimator weights are computed in: at least float32
    (half-precision logits, as ``torch.autocast`` makes them, would round the uniforms and the
    probabilities), float64 for float64 logits.
    """
    return torch.promote_types(dtype, torch.float32)


def bernoulli_pair(u: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """
    The antithetic pair made from one uniform draw. This is the one definition of the pair that
    the rest of the package refers to:

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


class Estimator(NamedTuple):
    """
    A named estimator of the logits gradient.

    :param name: the name users pass as ``TraceARM_ELBO(estimator=name)``.
    :param antithetic: whether it needs ``f(z1)``, i.e. one extra evaluation per Bernoulli site.
    :param logits_grad: ``(f1, f2, u, logits) -> Tensor``, the per-component gradient estimate;
        for a multi-sample estimator ``(f, z, logits) -> Tensor`` over a leading sample dim.
    :param multi_sample: whether it takes ``num_samples`` (see :mod:`pyro_arm.multisample_elbo`).
    """

    name: str
    antithetic: bool
    logits_grad: Callable[..., Tensor]
    multi_sample: bool = False


#: The estimators :class:`~pyro_arm.TraceARM_ELBO` knows by name.
ESTIMATORS: dict[str, Estimator] = {
    "arm": Estimator("arm", True, arm),
    "disarm": Estimator("disarm", True, disarm),
    "ar": Estimator("ar", False, ar),
    # multi-sample estimators (issue 8): run by pyro_arm.multisample_elbo
    "rloo": Estimator("rloo", False, multisample.rloo, multi_sample=True),
    "arms": Estimator("arms", True, multisample.arms, multi_sample=True),
}


def get_estimator(name: str) -> Estimator:
    """Looks an estimator up by name, or raises :class:`ValueError` listing the valid names."""
    try:
        return ESTIMATORS[name]
    except (KeyError, TypeError):
        valid = ", ".join(repr(k) for k in ESTIMATORS)
        raise ValueError(f"Unknown estimator {name!r}; expected one of {valid}") from None


def check_num_samples(estimator: Estimator, num_samples: Optional[int]) -> Optional[int]:
    """
    Validates ``num_samples`` for ``estimator``: an int ``>= 2`` (default 2) for a multi-sample
    estimator, ``None`` for the others.

    :raises ValueError: on ``num_samples < 2`` with a multi-sample estimator, or on
        ``num_samples`` passed to an estimator that does not take it (naming those that do).
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
    return num_samples
