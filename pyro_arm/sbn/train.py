# SPDX-License-Identifier: Apache-2.0
"""
Training sigmoid belief nets on binarized MNIST, with checkpoints that resume exactly.

:func:`train` runs one configuration (:class:`TrainConfig`) in a run folder::

    runs/<model>-<estimator>-s<seed>/
        config.json      the configuration, library versions, data sizes, device
        metrics.csv      step, epoch, train_loss, valid_neg_elbo, train_wall_s  (every eval_every)
        checkpoint.pt    model, Adam state, RNG state, step (atomic: tmp file + os.replace)
        summary.json     test_elbo, test_iwae, k, wall_s, steps_per_s, seconds_per_step, ...
        learning_curves.png, reconstructions.png, samples.png

Every source of randomness is either derived from ``(seed, step)`` (the order of the training
images in each epoch, the dynamic binarization of each batch) or is the global torch RNG (the
guide's samples), whose state is in the checkpoint; evaluations run under
:func:`torch.random.fork_rng` so that they do not perturb it. Resuming from a checkpoint therefore
gives the same parameters, bit for bit on the same device, as an uninterrupted run.

All losses are in nats per datapoint; ``train_loss`` is the mean training ``-ELBO`` over the
steps since the previous row.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyro
import torch
from pyro.infer import Trace_ELBO, TraceGraph_ELBO

from pyro_arm.sbn.data import BINARIZATIONS, load_mnist
from pyro_arm.sbn.evaluate import evaluate_sbn, negative_elbo
from pyro_arm.sbn.models import build_sbn, parse_architecture

#: ``--estimator`` choices: the ARM family (:class:`~pyro_arm.TraceARM_ELBO`) and Pyro's own.
ESTIMATOR_CHOICES = ("arm", "disarm", "ar", "trace", "tracegraph")
#: Config fields that fix the training trajectory; ``--resume`` refuses to change them.
TRAJECTORY_FIELDS = (
    "model",
    "estimator",
    "batch_size",
    "lr",
    "binarization",
    "data",
    "seed",
    "num_particles",
    "vectorize",
)
CHECKPOINT_FORMAT = 1
METRICS_FIELDS = ("step", "epoch", "train_loss", "valid_neg_elbo", "train_wall_s")


class ConfigError(ValueError):
    """A bad option or run folder; the message says what to do."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training was interrupted; a checkpoint of the last finished step was saved."""

    def __init__(self, step: int, run_dir: Path):
        super().__init__(step, run_dir)
        self.step = step
        self.run_dir = run_dir


