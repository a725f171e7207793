# SPDX-License-Identifier: Apache-2.0
"""
Shared pieces of the benchmark scripts: the common options, data batches, the plain view of a
Pyro SBN, contenders, interleaved timing and output. Run the scripts from the repository root as
modules (``python -m benchmarks.step_time``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pyro
import torch
from pyro.poutine.util import prune_subsample_sites

from benchmarks import storch_arm
from benchmarks.plain_arm import ESTIMATOR_NAMES, PlainARMStep, PlainSBN, arm_surrogate_loss
from pyro_arm.iwelbo import IWELBO
from pyro_arm.sbn.elbo import make_elbo
from pyro_arm.sbn.models import build_sbn, run_map

#: The estimators every contender family implements (the plain step has these three).
ESTIMATORS = ESTIMATOR_NAMES


# ------------------------------------------------------------------------------------ arguments


def base_parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark script shares; each script adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 2)")
    p.add_argument("--data", default="embedded", help="'embedded', 'download' or an IDX folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-validation",
        action="store_true",
        help="pyro.enable_validation(False) (Pyro validates by default: support checks cost)",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run (see the script's doc)")
    p.add_argument("--json-out", default=None, help="also write the JSON line to this file")
    return p


def setup(args: argparse.Namespace) -> None:
    """
    Threads, Pyro validation, and module-local parameters: each contender's PyroModule keeps
    its own parameters instead of syncing them with the global param store by name, so that
    contenders built from the same architecture never share parameters.
    """
    if args.device == "cpu":
        torch.set_num_threads(args.threads or 2)
    pyro.enable_validation(not args.no_validation)
    pyro.settings.set(module_local_params=True)


# ----------------------------------------------------------------------------------------- data


def train_batches(data, batch_size: int, generator: torch.Generator, device="cpu"):
    """Endless full-size training batches, reshuffled every epoch by ``generator``."""
    while True:
        yield from data.batches(
            "train", batch_size, device=device, generator=generator, drop_last=True
        )


def fixed_batch(data, batch_size: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """The first batch of a seeded shuffle of the training set."""
    gen = torch.Generator().manual_seed(seed)
    return next(iter(data.batches("train", batch_size, device=device, generator=gen)))


# --------------------------------------------------------------------------------------- models


def plain_from_pyro(sbn) -> PlainSBN:
    """
    A :class:`PlainSBN` sharing the modules and parameters of the Pyro SBN ``sbn``.

    Used to start the plain ARM step from the same parameters as the Pyro one, and to evaluate
    both with the same code.
    """
    slope = sbn.negative_slope
    return PlainSBN(
        [_Map(m, slope) for m in sbn.encoders],
        [_Map(m, slope) for m in sbn.decoders],
        sbn.prior_logits,
    )


class _Map(torch.nn.Module):
    """One map of :class:`~pyro_arm.sbn.models.SigmoidBeliefNet` as a module (shared layers)."""

    def __init__(self, layers: torch.nn.ModuleList, negative_slope: float):
        super().__init__()
        self.layers = layers
        self.negative_slope = negative_slope

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return run_map(self.layers, h, self.negative_slope)


def copy_of_plain(sbn) -> PlainSBN:
    """An independent copy of the parameters of ``sbn`` (Pyro or plain) as a :class:`PlainSBN`."""
    plain = sbn if isinstance(sbn, PlainSBN) else plain_from_pyro(sbn)
    return copy.deepcopy(plain)


# ---------------------------------------------------------------------------------- contenders


#: Multi-sample contenders ``<estimator><n>_vec`` (e.g. ``arms4_vec``): the estimators and n.
MULTI_SAMPLE_ESTIMATORS = ("rloo", "arms")
MULTI_SAMPLE_SIZES = (2, 4, 8)


#: ``<estimator><n>[all]``: a multi-sample contender's name before its mode (``all``: ARMS with
#: ``model_grad="all"``).
_MULTI_SAMPLE = re.compile(r"(rloo|arms)(\d+)(all)?")

#: ``iw<estimator><K>``: the importance-weighted bound with K samples (``iwdisarm4_vec``; ARMS
#: with 3 members per Bernoulli site).
_IW = re.compile(r"iw(vimco|disarm|arms)(\d+)")

#: ``<estimator><P>p``: a contender with ``P`` particles (``disarm2p_vec``: DisARM, 2 particles).
_PARTICLES = re.compile(r"([a-z]+?)(\d+)p")


def pyro_loss(kind: str, num_particles: int = 1):
    """A Pyro ELBO: ``trace_elbo``, ``tracegraph_elbo``, ``<estimator>_seq`` or ``_vec``, or a
    multi-sample ``<estimator><n>_seq`` / ``_vec`` (``rloo4_vec``: RLOO with 4 samples;
    ``arms4all_vec``: ARMS with 4 samples and ``model_grad="all"``)."""
    name, mode = kind.rsplit("_", 1)
    iw = _IW.fullmatch(name)
    if iw:
        return IWELBO(
            num_samples=int(iw.group(2)),
            estimator=iw.group(1),
            num_particles=num_particles,
            vectorize_particles=(mode == "vec"),
            max_plate_nesting=1,
        )
    particles = _PARTICLES.fullmatch(name)
    if particles:
        name, num_particles = particles.group(1), int(particles.group(2)) * num_particles
    multi = _MULTI_SAMPLE.fullmatch(name)
    if multi:
        estimator, n = multi.group(1), int(multi.group(2))
        model_grad = "all" if multi.group(3) else "base"
        return make_elbo(
            estimator, num_particles, (mode == "vec"), num_samples=n, model_grad=model_grad
        )
    return make_elbo(name, num_particles, vectorize=(mode == "vec"))


def num_stochastic_layers(sbn, x: torch.Tensor) -> int:
    """The latent sample sites of an SBN's guide (its stochastic layers)."""
    trace = prune_subsample_sites(pyro.poutine.trace(sbn.guide).get_trace(x))
    return sum(1 for s in trace.nodes.values() if s["type"] == "sample" and not s["is_observed"])


