# SPDX-License-Identifier: Apache-2.0
"""
The configuration of one training run, and its validation: the single source of the
``pyro-arm train`` options.

Each field of :class:`TrainConfig` carries its command-line help and rules in its metadata
(:func:`option`): the CLI builds one ``--flag`` per field from :func:`dataclasses.fields`, and
:meth:`TrainConfig.validate` applies every field's rule, so a value is checked in one place
whether it comes from the command line, a resumed run or Python.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from pyro_arm.estimators import ESTIMATORS, check_num_samples
from pyro_arm.iwelbo import check_iw_num_samples
from pyro_arm.sbn.data import BINARIZATIONS
from pyro_arm.sbn.elbo import IW_ESTIMATORS, OBJECTIVES, PYRO_BASELINES, estimator_choices
from pyro_arm.sbn.models import ARCHITECTURES, CATEGORICAL_MODEL, parse_architecture
from pyro_arm.trace_arm_elbo import MODEL_GRADS

#: Config fields that fix the training trajectory; a resumed run may not change them.
TRAJECTORY_FIELDS = (
    "model",
    "objective",
    "estimator",
    "batch_size",
    "lr",
    "binarization",
    "data",
    "seed",
    "num_particles",
    "vectorize",
    "num_samples",
    "num_members",
    "model_grad",
)


class ConfigError(ValueError):
    """A bad option or run folder; the message says what to do."""


def flag(name: str) -> str:
    """The command-line flag of a field: ``batch_size -> --batch-size``."""
    return "--" + name.replace("_", "-")


def _positive_int(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
        raise ConfigError(f"{flag(name)}: expected a positive integer, got {value!r}")


def _positive_number(name: str, value: Any) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{flag(name)}: expected a positive number, got {value!r}")


#: Seeds are 64-bit unsigned integers (what :func:`torch.manual_seed` accepts).
MAX_SEED = 2**64 - 1


def _seed(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{flag(name)}: expected an integer from 0 to 2**64-1, got {value!r}")


def _architecture(name: str, value: Any) -> None:
    if value == CATEGORICAL_MODEL:
        return
    try:
        parse_architecture(value)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _device(name: str, value: Any) -> None:
    if value in ("cpu", "cuda", "auto") or str(value).removeprefix("cuda:").isdigit():
        return
    raise ConfigError(f"{flag(name)}: unknown device {value!r}; expected cpu, cuda, cuda:N or auto")


def _one_of(
    choices: Callable[[], tuple[str, ...]], optional: bool = False
) -> Callable[[str, Any], None]:
    """A check that the value is one of ``choices()`` (or, when ``optional``, ``None``)."""

    def check(name: str, value: Any) -> None:
        valid = choices()
        if value not in valid and not (optional and value is None):
            raise ConfigError(
                f"{flag(name)}: invalid choice: {value!r} (choose from {', '.join(valid)})"
            )

    return check


def option(
    default: Any,
    help: str,
    *,
    type: Optional[Callable[[str], Any]] = None,
    check: Optional[Callable[[str, Any], None]] = None,
    choices: Optional[Callable[[], tuple[str, ...]]] = None,
    metavar: Optional[str] = None,
) -> Any:
    """
    A :class:`TrainConfig` field with its command-line metadata.

    :param help: the ``--help`` text.
    :param type: parses the command-line string (``bool`` makes an on/off flag; default ``str``).
    :param check: ``check(name, value)`` raises :class:`ConfigError` for a bad value.
    :param choices: returns the valid values (read when validating, and shown in ``--help``).
    :param metavar: the value's name in ``--help``.
    """
    if choices is not None:
        check = _one_of(choices)
    if metavar is None and type is int:
        metavar = "N"
    metadata = {"help": help, "type": type or str, "check": check, "choices": choices}
    return dataclasses.field(default=default, metadata={**metadata, "metavar": metavar})


@dataclass
class TrainConfig:
    """
    One training run: the ``pyro-arm train`` options, one per field (the ``:param:`` lines below
    are made from each field's help).

    The defaults (DisARM, Adam lr 1e-3, 30,000 steps of batch 50) were picked from measurements
    at equal wall time on the embedded data: see "Equal wall time" in the docs' results page.

    The run folder defaults to ``runs/<model>-<estimator>-s<seed>`` (:meth:`resolved_run_dir`).
    """

    model: str = option(
        "linear",
        f"architecture: {', '.join(ARCHITECTURES)} or linear-D1-D2-... / nonlinear-D1-..., "
        f"or {CATEGORICAL_MODEL} (a VAE with 20 categorical latents of 10 classes)",
        check=_architecture,
        metavar="NAME",
    )
    objective: str = option(
        "elbo",
        "elbo, or iwae: the importance-weighted bound with --num-samples samples (IWELBO)",
        choices=lambda: OBJECTIVES,
    )
    estimator: str = option(
        "disarm",
        "with elbo: an estimator of pyro_arm.estimators.ESTIMATORS (TraceARM_ELBO), or trace "
        "(Trace_ELBO) or tracegraph (TraceGraph_ELBO), or with --model categorical gumbel "
        "(Gumbel straight-through, biased); with iwae: vimco, disarm or arms",
        choices=estimator_choices,
    )
    steps: int = option(
        30000, "optimizer steps (a resumed run continues up to it)", type=int, check=_positive_int
    )
    batch_size: int = option(50, "images per step", type=int, check=_positive_int)
    lr: float = option(1e-3, "Adam learning rate", type=float, check=_positive_number)
    binarization: str = option(
        "threshold",
        "threshold (pixel > 0.5) or dynamic (resampled per batch)",
        choices=lambda: BINARIZATIONS,
    )
    data: str = option(
        "embedded",
        "embedded (the packaged 10k/2k/2k subset), download (full MNIST into ~/.cache/pyro-arm), "
        "or a folder with the four MNIST IDX files",
        metavar="SOURCE",
    )
    seed: int = option(
        0,
        "seeds the initialization, the data order and the samples (0 to 2**64-1)",
        type=int,
        check=_seed,
    )
    device: str = option("auto", "cpu, cuda, cuda:N or auto (CUDA if available)", check=_device)
    num_particles: int = option(1, "ELBO particles per step", type=int, check=_positive_int)
    vectorize: bool = option(
        False, "vectorize the particles (and antithetic branches) in plates", type=bool
    )
    num_samples: Optional[int] = option(
        None,
        "samples inside one estimate of the multi-sample estimators rloo and arms "
        "(>= 2; default 2); not taken by the others",
        type=int,
        check=_positive_int,
    )
    num_members: Optional[int] = option(
        None,
        "with --objective iwae --estimator arms: antithetic members per Bernoulli site "
        "(>= 2; default 3)",
        type=int,
        check=_positive_int,
    )
    model_grad: Optional[str] = option(
        None,
        "model-parameter gradient: base (at the base sample) or, with arms, all (averaged over "
        "every evaluated sample; the default for arms)",
        check=_one_of(lambda: MODEL_GRADS, optional=True),
        metavar="{" + ",".join(MODEL_GRADS) + "}",
    )
    eval_every: int = option(
        1000, "steps between validation -ELBO rows", type=int, check=_positive_int
    )
    eval_k: int = option(
        1000, "samples of the importance-weighted test bound", type=int, check=_positive_int
    )
    test_size: Optional[int] = option(
        None,
        "test images used for the k-sample bound (default: all)",
        type=int,
        check=_positive_int,
    )
    checkpoint_every: int = option(1000, "steps between checkpoints", type=int, check=_positive_int)
    threads: Optional[int] = option(
        None,
        "CPU threads of torch (torch.set_num_threads; default: torch's own choice)",
        type=int,
        check=_positive_int,
    )
    run_dir: Optional[str] = option(
        None, "run folder (default runs/<model>-<estimator>-s<seed>)", metavar="DIR"
    )

    def resolved_run_dir(self) -> Path:
        """The run folder: :attr:`run_dir`, else ``runs/<model>-<estimator>-s<seed>``."""
        return Path(self.run_dir or f"runs/{self.model}-{self.estimator}-s{self.seed}")

    def validate(self) -> None:
        """Applies every field's rule; raises :class:`ConfigError` saying what is expected."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            check = field.metadata["check"]
            if check is not None:
                check(field.name, value)
        if self.objective == "iwae":
            if self.estimator not in IW_ESTIMATORS:
                raise ConfigError(
                    f"{flag('estimator')} {self.estimator}: the iwae objective takes "
                    f"{', '.join(IW_ESTIMATORS)}"
                )
            if self.num_samples is not None and self.num_samples < 2:
                raise ConfigError(f"{flag('num_samples')}: the iwae objective needs >= 2")
            if self.num_samples is not None:
                try:
                    check_iw_num_samples(self.num_samples)
                except ValueError as e:
                    raise ConfigError(f"{flag('num_samples')}: {e}") from None
            if self.model_grad is not None:
                raise ConfigError(f"{flag('model_grad')}: not taken by the iwae objective")
            if self.num_members is not None and (self.estimator != "arms" or self.num_members < 2):
                raise ConfigError(f"{flag('num_members')}: >= 2, with --estimator arms only")
            if self.estimator == "renyi" and self.num_particles != 1:
                raise ConfigError(f"{flag('num_particles')}: renyi takes --num-samples only")
            return
        if self.num_members is not None:
            raise ConfigError(f"{flag('num_members')}: only with --objective iwae")
        if self.estimator not in ESTIMATORS and self.estimator not in PYRO_BASELINES:
            raise ConfigError(f"{flag('estimator')} {self.estimator}: only with --objective iwae")
        if self.estimator == "gumbel" and self.model != CATEGORICAL_MODEL:
            raise ConfigError(f"{flag('estimator')} gumbel: only with --model {CATEGORICAL_MODEL}")
        if self.estimator in ESTIMATORS:
            try:
                check_num_samples(ESTIMATORS[self.estimator], self.num_samples)
            except ValueError as e:
                raise ConfigError(f"{flag('num_samples')}: {e}") from None
        elif self.num_samples is not None:
            raise ConfigError(f"{flag('num_samples')}: {self.estimator} does not take it")
        if self.model_grad == "all" and self.estimator != "arms":
            raise ConfigError(f"{flag('model_grad')} {self.model_grad}: only with --estimator arms")


def _document_fields(cls: type) -> None:
    """Appends a ``:param:`` line per field, from its help, to the class docstring."""
    lines = [f":param {f.name}: {f.metadata['help']}." for f in dataclasses.fields(cls)]
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n    " + "\n    ".join(lines) + "\n"


_document_fields(TrainConfig)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if available, else CPU; ``cuda[:N]`` without a GPU raises ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name} was asked for but CUDA is not available "
            "(no GPU, or a CPU-only PyTorch); use --device cpu or auto"
        )
    return torch.device(name)
