# SPDX-License-Identifier: Apache-2.0
"""
Effect handlers that draw the guide's Bernoulli samples from stored uniforms.

Each ARM site draws :math:`u \\sim U(0, 1)` itself and takes the value
:math:`z_2 = 1[u < \\sigma(\\phi)]`, its antithetic twin being :math:`z_1 = 1[u > \\sigma(-\\phi)]`.
The antithetic branch of ARM site :math:`t` holds every site sampled before :math:`t` at its
base value, sets :math:`t` to :math:`z_1`, and resamples everything after :math:`t`; later ARM
sites reuse their base uniforms (common random numbers), so a site that does not depend on
:math:`z_t` keeps its base value and adds nothing to the difference of the two runs.

- :class:`BaseSampleMessenger` and :class:`BranchMessenger` do this one run at a time, so the
  structure of model and guide may depend on sampled values.
- :class:`BatchedBranchMessenger` runs the base run and all branches as one batched pass, the
  branches indexed by a plate.

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
    Replays a base run with ARM site ``flip`` set to its antithetic twin.

    Sites before ``flip`` keep their base values, and so do the plates' subsamples; sites
    after it are resampled, ARM sites from their base uniforms. A site the base run did not
    have (the structure may depend on the flipped value) is sampled afresh.
    """

    def __init__(self, base: BaseSampleMessenger, flip: str) -> None:
        super().__init__()
        self.base = base
        self.position = {name: i for i, name in enumerate(base.order)}
        self.flip = self.position[flip]

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None:
            return
        name = msg["name"]
        if is_subsample_site(msg):
            msg["value"] = self.base.values[name]
            return
        position = self.position.get(name)
        arm = self.base.arm_sites.get(name)
        if position is None:
            return
        if position < self.flip:
            msg["value"] = self.base.values[name]
        elif arm is None:
            return
        elif position == self.flip:
            msg["value"] = arm.z1
        else:
            logits = bernoulli_logits(msg["fn"])
            if logits is not None and msg["fn"].shape() == arm.u.shape:
                msg["value"] = (arm.u < torch.sigmoid(logits)).to(logits.dtype)


class BatchedBranchMessenger(Messenger):
    """
    Runs the base run and the antithetic branches of ``num_arm_sites`` ARM sites as one pass.

    The guide must be wrapped in a plate of size ``num_arm_sites + 1`` at ``branch_dim``
    (inside this handler). Index 0 of that plate is the base run; index ``k + 1`` is the branch
    of the ``k``-th ARM site in execution order. After the run, :attr:`arm_sites` holds each
    ARM site's uniforms and its base logits, with a size-1 dim in place of the branch dim.

    :param num_arm_sites: the number of ARM sites the guide samples, or ``None`` to run the
        base run alone (a plate of size 1) with any number of ARM sites.
    :param branch_dim: the dim of the branch plate.
    """

    def __init__(self, num_arm_sites: Optional[int], branch_dim: int) -> None:
        super().__init__()
        self.num_arm_sites = num_arm_sites
        self.branch_dim = branch_dim
        self.arm_sites: dict[str, ARMSample] = {}
        self.order: list[str] = []
        self._flip_index = None

    def _branch_flips(self, fn, device) -> tuple[torch.Tensor, int]:
        """Which ARM site each branch flips (-1 for the base run), shaped like ``fn``'s samples."""
        if self._flip_index is None or self._flip_index.device != device:
            self._flip_index = torch.arange(-1, self.num_arm_sites or 0, device=device)
        axis = len(fn.batch_shape) + self.branch_dim
        shape = (-1,) + (1,) * (len(fn.shape()) - axis - 1)
        return self._flip_index.reshape(shape), axis

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None or is_subsample_site(msg):
            return
        fn = msg["fn"]
        name = msg["name"]
        self.order.append(name)
        k = len(self.arm_sites)
        if not is_arm_site(msg):
            # Sampled afresh in the base run and in the branches of ARM sites before it;
            # held at its base value in the branches of ARM sites after it.
            value = fn(*msg["args"], **msg["kwargs"])
            if self.num_arm_sites is not None and k < self.num_arm_sites:
                flips, axis = self._branch_flips(fn, value.device)
                value = torch.where(flips >= k, value.narrow(axis, 0, 1), value)
            msg["value"] = value
            return
        if self.num_arm_sites is not None and k >= self.num_arm_sites:
            raise NotImplementedError(
                f"ARM site '{name}' was not seen when the guide's Bernoulli sites were counted: "
                "the guide's structure depends on sampled values, which a vectorized pass "
                "cannot follow; use vectorize_particles=False"
            )
        logits = bernoulli_logits(fn)
        flips, axis = self._branch_flips(fn, logits.device)
        base_logits = logits.expand(fn.shape()).narrow(axis, 0, 1)
        u = torch.rand(base_logits.shape, dtype=logits.dtype, device=logits.device)
        # On the logits' own shape: they often vary along few of the dims (not the branches).
        z1, z2 = bernoulli_pair(u, logits)
        value = torch.where(flips > k, z2.narrow(axis, 0, 1), z2)
        msg["value"] = torch.where(flips == k, z1, value)
        self.arm_sites[name] = ARMSample(u, base_logits, None, None, fn.event_dim)
