# SPDX-License-Identifier: Apache-2.0
"""
Training sigmoid belief nets on binarized MNIST, with checkpoints that resume exactly.

:func:`train` runs one configuration (:class:`~pyro_arm.sbn.config.TrainConfig`) in a run
folder::

    runs/<model>-<estimator>-s<seed>/
        config.json      the configuration, library versions, data sizes, device
        metrics.csv      step, epoch, train_loss, valid_neg_elbo, train_wall_s  (every eval_every)
        checkpoint.pt    model, Adam state, RNG state, step (written atomically)
        summary.json     test_elbo, test_iwae, k, wall_s, steps_per_s, seconds_per_step, ...
        learning_curves.png, reconstructions.png, samples.png

Every source of randomness is a named stream of :mod:`pyro_arm.sbn.seeding`: derived from
``(seed, epoch)`` or ``(seed, step)`` (the order of the training images, the dynamic
binarization of each batch), or the global torch RNG (the guide's samples), whose state is in the
checkpoint (:class:`~pyro_arm.sbn.checkpoint.TrainState`); evaluations run on forked RNGs so
that they do not perturb it. Resuming from a checkpoint therefore gives the same parameters, bit
for bit on the same device, as an uninterrupted run.

Nothing finished is lost, and nothing is overwritten: the first SIGINT or SIGTERM lets the
current step finish and saves it (:mod:`~pyro_arm.sbn.interrupts`; a second one aborts, leaving
the last checkpoint; one during the final evaluation stops it, the checkpoint being saved); a
step whose loss or parameters are not finite ends the run (:class:`TrainingDiverged`) before it
is saved, as does a failed allocation (:class:`~pyro_arm.sbn.resources.OutOfMemory`); a run
holds the lock of its folder, so that no other run writes there meanwhile; a fresh run only
starts in a missing or empty folder, and removes what it wrote if it fails before its first
checkpoint (:mod:`~pyro_arm.sbn.rundir`). A run folder holds regular files only, none opened
through a link; every run draws a random run id, written into the ``config`` of ``config.json``
and of each checkpoint, and a resumed run refuses a checkpoint of another run before it changes
anything.

All losses are in nats per datapoint; ``train_loss`` is the mean training ``-ELBO`` over the
steps since the previous row.

Under ``torchrun`` the same loop runs data-parallel; :mod:`pyro_arm.sbn.distributed` holds what
changes (the shard of each batch, DDP, the ranks' random streams, rank-0 writes).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import pyro
import torch
from pyro.infer import ELBO
from torch import Tensor

from pyro_arm.sbn import distributed
from pyro_arm.sbn.checkpoint import TrainState, save_checkpoint
from pyro_arm.sbn.config import ConfigError, TrainConfig
from pyro_arm.sbn.data import MNISTData, load_mnist
from pyro_arm.sbn.distributed import Ranks
from pyro_arm.sbn.elbo import make_elbo
from pyro_arm.sbn.files import atomic_write_text, open_regular
from pyro_arm.sbn.interrupts import Aborted, Interrupted, StopSignals, signal_name
from pyro_arm.sbn.metrics import append_metrics, read_metrics, truncate_metrics, write_metrics
from pyro_arm.sbn.models import SigmoidBeliefNet, build_sbn
from pyro_arm.sbn.resources import (
    OutOfMemory,
    allocation_failed,
    check_fits,
    is_out_of_memory,
    memory_options,
)
from pyro_arm.sbn.rundir import check_location, run_folder
from pyro_arm.sbn.seeding import Stream, forked, generator, seed_global

__all__ = ["TrainingDiverged", "TrainingInterrupted", "make_elbo", "train"]


class TrainingInterrupted(KeyboardInterrupt):
    """
    Training was interrupted; ``checkpoint.pt`` holds step :attr:`step` (0: none was written).

    :param signum: the signal (SIGINT for a plain ``KeyboardInterrupt``).
    :param aborted: a second signal stopped the run at once, without saving.
    :param evaluating: the signal stopped the final evaluation, after the last checkpoint.
    """

    def __init__(
        self,
        step: int,
        run_dir: Path,
        signum: int = signal.SIGINT,
        aborted: bool = False,
        evaluating: bool = False,
    ):
        super().__init__(step, run_dir)
        self.step, self.run_dir, self.signum, self.aborted = step, run_dir, signum, aborted
        self.evaluating = evaluating

    def __str__(self) -> str:
        name = signal_name(self.signum)
        if self.evaluating:
            return (
                f"interrupted by {name} during the final evaluation; checkpoint of step "
                f"{self.step} saved in {self.run_dir}; the same command plus --resume finishes "
                "the evaluation without retraining"
            )
        if self.step == 0:
            saved = "no checkpoint had been written yet, so nothing was kept"
        elif self.aborted:
            saved = f"{self.run_dir / 'checkpoint.pt'} is unchanged (step {self.step})"
        else:
            saved = f"checkpoint of step {self.step} saved in {self.run_dir}"
        how = "aborted by a second" if self.aborted else "interrupted by"
        resume = "; continue with the same command plus --resume" if self.step else ""
        return f"{how} {name}; {saved}{resume}"


class TrainingDiverged(FloatingPointError):
    """The loss or the parameters became non-finite; nothing of that step was saved."""

    def __init__(self, what: str, step: int, saved_step: int, run_dir: Path, lr: float):
        kept = (
            f"the checkpoint of step {saved_step} in {run_dir} is kept"
            if saved_step
            else "no checkpoint had been written"
        )
        super().__init__(
            f"training diverged at step {step}: {what}; {kept}; start again with a smaller --lr "
            f"(now {lr:g}) in a new --run-dir"
        )
        self.step, self.saved_step = step, saved_step


class _TrainStream:
    """The training batch of each step, a pure function of ``(seed, step)``."""

    def __init__(
        self, data: MNISTData, batch_size: int, seed: int, device: torch.device, ranks: Ranks
    ):
        self.data, self.batch_size, self.seed, self.device = data, batch_size, seed, device
        self.ranks = ranks
        n = data.num_examples("train")
        if n < batch_size:
            raise ConfigError(f"--batch-size {batch_size} exceeds the {n} training images")
        self.steps_per_epoch = n // batch_size
        self._epoch, self._order = None, None

    def batch(self, step: int) -> Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = generator(self.seed, Stream.ORDER, epoch)
            self._order = torch.randperm(self.data.num_examples("train"), generator=g)
            self._epoch = epoch
        index = self._order[i * self.batch_size : (i + 1) * self.batch_size]
        g = generator(self.seed, Stream.BINARIZE, step)
        x = self.data.batch("train", index, device=self.device, generator=g)
        return self.ranks.shard(x)  # this rank's part of the global batch


@dataclass
class _Run:
    """What a run is built from its config: data, model, ELBO, files."""

    config: TrainConfig
    device: torch.device
    data: MNISTData
    sbn: SigmoidBeliefNet
    elbo: ELBO
    stream: _TrainStream
    x_valid: Tensor
    ranks: Ranks
    step_loss: Callable[[Tensor], float]  # accumulates grads; -ELBO summed over the global batch
    run_id: Optional[str] = None  # drawn when the run starts (None: a run made before ids)

    @property
    def dir(self) -> Path:
        return self.config.resolved_run_dir()

    def saved_config(self) -> dict:
        """The ``config`` of ``config.json`` and of the checkpoints: the options and the run id."""
        return {**asdict(self.config), "run_id": self.run_id}

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.csv"


def _build(config: TrainConfig) -> _Run:
    ranks = Ranks.from_env()
    device = ranks.device(config.device)
    check_fits(config.model, device)
    ranks.setup(device, config.batch_size)
    try:
        data = load_mnist(config.data, config.binarization)
    except MemoryError:
        raise OutOfMemory(
            f"out of memory loading --data {config.data}; give the process more memory"
        ) from None
    torch.manual_seed(config.seed)  # the initial parameters
    pyro.clear_param_store()
    try:
        sbn = build_sbn(config.model, data.train_pixel_mean()).to(device)
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        raise OutOfMemory(
            f"--model {config.model} does not fit in memory ({e}); choose smaller layers"
        ) from None
    elbo = make_elbo(
        config.estimator,
        config.num_particles,
        config.vectorize,
        config.num_samples,
        config.model_grad,
        config.objective,
        config.num_members,
    )
    stream = _TrainStream(data, config.batch_size, config.seed, device, ranks)
    x_valid = data.fixed("valid", seed=0).to(device)
    step_loss = distributed.step_function(ranks, sbn, elbo)
    return _Run(config, device, data, sbn, elbo, stream, x_valid, ranks, step_loss)


def _start(run: _Run, checkpoint: Optional[dict], log: Callable[[str], None]) -> TrainState:
    """A fresh state, or the checkpoint's (dropping the metrics rows written after it)."""
    optimizer = torch.optim.Adam(run.sbn.parameters(), lr=run.config.lr)
    main = run.ranks.is_main
    if checkpoint is None:
        if main:
            write_metrics(run.metrics_path, [])
        seed_global(run.config.seed, Stream.GUIDE, *run.ranks.stream_index)
        return TrainState(run.sbn, optimizer, run.device)
    state = TrainState.from_checkpoint(checkpoint, run.sbn, optimizer, run.device)
    run.ranks.restore_rng(checkpoint)
    if main:
        truncate_metrics(run.metrics_path, state.step)
    if state.step == run.config.steps:
        log(f"{run.dir} already reached step {state.step} (--steps); evaluating it again")
    else:
        log(f"resuming {run.dir} at step {state.step} of {run.config.steps}")
    return state


