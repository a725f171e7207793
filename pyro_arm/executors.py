# SPDX-License-Identifier: Apache-2.0
"""
How a call's branches run: looped (one run per branch, following any value-dependent code) or
batched (one pass along a plate over branches), and the one rule that chooses.

A batched pass is equivalent to the looped branches only where the model and guide broadcast over
the plate of branches and read no sampled value into Python. The rule, checked on every call:

1. with ``vectorize_particles=True`` the branches run batched under a
   :class:`~pyro_arm.reads.ReadGuard`; where they read a sampled value into Python
   (:mod:`pyro_arm.reads`) they run looped, each branch a pass over every particle, as the base
   pass is (as in Pyro's vectorized ELBOs, a read there sees every particle at once);
2. otherwise they run looped when the model and guide are known to read sampled values (a read
   seen by a batched pass or by the dependency replay), when a batched pass has failed or given
   other signals, or when there is at most one branch;
3. else they run batched under a :class:`~pyro_arm.reads.ReadGuard`: a read aborts the pass and
   the call runs looped (and so do later calls). A pass whose code path (its
   :attr:`~pyro_arm.reads.ReadGuard.fingerprint`) has not been seen before is proven first: the
   call also runs its branches looped, keeps the looped signals, and batches that path from then
   on only if the two agree wherever no site is drawn afresh.

So a read that starts only on some calls, or a code path that appears later, never reaches a
gradient through a batched pass.
"""

from __future__ import annotations

import warnings
from typing import Optional

from pyro_arm.particle import Particle
from pyro_arm.reads import ReadGuard, SampledValueRead

#: The number of branches per particle from which running them one by one is worth a warning.
WARN_LOOPED_ROWS = 16


class BranchExecutor:
    """
    Runs the branches of each call's particles for one ELBO, by the rule of this module; keeps,
    per ``(model, guide)``, the branch dim of their batched passes, the code paths proven
    equivalent to the looped branches, or why they must run looped.
    """

    def __init__(self) -> None:
        #: (model, guide) -> the branch dim of batched passes
        self.branch_dims: dict = {}
        #: (model, guide) -> fingerprints of the passes proven equivalent to looped branches
        self.proven: dict = {}
        #: (model, guide) -> why the branches run looped
        self.looped: dict = {}

    def run(self, elbo, particles: list[Particle], model, guide, args, kwargs) -> None:
        """Runs every particle's branches for ``elbo`` (a :class:`~pyro_arm.TraceARM_ELBO`)."""
        key, done = (model, guide), 0
        if elbo.vectorize_particles:
            for particle in particles:
                if key not in self.looped:
                    try:
                        particle.run_branches(elbo._particle_dim() - 1, ReadGuard())
                        continue
                    except NotImplementedError as exc:
                        if not isinstance(exc.__cause__, SampledValueRead):
                            raise
                        self._loop(key, [particle], f"a batched pass of branches read: {exc}")
                particle.run_branches(None)
            return
        if key not in self.looped:
            if any(p.dependencies is not None and p.dependencies.control for p in particles):
                self._loop(key, particles, "the model or guide reads sampled values into Python")
            else:
                try:
                    for particle in particles:
                        self._batched(elbo, key, particle, model, guide, args, kwargs)
                        done += 1
                except _Looped:
                    pass
        for particle in particles[done:]:
            particle.run_branches(None)

    def _batched(self, elbo, key, particle: Particle, model, guide, args, kwargs) -> None:
        """Runs a particle's branches batched; proves a new code path against the looped
        branches, whose signals the call then keeps. Raises :class:`_Looped` where the branches
        must run looped."""
        if key in self.looped:
            raise _Looped(self.looped[key])
        if len(particle.plan()) < 2:
            particle.run_branches(None)
            return
        guard = ReadGuard()
        try:
            branch_dim = self._branch_dim(elbo, key, model, guide, args, kwargs)
            particle.run_branches(branch_dim, guard)
        except Exception as exc:  # the looped branches raise what is the model's own
            raise self._loop(key, [particle], f"a batched pass of branches failed: {exc}") from None
        proven = self.proven.setdefault(key, set())
        if guard.fingerprint in proven:
            return
        batched = particle.member_signals
        particle.run_branches(None)
        if particle.differs_from(batched):
            self._loop(key, [particle], "a batched pass of branches gave other signals")
            return
        proven.add(guard.fingerprint)

    def _branch_dim(self, elbo, key, model, guide, args, kwargs) -> int:
        """The dim of the plate over branches: left of every plate of model and guide."""
        if key not in self.branch_dims:
            saved = elbo.max_plate_nesting
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if saved == float("inf"):
                        elbo._guess_max_plate_nesting(model, guide, args, kwargs)
                    self.branch_dims[key] = -elbo.max_plate_nesting - 1
            finally:
                elbo.max_plate_nesting = saved
        return self.branch_dims[key]

    def _loop(self, key, particles: list[Particle], reason: str) -> _Looped:
        """Records that the branches of ``key`` run looped from now on, warning once where
        that is costly."""
        self.looped[key] = reason
        rows = len(particles[0].plan())
        if rows >= WARN_LOOPED_ROWS:
            warnings.warn(
                f"TraceARM_ELBO runs the {rows} branches of each particle one by one ({reason}); "
                "a step then costs time quadratic in the number of sites. A model and guide "
                "that read no sampled value into Python (.item(), `if z:`, .tolist(), "
                "torch.equal) and whose tensors broadcast over plates run their branches as one "
                "batched pass; vectorize_particles=True asks for that outright.",
                stacklevel=5,
            )
        return _Looped(reason)


class _Looped(Exception):
    """The branches of this call run looped."""


def batch_dim(executor: BranchExecutor, model, guide) -> Optional[int]:
    """The branch dim at which the branches of ``(model, guide)`` run batched, or ``None``
    where they run looped (or have not run yet)."""
    key = (model, guide)
    if key in executor.looped or not executor.proven.get(key):
        return None
    return executor.branch_dims.get(key)
