# SPDX-License-Identifier: Apache-2.0
"""
The effect handlers that draw a particle's rows: its base run and its branches.

- :class:`SampleMessenger` runs the guide as usual, except that each site of a family
  (:mod:`pyro_arm.families`: Bernoulli, Categorical) draws its members by the family's draw
  rule and takes member 0, keeping a :class:`~pyro_arm.families.SiteSample`;
- :class:`BranchMessenger` replays that base run as one or more branches ``(t, k)`` under
  the one draw rule (:func:`branch_rule`): before site ``t`` the base value, at ``t`` member
  ``k`` (a member, or a fresh draw of another score-function site), after ``t`` a site of a family
  from its base uniforms (common random numbers) and any other site afresh.
  One branch runs unbatched; several run as one batched pass along a plate over branches.

Each handler must wrap the guide outside every plate, so that the plates have broadcast a
site's distribution before the handler reads its shape.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from pyro.poutine.messenger import Messenger

from pyro_arm.estimators import Estimator
from pyro_arm.families import SiteSample, site_family
from pyro_arm.reads import unguarded
from pyro_arm.sites import is_subsample_site

__all__ = ["BranchMessenger", "SampleMessenger", "SiteSample", "branch_rule"]


class SampleMessenger(Messenger):
    """
    Draws the members of each site of a family and records the run.

    After the run, :attr:`order` lists the sampled (non-observed) sites in execution order,
    :attr:`values` maps every sampled site, subsample sites included, to its value,
    :attr:`samples` maps each site the estimator reduces to its :class:`SiteSample`, and
    :attr:`nan_logits` holds, per such site, whether its logits hold a NaN (unread tensors).

    :param estimator: draws the members; with no ``logits_grad``, Pyro samples every site.
    :param num_samples: the estimator's ``n``.
    :param subsamples: plate subsamples to take, by site name (those of another run).
    """

    def __init__(
        self,
        estimator: Estimator,
        num_samples: Optional[int] = None,
        subsamples: Optional[dict] = None,
    ) -> None:
        super().__init__()
        self.estimator, self.num_samples = estimator, num_samples
        self.subsamples = subsamples or {}
        self.order: list[str] = []
        self.values: dict[str, torch.Tensor] = {}
        self.samples: dict[str, SiteSample] = {}
        self.nan_logits: dict[str, torch.Tensor] = {}
        self._position: Optional[dict[str, int]] = None

    @property
    def position(self) -> dict[str, int]:
        """The position of each sampled site in :attr:`order` (after the run)."""
        if self._position is None or len(self._position) != len(self.order):
            self._position = {name: i for i, name in enumerate(self.order)}
        return self._position

    def _pyro_sample(self, msg) -> None:
        if msg["value"] is None and msg["name"] in self.subsamples and is_subsample_site(msg):
            msg["value"] = self.subsamples[msg["name"]]
            return
        if msg["value"] is not None:
            return
        family = site_family(msg)
        if family is None:
            return
        reduce = family.reduction(self.estimator) is not None
        fn = msg["fn"]
        # before fn.logits: it tells probs= sites apart
        weights_logits = family.estimator_logits(fn)
        if not reduce:  # a score-function site, sampled as Pyro would
            value = family.plain(fn, weights_logits)
            if value is not None:
                self.nan_logits[msg["name"]] = torch.isnan(weights_logits).any()
                msg["value"] = value
            return
        self.nan_logits[msg["name"]] = torch.isnan(weights_logits).any()
        sample = family.members(self.estimator, self.num_samples, fn, weights_logits)
        self.samples[msg["name"]] = sample
        msg["value"] = sample.z[0]

    def _pyro_post_sample(self, msg) -> None:
        if msg["is_observed"]:
            return
        if not is_subsample_site(msg):
            self.order.append(msg["name"])
        self.values[msg["name"]] = msg["value"]


Value = Union[torch.Tensor, Callable[[], torch.Tensor]]


def branch_rule(before, at, base: torch.Tensor, own: Value, later: Value) -> torch.Tensor:
    """
    The draw rule of a branch that flips site ``t`` to its member ``k``, for one site: ``base``
    (its base value) if the site comes before ``t``, ``own`` (member ``k``) if it is ``t``,
    ``later`` (common random numbers or a fresh draw) if it comes after. ``before`` and ``at``
    are bools for one branch, or tensors over a batch of branches. ``own`` and ``later`` may be
    callables, called only where needed.
    """
    if isinstance(before, bool):
        if before:
            return base
        value = own if at else later
        return value() if callable(value) else value
    own = own() if callable(own) else own
    later = later() if callable(later) else later
    with unguarded():
        return torch.where(before, base, torch.where(at, own, later))


class BranchMessenger(Messenger):
    """
    Replays a :class:`SampleMessenger` base run as the branches ``(t, k)`` of ``branches``
    (see :func:`branch_rule`). Observed sites are left alone and plate subsamples keep the base
    run's. With ``branch_dim`` set, index ``b`` of a plate over branches at that dim (left of
    every other plate) is branch ``branches[b]``; otherwise there is one branch.

    After the run, :attr:`seen` lists the base run's sites met, :attr:`fresh` the latent sites
    the base run lacked (sampled afresh by Pyro; an error when batched), and :attr:`drawn` maps
    each flipped site without members in the base run to its fresh draw.
    """

    def __init__(
        self,
        base: SampleMessenger,
        branches: list[tuple[str, int]],
        branch_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.base, self.branch_dim = base, branch_dim
        self.flips = [base.position[name] for name, _ in branches]
        self.ks = [k for _, k in branches]
        self.seen: list[str] = []
        self.fresh: list[str] = []
        self.drawn: dict[str, torch.Tensor] = {}

    def _pyro_sample(self, msg) -> None:
        name = msg["name"]
        if msg["infer"].get("_enumerate_dim") is not None and name in self.base.position:
            self.seen.append(name)  # enumerated, as in the base run
            return
        if msg["is_observed"] or msg["value"] is not None:
            return
        if is_subsample_site(msg):
            msg["value"] = self.base.values.get(name)  # None: a plate the guide lacks
            return
        position = self.base.position.get(name)
        if position is None:
            if self.branch_dim is not None:
                raise NotImplementedError(
                    f"Site '{name}' appeared in a batched pass of branches but not in the base "
                    "run: the guide's structure depends on sampled values, which a batched pass "
                    "cannot follow; use vectorize_particles=False"
                )
            self.fresh.append(name)  # downstream of the flip: sampled afresh by Pyro
            return
        self.seen.append(name)
        first = min(self.flips)
        if position < first:
            msg["value"] = self.base.values[name]
            return
        sample = self.base.samples.get(name)
        if self.branch_dim is None:
            if sample is None and position > first:
                return  # resampled by Pyro
            before, at = False, position == first
        else:
            flips = self._per_branch(msg["fn"].event_dim, self.base.values[name].device)
            with unguarded():
                before, at = flips > position, flips == position
        msg["value"] = branch_rule(
            before,
            at,
            self.base.values[name],
            lambda: self._own(msg, sample),
            lambda: self._later(msg, sample),
        )

    def _per_branch(self, event_dim: int, device: torch.device) -> torch.Tensor:
        """The flipped positions as a tensor ``(B, 1, ..., 1)`` that broadcasts against a
        sample of a site with ``event_dim`` event dims."""
        shape = (-1,) + (1,) * (-self.branch_dim - 1 + event_dim)
        with unguarded():
            return torch.tensor(self.flips, device=device).reshape(shape)

    def _own(self, msg, sample: Optional[SiteSample]) -> torch.Tensor:
        if sample is None:
            value = msg["fn"](*msg["args"], **msg["kwargs"])
            self.drawn[msg["name"]] = value
            return value
        if self.branch_dim is None:
            return sample.z[self.ks[0]]
        with unguarded():
            own = sample.z[torch.tensor(self.ks, device=sample.z.device)]
            ones = (1,) * (-self.branch_dim + sample.event_dim - own.dim())
            return own.reshape(own.shape[:1] + ones + own.shape[1:])

    def _later(self, msg, sample: Optional[SiteSample]) -> torch.Tensor:
        fn = msg["fn"]
        if msg["name"] in self.drawn:  # one fresh draw serves every branch
            return self.drawn[msg["name"]]
        if sample is not None:
            with unguarded():
                value = sample.family.redraw(sample, fn)
            if value is not None:
                return value
        return fn(*msg["args"], **msg["kwargs"])
