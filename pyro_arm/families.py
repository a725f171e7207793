# SPDX-License-Identifier: Apache-2.0
"""
Site families: the kinds of guide site an estimator gives members, each a registration on the
one engine.

A :class:`SiteFamily` says how to recognise its sites (the distribution under ``.expand``,
``.to_event``, ``.mask``), how to draw a site's ``m`` members (its draw rule, from the
estimator's :meth:`~pyro_arm.estimators.Estimator.member_uniforms`), how to redraw a later site
from the base run's uniforms (common random numbers), and how to reduce the members' signals
into the site's term of the surrogate (its reduction, looked up on the estimator). Everything
else (branches, plate-local signals, executors, dependencies, checks) is shared:

- **Bernoulli** (:data:`BERNOULLI`): member ``k`` is ``1[v_k < sigmoid(logits)]``; the reduction
  is the estimator's ``logits_grad``, the surrogate ``grad * logits``.
- **Categorical** and **OneHotCategorical** (:data:`CATEGORICAL`, :data:`ONE_HOT`): the sorted
  stick-breaking decisions of :mod:`pyro_arm.categorical`, one uniform per decision; the
  reduction is the estimator's ``categorical_grad``, the surrogate
  :math:`\\sum_k a_k \\log q(z_k)` per variable.

An estimator without a family's reduction leaves its sites to the score function
(:meth:`SiteFamily.plain` draws them, or Pyro does). A site opts out with
``infer={"arm": False}``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Categorical, Distribution, OneHotCategorical

from pyro_arm import categorical
from pyro_arm.estimators import Estimator, working_dtype
from pyro_arm.sites import bernoulli_logits, estimator_logits, innermost, is_subsample_site


class SiteSample(NamedTuple):
    """
    The members of one site.

    :param v: their uniforms ``(m, ...)``, in the working dtype (at least float32): one per
        component of a Bernoulli site, one per decision of each categorical variable.
    :param z: their values ``(m, *shape)`` in the site's format; ``z[0]`` is the base run's.
    :param logits: the logits the gradient is taken for (with their graph, in their own dtype).
    :param estimator_logits: the logits as the estimators see them: detached, in the working
        dtype (see :func:`~pyro_arm.sites.estimator_logits`).
    :param event_dim: the site's event dims.
    :param family: the site's :class:`SiteFamily`.
    """

    v: torch.Tensor
    z: torch.Tensor
    logits: torch.Tensor
    estimator_logits: torch.Tensor
    event_dim: int
    family: SiteFamily


class SiteFamily:
    """A kind of guide site: recognised by its innermost distribution, drawn and reduced."""

    name = "bernoulli"
    types: tuple = (Bernoulli,)

    def recognises(self, fn: Distribution) -> bool:
        return isinstance(innermost(fn), self.types)

    def reduction(self, estimator: Estimator) -> Optional[Callable]:
        """The estimator's reduction for this family; ``None``: the score function."""
        return estimator.logits_grad

    def estimator_logits(self, fn: Distribution) -> torch.Tensor:
        """The detached, working-dtype logits the draw rule reads."""
        return estimator_logits(fn)

    def plain(self, fn: Distribution, logits: torch.Tensor) -> Optional[torch.Tensor]:
        """A score-function site's value (``None``: Pyro draws it)."""
        u = torch.rand(fn.shape(), dtype=logits.dtype, device=logits.device)
        return (u < torch.sigmoid(logits)).to(bernoulli_logits(fn).dtype)

    def members(self, estimator: Estimator, n: Optional[int], fn, logits) -> SiteSample:
        """Draws the site's members (member 0: the base run's value)."""
        v = estimator.member_uniforms(n, fn.shape(), logits)
        grad_logits = bernoulli_logits(fn)
        z = (v < torch.sigmoid(logits)).to(grad_logits.dtype)
        return SiteSample(v, z, grad_logits, logits, fn.event_dim, self)

    def redraw(self, sample: SiteSample, fn: Distribution) -> Optional[torch.Tensor]:
        """A later site of a branch from the base run's uniforms, or ``None`` if they do not
        fit its shape (then it is drawn afresh)."""
        if not self.recognises(fn):
            return None
        v = sample.v[0]
        if torch.broadcast_shapes(v.shape, fn.shape()) != fn.shape():
            return None
        return (v < torch.sigmoid(estimator_logits(fn))).to(sample.z.dtype)

    def layout(self, sample: SiteSample) -> tuple[int, int]:
        """The dims of a member's signal and its trailing event dims."""
        return sample.z.dim() - 1, sample.event_dim

    def surrogate(self, estimator: Estimator, f: torch.Tensor, sample: SiteSample):
        """The site's surrogate term from its members' signals ``f`` (``(m, ...)``)."""
        s = sample
        grad = estimator.site_grad(f, s.v, s.z, s.estimator_logits)
        return (grad.detach() * s.logits).sum()


