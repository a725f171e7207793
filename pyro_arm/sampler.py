# SPDX-License-Identifier: Apache-2.0
"""
The effect handlers that draw a particle's rows: its base run and its branches.

- :class:`SampleMessenger` runs the guide as usual, except that each Bernoulli site draws
  the uniforms of its members (:meth:`~pyro_arm.estimators.Estimator.member_uniforms`) and
  takes member 0, keeping a :class:`SiteSample`;
- :class:`BranchMessenger` replays that base run as one or more branches ``(t, k)`` under
  the one draw rule (:func:`branch_rule`): before site ``t`` the base value, at ``t`` member
  ``k`` (a Bernoulli member, or a fresh draw of another score-function site), after ``t`` a
  Bernoulli site from its base uniforms (common random numbers) and any other site afresh.
  One branch runs unbatched; several run as one batched pass along a plate over branches.

Each handler must wrap the guide outside every plate, so that the plates have broadcast a
site's distribution before the handler reads its shape.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import torch
from pyro.poutine.messenger import Messenger

from pyro_arm.estimators import Estimator
from pyro_arm.reads import unguarded
from pyro_arm.sites import bernoulli_logits, estimator_logits, is_arm_site, is_subsample_site


class SiteSample(NamedTuple):
    """
    The members of one Bernoulli site.

    :param v: their uniforms ``(m, *shape)``, in the working dtype (at least float32).
    :param z: their values ``(m, *shape)``, ``z[k] = 1[v[k] < sigmoid(logits)]``, in the
        site's dtype; ``z[0]`` is the base run's value.
    :param logits: the logits the gradient is taken for (with their graph, in their own dtype).
    :param estimator_logits: the logits as the estimators see them: detached, in the working
        dtype (see :func:`~pyro_arm.sites.estimator_logits`).
    :param event_dim: the site's event dims.
    """

    v: torch.Tensor
    z: torch.Tensor
    logits: torch.Tensor
    estimator_logits: torch.Tensor
    event_dim: int


class SampleMessenger(Messenger):
    """
    Draws each Bernoulli site's members and records the run.

    After the run, :attr:`order` lists the sampled (non-observed) sites in execution order,
    :attr:`values` maps every sampled site, subsample sites included, to its value,
    :attr:`samples` maps each Bernoulli site of the estimator to its :class:`SiteSample`, and
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
        if msg["value"] is not None or not is_arm_site(msg):
            return
        fn = msg["fn"]
        weights_logits = estimator_logits(fn)  # before fn.logits: it tells probs= sites apart
        self.nan_logits[msg["name"]] = torch.isnan(weights_logits).any()
        logits = bernoulli_logits(fn)
        if self.estimator.logits_grad is None:  # a score-function site, sampled as Pyro would
            u = torch.rand(fn.shape(), dtype=weights_logits.dtype, device=weights_logits.device)
            msg["value"] = (u < torch.sigmoid(weights_logits)).to(logits.dtype)
            return
        v = self.estimator.member_uniforms(self.num_samples, fn.shape(), weights_logits)
        z = (v < torch.sigmoid(weights_logits)).to(logits.dtype)
        name = msg["name"]
        self.samples[name] = SiteSample(v, z, logits, weights_logits, fn.event_dim)
        msg["value"] = z[0]

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
    each flipped site that is not a Bernoulli site of the base run to its fresh draw.
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
        if msg["is_observed"] or msg["value"] is not None:
            return
        name = msg["name"]
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
        if sample is not None and bernoulli_logits(fn) is not None:
            v = sample.v[0]
            if torch.broadcast_shapes(v.shape, fn.shape()) == fn.shape():
                with unguarded():
                    return (v < torch.sigmoid(estimator_logits(fn))).to(sample.z.dtype)
        return fn(*msg["args"], **msg["kwargs"])
