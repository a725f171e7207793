# SPDX-License-Identifier: Apache-2.0
"""
Effect handlers that draw the guide's Bernoulli samples from stored uniforms.

Each ARM site draws :math:`u \\sim U(0, 1)` itself and takes the value
:math:`z_2 = 1[u < \\sigma(\\phi)]`, its antithetic twin being :math:`z_1 = 1[u > \\sigma(-\\phi)]`.
The antithetic branch of ARM site :math:`t` holds every site sampled before :math:`t` at its
base value, sets :math:`t` to :math:`z_1`, and resamples everything after :math:`t`; later ARM
sites reuse their base uniforms (common random numbers), so a site that does not depend on
:math:`z_t` keeps its base value and adds nothing to the difference of the two runs.

- :class:`BaseSampleMessenger` runs the guide as usual, except that ARM sites take
  :math:`z_2` from uniforms it draws and keeps;
- :class:`BranchMessenger` replays that base run with one ARM site flipped, or with one flipped
  site per index of a plate over branches, so that all branches run as one batched pass.

Each handler must wrap the guide outside every plate, so that the plates have broadcast a
site's distribution before the handler reads its shape.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from pyro.poutine.messenger import Messenger

from pyro_arm.estimators import bernoulli_pair
from pyro_arm.sites import bernoulli_logits, is_arm_site, is_subsample_site


class ARMSample(NamedTuple):
    """What a run keeps of one ARM site: its uniforms, logits and antithetic pair."""

    u: torch.Tensor
    logits: torch.Tensor
    z1: torch.Tensor
    z2: torch.Tensor
    event_dim: int


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

    def _pyro_sample(self, msg) -> None:
        if msg["value"] is not None or not is_arm_site(msg):
            return
        fn = msg["fn"]
        logits = bernoulli_logits(fn)
        u = torch.rand(fn.shape(), dtype=logits.dtype, device=logits.device)
        z1, z2 = bernoulli_pair(u, logits)
        self.arm_sites[msg["name"]] = ARMSample(u, logits, z1, z2, fn.event_dim)
        msg["value"] = z2

    def _pyro_post_sample(self, msg) -> None:
        if msg["is_observed"]:
            return
        if not is_subsample_site(msg):
            self.order.append(msg["name"])
        self.values[msg["name"]] = msg["value"]


class BranchMessenger(Messenger):
    """
    Replays a base run with ARM sites flipped to their antithetic twins, one per branch.

    Sites before a branch's flipped site keep their base values, and so do the plates'
    subsamples; sites after it are resampled, ARM sites from their base uniforms.

    :param base: the handler of the base run.
    :param flips: names of the flipped ARM sites, one per branch.
    :param branch_dim: the dim of the plate over branches when several run in one batched pass,
        or ``None`` for one branch; then a site the base run did not have (the structure may
        depend on the flipped value) is sampled afresh, where a batched pass raises
        :class:`NotImplementedError`.
    """

    def __init__(
        self, base: BaseSampleMessenger, flips: list[str], branch_dim: Optional[int] = None
    ) -> None:
        super().__init__()
        if branch_dim is None and len(flips) != 1:
            raise ValueError("several branches need the dim of a plate over branches")
        self.base = base
        self.position = {name: i for i, name in enumerate(base.order)}
        self.flips = [self.position[name] for name in flips]
        self.branch_dim = branch_dim
        self.seen: list[str] = []
        self._flips = None  # self.flips as a tensor on the samples' device, made once

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None:
            return
        name = msg["name"]
        if is_subsample_site(msg):
            msg["value"] = self.base.values.get(name)  # None: a plate the guide lacks
            return
        position = self.position.get(name)
        if position is None:
            if self.branch_dim is not None:
                raise NotImplementedError(
                    f"Site '{name}' appeared in an antithetic branch but not in the base run: "
                    "the guide's structure depends on sampled values, which a vectorized pass "
                    "cannot follow; use vectorize_particles=False"
                )
            return  # a new site downstream of the flip: sampled afresh
        self.seen.append(name)
        if all(position < flip for flip in self.flips):
            msg["value"] = self.base.values[name]
            return
        arm = self.base.arm_sites.get(name)
        if self.branch_dim is None:
            if arm is not None:  # else resampled by Pyro
                flipped = position == self.flips[0]
                msg["value"] = arm.z1 if flipped else _common_random_sample(msg["fn"], arm)
            return
        fn = msg["fn"]
        if self._flips is None:
            device = self.base.values[name].device
            self._flips = torch.tensor(self.flips, device=device)
        shape = (-1,) + (1,) * (-self.branch_dim - 1 + fn.event_dim)
        flips = self._flips.reshape(shape)
        before = flips > position
        if arm is None:
            fresh = fn(*msg["args"], **msg["kwargs"])
            msg["value"] = torch.where(before, self.base.values[name], fresh)
        else:
            after = _common_random_sample(fn, arm)
            msg["value"] = torch.where(
                before, arm.z2, torch.where(flips == position, arm.z1, after)
            )


def _common_random_sample(fn, arm: ARMSample) -> torch.Tensor:
    """A Bernoulli sample of ``fn`` from the base run's uniforms (where the shapes agree)."""
    logits = bernoulli_logits(fn)
    if logits is None or torch.broadcast_shapes(arm.u.shape, fn.shape()) != fn.shape():
        return fn()
    return bernoulli_pair(arm.u, logits)[1]