def _check_resume(checkpoint: dict, config: TrainConfig) -> None:
    """:raises ConfigError: if the checkpoint is past ``config.steps``."""
    step = int(checkpoint["step"])
    if step > config.steps:
        raise ConfigError(
            f"the checkpoint in {config.resolved_run_dir()} is at step {step}, past --steps "
            f"{config.steps}; pass --steps {step} or more to continue it"
        )


def _folder_run_id(run_dir: Path) -> Optional[str]:
    """The run id in ``run_dir``'s ``config.json`` (None if it has none, or no ``config.json``).

    :raises ConfigError: if ``config.json`` cannot be read, or is missing beside a
        ``metrics.csv`` (whose run then cannot be told).
    """
    path = run_dir / "config.json"
    try:
        fd = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        if (run_dir / "metrics.csv").exists():
            raise ConfigError(
                f"{run_dir} has a metrics.csv but no config.json, which names the run it belongs "
                "to; put back the run's config.json, or pick another --run-dir"
            ) from None
        return None
    try:
        with open(fd, "rb") as f:
            info = json.loads(f.read().decode("utf-8"))
        return info["config"].get("run_id")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(
            f"cannot read the run's identity in {path} ({type(e).__name__}); put back the run's "
            "config.json, or pick another --run-dir"
        ) from None


