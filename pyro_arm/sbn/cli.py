# SPDX-License-Identifier: Apache-2.0
"""
The ``pyro-arm`` command (also ``python -m pyro_arm``).

``pyro-arm train [options]`` trains a sigmoid belief net on binarized MNIST with an ARM-family or
Pyro estimator (see :mod:`pyro_arm.sbn.train`). Bad input ends with one line
``pyro-arm: error: <what is wrong and what to do>`` and exit status 2; an interrupted run
(Ctrl-C) saves a checkpoint and exits with status 130.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, Optional, Sequence

from pyro_arm.sbn.data import BINARIZATIONS, DataError
from pyro_arm.sbn.models import ARCHITECTURES
from pyro_arm.sbn.train import ESTIMATOR_CHOICES, ConfigError, TrainConfig, TrainingInterrupted

PROG = "pyro-arm"


class UsageError(Exception):
    """A command-line error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and an exception (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-arm`` argument parser."""
    d = TrainConfig()
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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # Defaults are None so that --resume can tell which options were given explicitly.
    t.add_argument(
        "--model",
        metavar="NAME",
        help=f"architecture: {', '.join(ARCHITECTURES)} or linear-D1-D2-... / nonlinear-D1-... "
        f"(default {d.model})",
    )
    t.add_argument(
        "--estimator",
        choices=ESTIMATOR_CHOICES,
        help="arm, disarm, ar (TraceARM_ELBO), trace (Trace_ELBO), tracegraph "
        f"(TraceGraph_ELBO) (default {d.estimator})",
    )
    t.add_argument("--steps", type=_positive_int, help=f"optimizer steps (default {d.steps})")
    t.add_argument(
        "--batch-size", type=_positive_int, help=f"images per step (default {d.batch_size})"
    )
    t.add_argument("--lr", type=_positive_float, help=f"Adam learning rate (default {d.lr})")
    t.add_argument(
        "--binarization",
        choices=BINARIZATIONS,
        help=f"threshold (pixel > 0.5) or dynamic (resampled per batch) (default {d.binarization})",
    )
    t.add_argument(
        "--data",
        metavar="SOURCE",
        help="embedded (the packaged 10k/2k/2k subset), download (full MNIST into "
        "~/.cache/pyro-arm), or a folder with the four MNIST IDX files, e.g. "
        f"../shared/data/mnist (default {d.data})",
    )
    t.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    t.add_argument("--device", choices=("cpu", "cuda", "auto"), help=f"(default {d.device})")
    t.add_argument(
        "--num-particles",
        type=_positive_int,
        help=f"ELBO particles per step (default {d.num_particles})",
    )
    t.add_argument(
        "--vectorize",
        action="store_true",
        default=None,
        help="vectorize the particles (and antithetic branches) in plates",
    )
    t.add_argument(
        "--eval-every",
        type=_positive_int,
        help=f"steps between validation -ELBO rows (default {d.eval_every})",
    )
    t.add_argument(
        "--eval-k",
        type=_positive_int,
        help=f"samples of the importance-weighted test bound (default {d.eval_k})",
    )
    t.add_argument(
        "--test-size",
        type=_positive_int,
        help="test images used for the k-sample bound (default: all)",
    )
    t.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        help=f"steps between checkpoints (default {d.checkpoint_every})",
    )
    t.add_argument(
        "--run-dir",
        metavar="DIR",
        help="run folder (default runs/<model>-<estimator>-s<seed>)",
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the run folder from its checkpoint (up to --steps)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, set[str]]:
    values = {}
    for name in (
        "model",
        "estimator",
        "steps",
        "batch_size",
        "lr",
        "binarization",
        "data",
        "seed",
        "device",
        "num_particles",
        "vectorize",
        "eval_every",
        "eval_k",
        "test_size",
        "checkpoint_every",
        "run_dir",
    ):
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    return TrainConfig(**values), set(values)


def _error(message: str, status: int = 2) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs ``pyro-arm``; returns the exit status (0 success, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        return _error(str(e))
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from pyro_arm.sbn.train import train

    config, explicit = _config_from_args(args)
    try:
        train(config, resume=args.resume, explicit=explicit, progress=not args.no_progress)
    except (ConfigError, DataError) as e:
        return _error(str(e))
    except FloatingPointError as e:
        return _error(str(e), 1)
    except TrainingInterrupted as e:
        return _error(
            f"interrupted at step {e.step}; checkpoint saved in {e.run_dir}, continue with the "
            "same command plus --resume",
            130,
        )
    except KeyboardInterrupt:
        return _error("interrupted", 130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
