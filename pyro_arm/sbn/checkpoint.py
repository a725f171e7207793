# SPDX-License-Identifier: Apache-2.0
"""
The state of a training run and its checkpoint file.

:class:`TrainState` is everything that changes from step to step: the model and Adam
parameters, the global torch RNG (the guide's samples), the step, the training time and the
running loss statistics. :meth:`TrainState.to_checkpoint` and :meth:`TrainState.from_checkpoint`
are inverse to each other, so a resumed run continues bit for bit (on the same device).
"""

from __future__ import annotations

import io
import os
import pickle
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from pyro_arm.sbn.config import ConfigError
from pyro_arm.sbn.files import atomic_write_bytes, open_regular
from pyro_arm.sbn.resources import is_out_of_memory

CHECKPOINT_FORMAT = 1
#: The keys every checkpoint has.
CHECKPOINT_KEYS = (
    "format",
    "config",
    "model",
    "optimizer",
    "torch_rng",
    "step",
    "train_wall_s",
    "interval_sum",
    "interval_count",
)


@dataclass
class TrainState:
    """
    The mutable state of a run.

    :param module: the model (its ``state_dict`` is saved).
    :param optimizer: its optimizer.
    :param device: where it trains (a CUDA device's RNG state is saved too).
    :param step: finished optimizer steps.
    :param train_wall_s: seconds spent in training steps.
    :param interval_sum: sum of the losses since the last metrics row.
    :param interval_count: number of those losses.
    :param ema: exponential moving average of the loss (for the progress bar).
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    step: int = 0
    train_wall_s: float = 0.0
    interval_sum: float = 0.0
    interval_count: int = 0
    ema: Optional[float] = None

    def record(self, loss: float, seconds: float) -> None:
        """Counts one finished step with its loss and duration."""
        self.step += 1
        self.train_wall_s += seconds
        self.interval_sum += loss
        self.interval_count += 1
        self.ema = loss if self.ema is None else 0.98 * self.ema + 0.02 * loss

    def pop_interval_mean(self) -> float:
        """The mean loss since the last call (the ``train_loss`` of a metrics row)."""
        mean = self.interval_sum / max(self.interval_count, 1)
        self.interval_sum, self.interval_count = 0.0, 0
        return mean

    def to_checkpoint(self, config: dict) -> dict:
        """The checkpoint dict (tensors and plain values), with the run's ``config``."""
        cuda = self.device.type == "cuda"
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else None,
            "step": self.step,
            "train_wall_s": self.train_wall_s,
            "interval_sum": self.interval_sum,
            "interval_count": self.interval_count,
            "ema": self.ema,
        }

    @classmethod
    def from_checkpoint(
        cls, ckpt: dict, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
    ) -> TrainState:
        """
        Loads ``ckpt`` into ``module``, ``optimizer`` and the RNGs; returns the state.

        :raises ConfigError: if the checkpoint's weights or optimizer state do not fit
            ``module`` (another architecture) or a key is missing.
        """
        try:
            module.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            what = textwrap.shorten(" ".join(str(e).split()) or type(e).__name__, 240)
            raise ConfigError(
                f"the checkpoint does not fit this model ({what}); it belongs to another run: "
                "pick another --run-dir"
            ) from None
        torch.set_rng_state(ckpt["torch_rng"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        return cls(
            module,
            optimizer,
            device,
            step=int(ckpt["step"]),
            train_wall_s=float(ckpt["train_wall_s"]),
            interval_sum=float(ckpt["interval_sum"]),
            interval_count=int(ckpt["interval_count"]),
            ema=ckpt.get("ema"),
        )


def save_checkpoint(ckpt: dict, path: Path) -> None:
    """
    Writes a checkpoint dict atomically (:func:`~pyro_arm.sbn.files.atomic_write`). It is
    serialized in memory first, so that a failed write (a full disk) raises the ``OSError``.
    """
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _reason(error: Exception) -> str:
    """What is wrong with an unreadable checkpoint, without torch's advice to unpickle it."""
    if isinstance(error, pickle.UnpicklingError):
        return "it holds objects other than tensors and plain values"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if "weights_only" in first:
        first = ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def load_checkpoint(path: Path) -> dict:
    """
    Reads a checkpoint (tensors and plain values only: ``weights_only=True``), never through a
    link (:func:`~pyro_arm.sbn.files.open_regular`).

    :raises ConfigError: if it is missing, damaged or not a pyro-arm checkpoint.
    :raises UnsafeFile: if ``path`` is a link or not a regular file.
    """
    try:
        fd = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ConfigError(
            f"no checkpoint {path} to resume from; start the run without --resume"
        ) from None
    try:
        with open(fd, "rb") as f:
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling / zip error means a damaged file
        if is_out_of_memory(e):
            raise
        raise ConfigError(
            f"cannot read checkpoint {path} ({_reason(e)}); delete the run folder and start "
            "again, or pick another --run-dir"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a pyro-arm checkpoint; pick another --run-dir")
    missing = [key for key in CHECKPOINT_KEYS if key not in ckpt]
    if missing:
        raise ConfigError(
            f"checkpoint {path} lacks {', '.join(map(repr, missing))}; it is damaged: pick "
            "another --run-dir"
        )
    return ckpt