def _check_same_run(checkpoint: dict, run_dir: Path) -> None:
    """
    :raises ConfigError: if the checkpoint's run id is not that of the folder's ``config.json``
        (a checkpoint copied in from another run folder), before anything in it is changed.
    """
    ours, theirs = _folder_run_id(run_dir), checkpoint["config"].get("run_id")
    if ours != theirs:
        raise ConfigError(
            f"{run_dir / 'checkpoint.pt'} belongs to another run (run id {theirs}; "
            f"{run_dir / 'config.json'} has {ours}): it was copied from another run folder; put "
            "back this run's checkpoint, or --resume the other run in its own folder"
        )


def _apply_threads(config: TrainConfig) -> None:
    """``--threads``: :func:`torch.set_num_threads` (torch's default when not given)."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)


def _versions() -> dict:
    import pyro_arm

    return {
        "pyro_arm": pyro_arm.__version__,
        "pyro": pyro.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


def _write_info(run: _Run) -> None:
    data = run.data
    info = {
        "config": run.saved_config(),
        "versions": _versions(),
        "device": str(run.device),
        "data": {
            "source": data.source,
            **{f"num_{s}": data.num_examples(s) for s in ("train", "valid", "test")},
        },
        "steps_per_epoch": run.stream.steps_per_epoch,
        "threads": torch.get_num_threads(),
        **run.ranks.info(),
    }
    atomic_write_text(run.dir / "config.json", json.dumps(info, indent=2) + "\n")


def _evaluate_valid(sbn, x_valid: Tensor, seed: int, step: int, device: torch.device) -> float:
    ranks = Ranks.from_env()  # sharded over the processes of a torchrun run
    with forked(seed, Stream.VALID, step, *ranks.stream_index, device=device):
        return distributed.negative_elbo(ranks, sbn, x_valid, batch_size=1000)


def _train_step(run: _Run, state: TrainState) -> float:
    """One optimizer step on the batch of ``state.step``; returns its ``-ELBO`` per image."""
    x = run.stream.batch(state.step)
    t0 = time.perf_counter()
    state.optimizer.zero_grad(set_to_none=True)
    loss = run.step_loss(x) / run.config.batch_size
    state.optimizer.step()
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    seconds = time.perf_counter() - t0
    _check_finite(run.sbn, loss)
    state.record(loss, seconds)
    return loss


def _check_finite(sbn: SigmoidBeliefNet, loss: float) -> None:
    """:raises FloatingPointError: if the loss or, after the step, a parameter is not finite."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"the loss became {loss}")
    finite = torch.stack([p.detach().isfinite().all() for p in sbn.parameters()]).all()
    if not finite:
        raise FloatingPointError("the parameters became non-finite after the optimizer step")