def model_evaluations(name: str, num_layers: int, num_particles: int = 1) -> int:
    """
    Runs of model and guide behind one gradient of contender ``name`` on an SBN with
    ``num_layers`` stochastic layers: ARM / DisARM ``T + 1`` per particle (2 for one layer),
    AR and Pyro's ELBOs 1, RLOO-n ``n``, ARMS-n ``1 + T (n - 1)`` (``n`` for one layer), and one
    more (a run of the model alone) for ARMS with ``model_grad="all"``.
    """
    estimator = name.rsplit("_", 1)[0].removeprefix("plain_").removeprefix("storch_")
    iw = _IW.fullmatch(estimator)
    if iw:
        k, members = int(iw.group(2)), {"vimco": 1, "disarm": 2, "arms": 3}[iw.group(1)]
        return num_particles * k * (1 + num_layers * (members - 1))
    particles = _PARTICLES.fullmatch(estimator)
    if particles:
        estimator, num_particles = particles.group(1), int(particles.group(2)) * num_particles
    multi = _MULTI_SAMPLE.fullmatch(estimator)
    if multi:
        n = int(multi.group(2))
        per_particle = n if multi.group(1) == "rloo" else 1 + num_layers * (n - 1)
        per_particle += bool(multi.group(3))
    elif estimator in ("arm", "disarm"):
        per_particle = num_layers + 1
    else:
        per_particle = 1
    return per_particle * num_particles


def available_contenders(include_plain: bool = True, include_peers: bool = True) -> list[str]:
    """Every contender name this installation can run (the storchastic peers only when it
    imports and runs on batches: see :data:`benchmarks.storch_arm.RUNS_ON_BATCHES`)."""
    names = ["trace_elbo", "tracegraph_elbo"]
    names += [f"{e}_{m}" for m in ("seq", "vec") for e in ESTIMATORS]
    names += [f"{e}{n}_vec" for e in MULTI_SAMPLE_ESTIMATORS for n in MULTI_SAMPLE_SIZES]
    names += [f"arms{n}all_vec" for n in MULTI_SAMPLE_SIZES]
    names += ["disarm2p_vec"]
    names += [f"iw{e}{k}_vec" for e in ("vimco", "disarm", "arms") for k in (2, 4, 8, 16)]
    if include_plain:
        names += [f"plain_{e}" for e in ESTIMATORS]
    if include_peers and storch_arm.unavailable_reason() is None:
        names += [n for n in storch_arm.CONTENDERS if storch_arm.RUNS_ON_BATCHES[n]]
    return names


def check_contenders(names: Sequence[str]) -> None:
    """Exits with a clear message when a contender asked for cannot run here."""
    for name in names:
        if name in storch_arm.CONTENDERS:
            reason = storch_arm.unavailable_reason(name)
            if reason is not None:
                raise SystemExit(f"contender {name!r} unavailable: {reason}")
        elif name not in available_contenders():
            raise SystemExit(f"unknown contender {name!r}; known: {available_contenders()}")


@dataclass
class Contender:
    """A training step on its own copy of the model: ``step(x) -> loss``."""

    name: str
    module: torch.nn.Module
    step: Callable[[torch.Tensor], float]
    params: Callable[[], Iterable[tuple[str, torch.nn.Parameter]]]
    grad_only: Callable[[torch.Tensor], None]