@dataclass
class TrainConfig:
    """
    One training run (the ``pyro-arm train`` options).

    :param model: architecture name (:func:`~pyro_arm.sbn.models.build_sbn`).
    :param estimator: ``arm``, ``disarm``, ``ar`` (:class:`~pyro_arm.TraceARM_ELBO`), ``trace``
        (:class:`~pyro.infer.Trace_ELBO`) or ``tracegraph`` (:class:`~pyro.infer.TraceGraph_ELBO`).
    :param steps: total number of optimizer steps (a resumed run continues up to it).
    :param batch_size: images per step.
    :param lr: Adam learning rate.
    :param binarization: ``threshold`` or ``dynamic``.
    :param data: ``embedded``, ``download`` or a folder of MNIST IDX files.
    :param seed: seeds the initialization, the data order and the guide's samples.
    :param device: ``cpu``, ``cuda`` or ``auto``.
    :param num_particles: ELBO particles per step.
    :param vectorize: vectorize the particles (and the antithetic branches).
    :param eval_every: steps between validation ``-ELBO`` rows of ``metrics.csv``.
    :param eval_k: samples of the final importance-weighted test bound.
    :param test_size: test images used for that bound (default all).
    :param checkpoint_every: steps between checkpoints (one is also written at the end).
    :param run_dir: the run folder (default ``runs/<model>-<estimator>-s<seed>``).
    """

    model: str = "linear"
    estimator: str = "arm"
    steps: int = 5000
    batch_size: int = 50
    lr: float = 3e-4
    binarization: str = "threshold"
    data: str = "embedded"
    seed: int = 0
    device: str = "auto"
    num_particles: int = 1
    vectorize: bool = False
    eval_every: int = 1000
    eval_k: int = 1000
    test_size: Optional[int] = None
    checkpoint_every: int = 1000
    run_dir: Optional[str] = None

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.model}-{self.estimator}-s{self.seed}")

    def validate(self) -> None:
        """Raises :class:`ConfigError` for an invalid value, saying what is expected."""
        try:
            parse_architecture(self.model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.estimator not in ESTIMATOR_CHOICES:
            raise ConfigError(
                f"unknown estimator {self.estimator!r}; expected one of "
                f"{', '.join(ESTIMATOR_CHOICES)}"
            )
        if self.binarization not in BINARIZATIONS:
            raise ConfigError(
                f"unknown binarization {self.binarization!r}; expected one of "
                f"{', '.join(BINARIZATIONS)}"
            )
        if self.device not in ("cpu", "cuda", "auto") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"unknown device {self.device!r}; expected cpu, cuda or auto")
        positive = ("steps", "batch_size", "num_particles", "eval_every", "eval_k")
        for name in positive + ("checkpoint_every",):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer")
        if self.test_size is not None and self.test_size < 1:
            raise ConfigError("--test-size must be a positive integer")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError("--lr must be a positive number")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if available, else CPU; ``cuda`` without a GPU raises ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name} was asked for but CUDA is not available "
            "(no GPU, or a CPU-only PyTorch); use --device cpu or auto"
        )
    return torch.device(name)


def make_elbo(estimator: str, num_particles: int = 1, vectorize: bool = False):
    """The ELBO object for an ``--estimator`` name (one plate: the data plate at dim -1)."""
    kwargs = dict(num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=1)
    if estimator == "trace":
        return Trace_ELBO(**kwargs)
    if estimator == "tracegraph":
        return TraceGraph_ELBO(**kwargs)
    from pyro_arm import TraceARM_ELBO

    return TraceARM_ELBO(estimator=estimator, **kwargs)


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


class _TrainStream:
    """The training batch of each step, a pure function of ``(seed, step)``."""

    def __init__(self, data, batch_size: int, seed: int, device: torch.device):
        self.data, self.batch_size, self.seed, self.device = data, batch_size, seed, device
        n = data.num_examples("train")
        if n < batch_size:
            raise ConfigError(f"--batch-size {batch_size} exceeds the {n} training images")
        self.steps_per_epoch = n // batch_size
        self._epoch, self._order = None, None

    def batch(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_derived_seed(self.seed, 1, epoch))
            self._order = torch.randperm(self.data.num_examples("train"), generator=g)
            self._epoch = epoch
        index = self._order[i * self.batch_size : (i + 1) * self.batch_size]
        g = torch.Generator().manual_seed(_derived_seed(self.seed, 2, step))
        return self.data.batch("train", index, device=self.device, generator=g)


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _versions() -> dict:
    import pyro_arm

    return {
        "pyro_arm": pyro_arm.__version__,
        "pyro": pyro.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.csv`` as dicts of numbers (missing values as ``nan``)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        out.append({k: float(v) if v not in ("", None) else math.nan for k, v in row.items()})
        out[-1]["step"] = int(out[-1]["step"])
    return out


def _write_metrics(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in METRICS_FIELDS})
    os.replace(tmp, path)


def _append_metrics(path: Path, row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: row[k] for k in METRICS_FIELDS})


