# SPDX-License-Identifier: Apache-2.0
"""
Shared pieces of the benchmark scripts: data, models (Pyro and plain), contenders, interleaved
timing and output.

The scripts use :mod:`pyro_arm.models` and :mod:`pyro_arm.data` when they import; otherwise a
minimal stand-in with the same interface (below) keeps them running.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import statistics
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO
from pyro.optim import Adam

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_arm import PlainARMStep, PlainSBN, build_plain_sbn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"

try:  # the real ELBO, once it lands
    from pyro_arm import TraceARM_ELBO
except ImportError:  # pragma: no cover - stand-in period only
    TraceARM_ELBO = None

try:
    from pyro_arm.models import build_sbn as _build_sbn
except ImportError:  # pragma: no cover
    _build_sbn = None

try:
    from pyro_arm.data import load_mnist as _load_mnist
except ImportError:  # pragma: no cover
    _load_mnist = None

ESTIMATORS = ("arm", "disarm", "ar")
MODEL_LAYERS = {
    "linear": ([200], ()),
    "two_layer": ([200, 200], ()),
    "nonlinear": ([200], (200, 200)),
}


# ----------------------------------------------------------------------------------------- data


@dataclass
class _StandInMNIST:
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    def batches(self, split, batch_size, *, device=None, generator=None, shuffle=True):
        data = getattr(self, split)
        n = data.shape[0]
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for i in range(0, n - batch_size + 1, batch_size):
            yield data[order[i : i + batch_size]].to(device)


def _read_idx_images(path: Path) -> torch.Tensor:
    with gzip.open(path, "rb") as fh:
        _, n, rows, cols = struct.unpack(">IIII", fh.read(16))
        raw = np.frombuffer(fh.read(), dtype=np.uint8).reshape(n, rows * cols)
    return torch.from_numpy(raw.astype(np.float32) / 255.0)


def load_data(source: str = "embedded"):
    """
    Binarized MNIST with ``.train``, ``.valid``, ``.test`` and ``.batches(...)``.

    Uses :func:`pyro_arm.data.load_mnist` when present; the stand-in reads the IDX files
    (``source`` a folder, or the shared copy for ``"embedded"``) and thresholds at 0.5.
    """
    if _load_mnist is not None:
        return _load_mnist(source)
    folder = SHARED_MNIST if source in ("embedded", "download") else Path(source)
    train = (_read_idx_images(folder / "train-images-idx3-ubyte.gz") > 0.5).float()
    test = (_read_idx_images(folder / "t10k-images-idx3-ubyte.gz") > 0.5).float()
    return _StandInMNIST(train[:50000], train[50000:], test)


def fixed_batch(data, batch_size: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """The first batch of a seeded shuffle of the training set."""
    gen = torch.Generator().manual_seed(seed)
    return next(iter(data.batches("train", batch_size, device=device, generator=gen)))


# --------------------------------------------------------------------------------------- models


class _StandInSBN(torch.nn.Module):
    """The interface of :class:`pyro_arm.models.SigmoidBeliefNet`, wrapping a :class:`PlainSBN`."""

    def __init__(self, plain: PlainSBN):
        super().__init__()
        self.net = plain

    def model(self, x):
        net = self.net
        pyro.module("decoders", net.decoders)
        prior = pyro.param("prior_logits", net.prior_logits)
        T = net.num_layers
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample(
                f"z{T}", dist.Bernoulli(logits=prior.expand(x.shape[0], -1)).to_event(1)
            )
            for k in reversed(range(T)):
                logits = net.decoders[k](z)
                if k == 0:
                    pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)
                else:
                    z = pyro.sample(f"z{k}", dist.Bernoulli(logits=logits).to_event(1))

    def guide(self, x):
        net = self.net
        pyro.module("encoders", net.encoders)
        with pyro.plate("data", x.shape[0], dim=-1):
            h = x
            for k, enc in enumerate(net.encoders):
                h = pyro.sample(f"z{k + 1}", dist.Bernoulli(logits=enc(h)).to_event(1))


def build_pyro_sbn(name: str, x_mean: torch.Tensor | None = None):
    """The Pyro SBN (``.model`` / ``.guide``) called ``name``."""
    if _build_sbn is not None:
        return _build_sbn(name, x_mean=x_mean)
    layers, hidden = MODEL_LAYERS[name]
    return _StandInSBN(build_plain_sbn(layers, 784, x_mean, hidden))


def plain_from_pyro(sbn) -> PlainSBN:
    """
    A :class:`PlainSBN` sharing the parameters of the Pyro SBN ``sbn`` (same init, same modules).

    Used to start the plain ARM step from the same parameters as the Pyro one, and to evaluate
    both with the same code.
    """
    if isinstance(sbn, _StandInSBN):
        return sbn.net
    return _plain_view_of_real_sbn(sbn)


class _Map(torch.nn.Module):
    """One map of :class:`pyro_arm.models.SigmoidBeliefNet`: Linear (LeakyReLU Linear)*."""

    def __init__(self, layers: torch.nn.ModuleList, negative_slope: float):
        super().__init__()
        self.layers = layers
        self.negative_slope = negative_slope

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            if i > 0:
                h = torch.nn.functional.leaky_relu(h, self.negative_slope)
            h = layer(h)
        return h


def _plain_view_of_real_sbn(sbn) -> PlainSBN:
    slope = sbn.negative_slope
    return PlainSBN(
        [_Map(m, slope) for m in sbn.encoders],
        [_Map(m, slope) for m in sbn.decoders],
        sbn.prior_logits,
    )


def move_to(module: torch.nn.Module, device) -> torch.nn.Module:
    """``module.to(device)`` that also works where a model overrides ``nn.Module._apply``."""
    if str(device) == "cpu":
        return module
    for p in module.parameters():
        p.data = p.data.to(device)
    return module


def copy_of_plain(sbn) -> PlainSBN:
    """An independent copy of the parameters of ``sbn`` (Pyro or plain) as a :class:`PlainSBN`."""
    import copy

    plain = sbn if isinstance(sbn, PlainSBN) else plain_from_pyro(sbn)
    return copy.deepcopy(plain)


# ---------------------------------------------------------------------------------- contenders


def pyro_loss(kind: str, num_particles: int = 1):
    """A Pyro ELBO: ``trace_elbo``, ``tracegraph_elbo``, ``<estimator>_seq`` or ``_vec``."""
    if kind == "trace_elbo":
        return Trace_ELBO(num_particles=num_particles, max_plate_nesting=1)
    if kind == "tracegraph_elbo":
        return TraceGraph_ELBO(num_particles=num_particles, max_plate_nesting=1)
    estimator, mode = kind.rsplit("_", 1)
    if TraceARM_ELBO is None:
        raise RuntimeError("pyro_arm.TraceARM_ELBO is not available")
    return TraceARM_ELBO(
        num_particles=num_particles,
        max_plate_nesting=1,
        vectorize_particles=(mode == "vec"),
        estimator=estimator,
    )


def available_contenders(include_plain: bool = True) -> list[str]:
    """Every contender name this installation can run."""
    names = ["trace_elbo", "tracegraph_elbo"]
    if TraceARM_ELBO is not None:
        names += [f"{e}_{m}" for m in ("seq", "vec") for e in ESTIMATORS]
    if include_plain:
        names += [f"plain_{e}" for e in ESTIMATORS]
    return names


@dataclass
class Contender:
    """A training step on its own copy of the model: ``step(x) -> loss``."""

    name: str
    step: Callable[[torch.Tensor], float]
    params: Callable[[], Iterable[tuple[str, torch.nn.Parameter]]]
    grad_only: Callable[[torch.Tensor], None]


def make_contender(
    name: str, model_name: str, x_mean, lr: float = 1e-3, seed: int = 0, device="cpu", init=None
) -> Contender:
    """
    ``name`` on a fresh SBN ``model_name`` (initialised from ``seed``, or from the parameters of
    the Pyro SBN ``init`` when given).

    Pyro contenders run ``SVI.step``; plain ones :class:`PlainARMStep` with ``torch.optim.Adam``.
    ``grad_only(x)`` leaves the gradient in ``.grad`` without stepping (for variance).
    """
    torch.manual_seed(seed)
    if name.startswith("plain_"):
        estimator = name.split("_", 1)[1]
        plain = (
            copy_of_plain(init)
            if init is not None
            else copy_of_plain(build_pyro_sbn(model_name, x_mean))
        )
        move_to(plain, device)
        step = PlainARMStep(plain, torch.optim.Adam(plain.parameters(), lr=lr), estimator)

        def grad_only(x):
            from plain_arm import arm_surrogate_loss

            plain.zero_grad(set_to_none=True)
            arm_surrogate_loss(plain, x, estimator)[0].backward()

        return Contender(name, step, lambda: plain.named_parameters(), grad_only)

    sbn = build_pyro_sbn(model_name, x_mean)
    if init is not None:
        sbn.load_state_dict(init.state_dict())
    move_to(sbn, device)
    loss = pyro_loss(name)
    # Each contender keeps its own param store contents so that contenders never share
    # parameters (PyroModule and pyro.module sync with the global store by name).
    store = {"_params": {}, "_constraints": {}, "_param_to_name": {}}
    svi = SVI(sbn.model, sbn.guide, Adam({"lr": lr}), loss=loss)

    def run(fn):
        glob = pyro.get_param_store()
        saved = {k: getattr(glob, k) for k in store}
        for k, v in store.items():
            setattr(glob, k, v)
        try:
            return fn()
        finally:
            for k, v in saved.items():
                setattr(glob, k, v)

    def step(x):
        return run(lambda: svi.step(x))

    def grad_only(x):
        def go():
            for p in sbn.parameters():
                p.grad = None
            loss.loss_and_grads(sbn.model, sbn.guide, x)

        run(go)

    return Contender(name, step, lambda: sbn.named_parameters(), grad_only)


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
) -> dict[str, list[float]]:
    """
    Seconds per call of every function, interleaved: each round calls every function once, in a
    fresh random order, so that load on a shared machine hits all contenders alike.
    """
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
            t0 = time.perf_counter()
            fns[n]()
            sync()
            times[n].append(time.perf_counter() - t0)
    return times


def median_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of the per-round ratio ``num / den``."""
    return statistics.median(a / b for a, b in zip(num, den))


def set_threads(threads: int | None, device: str) -> None:
    if device == "cpu":
        torch.set_num_threads(threads or 2)


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


def emit_json(record: dict, path: str | None) -> None:
    """Prints ``record`` as one JSON line (and writes it to ``path`` when given)."""
    line = json.dumps(record, sort_keys=True)
    print(line)
    if path:
        Path(path).write_text(line + "\n")


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "stand_in_models": _build_sbn is None,
        "stand_in_data": _load_mnist is None,
    }
