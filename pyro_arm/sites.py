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
from pyro.poutine.subsample_messenger import _Subsample
from torch.distributions import Bernoulli, Distribution, Independent

_WRAPPERS = (Independent, MaskedDistribution, ExpandedDistribution)


def bernoulli_logits(fn: Distribution) -> Optional[torch.Tensor]:
    """
    The logits of a (possibly wrapped) Bernoulli distribution, or ``None`` for any other one.

    The logits are those of the innermost Bernoulli; they broadcast, right-aligned, to
    ``fn.shape()``, because every wrapper keeps batch and event dims right-aligned.
    """
    while isinstance(fn, _WRAPPERS):
        fn = fn.base_dist
    if isinstance(fn, Bernoulli):
        return fn.logits
    return None


def is_subsample_site(msg: dict) -> bool:
    """Whether a sample message is the subsample draw of a :class:`pyro.plate`."""
    return isinstance(msg["fn"], _Subsample)


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
    is_bernoulli = bernoulli_logits(msg["fn"]) is not None
    if opt_in and not is_bernoulli:
        raise ValueError(
            f"At site '{msg['name']}': infer={{'arm': True}} asks for ARM, but the site's "
            f"distribution is {type(msg['fn']).__name__}; ARM applies to Bernoulli sites only"
        )
    return is_bernoulli and opt_in is not False
