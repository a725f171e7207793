# SPDX-License-Identifier: Apache-2.0
"""
Test bounds for models with discrete latents, in nats per datapoint.

For a model ``p(x, z)`` and guide ``q(z | x)`` taking a batch ``x`` of shape ``(B, ...)`` with
one ``pyro.plate(..., dim=-1)`` over the datapoints, the log importance weights
``log w_k = log p(x, z_k) - log q(z_k | x)``, ``z_k ~ q(z | x)``, are computed for ``k``
samples at once by running guide and model (replayed) inside a particle plate at dim ``-2``, in
chunks of samples and of datapoints so that memory stays bounded. From them:

- :func:`negative_elbo`: ``-mean_k log w_k`` (the ``k = 1`` ELBO, averaged over the samples);
- :func:`negative_iw_bound`: ``-log mean_k exp(log w_k)``, the importance-weighted bound of
  Burda et al. (2016) with ``k`` samples (the ARM paper reports ``k = 1000``).

Both return the mean over datapoints of the negated bound (a loss: lower is better); the bounds
satisfy ``ELBO <= IW_k <= IW_{k'} <= log p(x)`` in expectation for ``k <= k'``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample
from torch import Tensor

_PARTICLES = "_eval_particles"


def _sum_to_particles(value: Tensor, num: int, batch: int) -> Tensor:
    # A site's log-density has shape (num, batch), (batch,), (num, 1) or () ...; sum any extra
    # rightmost batch dims away and broadcast to (num, batch).
    while value.dim() > 2:
        value = value.sum(-1)
    return value.expand(num, batch)


@torch.no_grad()
def log_weights(model: Callable, guide: Callable, x: Tensor, num_samples: int) -> Tensor:
    """
    Log importance weights ``log p(x, z_k) - log q(z_k | x)`` for one batch.

    :param model: ``model(x)``, with its data plate at dim ``-1``.
    :param guide: ``guide(x)``, likewise.
    :param x: the batch, datapoints along dim 0.
    :param num_samples: ``k``, vectorized in a plate at dim ``-2``.
    :returns: a tensor of shape ``(num_samples, B)``.
    """
    batch = x.shape[0]
    with pyro.plate(_PARTICLES, num_samples, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    log_w = x.new_zeros(num_samples, batch)
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        trace.compute_log_prob(lambda _, site: not site_is_subsample(site))
        for site in trace.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                log_w = log_w + sign * _sum_to_particles(site["log_prob"], num_samples, batch)
    return log_w


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


@torch.no_grad()
def iw_log_likelihoods(
    model: Callable,
    guide: Callable,
    x: Tensor,
    num_samples: int,
    *,
    batch_size: int = 100,
    chunk_size: int = 100,
) -> tuple[Tensor, Tensor]:
    """
    Per-datapoint ELBO and ``k``-sample importance-weighted bound, from the same samples.

    :param x: data ``(N, ...)``, on the model's device.
    :param num_samples: ``k``.
    :param batch_size: datapoints per chunk.
    :param chunk_size: samples per chunk (memory is about ``batch_size * chunk_size`` times one
        datapoint's activations).
    :returns: ``(elbo, iw)``, each of shape ``(N,)``: ``mean_k log w_k`` and
        ``log mean_k exp(log w_k)``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    elbos, iws = [], []
    for lo, hi in _chunks(x.shape[0], batch_size):
        xb = x[lo:hi]
        total = xb.new_zeros(hi - lo)
        lse = xb.new_full((hi - lo,), -math.inf)
        for k_lo, k_hi in _chunks(num_samples, chunk_size):
            log_w = log_weights(model, guide, xb, k_hi - k_lo)
            total = total + log_w.sum(0)
            lse = torch.logaddexp(lse, torch.logsumexp(log_w, 0))
        elbos.append(total / num_samples)
        iws.append(lse - math.log(num_samples))
    return torch.cat(elbos), torch.cat(iws)


def negative_elbo(
    model: Callable,
    guide: Callable,
    x: Tensor,
    num_samples: int = 1,
    *,
    batch_size: int = 100,
    chunk_size: int = 100,
) -> float:
    """
    ``-ELBO`` in nats per datapoint, averaged over the datapoints of ``x``, each with
    ``num_samples`` single-sample ELBO estimates averaged (default 1).
    """
    elbo, _ = iw_log_likelihoods(
        model, guide, x, num_samples, batch_size=batch_size, chunk_size=chunk_size
    )
    return -elbo.mean().item()


def negative_iw_bound(
    model: Callable,
    guide: Callable,
    x: Tensor,
    num_samples: int = 1000,
    *,
    batch_size: int = 100,
    chunk_size: int = 100,
) -> float:
    """
    ``-log mean_k exp(log p(x, z_k) - log q(z_k | x))`` in nats per datapoint, averaged over the
    datapoints of ``x``: the negated ``k``-sample importance-weighted bound (``k = num_samples``).
    """
    _, iw = iw_log_likelihoods(
        model, guide, x, num_samples, batch_size=batch_size, chunk_size=chunk_size
    )
    return -iw.mean().item()


def evaluate_sbn(
    sbn,
    x: Tensor,
    *,
    k: int = 1000,
    iw_size: Optional[int] = None,
    batch_size: int = 100,
    chunk_size: int = 100,
) -> dict:
    """
    The test numbers of the ARM paper for a :class:`~pyro_arm.sbn.models.SigmoidBeliefNet`.

    :param x: binarized data ``(N, 784)`` on the model's device.
    :param k: samples of the importance-weighted bound.
    :param iw_size: use only the first ``iw_size`` datapoints for the ``k``-sample bound
        (default all).
    :returns: ``{"neg_elbo": -ELBO (k=1) over all of x, "neg_iw": -IW_k, "k": k,
        "iw_size": datapoints used for the bound}``, nats per datapoint.
    """
    n_iw = x.shape[0] if iw_size is None else min(int(iw_size), x.shape[0])
    neg_elbo = negative_elbo(sbn.model, sbn.guide, x, 1, batch_size=max(batch_size, 500))
    neg_iw = negative_iw_bound(
        sbn.model, sbn.guide, x[:n_iw], k, batch_size=batch_size, chunk_size=chunk_size
    )
    return {"neg_elbo": neg_elbo, "neg_iw": neg_iw, "k": k, "iw_size": n_iw}
