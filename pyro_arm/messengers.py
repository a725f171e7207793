# SPDX-License-Identifier: Apache-2.0
"""
Effect handlers that draw the guide's Bernoulli samples from stored uniforms.

:class:`BaseSampleMessenger` runs the guide once as usual, except that each ARM site draws
:math:`u \\sim U(0, 1)` itself and takes the value :math:`z_2 = 1[u < \\sigma(\\phi)]`; it keeps
the uniforms, the logits, the antithetic twin :math:`z_1` and every site's value.

:class:`BranchMessenger` re-runs the guide for the antithetic branches of that base run. The
branch of ARM site :math:`t` holds every site sampled before :math:`t` at its base value, sets
:math:`t` to :math:`z_1`, and resamples everything after :math:`t`; later Bernoulli sites reuse
their base uniforms (common random numbers), so a site that does not depend on :math:`z_t`
keeps its base value and contributes nothing to the difference of the two runs. Several
branches run as one batched pass when the guide is wrapped in a plate over branches.

Both handlers must wrap the guide outside every plate, so that the plates have broadcast a
site's distribution before the handler reads its shape.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from pyro.poutine.messenger import Messenger

from pyro_arm.estimators import bernoulli_pair
from pyro_arm.sites import bernoulli_logits, is_arm_site, is_subsample_site


class ARMSample(NamedTuple):
    """What the base run keeps of one ARM site."""

    u: torch.Tensor
    logits: torch.Tensor
    z1: torch.Tensor
    z2: torch.Tensor
    event_dim: int


class BaseSampleMessenger(Messenger):
    """
    Samples each ARM site of a guide from a stored uniform and records the base run.

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
    Replays a base run with antithetic flips, one flipped ARM site per branch.

    :param base: the handler of the base run.
    :param flips: names of the flipped ARM sites, one per branch.
    :param branch_dim: the plate dim that indexes branches when several run in one batched
        pass, or ``None`` for a single branch (then a structure that differs from the base
        run is allowed: new sites are sampled afresh).
    """

    def __init__(self, base: BaseSampleMessenger, flips: list[str], branch_dim: Optional[int]):
        super().__init__()
        if branch_dim is None and len(flips) != 1:
            raise ValueError("Several branches need a branch plate dim")
        self.base = base
        self.position = {name: i for i, name in enumerate(base.order)}
        self.flip_positions = [self.position[name] for name in flips]
        self.branch_dim = branch_dim
        self.seen: list[str] = []

    def _branch_mask(self, compare, position: int, like: torch.Tensor, event_dim: int):
        """A bool tensor over branches, shaped to broadcast against a site's value."""
        mask = torch.tensor(
            [compare(position, flip) for flip in self.flip_positions], device=like.device
        )
        return mask.reshape((-1,) + (1,) * (-self.branch_dim - 1 + event_dim))

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None:
            return
        name = msg["name"]
        if is_subsample_site(msg):
            msg["value"] = self.base.values[name]
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
        base_value = self.base.values[name]
        arm = self.base.arm_sites.get(name)
        if self.branch_dim is None:
            self._single_branch(msg, position, base_value, arm)
        else:
            self._batched_branches(msg, position, base_value, arm)

    def _single_branch(self, msg, position, base_value, arm) -> None:
        flip = self.flip_positions[0]
        if position < flip:
            msg["value"] = base_value
        elif arm is None:
            return  # resampled by Pyro
        elif position == flip:
            msg["value"] = arm.z1
        else:
            msg["value"] = _common_random_sample(msg["fn"], arm)

    def _batched_branches(self, msg, position, base_value, arm) -> None:
        fn = msg["fn"]
        event_dim = fn.event_dim
        if all(position < flip for flip in self.flip_positions):
            msg["value"] = base_value.expand(fn.shape())
            return
        before = self._branch_mask(int.__lt__, position, base_value, event_dim)
        if arm is None:
            fresh = fn(*msg["args"], **msg["kwargs"])
            msg["value"] = torch.where(before, base_value, fresh)
            return
        at = self._branch_mask(int.__eq__, position, base_value, event_dim)
        after = _common_random_sample(fn, arm)
        msg["value"] = torch.where(before, arm.z2, torch.where(at, arm.z1, after))


def _common_random_sample(fn, arm: ARMSample) -> torch.Tensor:
    """A Bernoulli sample of ``fn`` made from the base run's uniforms where the shapes agree."""
    logits = bernoulli_logits(fn)
    if logits is None or torch.broadcast_shapes(arm.u.shape, fn.shape()) != fn.shape():
        return fn()
    return (arm.u < torch.sigmoid(logits)).to(logits.dtype)
