# SPDX-License-Identifier: Apache-2.0
"""
Reading guide sample sites: the distribution under every wrapper a Pyro user writes
(``.expand``, ``.to_event``, ``.mask``), a Bernoulli's logits whether it was built with
``logits=`` or ``probs=``, and plate subsample sites. ``poutine.scale`` and ``poutine.mask`` act
on the site's ``scale`` and ``mask`` fields and leave the distribution alone. Which sites take
part in an estimator is the business of :mod:`pyro_arm.families`.
"""

from __future__ import annotations

from typing import Optional

import torch
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine.util import site_is_subsample
from torch.distributions import Bernoulli, Distribution, Independent

from pyro_arm.estimators import working_dtype

_WRAPPERS = (Independent, MaskedDistribution, ExpandedDistribution)


def innermost(fn: Distribution) -> Distribution:
    while isinstance(fn, _WRAPPERS):
        fn = fn.base_dist
    return fn


def is_bernoulli(fn: Distribution) -> bool:
    """Whether ``fn`` is a Bernoulli under any of ``.expand``, ``.to_event``, ``.mask``."""
    return isinstance(innermost(fn), Bernoulli)


def bernoulli_logits(fn: Distribution) -> Optional[torch.Tensor]:
    """
    The logits of a (possibly wrapped) Bernoulli distribution, or ``None`` for any other one:
    the tensor the ARM gradient is taken for (for a site written with ``probs=``, torch's logits
    of the probs, through which the gradient flows on to the probs).

    The logits are those of the innermost Bernoulli; they broadcast, right-aligned, to
    ``fn.shape()``, because every wrapper keeps batch and event dims right-aligned.
    """
    fn = innermost(fn)
    return fn.logits if isinstance(fn, Bernoulli) else None


def estimator_logits(fn: Distribution) -> torch.Tensor:
    """
    The logits of a wrapped Bernoulli as the sampler and the estimators use them: detached, in
    :func:`~pyro_arm.estimators.working_dtype` (at least float32). A site written with
    ``probs=`` gets the exact ``logit(probs)`` (``-inf`` and ``+inf`` at 0 and 1), not torch's
    logits, which clamp the probs to the dtype's epsilon (about 1% in bfloat16). Call it before
    anything reads ``fn.logits``: that is how a site written with ``probs=`` is recognised.
    """
    fn = innermost(fn)
    if "logits" not in fn.__dict__:  # written with probs=, its logits not computed yet
        probs = fn.probs.detach()
        return torch.logit(probs.to(working_dtype(probs.dtype)))
    logits = fn.logits.detach()
    return logits.to(working_dtype(logits.dtype))


def is_subsample_site(msg: dict) -> bool:
    """Whether a sample message is the subsample draw of a :class:`pyro.plate`."""
    return site_is_subsample(msg)