def _metrics_row(run: _Run, state: TrainState) -> dict:
    """Evaluates the validation ``-ELBO`` and appends the row of ``state.step``."""
    valid = _evaluate_valid(run.sbn, run.x_valid, run.config.seed, state.step, run.device)
    row = {
        "step": state.step,
        "epoch": state.step / run.stream.steps_per_epoch,
        "train_loss": state.pop_interval_mean(),
        "valid_neg_elbo": valid,
        "train_wall_s": state.train_wall_s,
    }
    if run.ranks.is_main:
        append_metrics(run.metrics_path, row)
    return row


class _Loop:
    """
    The training loop: steps, metrics rows, checkpoints, and a clean stop.

    A checkpoint is only written after a step whose loss and parameters are finite. A stop
    signal (:class:`~pyro_arm.sbn.interrupts.StopSignals`) lets the current step and its metrics
    row finish, then saves it; a second signal aborts at once, leaving the last checkpoint. Under
    torchrun the ranks agree on the stop after every step (:meth:`_stop_agreed`), so all of them
    save and stop after the same step.
    """

    def __init__(self, run: _Run, state: TrainState, bar, say, callback, stop: StopSignals):
        self.run, self.state, self.bar, self.say, self.callback = run, state, bar, say, callback
        self.stop = stop
        self.saved_step = state.step

    def save(self) -> None:
        if self.state.step != self.saved_step:
            ckpt = self.run.ranks.gather_rng(self.state.to_checkpoint(self.run.saved_config()))
            if self.run.ranks.is_main:
                save_checkpoint(ckpt, self._path)
            self.saved_step = self.state.step

    @property
    def _path(self) -> Path:
        return self.run.dir / "checkpoint.pt"

    def _due(self, every: int) -> bool:
        return self.state.step % every == 0 or self.state.step == self.run.config.steps

    def _step_and_row(self) -> float:
        self.where = f"in step {self.state.step + 1}"
        try:
            loss = _train_step(self.run, self.state)
        except FloatingPointError as e:
            step, config = self.state.step + 1, self.run.config
            raise TrainingDiverged(str(e), step, self.saved_step, self.run.dir, config.lr) from None
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.state.ema:.2f}", refresh=False)
        if self._due(self.run.config.eval_every):
            self.where = f"in the validation after step {self.state.step}"
            row = _metrics_row(self.run, self.state)
            self.say(
                f"step {row['step']}: train -ELBO {row['train_loss']:.2f}, "
                f"valid -ELBO {row['valid_neg_elbo']:.2f} nats"
            )
        return loss

    def _stop_agreed(self) -> Optional[int]:
        """
        The stop signal, if one was received; under torchrun, by any rank (a collective: every
        rank calls it at the same points, so all of them stop after the same finished step).
        """
        return self.run.ranks.max_int(self.stop.signum or 0, self.run.device) or None

    def _steps(self) -> None:
        """Steps until ``config.steps`` or a stop request; raises KeyboardInterrupt mid-step."""
        while self.state.step < self.run.config.steps and not self._stop_agreed():
            self.consistent = False  # a step and its metrics row are half done
            loss = self._step_and_row()
            self.consistent = True
            if self._due(self.run.config.checkpoint_every):
                self.where = f"saving the checkpoint of step {self.state.step}"
                self.save()
            if self.callback is not None:
                self.callback(self.state.step, loss)

    def __call__(self) -> None:
        """Runs up to ``config.steps`` and saves; on a stop, saves what is consistent and raises
        :class:`TrainingInterrupted`."""
        self.consistent, self.where = True, "saving the last checkpoint"
        try:
            self._steps()
            self.save()
        except (MemoryError, RuntimeError) as e:  # nothing of the failed step is saved
            if not is_out_of_memory(e):
                raise
            raise _out_of_memory(e, self.run, self.where, self.saved_step) from None
        except Aborted as e:
            raise TrainingInterrupted(self.saved_step, self.run.dir, e.signum, True) from None
        except KeyboardInterrupt:  # raised inside a step (no signal handler, or a callback)
            # else keep the last checkpoint (the half-done step is redone); under several
            # processes too: the ranks stop at different points and cannot gather their RNGs
            if self.consistent and not self.run.ranks.distributed:
                self.save()
            raise TrainingInterrupted(self.saved_step, self.run.dir) from None
        finally:
            self.bar.close()
        signum = self._stop_agreed()  # a signal during the last step stops every rank too
        if signum is not None:
            raise TrainingInterrupted(self.saved_step, self.run.dir, signum)


