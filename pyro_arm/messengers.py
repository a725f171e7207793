# SPDX-License-Identifier: Apache-2.0
"""
Effect handlers that draw the guide's Bernoulli samples from stored uniforms.

Each ARM site draws :math:`u \\sim U(0, 1)` itself and takes the value :math:`z_2`, its
antithetic twin being :math:`z_1` (both as defined in
:func:`~pyro_arm.estimators.bernoulli_pair`). The antithetic branch of ARM site :math:`t` holds
every site sampled before :math:`t` at its base value, sets :math:`t` to :math:`z_1`, and
resamples everything after :math:`t`; later ARM sites reuse their base uniforms (common random
numbers), so a site that does not depend on :math:`z_t` keeps its base value and adds nothing to
the difference of the two runs.

- :class:`BaseSampleMessenger` runs the guide as usual, except that ARM sites take
  :math:`z_2` from uniforms it draws and keeps;
- :class:`BranchMessenger` replays that base run with one ARM site flipped;
- :class:`BatchedBranchMessenger` replays it with one flipped site per index of a plate over
  branches, so that all branches run as one batched pass.

Each handler must wrap the guide outside every plate, so that the plates have broadcast a
site's distribution before the handler reads its shape.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from pyro.poutine.messenger import Messenger

from pyro_arm.estimators import bernoulli_pair
from pyro_arm.sites import (
    bernoulli_logits,
    estimator_logits,
    is_arm_site,
    is_bernoulli,
    is_subsample_site,
)


class ARMSample(NamedTuple):
    """
    What a run keeps of one ARM site.

    :param u: its uniforms, in the working dtype (at least float32).
    :param logits: the logits the gradient is taken for (with their graph, in their own dtype).
    :param z1: the antithetic twin, in the site's dtype.
    :param z2: the sample (the base run's value), in the site's dtype.
    :param event_dim: the site's event dims.
    :param estimator_logits: the logits as the estimators see them: detached, in the working
        dtype (see :func:`~pyro_arm.sites.estimator_logits`).
    """

    u: torch.Tensor
    logits: torch.Tensor
    z1: torch.Tensor
    z2: torch.Tensor
    event_dim: int
    estimator_logits: torch.Tensor


class BaseSampleMessenger(Messenger):
    """
    Samples each ARM site of a guide from a stored uniform and records the run.

    After the run, :attr:`order` lists the names of the sampled (non-observed) sites in
    execution order, :attr:`values` maps every sampled site, subsample sites included, to
    its value, and :attr:`arm_sites` maps each ARM site's name to its :class:`ARMSample`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []
        self.values: dict[str, torch.Tensor] = {}
        self.arm_sites: dict[str, ARMSample] = {}
        self._position: Optional[dict[str, int]] = None

    @property
    def position(self) -> dict[str, int]:
        """The position of each sampled site in :attr:`order` (after the run)."""
        if self._position is None or len(self._position) != len(self.order):
            self._position = {name: i for i, name in enumerate(self.order)}
        return self._position

    def _pyro_sample(self, msg) -> None:
        if msg["value"] is not None or not is_arm_site(msg):
            return
        fn = msg["fn"]
        weights_logits = estimator_logits(fn)  # before fn.logits: it tells probs= sites apart
        logits = bernoulli_logits(fn)
        u = torch.rand(fn.shape(), dtype=weights_logits.dtype, device=weights_logits.device)
        z1, z2 = (z.to(logits.dtype) for z in bernoulli_pair(u, weights_logits))
        self.arm_sites[msg["name"]] = ARMSample(u, logits, z1, z2, fn.event_dim, weights_logits)
        msg["value"] = z2

    def _pyro_post_sample(self, msg) -> None:
        if msg["is_observed"]:
            return
        if not is_subsample_site(msg):
            self.order.append(msg["name"])
        self.values[msg["name"]] = msg["value"]


class BranchReplayMessenger(Messenger):
    """
    What every branch handler shares: observed and already-valued sites are left alone, plate
    subsamples keep the base run's, a site the base run lacks goes to :meth:`_new_site`, and
    every other site is recorded in :attr:`seen` and handed to :meth:`_replay` with its
    position in the base run.
    """

    base: BaseSampleMessenger
    seen: list[str]

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None:
            return
        name = msg["name"]
        if is_subsample_site(msg):
            msg["value"] = self.base.values.get(name)  # None: a plate the guide lacks
            return
        position = self.base.position.get(name)
        if position is None:
            self._new_site(msg)
            return
        self.seen.append(name)
        self._replay(msg, position)

    def _new_site(self, msg) -> None:
        raise NotImplementedError

    def _replay(self, msg, position: int) -> None:
        raise NotImplementedError


class BranchMessenger(BranchReplayMessenger):
    """
    Replays a base run with one ARM site flipped to its antithetic twin :math:`z_1`.

    Sites before the flipped one keep their base values, and so do the plates' subsamples;
    sites after it are resampled, ARM sites from their base uniforms. A site the base run did
    not have (the structure may depend on the flipped value) is sampled afresh and listed in
    :attr:`fresh`; :attr:`seen` lists the base run's sites met so far, for error messages.

    :param base: the handler of the base run.
    :param flip: the name of the flipped ARM site.
    """

    def __init__(self, base: BaseSampleMessenger, flip: str) -> None:
        super().__init__()
        self.base = base
        self.flip = base.position[flip]
        self.fresh: list[str] = []
        self.seen: list[str] = []

    def _new_site(self, msg) -> None:
        self.fresh.append(msg["name"])  # downstream of the flip: sampled afresh by Pyro

    def _replay(self, msg, position: int) -> None:
        name = msg["name"]
        if position < self.flip:
            msg["value"] = self.base.values[name]
            return
        arm = self.base.arm_sites.get(name)
        if arm is not None:  # else resampled by Pyro
            msg["value"] = arm.z1 if position == self.flip else common_random_sample(msg, arm)


class BatchedBranchMessenger(BranchReplayMessenger):
    """
    Replays a base run once per ARM site in ``flips``, all as one batched pass: index ``b`` of
    a plate over branches at dim ``branch_dim`` (left of every other plate) flips site
    ``flips[b]`` as :class:`BranchMessenger` does. The structure must not depend on sampled
    values: a site the base run did not have raises :class:`NotImplementedError`.

    :attr:`seen` lists the base run's sites met so far, for error messages.
    """

    def __init__(self, base: BaseSampleMessenger, flips: list[str], branch_dim: int) -> None:
        super().__init__()
        self.base = base
        self.flips = [base.position[name] for name in flips]
        self.branch_dim = branch_dim
        self.seen: list[str] = []
        self._flips: Optional[torch.Tensor] = None  # self.flips on the samples' device

    def _new_site(self, msg) -> None:
        raise NotImplementedError(
            f"Site '{msg['name']}' appeared in an antithetic branch but not in the base run: "
            "the guide's structure depends on sampled values, which a vectorized pass "
            "cannot follow; use vectorize_particles=False"
        )

    def _replay(self, msg, position: int) -> None:
        name = msg["name"]
        base_value = self.base.values[name]
        if position < min(self.flips):  # before every flip: the same in every branch
            msg["value"] = base_value
            return
        flips = self._branch_flips(msg["fn"].event_dim, base_value.device)
        before = flips > position
        arm = self.base.arm_sites.get(name)
        if arm is None:
            fresh = msg["fn"](*msg["args"], **msg["kwargs"])
            msg["value"] = torch.where(before, base_value, fresh)
        else:
            # resampled in the branches that flip an earlier site; none at the first flip
            later = common_random_sample(msg, arm) if position > min(self.flips) else arm.z2
            msg["value"] = torch.where(
                before, arm.z2, torch.where(flips == position, arm.z1, later)
            )

    def _branch_flips(self, event_dim: int, device: torch.device) -> torch.Tensor:
        """
        The flipped site's position per branch, shaped to broadcast against a sample of a site
        with ``event_dim`` event dims: the branches along the plate's dim ``branch_dim``, then
        ``-branch_dim - 1`` singleton batch dims (the other plates) and ``event_dim`` singleton
        event dims, i.e. shape ``(B, 1, ..., 1)``.
        """
        if self._flips is None:
            self._flips = torch.tensor(self.flips, device=device)
        return self._flips.reshape((-1,) + (1,) * (-self.branch_dim - 1 + event_dim))


def common_random_sample(msg: dict, arm: ARMSample) -> torch.Tensor:
    """
    A Bernoulli sample of the site's (resampled) distribution from the base run's uniforms,
    the ``z2`` of :func:`~pyro_arm.estimators.bernoulli_pair`, where the shapes agree; a fresh
    sample otherwise.
    """
    fn = msg["fn"]
    if not is_bernoulli(fn) or torch.broadcast_shapes(arm.u.shape, fn.shape()) != fn.shape():
        return fn(*msg["args"], **msg["kwargs"])
    return bernoulli_pair(arm.u, estimator_logits(fn))[1].to(arm.z2.dtype)
