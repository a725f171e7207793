# SPDX-License-Identifier: Apache-2.0
"""
Data-parallel training of a sigmoid belief net with ``TraceARM_ELBO`` and PyTorch Lightning.

In the manner of Pyro's ``examples/svi_lightning.py``: the ELBO as a :class:`torch.nn.Module`
inside a ``LightningModule``, a PyTorch optimizer, and ``training_step`` instead of Pyro's SVI.
Lightning's DDP strategy then shards every epoch over the processes (a ``DistributedSampler``)
and averages the gradients. Needs the optional extra: ``pip install -e ".[lightning]"``.

    python examples/svi_lightning_arm.py                                       # one process
    python examples/svi_lightning_arm.py --accelerator cpu --devices 2 --strategy ddp
    python examples/svi_lightning_arm.py --accelerator gpu --devices 4 --strategy ddp
    python examples/svi_lightning_arm.py --smoke                               # CI: 2 CPU ranks

Two points specific to a data-parallel ELBO:

- **The loss is per image.** ``TraceARM_ELBO`` returns a sum over the batch; Lightning's DDP
  *averages* the gradients of the ranks, so the example divides each rank's loss by its batch
  size, and the step is that of the mean ``-ELBO`` per image of the global batch (ranks of equal
  batch size). ``pyro-arm train`` under ``torchrun`` instead keeps the sum (see
  :mod:`pyro_arm.sbn.distributed`).
- **Every rank draws its own random numbers.** One seed everywhere would give all ranks the same
  guide samples; :meth:`PyroLightningModule.setup` seeds each rank's stream from the seed and
  its rank.

Parameters must exist before the optimizer (and DDP) sees them. The SBN's parameters are created
in its constructor; a model or guide that creates them lazily (``pyro.param``, autoguides) must
run the loss once on a batch first, as done below.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import pyro
import torch

from pyro_arm import TraceARM_ELBO
from pyro_arm.sbn.data import load_mnist
from pyro_arm.sbn.distributed import ElboLoss
from pyro_arm.sbn.models import build_sbn
from pyro_arm.sbn.seeding import Stream, seed_global


class PyroLightningModule(pl.LightningModule):
    """
    Trains ``loss_fn`` (``-ELBO`` summed over a batch) by its mean per image.

    :param loss_fn: the ELBO module (here :class:`~pyro_arm.sbn.distributed.ElboLoss` of the
        SBN's ``model`` and ``guide`` methods; ``TraceARM_ELBO()(model, guide)`` when model and
        guide are modules).
    :param lr: Adam's learning rate.
    :param seed: seeds each rank's guide samples.
    """

    def __init__(self, loss_fn: torch.nn.Module, lr: float, seed: int):
        super().__init__()
        self.loss_fn, self.lr, self.seed = loss_fn, lr, seed

    def setup(self, stage: str) -> None:
        seed_global(self.seed, Stream.GUIDE, self.trainer.world_size, self.global_rank)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = self.loss_fn(x) / x.shape[0]
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.loss_fn.parameters(), lr=self.lr)


def main(args: argparse.Namespace) -> None:
    pyro.set_rng_seed(args.seed)  # the initial parameters: the same on every rank
    data = load_mnist("embedded")
    x = data.fixed("train")  # the thresholded training images
    sbn = build_sbn(args.model, data.train_pixel_mean())
    elbo = TraceARM_ELBO(estimator=args.estimator, vectorize_particles=True, max_plate_nesting=1)
    loss_fn = ElboLoss(sbn, elbo)
    loss_fn(x[: args.batch_size])  # creates any lazily made parameters before DDP wraps them
    plan = PyroLightningModule(loss_fn, args.learning_rate, args.seed)

    dataset = torch.utils.data.TensorDataset(x)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        strategy=args.strategy,
        devices=args.devices,
        max_epochs=args.max_epochs,
        max_steps=args.max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
        enable_model_summary=not args.smoke,
    )
    trainer.fit(plan, train_dataloaders=loader)
    if trainer.is_global_zero:
        loss = trainer.callback_metrics["train_loss"].item()
        print(f"{trainer.global_step} steps on {trainer.world_size} process(es); last train "
              f"-ELBO {loss:.2f} nats per image")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SBN training with TraceARM_ELBO and Lightning")
    parser.add_argument("--model", default="linear")
    parser.add_argument("--estimator", default="arm")
    parser.add_argument("--batch-size", default=50, type=int, help="per process")
    parser.add_argument("--learning-rate", default=3e-4, type=float)
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--max-epochs", default=1, type=int)
    parser.add_argument("--max-steps", default=-1, type=int)
    # pl.Trainer arguments
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--devices", default="auto")
    parser.add_argument(
        "--smoke", action="store_true", help="3 steps of batch 10 on 2 CPU processes (DDP)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.accelerator, args.devices, args.strategy = "cpu", 2, "ddp"
        args.batch_size, args.max_steps = 10, 3
    return args


if __name__ == "__main__":
    main(parse_args())