def load_checkpoint(path: Path) -> dict:
    """Reads a checkpoint (tensors and plain values only: ``weights_only=True``)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(
            f"no checkpoint {path} to resume from; start the run without --resume"
        ) from None
    except Exception as e:  # any unpickling / zip error means a damaged file
        raise ConfigError(
            f"cannot read checkpoint {path} ({type(e).__name__}: {e}); delete it and start "
            "again, or pick another --run-dir"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a pyro-arm checkpoint; pick another --run-dir")
    return ckpt


def _check_resume(saved: dict, config: TrainConfig, explicit: set[str]) -> TrainConfig:
    """The config to resume with: the saved one, with the explicit non-trajectory options."""
    for name in TRAJECTORY_FIELDS:
        if name in explicit and saved.get(name) != getattr(config, name):
            raise ConfigError(
                f"--resume: the run was started with {name}={saved.get(name)!r}, not "
                f"{getattr(config, name)!r}; drop that option or pick another --run-dir"
            )
    fields = set(asdict(config))
    merged = {k: v for k, v in saved.items() if k in fields}
    merged.update({k: getattr(config, k) for k in explicit if k in fields})
    return TrainConfig(**merged)


def _evaluate_valid(sbn, x_valid, seed: int, step: int, device) -> float:
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_derived_seed(seed, 3, step))
        return negative_elbo(sbn.model, sbn.guide, x_valid, 1, batch_size=1000)


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    explicit: Optional[set[str]] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    callback: Optional[Callable[[int, float], None]] = None,
) -> dict:
    """
    Trains (or resumes) one run and evaluates it on the test set.

    :param config: the run's configuration.
    :param resume: continue from ``<run_dir>/checkpoint.pt``. Options not in ``explicit`` are
        taken from the saved run; explicit trajectory options (:data:`TRAJECTORY_FIELDS`) must
        equal the saved ones (else :class:`ConfigError`), the others (``steps``, evaluation,
        checkpointing, device) may change.
    :param explicit: names of the fields the user set explicitly (default: all of them).
    :param progress: show a tqdm progress bar (on stderr).
    :param log: where the one-line messages go.
    :param callback: ``callback(step, loss)`` after every step (``step`` counts finished steps).
    :returns: the summary dict, also written to ``summary.json``.
    :raises ConfigError: bad options or run folder. :raises DataError: bad data.
    :raises TrainingInterrupted: on ``KeyboardInterrupt``, after saving a checkpoint.
    """
    from tqdm.auto import tqdm

    from pyro_arm.sbn import plots

    config.validate()
    explicit = set(asdict(config)) if explicit is None else set(explicit)
    run_dir = config.resolved_run_dir()
    ckpt_path = run_dir / "checkpoint.pt"
    ckpt = None
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        config = _check_resume(ckpt["config"], config, explicit)
        config.run_dir = str(run_dir)
    elif ckpt_path.exists():
        raise ConfigError(
            f"{run_dir} already holds a run; pass --resume to continue it, or choose another "
            "--run-dir (or delete the folder)"
        )
    device = resolve_device(config.device)
    data = load_mnist(config.data, config.binarization)
    run_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    pyro.clear_param_store()
    sbn = build_sbn(config.model, data.train_pixel_mean()).to(device)
    optimizer = torch.optim.Adam(sbn.parameters(), lr=config.lr)
    elbo = make_elbo(config.estimator, config.num_particles, config.vectorize)
    stream = _TrainStream(data, config.batch_size, config.seed, device)
    x_valid = data.fixed("valid", seed=0).to(device)

    step, train_wall_s = 0, 0.0
    interval_sum, interval_count, ema = 0.0, 0, None
    metrics_path = run_dir / "metrics.csv"
    if ckpt is not None:
        sbn.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        step, train_wall_s = int(ckpt["step"]), float(ckpt["train_wall_s"])
        interval_sum, interval_count = float(ckpt["interval_sum"]), int(ckpt["interval_count"])
        ema = ckpt.get("ema")
        # rows written after the checkpoint (by an interrupted process) are redone
        _write_metrics(metrics_path, [r for r in read_metrics(metrics_path) if r["step"] <= step])
        log(f"resuming {run_dir} at step {step} of {config.steps}")
    else:
        _write_metrics(metrics_path, [])
        torch.manual_seed(_derived_seed(config.seed, 0))  # the guide's sampling stream
    info = {
        "config": asdict(config),
        "versions": _versions(),
        "device": str(device),
        "data": {
            "source": data.source,
            **{f"num_{s}": data.num_examples(s) for s in ("train", "valid", "test")},
        },
        "steps_per_epoch": stream.steps_per_epoch,
    }
    _atomic_write_text(run_dir / "config.json", json.dumps(info, indent=2) + "\n")

    def save_checkpoint() -> None:
        atomic_torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "config": asdict(config),
                "model": sbn.state_dict(),
                "optimizer": optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "train_wall_s": train_wall_s,
                "interval_sum": interval_sum,
                "interval_count": interval_count,
                "ema": ema,
            },
            ckpt_path,
        )

    bar = tqdm(
        total=config.steps,
        initial=step,
        disable=not progress,
        desc=f"{config.model}/{config.estimator}",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    saved_step = step
    say = bar.write if progress else log
    consistent = True  # False while a step and its metrics row are half done
    try:
        while step < config.steps:
            x = stream.batch(step)
            consistent = False
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = elbo.loss_and_grads(sbn.model, sbn.guide, x) / x.shape[0]
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_wall_s += time.perf_counter() - t0
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"the loss became {loss} at step {step + 1}; try a smaller --lr"
                )
            step += 1
            interval_sum += loss
            interval_count += 1
            ema = loss if ema is None else 0.98 * ema + 0.02 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.2f}", refresh=False)
            if step % config.eval_every == 0 or step == config.steps:
                valid = _evaluate_valid(sbn, x_valid, config.seed, step, device)
                row = {
                    "step": step,
                    "epoch": step / stream.steps_per_epoch,
                    "train_loss": interval_sum / max(interval_count, 1),
                    "valid_neg_elbo": valid,
                    "train_wall_s": train_wall_s,
                }
                _append_metrics(metrics_path, row)
                interval_sum, interval_count = 0.0, 0
                say(
                    f"step {step}: train -ELBO {row['train_loss']:.2f}, "
                    f"valid -ELBO {valid:.2f} nats"
                )
            consistent = True
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_checkpoint()
                saved_step = step
            if callback is not None:
                callback(step, loss)
    except KeyboardInterrupt:
        bar.close()
        if not consistent:  # keep the last checkpoint; the half-done step is redone on resume
            raise TrainingInterrupted(saved_step, run_dir) from None
        if step != saved_step:
            save_checkpoint()
        raise TrainingInterrupted(step, run_dir) from None
    bar.close()
    if step != saved_step:
        save_checkpoint()

    # Final evaluation on the test set.
    t0 = time.perf_counter()
    x_test = data.fixed("test", seed=0).to(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_derived_seed(config.seed, 4))
        result = evaluate_sbn(sbn, x_test, k=config.eval_k, iw_size=config.test_size)
    eval_wall_s = time.perf_counter() - t0
    summary = {
        "model": config.model,
        "estimator": config.estimator,
        "seed": config.seed,
        "steps": step,
        "epochs": step / stream.steps_per_epoch,
        "test_elbo": result["neg_elbo"],
        "test_iwae": result["neg_iw"],
        "k": result["k"],
        "test_size": x_test.shape[0],
        "iwae_test_size": result["iw_size"],
        "wall_s": train_wall_s,
        "steps_per_s": step / train_wall_s if train_wall_s > 0 else math.nan,
        "seconds_per_step": train_wall_s / step if step else math.nan,
        "eval_wall_s": eval_wall_s,
        "device": str(device),
        "data": data.source,
        "binarization": config.binarization,
        "units": "nats per datapoint; test_elbo and test_iwae are negated bounds (lower is better)",
    }
    _atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    log(
        f"test -ELBO {summary['test_elbo']:.2f} nats, -IWAE(k={summary['k']}, "
        f"n={summary['iwae_test_size']}) {summary['test_iwae']:.2f} nats; "
        f"{step} steps in {train_wall_s:.1f} s ({summary['steps_per_s']:.1f} steps/s, "
        f"{1000 * summary['seconds_per_step']:.1f} ms/step) on {device}; results in {run_dir}"
    )

    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_derived_seed(config.seed, 5))
        plots.save_all(sbn, read_metrics(metrics_path), x_test[:10], run_dir)
    return summary


def config_fields() -> tuple[str, ...]:
    """Names of the :class:`TrainConfig` fields."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig))