def _out_of_memory(error: BaseException, run: _Run, where: str, saved_step: int) -> OutOfMemory:
    """The one-line error of an allocator's failure in training."""
    config = run.config
    kept = (
        f"the checkpoint of step {saved_step} in {run.dir} is kept"
        if saved_step
        else "no checkpoint had been written"
    )
    return OutOfMemory(
        f"out of memory {where} ({allocation_failed(error)}); {kept}; start again in a new "
        f"--run-dir with {memory_options(config)}"
    )


def _summary(run: _Run, state: TrainState, result: dict, eval_wall_s: float) -> dict:
    step, wall = state.step, state.train_wall_s
    return {
        "model": run.config.model,
        "estimator": run.config.estimator,
        "seed": run.config.seed,
        "steps": step,
        "epochs": step / run.stream.steps_per_epoch,
        "test_elbo": result["neg_elbo"],
        "test_iwae": result["neg_iw"],
        "k": result["k"],
        "test_size": result["test_size"],
        "iwae_test_size": result["iw_size"],
        "wall_s": wall,
        "steps_per_s": step / wall if wall > 0 else math.nan,
        "seconds_per_step": wall / step if step else math.nan,
        "eval_wall_s": eval_wall_s,
        "device": str(run.device),
        "data": run.data.source,
        "binarization": run.config.binarization,
        "units": "nats per datapoint; test_elbo and test_iwae are negated bounds (lower is better)",
        **run.ranks.info(),
    }


