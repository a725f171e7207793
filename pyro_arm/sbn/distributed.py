# SPDX-License-Identifier: Apache-2.0
"""
Data-parallel training of ``pyro-arm train`` on :mod:`torch.distributed`.

Under ``torchrun --nproc-per-node N -m pyro_arm train ...`` (``WORLD_SIZE`` > 1 in the
environment) the run is split over ``N`` processes (ranks):

- **Data.** Every rank builds the same global batch of ``--batch-size`` images (the order and the
  binarization are functions of ``(seed, step)``, as in one process) and keeps its own contiguous
  shard (:meth:`Ranks.shard`, :func:`torch.tensor_split`: shards differ in size by at most one).
- **Gradient.** The training loss of a batch is a *sum* over its images, so the global-batch
  estimator is the sum of the shards' estimators. Each rank's loss is scaled by the world size
  ``W`` (:class:`ElboLoss`), and :class:`~torch.nn.parallel.DistributedDataParallel` averages the
  gradients: ``(1/W) sum_r W g_r = sum_r g_r``, the gradient of one process on the whole batch
  (for any shard sizes). The reported loss is the all-reduced sum, per image of the global batch.
- **Random numbers.** Rank ``r`` of ``W`` draws its guide samples, validation and test samples
  from the streams of :mod:`~pyro_arm.sbn.seeding` at the extra index ``(W, r)``
  (:attr:`Ranks.stream_index`), so a run is reproducible for a fixed world size.
- **Files.** Only rank 0 writes the run folder and shows the progress bar; the checkpoint holds
  every rank's RNG state (:meth:`Ranks.gather_rng`), so ``--resume`` with the same world size is
  exact. Resuming with another world size is refused (:meth:`Ranks.restore_rng`).
- **Stop signals.** After every step the ranks all-reduce their stop flags
  (:meth:`Ranks.max_int` of the signal number), so a SIGINT or SIGTERM received by any rank stops
  every rank after the same finished step; the checkpoint of that step is then written as a
  periodic one (every rank's RNG state gathered to rank 0). A second signal aborts at once.
  Divergence needs no vote: the reported loss is all-reduced and the parameters are identical
  after the all-reduced step, so every rank sees the same.
- **Evaluation.** Validation and test sets are sharded like the batches; per-image bounds are
  summed over the ranks (:func:`negative_elbo`, :func:`evaluate_sbn`).

Backend: ``nccl`` on CUDA (rank ``r`` uses ``cuda:LOCAL_RANK``), ``gloo`` on CPU. With
``WORLD_SIZE`` unset or 1 nothing here is active: :class:`Ranks` is a single process and every
function delegates to the one-process code unchanged.

``TraceARM_ELBO()(model, guide)`` is a :class:`torch.nn.Module` (Pyro's ``ELBOModule``) and can be
wrapped in DDP directly when ``model`` and ``guide`` are modules (e.g.
:class:`~pyro.nn.PyroModule`). Parameters created lazily (``pyro.param``, ``pyro.module``,
autoguides) must exist before wrapping: DDP registers its gradient hooks on the parameters it sees
at construction, so run the loss once on a batch first (as Pyro's Lightning example does).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from pyro.infer import ELBO
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pyro_arm.sbn import evaluate
from pyro_arm.sbn.config import ConfigError, resolve_device

__all__ = ["ElboLoss", "Ranks", "evaluate_sbn", "negative_elbo", "shutdown", "step_function"]


class ElboLoss(nn.Module):
    """
    ``forward(*args) = scale * elbo.differentiable_loss(module.model, module.guide, *args)``: an
    ELBO of a module's ``model`` and ``guide`` methods as a module that owns the parameters (Pyro's
    ``ELBOModule`` needs ``model`` and ``guide`` to be modules themselves), ready for DDP.

    :param module: a module with ``model`` and ``guide`` methods (e.g. a
        :class:`~pyro_arm.sbn.models.SigmoidBeliefNet`).
    :param elbo: any Pyro ELBO.
    :param scale: multiplies the loss (the world size: see the module docstring).
    """

    def __init__(self, module: nn.Module, elbo: ELBO, scale: float = 1.0):
        super().__init__()
        self.module = module
        self.elbo = elbo
        self.scale = float(scale)

    def forward(self, *args, **kwargs) -> Tensor:
        loss = self.elbo.differentiable_loss(self.module.model, self.module.guide, *args, **kwargs)
        return loss * self.scale if self.scale != 1.0 else loss


@dataclass(frozen=True)
class Ranks:
    """
    The processes of a run, from the variables ``torchrun`` sets.

    :param world_size: number of processes ``W``.
    :param rank: this process, ``0 <= rank < W``.
    :param local_rank: this process on its node (its GPU index).
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        """``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` (a single process when unset)."""
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        return cls(world, int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")))

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and logs."""
        return self.rank == 0

    @property
    def stream_index(self) -> tuple[int, ...]:
        """Extra index of this rank's random streams: ``()`` alone, ``(W, rank)`` otherwise."""
        return (self.world_size, self.rank) if self.distributed else ()

    def device(self, name: str) -> torch.device:
        """
        The device of ``--device name``: :func:`resolve_device`; under several processes,
        ``cuda`` or ``auto`` on a GPU machine mean ``cuda:LOCAL_RANK``.

        :raises ConfigError: for ``cuda:N`` with several processes (they would share a GPU).
        """
        device = resolve_device(name)
        if not self.distributed or device.type != "cuda":
            return device
        if name.startswith("cuda:"):
            raise ConfigError(
                f"--device {name}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                "use --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose GPUs"
            )
        return torch.device("cuda", self.local_rank)

    def setup(self, device: torch.device, batch_size: int) -> None:
        """Joins the process group (nccl on CUDA, else gloo) unless alone or already joined."""
        if not self.distributed:
            return
        if batch_size < self.world_size:
            raise ConfigError(
                f"--batch-size {batch_size} is smaller than the {self.world_size} processes; "
                "each needs at least one image of the global batch"
            )
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def shard(self, x: Tensor) -> Tensor:
        """This rank's contiguous part of ``x`` along dim 0 (all of it when alone)."""
        if not self.distributed:
            return x
        return torch.tensor_split(x, self.world_size)[self.rank]

    def sum(self, values: Tensor) -> Tensor:
        """``values`` summed over the ranks (float64, on ``values``' device)."""
        values = values.detach().to(torch.float64)
        if self.distributed:
            dist.all_reduce(values)
        return values

    def max_int(self, value: int, device: torch.device) -> int:
        """The largest ``value`` over the ranks (collective, on ``device``; alone: ``value``)."""
        if not self.distributed:
            return value
        values = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return int(values.item())

    def gather_rng(self, checkpoint: dict) -> dict:
        """Adds every rank's torch RNG state to a checkpoint dict (collective; alone: as is)."""
        if not self.distributed:
            return checkpoint
        mine = {"torch": torch.get_rng_state()}
        if torch.cuda.is_initialized():
            mine["cuda"] = torch.cuda.get_rng_state()
        states: list = [None] * self.world_size
        dist.all_gather_object(states, mine)
        return {**checkpoint, "world_size": self.world_size, "rank_rng": states}

    def restore_rng(self, checkpoint: dict) -> None:
        """
        Sets this rank's RNG state from a checkpoint of :meth:`gather_rng`.

        :raises ConfigError: if the checkpoint was made by another number of processes.
        """
        saved = int(checkpoint.get("world_size", 1))
        if saved != self.world_size:
            how = "without torchrun" if saved == 1 else f"with torchrun --nproc-per-node {saved}"
            raise ConfigError(
                f"--resume: the run was trained by {saved} process(es), not {self.world_size}; "
                f"resume it {how} (its random streams depend on the number of processes)"
            )
        if self.distributed:
            state = checkpoint["rank_rng"][self.rank]
            torch.set_rng_state(state["torch"])
            if "cuda" in state:
                torch.cuda.set_rng_state(state["cuda"])

    def info(self) -> dict:
        """Entries for ``config.json`` and ``summary.json`` (none when alone)."""
        return {"world_size": self.world_size} if self.distributed else {}


def shutdown() -> None:
    """Leaves the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def step_function(ranks: Ranks, sbn: nn.Module, elbo: ELBO) -> Callable[[Tensor], float]:
    """
    ``f(x) -> loss``: accumulates the gradient of the global batch into ``sbn``'s parameters
    and returns its ``-ELBO`` summed over the global batch. Alone: ``elbo.loss_and_grads``;
    under several processes: ``x`` is this rank's shard and the loss goes through DDP.
    """
    if not ranks.distributed:
        return lambda x: elbo.loss_and_grads(sbn.model, sbn.guide, x)
    if not hasattr(elbo, "differentiable_loss"):  # DDP needs the loss as a tensor
        raise ConfigError(
            f"{type(elbo).__name__} has no differentiable_loss in this Pyro, so it cannot train "
            "under torchrun (DDP); use it in one process, or another --estimator"
        )
    device = next(sbn.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(ElboLoss(sbn, elbo, ranks.world_size), device_ids=ids)

    def step(x: Tensor) -> float:
        loss = ddp(x)
        loss.backward()
        return ranks.sum(loss / ranks.world_size).item()

    return step


def _bounds(sbn: nn.Module, x: Tensor, k: int, **kwargs) -> tuple[Tensor, Tensor]:
    if x.shape[0] == 0:  # a rank with no image of a small set
        return x.new_zeros(0), x.new_zeros(0)
    return evaluate.iw_log_likelihoods(sbn.model, sbn.guide, x, k, **kwargs)


def _mean(ranks: Ranks, values: Tensor) -> float:
    total = ranks.sum(torch.stack([values.sum(), values.new_tensor(values.numel())]))
    return (total[0] / total[1]).item()


def negative_elbo(ranks: Ranks, sbn: nn.Module, x: Tensor, batch_size: int) -> float:
    """:func:`~pyro_arm.sbn.evaluate.negative_elbo` of ``x`` (one sample), sharded over ranks."""
    if not ranks.distributed:
        return evaluate.negative_elbo(sbn.model, sbn.guide, x, 1, batch_size=batch_size)
    elbo, _ = _bounds(sbn, ranks.shard(x), 1, batch_size=batch_size)
    return -_mean(ranks, elbo)


def evaluate_sbn(ranks: Ranks, sbn: nn.Module, x: Tensor, k: int, iw_size: Optional[int]) -> dict:
    """:func:`~pyro_arm.sbn.evaluate.evaluate_sbn`, sharded over ranks (same defaults)."""
    if not ranks.distributed:
        return evaluate.evaluate_sbn(sbn, x, k=k, iw_size=iw_size)
    n_iw = x.shape[0] if iw_size is None else min(int(iw_size), x.shape[0])
    neg_elbo = negative_elbo(ranks, sbn, x, batch_size=500)
    _, iw = _bounds(sbn, ranks.shard(x[:n_iw]), k)
    return {"neg_elbo": neg_elbo, "neg_iw": -_mean(ranks, iw), "k": k, "iw_size": n_iw}