class CategoricalFamily(SiteFamily):
    """Categorical sites (``one_hot``: OneHotCategorical, whose class dim is an event dim)."""

    def __init__(self, one_hot: bool) -> None:
        self.one_hot = one_hot
        self.name = "one_hot_categorical" if one_hot else "categorical"
        self.types = (OneHotCategorical,) if one_hot else (Categorical,)

    def _categorical(self, fn: Distribution) -> Categorical:
        inner = innermost(fn)
        return inner._categorical if self.one_hot else inner

    def recognises(self, fn: Distribution) -> bool:
        inner = innermost(fn)  # a straight-through one-hot has its own (pathwise) gradient
        return isinstance(inner, self.types) and not inner.has_rsample

    def reduction(self, estimator: Estimator) -> Optional[Callable]:
        return estimator.categorical_grad

    def estimator_logits(self, fn: Distribution) -> torch.Tensor:
        inner = self._categorical(fn)
        if "logits" not in inner.__dict__:  # written with probs=: the exact log(probs)
            probs = inner.probs.detach()
            return probs.to(working_dtype(probs.dtype)).log()
        logits = inner.logits.detach()
        return logits.to(working_dtype(logits.dtype))

    def plain(self, fn, logits) -> Optional[torch.Tensor]:
        return None

    def _shape(self, fn: Distribution) -> torch.Size:
        shape = fn.shape()
        return shape[:-1] if self.one_hot else shape

    def _values(self, index: torch.Tensor, num_classes: int, dtype: torch.dtype):
        if self.one_hot:
            return F.one_hot(index, num_classes).to(dtype)
        return index

    def members(self, estimator, n, fn, logits) -> SiteSample:
        grad_logits = self._categorical(fn).logits
        order, eta = categorical.stick_breaking(logits)
        v = estimator.member_uniforms(n, self._shape(fn) + eta.shape[-1:], eta)
        index = categorical.classes(categorical.positions(v, eta), order)
        z = self._values(index, logits.size(-1), grad_logits.dtype)
        return SiteSample(v, z, grad_logits, logits, fn.event_dim, self)

    def redraw(self, sample, fn) -> Optional[torch.Tensor]:
        if not self.recognises(fn):
            return None
        logits = self.estimator_logits(fn)
        order, eta = categorical.stick_breaking(logits)
        v = sample.v[0]
        shape = self._shape(fn) + eta.shape[-1:]
        if logits.size(-1) != sample.estimator_logits.size(-1):
            return None
        if torch.broadcast_shapes(v.shape, eta.shape, shape) != shape:
            return None
        index = categorical.classes(categorical.positions(v, eta), order)
        return self._values(index, logits.size(-1), sample.z.dtype)

    def layout(self, sample) -> tuple[int, int]:
        return sample.z.dim() - 1 - self.one_hot, sample.event_dim - self.one_hot

    def surrogate(self, estimator, f, sample):
        s = sample
        order, eta = categorical.stick_breaking(s.estimator_logits)
        r = categorical.positions(s.v, eta)
        weights = estimator.categorical_grad(f, r, eta)
        index = categorical.classes(r, order)
        log_q = s.logits.expand(index.shape + s.logits.shape[-1:])
        log_q = log_q.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return (weights.detach() * log_q).sum()


BERNOULLI = SiteFamily()
CATEGORICAL = CategoricalFamily(one_hot=False)
ONE_HOT = CategoricalFamily(one_hot=True)

#: The registered site families, tried in order.
FAMILIES: list[SiteFamily] = [BERNOULLI, CATEGORICAL, ONE_HOT]


def register_family(family: SiteFamily) -> SiteFamily:
    """Adds ``family`` to :data:`FAMILIES` (before the others: it is tried first)."""
    FAMILIES.insert(0, family)
    return family


def family_of(fn: Distribution) -> Optional[SiteFamily]:
    """The family of a (possibly wrapped) distribution, or ``None``."""
    return next((family for family in FAMILIES if family.recognises(fn)), None)


def site_family(msg: dict) -> Optional[SiteFamily]:
    """
    The family of a guide sample message that takes part in the estimator, or ``None``
    (observed, subsample, opted out with ``infer={"arm": False}``, or of no family).

    :raises ValueError: if ``infer["arm"]`` is not a bool, or asks for ARM at a site of no
        family.
    """
    if msg["type"] != "sample" or msg["is_observed"] or is_subsample_site(msg):
        return None
    infer = msg.get("infer") or {}
    opt_in = infer.get("arm", None)
    if opt_in is not None and not isinstance(opt_in, bool):
        raise ValueError(
            f"At site '{msg['name']}': infer['arm'] must be True or False, got {opt_in!r}"
        )
    family = family_of(msg["fn"])
    if opt_in and family is None:
        raise ValueError(
            f"At site '{msg['name']}': infer={{'arm': True}} asks for ARM, but the site's "
            f"distribution is {type(msg['fn']).__name__}; ARM applies to Bernoulli, "
            "Categorical and OneHotCategorical sites only"
        )
    return family if opt_in is not False else None
