# SPDX-License-Identifier: Apache-2.0
"""
Finding the guide sample sites that :class:`~pyro_arm.TraceARM_ELBO` treats with ARM.

A site qualifies when it is sampled (not observed) and its distribution, once every wrapper a
Pyro user writes is peeled off (``.expand``, ``.to_event``, ``.mask``), is a Bernoulli, whether
it was built with ``logits=`` or ``probs=``. ``poutine.scale`` and ``poutine.mask`` act on the
site's ``scale`` and ``mask`` fields and leave the distribution alone. A site opts out with
``infer={"arm": False}``.
"""

from __future__ import annotations

from typing import Optional

import torch
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine.util import site_is_subsample
from torch.distributions import Bernoulli, Distribution, Independent

from pyro_arm.estimators import working_dtype

_WRAPPERS = (Independent, MaskedDistribution, ExpandedDistribution)


def _innermost(fn: Distribution) -> Distribution:
    while isinstance(fn, _WRAPPERS):
        fn = fn.base_dist
    return fn


def is_bernoulli(fn: Distribution) -> bool:
    """Whether ``fn`` is a Bernoulli under any of ``.expand``, ``.to_event``, ``.mask``."""
    return isinstance(_innermost(fn), Bernoulli)


def bernoulli_logits(fn: Distribution) -> Optional[torch.Tensor]:
    """
    The logits of a (possibly wrapped) Bernoulli distribution, or ``None`` for any other one:
    the tensor the ARM gradient is taken for (for a site written with ``probs=``, torch's logits
    of the probs, through which the gradient flows on to the probs).

    The logits are those of the innermost Bernoulli; they broadcast, right-aligned, to
    ``fn.shape()``, because every wrapper keeps batch and event dims right-aligned.
    """
    fn = _innermost(fn)
    return fn.logits if isinstance(fn, Bernoulli) else None


def estimator_logits(fn: Distribution) -> torch.Tensor:
    """
    The logits of a wrapped Bernoulli as the sampler and the estimators use them: detached, in
    :func:`~pyro_arm.estimators.working_dtype` (at least float32). A site written with
    ``probs=`` gets the exact ``logit(probs)`` (``-inf`` and ``+inf`` at 0 and 1), not torch's
    logits, which clamp the probs to the dtype's epsilon (about 1% in bfloat16). Call it before
    anything reads ``fn.logits``: that is how a site written with ``probs=`` is recognised.
    """
    fn = _innermost(fn)
    if "logits" not in fn.__dict__:  # written with probs=, its logits not computed yet
        probs = fn.probs.detach()
        return torch.logit(probs.to(working_dtype(probs.dtype)))
    logits = fn.logits.detach()
    return logits.to(working_dtype(logits.dtype))


def is_subsample_site(msg: dict) -> bool:
    """Whether a sample message is the subsample draw of a :class:`pyro.plate`."""
    return site_is_subsample(msg)


def is_arm_site(msg: dict) -> bool:
    """
    Whether a guide sample message gets the ARM estimator.

    :raises ValueError: if ``infer["arm"]`` is not a bool, or asks for ARM at a site whose
        distribution is not a Bernoulli.
    """
    if msg["type"] != "sample" or msg["is_observed"] or is_subsample_site(msg):
        return False
    infer = msg.get("infer") or {}
    opt_in = infer.get("arm", None)
    if opt_in is not None and not isinstance(opt_in, bool):
        raise ValueError(
            f"At site '{msg['name']}': infer['arm'] must be True or False, got {opt_in!r}"
        )
    bernoulli = is_bernoulli(msg["fn"])
    if opt_in and not bernoulli:
        raise ValueError(
            f"At site '{msg['name']}': infer={{'arm': True}} asks for ARM, but the site's "
            f"distribution is {type(msg['fn']).__name__}; ARM applies to Bernoulli sites only"
        )
    return bernoulli and opt_in is not False