def make_contender(
    name: str, model_name: str, x_mean, lr: float = 1e-3, seed: int = 0, device="cpu", init=None
) -> Contender:
    """
    ``name`` on a fresh SBN ``model_name`` (initialised from ``seed``, or from the parameters of
    the Pyro SBN ``init`` when given).

    Every contender steps ``torch.optim.Adam``: Pyro ones after ``loss.loss_and_grads``, plain ones
    in :class:`PlainARMStep`.
    ``grad_only(x)`` leaves the gradient in ``.grad`` without stepping (for variance).
    Contenders share no parameters once :func:`setup` has made PyroModule parameters
    module-local.
    """
    torch.manual_seed(seed)
    if name in storch_arm.CONTENDERS:
        return _storch_contender(name, model_name, x_mean, lr, device, init)
    if name.startswith("plain_"):
        estimator = name.split("_", 1)[1]
        plain = (
            copy_of_plain(init)
            if init is not None
            else copy_of_plain(build_sbn(model_name, x_mean))
        )
        plain.to(device)
        step = PlainARMStep(plain, torch.optim.Adam(plain.parameters(), lr=lr), estimator)

        def grad_only(x):
            plain.zero_grad(set_to_none=True)
            arm_surrogate_loss(plain, x, estimator)[0].backward()

        return Contender(name, plain, step, lambda: plain.named_parameters(), grad_only)

    sbn = build_sbn(model_name, x_mean)
    if init is not None:
        sbn.load_state_dict(init.state_dict())
    sbn.to(device)
    loss = pyro_loss(name)
    # The same optimizer as the plain contenders (and as `pyro-arm train`), so that ratios compare
    # the gradient computations; SVI with pyro.optim adds the same per-parameter overhead to
    # every Pyro ELBO.
    optim = torch.optim.Adam(sbn.parameters(), lr=lr)

    def step(x):
        optim.zero_grad(set_to_none=True)
        value = loss.loss_and_grads(sbn.model, sbn.guide, x)
        optim.step()
        return value

    def grad_only(x):
        for p in sbn.parameters():
            p.grad = None
        loss.loss_and_grads(sbn.model, sbn.guide, x)

    return Contender(name, sbn, step, lambda: sbn.named_parameters(), grad_only)


def _storch_contender(name, model_name, x_mean, lr, device, init) -> Contender:
    """A storchastic contender (:mod:`benchmarks.storch_arm`) on a copy of the same SBN."""
    plain = copy_of_plain(init if init is not None else build_sbn(model_name, x_mean))
    plain.to(device)
    optim = torch.optim.Adam(plain.parameters(), lr=lr)
    step = storch_arm.StorchStep(plain, optim, storch_arm.CONTENDERS[name])
    return Contender(name, plain, step, lambda: plain.named_parameters(), step.grad)


def encoder_param_names(contender: Contender) -> list[str]:
    """Names of the guide's (encoder) parameters of a contender's model."""
    names = [n for n, _ in contender.params()]
    return [n for n in names if "enc" in n.lower()]


# -------------------------------------------------------------------------------------- timing


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
    seed: int = 0,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """
    Seconds per call of every function, interleaved: each round calls every function once, in a
    fresh random order, so that load on a shared machine hits all contenders alike.

    ``clock="cpu"`` counts this process's CPU time (all threads) instead of wall time: less
    sensitive to other processes competing for the cores, meaningless on a GPU.
    """
    timer = {"wall": time.perf_counter, "cpu": time.process_time}[clock]
    rng = random.Random(seed)
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        rng.shuffle(names)
        for n in names:
            t0 = timer()
            fns[n]()
            sync()
            times[n].append(timer() - t0)
    return times


def median_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of the per-round ratio ``num / den``."""
    return statistics.median(a / b for a, b in zip(num, den))


def device_sync(device: str) -> Callable[[], None]:
    if str(device).startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


# -------------------------------------------------------------------------------------- output


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            if v == 0 or math.isnan(v):
                return f"{v:.3g}"
            return f"{v:.4g}" if 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Prints a ``## title`` heading, then the rows as a markdown table."""
    print(f"## {title}\n")
    print(markdown_table(headers, rows))
    print()


def emit_json(record: dict, path: str | None) -> None:
    """Prints ``record`` as one JSON line (and writes it to ``path`` when given)."""
    line = json.dumps(record, sort_keys=True)
    print(line)
    if path:
        Path(path).write_text(line + "\n")


def finish(record: dict, benchmark: str, args: argparse.Namespace, **settings) -> dict:
    """Adds the benchmark's name, settings, device, validation and environment to ``record``,
    emits it as one JSON line (:func:`emit_json`) and returns it."""
    record.update(
        benchmark=benchmark,
        device=args.device,
        validation=not args.no_validation,
        env=environment(),
        **settings,
    )
    emit_json(record, args.json_out)
    return record


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
