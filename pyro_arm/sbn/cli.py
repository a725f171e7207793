# SPDX-License-Identifier: Apache-2.0
"""
The ``pyro-arm`` command (also ``python -m pyro_arm``).

``pyro-arm train [options]`` trains a sigmoid belief net on binarized MNIST with an ARM-family or
Pyro estimator (see :mod:`pyro_arm.sbn.train`). Its options are generated from the fields of
:class:`~pyro_arm.sbn.config.TrainConfig` and checked by
:meth:`~pyro_arm.sbn.config.TrainConfig.validate`. ``--resume`` continues a run from its
checkpoint: options not given are taken from the saved run, and options that fix the trajectory
(:data:`~pyro_arm.sbn.config.TRAJECTORY_FIELDS`) may not change.

Bad input, a run folder in use by another run or holding a link (or anything but regular files),
a checkpoint copied in from another run, a diverged run, a file-system error (read-only
folder, full disk) and too little memory end with one line
``pyro-arm: error: <what is wrong and what to do>`` and exit status 2. The first SIGINT (Ctrl-C)
or SIGTERM lets the current step finish, saves a checkpoint of it and exits with status 130
(SIGINT) or 143 (SIGTERM); a second one aborts at once, keeping the last checkpoint, and one
after the stop ends the process at once with 128 + its number. Under
``torchrun`` every rank stops after the same step (:mod:`pyro_arm.sbn.distributed`), and the
messages of a clean stop or a divergence, which all ranks share, are printed by rank 0 alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from typing import NoReturn, Optional, Sequence

from pyro_arm.sbn.checkpoint import load_checkpoint
from pyro_arm.sbn.config import TRAJECTORY_FIELDS, ConfigError, TrainConfig, flag
from pyro_arm.sbn.data import DataError
from pyro_arm.sbn.distributed import Ranks, shutdown
from pyro_arm.sbn.files import UnsafeFile
from pyro_arm.sbn.interrupts import ExitSignals, signal_name
from pyro_arm.sbn.resources import allocation_failed, is_out_of_memory
from pyro_arm.sbn.rundir import check_location, run_folder
from pyro_arm.sbn.train import TrainingDiverged, TrainingInterrupted, train

PROG = "pyro-arm"


class UsageError(Exception):
    """A command-line error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and an exception (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """
    One ``--flag`` per :class:`TrainConfig` field, typed and documented by its metadata. Every
    default is ``None``, so that ``--resume`` can tell which options were given explicitly;
    the values are checked by :meth:`TrainConfig.validate`, not here.
    """
    for field in dataclasses.fields(TrainConfig):
        meta = field.metadata
        default = "" if field.default is None else f" (default {field.default})"
        kwargs = dict(dest=field.name, default=None, help=meta["help"] + default)
        if meta["type"] is bool:  # --flag / --no-flag
            parser.add_argument(flag(field.name), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        metavar = meta["metavar"]
        if meta["choices"] is not None:  # read now: a newly registered estimator shows up
            metavar = "{" + ",".join(meta["choices"]()) + "}"
        parser.add_argument(flag(field.name), type=meta["type"], metavar=metavar, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-arm`` argument parser."""
    parser = _Parser(
        prog=PROG,
        description="Antithetic ARM / DisARM gradients for Bernoulli latents in Pyro.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    t = sub.add_parser(
        "train",
        help="train a sigmoid belief net on binarized MNIST",
        description=(
            "Train a sigmoid belief net on binarized MNIST, then report the test -ELBO and the "
            "k-sample importance-weighted bound (nats per image). Writes config.json, "
            "metrics.csv, checkpoint.pt, summary.json and PNG plots into the run folder."
        ),
    )
    add_config_options(t)
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the run folder from its checkpoint (up to --steps)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, set[str]]:
    """The config of the parsed options, and the names of those given explicitly."""
    names = (f.name for f in dataclasses.fields(TrainConfig))
    values = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    return TrainConfig(**values), set(values)


def resume_config(saved: dict, config: TrainConfig, explicit: set[str]) -> TrainConfig:
    """
    The config to resume with: the saved one, updated with the explicit options.

    :raises ConfigError: if an explicit trajectory option differs from the saved one.
    """
    for name in TRAJECTORY_FIELDS:
        if name in explicit and saved.get(name) != getattr(config, name):
            raise ConfigError(
                f"--resume: the run was started with {name}={saved.get(name)!r}, not "
                f"{getattr(config, name)!r}; drop that option or pick another --run-dir"
            )
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    merged = {k: v for k, v in saved.items() if k in fields}
    merged.update({k: getattr(config, k) for k in explicit})
    merged["run_dir"] = str(config.resolved_run_dir())
    return TrainConfig(**merged)


def _train(args: argparse.Namespace) -> None:
    config, explicit = config_from_args(args)
    config.validate()
    run_dir = config.resolved_run_dir()
    check_location(run_dir)
    # the lock is taken before the checkpoint is read, so that no other run changes it meanwhile
    with run_folder(run_dir, fresh=not args.resume, writer=Ranks.from_env().is_main):
        checkpoint = None
        if args.resume:
            checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
            config = resume_config(checkpoint["config"], config, explicit)
        train(config, checkpoint=checkpoint, progress=not args.no_progress)


def _error(message: str, status: int = 2, every_rank: bool = True) -> int:
    """Prints the one-line error (under torchrun, on rank 0 only unless ``every_rank``)."""
    if every_rank or Ranks.from_env().is_main:
        print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def _os_error(e: OSError) -> str:
    """One line for a file-system error: what failed, on which file, and what to check."""
    reason = e.strerror or str(e)
    where = f" on {e.filename}" if e.filename else ""
    return (
        f"{reason}{where}; check that the run folder is writable and the disk is not full, "
        "then --resume (or start again)"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    Runs ``pyro-arm``; returns the exit status: 0 success, 2 bad input (or a diverged run, a
    file-system error, too little memory), 128 + the signal number when interrupted (130 SIGINT,
    143 SIGTERM).

    :param argv: the arguments; None for those of the process (``sys.argv``), which runs
        ``pyro-arm`` as the program: its signal handlers
        (:class:`~pyro_arm.sbn.interrupts.ExitSignals`) then stay installed until the process
        exits, and it ends the process itself (after the exit hooks) instead of returning. A call
        with ``argv`` returns, with the previous handlers restored.
    """
    program = argv is None
    with ExitSignals(restore=not program) as signals:
        try:
            status = _main(argv)
        except KeyboardInterrupt as e:  # one that came outside the handlers of _main
            status = _interrupted(e)
        finally:
            signals.done()  # a further signal ends the process at once
            shutdown()  # leaves the process group of a torchrun run
    if program:
        signals.exit(status)
    return status


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        return _error(str(e))
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        _train(args)
    except TrainingDiverged as e:  # every rank of a torchrun run agrees: rank 0 says it
        return _error(str(e), every_rank=False)
    except (ConfigError, DataError, UnsafeFile) as e:
        return _error(str(e))
    except OSError as e:
        return _error(_os_error(e))
    except (MemoryError, RuntimeError) as e:  # outside the steps and evaluations of train
        if not is_out_of_memory(e):
            raise
        return _error(
            f"out of memory ({allocation_failed(e)}); give the process more memory, or train "
            "with a smaller --batch-size, fewer --num-samples (with --objective iwae, rloo or "
            "arms) or smaller layers (--model)"
        )
    except TrainingInterrupted as e:
        return _error(str(e), 128 + e.signum, every_rank=e.aborted)
    except KeyboardInterrupt as e:
        return _interrupted(e)
    return 0


def _interrupted(e: KeyboardInterrupt) -> int:
    signum = getattr(e, "signum", signal.SIGINT)
    return _error(f"interrupted by {signal_name(signum)}", 128 + signum)


if __name__ == "__main__":
    sys.exit(main())
