# SPDX-License-Identifier: Apache-2.0
r"""
Multi-sample gradient estimators, as pure tensor functions over a leading sample dim ``n``.

Both estimators below spend :math:`n \ge 2` evaluations :math:`f_k = f(z_k)` of the cost on
samples :math:`z_1, \dots, z_n` from :math:`q_\phi` and estimate
:math:`\nabla_\phi \mathbb{E}_{q_\phi}[f(z)]` per component.

**RLOO** (REINFORCE with leave-one-out baselines; Kool, van Hoof & Welling, 2019, "Buy 4
REINFORCE samples, get a baseline for free!"). With independent :math:`z_k \sim q_\phi`,

.. math::

    \hat g_\mathrm{RLOO} = \sum_{k=1}^n w_k \nabla_\phi \log q_\phi(z_k), \qquad
    w_k = \frac1n \Big(f_k - \frac1{n-1} \sum_{j \ne k} f_j\Big)
        = \frac1{n(n-1)} \sum_{j=1}^n (f_k - f_j).

The baseline of sample :math:`k` is independent of :math:`z_k`, so it has no bias. This works
for any distribution (:func:`rloo_weights` gives the :math:`w_k`); for a Bernoulli with logits
:math:`\phi` the score is :math:`z_k - \sigma(\phi)` (:func:`rloo`).

**ARMS** (Dimitriev & Zhou, 2021, "ARMS: Antithetic-REINFORCE-Multi-Sample Gradient for Binary
Variables", ICML), for independent Bernoulli components with :math:`p = \sigma(\phi)`.

*Copula.* Per component, independently of the other components, draw
:math:`d \sim \mathrm{Dirichlet}(1, \dots, 1)` with ``n`` entries (normalised exponentials
:math:`d_k = e_k / \sum_j e_j`, computed as the spacings of their normalised cumulative sums)
and set :math:`u_k = (1 - d_k)^{n-1}` (:func:`arms_uniforms`). Since :math:`d_k \sim
\mathrm{Beta}(1, n-1)`, :math:`P(u_k < t) = P(d_k > 1 - t^{1/(n-1)}) = t`: each :math:`u_k` is
:math:`U(0, 1)`. The Dirichlet is uniform on the simplex, so for :math:`j \ne k`
:math:`P(d_j > a, d_k > a) = (1 - 2a)_+^{n-1}`, hence

.. math::

    B_n(t) := P(u_j < t, u_k < t) = \big(2 t^{1/(n-1)} - 1\big)_+^{n-1} < t^2 \quad (0 < t < 1),

and at most one :math:`u_k` lies below :math:`2^{-(n-1)}`: the lower tail is mutually
antithetic. With :math:`n = 2`, :math:`(u_1, u_2) = (u, 1 - u)`.

*Samples* (:func:`arms_samples`). The copula is antithetic in its lower tail only, so that tail
decides the rarer value: :math:`z_k = 1[u_k < p]` if :math:`\phi < 0`, else
:math:`z_k = 1[1 - u_k < p]`. Every :math:`z_k` is marginally :math:`\mathrm{Bernoulli}(p)`.
With :math:`m = \sigma(-|\phi|) = \min(p, 1 - p)`, the rarer value's pair coincidence is
:math:`B_n(m)`, and the chance that another sample takes the rarer value given that one does is

.. math::

    r = \frac{B_n(m)}{m} = \big(2 - m^{-1/(n-1)}\big)_+^{n-1}
      = \big(2 - (1 + e^{|\phi|})^{1/(n-1)}\big)_+^{n-1} \;<\; m.

*Estimator* (:func:`arms`). Fix a component :math:`i`. Each component has its own copula
draw, so the other components :math:`z_{j,-i}` of any sample are independent of
:math:`(z_{j,i}, z_{k,i})` and marginally :math:`q_\phi`; averaging over them turns
:math:`f(z_j)` into :math:`h(z_{j,i}) = h(0) + \Delta z_{j,i}`, and the true logits gradient is
:math:`p(1-p)\Delta`. Writing :math:`z_k` for :math:`z_{k,i}`, :math:`p` for :math:`p_i`, and
:math:`J = P(z_j = z_k = 1)` for :math:`j \ne k`,

.. math::

    \mathbb{E}[h(z_k)(z_k - p)] = \Delta\, p(1-p), \qquad
    \mathbb{E}[h(z_j)(z_k - p)] = \Delta\,(J - p^2) \quad (j \ne k),

so the leave-one-out sum has mean :math:`\mathbb{E}[\sum_k w_k (z_k - p)] = \Delta (p - J)`
instead of :math:`\Delta\, p (1 - p)`: the correlated baseline removes the (negative)
covariance :math:`J - p^2` too. ARMS rescales by the debiasing factor

.. math::

    \hat g_\mathrm{ARMS} = c \sum_{k=1}^n w_k (z_k - p), \qquad
    c = \frac{p(1-p)}{p - J} = \frac{\sigma(|\phi|)}{1 - r}
    \quad\text{(} J = B_n(p) \text{ if } \phi < 0 \text{, else } 2p - 1 + B_n(1-p)\text{)},

(:func:`arms_debias`), which is unbiased. The second form (with :math:`p(1-p) = m(1-m)` and
:math:`p - J = m(1 - r)` in both cases) needs no guard against a vanishing denominator, unlike
the reference implementation (github.com/alekdimi/arms), which adds :math:`10^{-6}` to
:math:`p - J`. Independent samples have :math:`J = p^2`, :math:`r = m`, :math:`c = 1`: RLOO.
For :math:`n = 2`, :math:`r = 0` and :math:`c = \sigma(|\phi|)`, and
:math:`\hat g = \tfrac12 (f_1 - f_2)(z_1 - z_2)\, \sigma(|\phi|)` is DisARM (Dong, Mnih & Tucker,
2020) on the pair :math:`(u, 1 - u)`. More generally, :math:`\sum_k w_k (z_k - p) =
\frac1{n(n-1)} \sum_{j<k} (f_k - f_j)(z_k - z_j)`: ARMS is the average of DisARM-like terms
over all pairs.

Because :math:`\sum_k w_k = 0`, the functions compute :math:`\sum_k w_k z_k`, which equals
:math:`\sum_k w_k (z_k - p)`, and with :math:`w_k` built from the differences
:math:`f_k - f_j` the :math:`n = 2` case reproduces :func:`pyro_arm.estimators.disarm` to the
bit. The values ``f`` are the cost per sample, already broadcast per component (plate-local
signals); nothing here knows about Pyro. Not implemented: the paper's Gaussian-copula variant
and its multi-sample-bound (IWAE) version of the estimator.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _check_num_samples(n: int) -> None:
    if n < 2:
        raise ValueError(f"multi-sample estimators need num_samples >= 2, got {n}")


def _expand_to(logits: Tensor, grad: Tensor) -> Tensor:
    return grad.expand(torch.broadcast_shapes(grad.shape, logits.shape))


def rloo_weights(f: Tensor) -> Tensor:
    r"""
    Leave-one-out weights :math:`w_k = \frac1n (f_k - \frac1{n-1}\sum_{j \ne k} f_j)`.

    ``sum_k w_k * grad log q(z_k)`` is the RLOO estimate. Computed as
    :math:`\frac1{n(n-1)} \sum_j (f_k - f_j)`, differences first (no cancellation of a large
    common offset, and exactly :math:`\pm\frac12 (f_1 - f_2)` for :math:`n = 2`), at the cost
    of an ``(n, n, *shape)`` intermediate.

    :param f: values ``(n, *shape)`` of the cost at ``n`` samples, ``n >= 2``.
    :returns: the weights, of the shape of ``f``; they sum to zero over the sample dim.
    :raises ValueError: if ``n < 2``.
    """
    n = f.shape[0]
    _check_num_samples(n)
    diffs = f.unsqueeze(1) - f.unsqueeze(0)  # diffs[k, j] = f_k - f_j
    return diffs.sum(1) / (n * (n - 1))


def rloo(f: Tensor, z: Tensor, logits: Tensor) -> Tensor:
    r"""
    RLOO for independent Bernoulli samples: :math:`\sum_k w_k (z_k - \sigma(\phi))`, computed as
    :math:`\sum_k w_k z_k` (equal, since :math:`\sum_k w_k = 0`).

    :param f: values ``(n, *shape)`` (broadcastable to ``z``), ``n >= 2``.
    :param z: independent samples ``(n, *shape)`` from ``Bernoulli(logits=logits)``.
    :param logits: logits broadcastable to ``z[0]``.
    :returns: the per-component estimate of the logits gradient, of the broadcast shape.
    """
    return _expand_to(logits, (rloo_weights(f) * z).sum(0))


def arms_uniforms(
    n: int,
    shape: torch.Size | tuple[int, ...],
    generator: Optional[torch.Generator] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device | str] = None,
) -> Tensor:
    r"""
    Draws ``n`` mutually antithetic uniforms per component from the Dirichlet copula.

    :math:`d \sim \mathrm{Dirichlet}(1, \dots, 1)` as the spacings of the normalised cumulative
    sums of ``n`` standard exponentials, then :math:`u_k = (1 - d_k)^{n-1}`. The last
    cumulative sum is exactly 1, so for ``n = 2`` the pair is ``(u, 1 - u)`` to the bit.

    :param n: number of samples, ``n >= 2``.
    :param shape: the shape of one sample.
    :param generator: optional :class:`torch.Generator`.
    :returns: uniforms of shape ``(n, *shape)``, each marginally ``U(0, 1)``.
    :raises ValueError: if ``n < 2``.
    """
    _check_num_samples(n)
    # -log(1 - U) of uniforms in [0, 1): standard exponentials, finite, several times faster
    # than Tensor.exponential_ on the CPU
    u = torch.rand((n, *shape), generator=generator, dtype=dtype, device=device)
    e = u.neg_().log1p_().neg_()
    c = e.cumsum(0)
    c = c / c[-1:]
    d = torch.diff(c, dim=0, prepend=torch.zeros_like(c[:1]))
    return (1 - d) ** (n - 1)


def arms_samples(u: Tensor, logits: Tensor) -> Tensor:
    r"""
    Bernoulli samples from copula uniforms: ``1[u < p]`` where ``logits < 0``, else
    ``1[1 - u < p]``, with ``p = sigmoid(logits)``, so that the copula's antithetic lower tail
    decides the rarer value.

    :param u: uniforms ``(n, *shape)`` from :func:`arms_uniforms`.
    :param logits: logits broadcastable to ``u[0]``.
    :returns: samples ``(n, *shape)`` in ``logits.dtype``.
    """
    probs = torch.sigmoid(logits)
    return torch.where(logits < 0, u < probs, 1 - u < probs).to(logits.dtype)


def arms_lower_tail(u: Tensor, logits: Tensor) -> Tensor:
    r"""
    Copula uniforms reordered so that :math:`z_k = 1[v_k < p]` are ARMS samples:
    :math:`v_k = u_k` where ``logits < 0``, else :math:`v_k = 1 - u_{n-1-k}`.

    Up to the reversal of the sample order where ``logits >= 0`` (the copula is exchangeable,
    so the joint law is unchanged), ``1[v < p]`` is :func:`arms_samples`. Each :math:`v_k` is
    ``U(0, 1)``, and for ``n = 2`` with ``u = (w, 1 - w)``, :math:`v = (w, 1 - w)` whatever the
    sign: sample 0 is DisARM's ordinary sample ``1[w < p]`` and sample 1 its antithetic twin.

    :param u: uniforms ``(n, *shape)`` from :func:`arms_uniforms`.
    :param logits: logits broadcastable to ``u[0]``.
    :returns: uniforms ``(n, *shape)`` of the broadcast shape.
    """
    return torch.where(logits < 0, u, 1 - u.flip(0))


def copula_cdf(t: Tensor, n: int) -> Tensor:
    r"""
    The bivariate CDF of two of the ``n`` copula uniforms of :func:`arms_uniforms`,
    :math:`B_n(t) = P(u_j < t, u_k < t) = (2 t^{1/(n-1)} - 1)_+^{n-1}` (``n = 2``:
    :math:`(2t - 1)_+`, the pair ``(u, 1 - u)``).
    """
    _check_num_samples(n)
    if n == 2:
        return (2 * t - 1).clamp(min=0)
    return (2 * t ** (1 / (n - 1)) - 1).clamp(min=0) ** (n - 1)


def arms_debias(logits: Tensor, n: int) -> Tensor:
    r"""
    The ARMS debiasing factor :math:`c = p(1-p) / (p - J) = \sigma(|\phi|) / (1 - r)`, with
    :math:`r = (2 - (1 + e^{|\phi|})^{1/(n-1)})_+^{n-1}` the chance that another copula sample
    takes the rarer value given that one does (see the module docstring).

    :param logits: logits :math:`\phi`.
    :param n: number of samples, ``n >= 2``.
    :returns: the factor, of the shape of ``logits``; ``sigmoid(|logits|)`` for ``n = 2``.
    :raises ValueError: if ``n < 2``.
    """
    _check_num_samples(n)
    a = logits.abs()
    r = (2 - torch.exp(a).add(1) ** (1 / (n - 1))).clamp(min=0) ** (n - 1)
    return torch.sigmoid(a) / (1 - r)


def arms_weights(f: Tensor, logits: Tensor) -> Tensor:
    r"""
    Per-sample ARMS weights :math:`c\, w_k`: ``sum_k weights_k * (z_k - sigmoid(logits))`` is the
    ARMS estimate, so they can multiply the score like RLOO's weights.

    :param f: values ``(n, *shape)``, ``n >= 2``, at samples from :func:`arms_samples`.
    :param logits: logits broadcastable to ``f[0]``.
    :returns: weights of the broadcast shape ``(n, *shape)``.
    """
    return arms_debias(logits, f.shape[0]) * rloo_weights(f)


def arms(f: Tensor, z: Tensor, logits: Tensor) -> Tensor:
    r"""
    ARMS: :math:`c \sum_k w_k (z_k - \sigma(\phi))`, computed as :math:`\sum_k c\, w_k z_k`.

    :param f: values ``(n, *shape)`` (broadcastable to ``z``), ``n >= 2``.
    :param z: copula samples ``(n, *shape)`` from :func:`arms_samples`.
    :param logits: logits broadcastable to ``z[0]``.
    :returns: the per-component estimate of the logits gradient, of the broadcast shape.
    """
    return _expand_to(logits, (arms_weights(f, logits) * z).sum(0))
