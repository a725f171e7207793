# SPDX-License-Identifier: Apache-2.0
r"""
Coupled antithetic gradients for categorical variables, as pure tensor functions.

**Stick-breaking.** Sort a variable's ``C`` logits in ascending order, :math:`l_0 \le \dots \le
l_{C-1}`, and write the categorical as ``C - 1`` binary decisions with logits

.. math::

    \eta_i = l_i - \log \sum_{j > i} e^{l_j}, \qquad p_i = \sigma(\eta_i)
    = \frac{q_i}{\sum_{j \ge i} q_j},

taken in order: the class is the first decision that comes out 1 (the last class if none does)
(:func:`stick_breaking`, :func:`positions`). With one uniform :math:`u_i` per decision,
:math:`b_i = 1[u_i < p_i]` gives an exact sample of :math:`q`. Sorted ascending, every
decision but the last has :math:`p_i \le 1/3`.

**Coupled members.** ``m`` members draw their decisions from ``m`` uniforms per decision that
are marginally :math:`U(0, 1)` and mutually antithetic: the pair :math:`(u, 1 - u)` (``m = 2``,
Dong, Mnih & Tucker, 2021, "Coupled Gradient Estimators for Discrete Latent Variables") or the
Dirichlet copula of :mod:`pyro_arm.multisample` (CARMS, Dimitriev & Zhou, 2021), whose pairs
have the bivariate CDF :math:`B(t) = P(u_j < t, u_k < t)` (for the pair
:math:`B(t) = (2t - 1)_+`). Decisions are independent across ``i``, so for members with sorted
classes :math:`r \ne s` that first differ at decision :math:`d = \min(r, s)`,

.. math::

    w(r, s) = \frac{q(r)\, q(s)}{P(z_j = r, z_k = s)}
    = \prod_{i < d} \frac{(1 - p_i)^2}{1 - 2 p_i + B(p_i)}
      \cdot \frac{p_d (1 - p_d)}{p_d - B(p_d)}

(:func:`pair_log_weights`; for ``C = 2`` and the pair, :math:`w = \sigma(|\eta_0|)`). Every
pair of distinct classes has :math:`P > 0` (the decisions before :math:`d` have
:math:`p_i < 1/2`), so reweighting turns an expectation under the coupled pair into one under
independent samples, and the estimator

.. math::

    \hat g = \frac{1}{m (m - 1)} \sum_{j \ne k} \tfrac12\, w(z_j, z_k)
        \big(f(z_j) - f(z_k)\big) \big(\nabla \log q(z_j) - \nabla \log q(z_k)\big)

has the mean of RLOO over ``m`` independent samples, the true gradient (:func:`coupled`). A
pair with :math:`z_j = z_k` contributes nothing (its weight is set to 0). No weight is
clipped: where a factor's denominator is not positive, the event it belongs to has probability
zero, so setting the weight to 0 there changes no expectation. :math:`1 - 2p` is computed as
:math:`-\tanh(\eta / 2)` (no cancellation near :math:`p = 1/2`), and the product in log space.

As for Bernoulli sites, the explicit gradient of :math:`-\log q(z)` in the cost, which has
mean zero, is dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pyro_arm.multisample import copula_cdf


def stick_breaking(logits: Tensor) -> tuple[Tensor, Tensor]:
    """
    The ascending order of ``logits`` (``(*batch, C)``) and the ``C - 1`` decision logits
    :math:`\\eta_i = l_i - \\mathrm{logsumexp}(l_{i+1:})` of the sorted logits.

    :returns: ``(order, eta)``: ``order[..., i]`` is the class of sorted position ``i``;
        ``eta`` has shape ``(*batch, C - 1)``.
    """
    sorted_logits, order = logits.sort(dim=-1, stable=True)
    tail = sorted_logits.flip(-1).logcumsumexp(-1).flip(-1)  # logsumexp of l_{i:}
    return order, sorted_logits[..., :-1] - tail[..., 1:]


def positions(v: Tensor, eta: Tensor) -> Tensor:
    """The sorted position of each member's class: the number of leading decisions
    ``1[v < sigmoid(eta)]`` that come out 0. ``v``: ``(m, *shape, C - 1)``."""
    zeros = (v >= torch.sigmoid(eta)).to(torch.uint8)
    return zeros.cumprod(-1).sum(-1)


def classes(r: Tensor, order: Tensor) -> Tensor:
    """The classes of sorted positions ``r`` (``(m, *shape)``) under ``order``."""
    order = order.expand(r.shape + order.shape[-1:])
    return order.gather(-1, r.unsqueeze(-1)).squeeze(-1)


def pair_log_weights(eta: Tensor, m: int) -> Tensor:
    """
    :math:`\\log w` for two of ``m`` copula members whose classes first differ at decision
    ``d``, for every ``d``: shape of ``eta``. ``-inf`` where such a pair has probability 0.
    """
    p = torch.sigmoid(eta)
    b = copula_cdf(p, m)
    both_zero = -torch.tanh(eta / 2) + b  # P(u_j >= p, u_k >= p) = 1 - 2p + B(p)
    split = p - b  # P(u_j < p, u_k >= p)
    ninf = torch.full_like(eta, -float("inf"))
    log_zero = torch.where(
        both_zero > 0, 2 * F.logsigmoid(-eta) - both_zero.clamp(min=1e-300).log(), ninf
    )
    log_split = torch.where(
        split > 0,
        F.logsigmoid(eta) + F.logsigmoid(-eta) - split.clamp(min=1e-300).log(),
        ninf,
    )
    before = torch.cat([torch.zeros_like(log_zero[..., :1]), log_zero[..., :-1]], -1).cumsum(-1)
    return before + log_split


def pair_weights(r: Tensor, eta: Tensor) -> Tensor:
    """
    :math:`w(z_j, z_k)` for every pair of the ``m`` members with sorted positions ``r``
    (``(m, *shape)``), shape ``(m, m, *shape)``; 0 where the classes agree.
    """
    m = r.size(0)
    log_w = pair_log_weights(eta, m)
    d = torch.minimum(r.unsqueeze(1), r.unsqueeze(0))
    last = log_w.size(-1) - 1
    log_w = log_w.expand(d.shape + log_w.shape[-1:])
    w = log_w.gather(-1, d.clamp(max=last).unsqueeze(-1)).squeeze(-1).exp()
    return torch.where(r.unsqueeze(1) == r.unsqueeze(0), torch.zeros_like(w), w)


def coupled(f: Tensor, r: Tensor, eta: Tensor) -> Tensor:
    """
    The weights :math:`a_k` of the members' :math:`\\log q(z_k)`: :math:`\\sum_k a_k \\nabla
    \\log q(z_k)` is :math:`\\hat g`, with :math:`a_k = \\frac{1}{m(m-1)} \\sum_{j} w(z_k, z_j)
    (f_k - f_j)`.

    :param f: the members' signals ``(m, ...)``, broadcastable to ``r``.
    :param r: the members' sorted positions ``(m, *shape)`` (:func:`positions`).
    :param eta: the decision logits (:func:`stick_breaking`), broadcastable to
        ``(*shape, C - 1)``.
    :returns: ``(m, *shape)``.
    """
    m = r.size(0)
    w = pair_weights(r, eta)
    diff = f.unsqueeze(1) - f.unsqueeze(0)  # diff[k, j] = f_k - f_j
    return (w * diff).sum(1) / (m * (m - 1))