def _finish(run: _Run, state: TrainState, log: Callable[[str], None]) -> dict:
    """The final test bounds, ``summary.json`` and the figures."""
    from pyro_arm.sbn import plots

    config, device = run.config, run.device
    t0 = time.perf_counter()
    x_test = run.data.fixed("test", seed=0).to(device)
    with forked(config.seed, Stream.TEST, *run.ranks.stream_index, device=device):
        result = distributed.evaluate_sbn(
            run.ranks, run.sbn, x_test, config.eval_k, config.test_size
        )
    result["test_size"] = x_test.shape[0]
    summary = _summary(run, state, result, time.perf_counter() - t0)
    if not run.ranks.is_main:
        return summary
    atomic_write_text(run.dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    log(
        f"test -ELBO {summary['test_elbo']:.2f} nats, -IWAE(k={summary['k']}, "
        f"n={summary['iwae_test_size']}) {summary['test_iwae']:.2f} nats; "
        f"{state.step} steps in {state.train_wall_s:.1f} s ({summary['steps_per_s']:.1f} "
        f"steps/s, {1000 * summary['seconds_per_step']:.1f} ms/step) on {device}; "
        f"results in {run.dir}"
    )
    with forked(config.seed, Stream.PLOTS, device=device):
        plots.save_all(run.sbn, read_metrics(run.metrics_path), x_test[:10], run.dir)
    return summary


def train(
    config: TrainConfig,
    *,
    checkpoint: Optional[dict] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    callback: Optional[Callable[[int, float], None]] = None,
) -> dict:
    """
    Trains one run (or continues it from a checkpoint) and evaluates it on the test set.

    :param config: the run's configuration.
    :param checkpoint: a checkpoint of this run (:func:`~pyro_arm.sbn.checkpoint.load_checkpoint`)
        to continue from, up to ``config.steps``; its run id (``config["run_id"]``, drawn when
        the run started) must be that of the folder's ``config.json``. Without one, the run folder
        must be missing or empty, and is removed again if the run fails before its first
        checkpoint.
    :param progress: show a tqdm progress bar (on stderr).
    :param log: where the one-line messages go.
    :param callback: ``callback(step, loss)`` after every step (``step`` counts finished steps).
    :returns: the summary dict, also written to ``summary.json``.
    :raises ConfigError: bad options or run folder (also
        :class:`~pyro_arm.sbn.rundir.RunFolderBusy`: another run holds the folder; and
        :class:`~pyro_arm.sbn.resources.OutOfMemory`: an allocation failed, nothing of it saved;
        and a checkpoint of another run).
    :raises UnsafeFile: an entry of the run folder is a link or not a regular file.
    :raises DataError: bad data.
    :raises TrainingInterrupted: on SIGINT / SIGTERM (``KeyboardInterrupt``), after the current
        step and a checkpoint of it; at once, without saving, on a second signal; at once during
        the final evaluation (the checkpoint is saved: ``--resume`` evaluates it).
    :raises TrainingDiverged: if the loss or the parameters become non-finite (the last
        checkpoint is kept).
    """
    config.validate()
    run_dir = config.resolved_run_dir()
    check_location(run_dir)
    if checkpoint is not None:
        _check_resume(checkpoint, config)
    _apply_threads(config)
    main = Ranks.from_env().is_main  # only rank 0 writes files and messages
    if not main:
        progress, log = False, _silent
    with StopSignals(_STOP_MESSAGE if main else "") as stop:
        with run_folder(run_dir, fresh=checkpoint is None, writer=main):
            run_id = secrets.token_hex(8)  # a fresh run's identity, in each of its checkpoints
            if checkpoint is not None:
                _check_same_run(checkpoint, run_dir)
                run_id = checkpoint["config"].get("run_id")
            try:
                run = _build(config)
                run.run_id = run_id
                state = _start(run, checkpoint, log)
                if main:
                    _write_info(run)
                _run_loop(run, state, progress, log, callback, stop)
            except Aborted as e:  # before or after the loop: the checkpoint is as it was
                step = int(checkpoint["step"]) if checkpoint is not None else 0
                raise TrainingInterrupted(step, run_dir, e.signum, aborted=True) from None
            stop.at_once()  # nothing is left to save: a signal interrupts the evaluation
            try:
                if stop.requested:  # a signal that came after the loop's last look
                    raise Interrupted(stop.signum)
                return _finish(run, state, log)
            except KeyboardInterrupt as e:
                signum = getattr(e, "signum", signal.SIGINT)
                raise TrainingInterrupted(state.step, run_dir, signum, evaluating=True) from None
            except (MemoryError, RuntimeError) as e:
                if not is_out_of_memory(e):
                    raise
                raise OutOfMemory(
                    f"out of memory in the final evaluation ({allocation_failed(e)}); the "
                    f"checkpoint of step {state.step} in {run_dir} is kept: give the process "
                    "more memory and --resume to finish the evaluation, or start again in a new "
                    f"--run-dir with smaller layers (--model {config.model})"
                ) from None


_STOP_MESSAGE = "stopping after the current step (send it again to abort at once)"


def _silent(message: str) -> None:
    """The log of ranks other than 0."""


def _run_loop(run: _Run, state: TrainState, progress: bool, log, callback, stop) -> None:
    """The loop of :class:`_Loop`, with a progress bar."""
    from tqdm.auto import tqdm

    bar = tqdm(
        total=run.config.steps,
        initial=state.step,
        disable=not progress,
        desc=f"{run.config.model}/{run.config.estimator}",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    _Loop(run, state, bar, bar.write if progress else log, callback, stop)()
