# SPDX-License-Identifier: Apache-2.0
"""
Gradient variance of the encoder parameters: TraceARM_ELBO (every estimator, sequential and
vectorized) against Pyro's Trace_ELBO and TraceGraph_ELBO, with the plain-PyTorch ARM step as a
check.

On one fixed batch of binarized MNIST, every contender draws ``--draws`` gradients (interleaved
round by round) at the same parameters; the script reports the trace of their covariance over the
encoder (guide) parameters, the squared norm of their mean, the median time of one gradient
(forward + backward) and variance x time (the variance at equal compute), and the runs of model
and guide per gradient ("evals", see :func:`benchmarks.common.model_evaluations`) with variance x
evals (the variance at equal model evaluations). It does so at
initialisation and after ``--train-steps`` Adam steps of vectorized ARM.

    python -m benchmarks.variance

Prints a markdown table per model and state, and one JSON line (``--json-out`` writes it too).
"""

from __future__ import annotations

import itertools
import statistics
import time

import torch

from benchmarks import common
from pyro_arm.sbn.data import load_mnist
from pyro_arm.sbn.models import build_sbn


def parse_args(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--models", nargs="+", default=["linear", "two_layer"])
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--draws", type=int, default=200, help="gradients per contender and state")
    p.add_argument("--train-steps", type=int, default=1000, help="ARM steps before 'trained'")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--contenders", nargs="+", default=None, help="default: all available")
    args = p.parse_args(argv)
    if args.quick:  # the first model only, at most 20 train steps
        args.models, args.train_steps = args.models[:1], min(args.train_steps, 20)
    return args


class GradStats:
    """Running mean and per-element variance (float64) of flattened gradients."""

    def __init__(self):
        self.n, self.sum, self.sumsq = 0, None, None

    def add(self, g: torch.Tensor) -> None:
        g = g.detach().to(torch.float64).flatten()
        if self.sum is None:
            self.sum, self.sumsq = torch.zeros_like(g), torch.zeros_like(g)
        self.n += 1
        self.sum += g
        self.sumsq += g * g

    def trace_cov(self) -> float:
        mean = self.sum / self.n
        return ((self.sumsq - self.n * mean * mean).sum() / (self.n - 1)).item()

    def mean_sq_norm(self) -> float:
        return ((self.sum / self.n) ** 2).sum().item()


def encoder_grad(contender: common.Contender) -> torch.Tensor:
    """The concatenated gradient of the encoder (guide) parameters."""
    params = dict(contender.params())
    grads = [params[n].grad for n in common.encoder_param_names(contender)]
    return torch.cat([g.flatten() for g in grads])


def measure(contenders, x, draws, sync, seed):
    """``{name: (GradStats, [seconds per gradient])}``, draws interleaved round by round."""
    stats = {c.name: GradStats() for c in contenders}
    fns = {}
    for c in contenders:

        def fn(c=c):
            c.grad_only(x)
            sync()
            return c

        fns[c.name] = fn
    for fn in fns.values():  # warm-up
        fn()
    times = {n: [] for n in fns}
    order = list(fns)
    rng = torch.Generator().manual_seed(seed)
    for _ in range(draws):
        order = [order[i] for i in torch.randperm(len(order), generator=rng)]
        for n in order:
            t0 = time.perf_counter()
            c = fns[n]()
            times[n].append(time.perf_counter() - t0)
            stats[n].add(encoder_grad(c))
    return {n: (stats[n], times[n]) for n in fns}


def train(model_name, x_mean, data, steps, lr, seed, device):
    """A Pyro SBN after ``steps`` steps of vectorized ARM (batch 50) from seed ``seed``."""
    c = common.make_contender("arm_vec", model_name, x_mean, lr=lr, seed=seed, device=device)
    gen = torch.Generator().manual_seed(seed)
    for _, xb in zip(range(steps), common.train_batches(data, 50, gen, device)):
        c.step(xb)
    return c.module


def main(argv=None):
    args = parse_args(argv)
    common.setup(args)
    sync = common.device_sync(args.device)
    data = load_mnist(args.data)
    x_mean = data.train.mean(0)
    x = common.fixed_batch(data, args.batch_size, args.seed, args.device)
    names = args.contenders or common.available_contenders()
    common.check_contenders(names)
    record = {"trace_cov": {}, "mean_sq_norm": {}, "ms_per_grad": {}, "var_x_ms": {}}

    for model_name, state in itertools.product(args.models, ("init", "trained")):
        torch.manual_seed(args.seed)
        init = build_sbn(model_name, x_mean)
        if state == "trained":
            init = train(
                model_name, x_mean, data, args.train_steps, args.lr, args.seed, args.device
            )
        contenders = [
            common.make_contender(
                n, model_name, x_mean, seed=args.seed, device=args.device, init=init
            )
            for n in names
        ]
        results = measure(contenders, x, args.draws, sync, args.seed)
        key = f"{model_name}/{state}"
        for k in record:
            record[k][key] = {}
        rows = []
        layers = common.num_stochastic_layers(init, x)
        ref = results["plain_arm"][0].trace_cov() if "plain_arm" in results else float("nan")
        for n, (st, ts) in results.items():
            var, ms = st.trace_cov(), statistics.median(ts) * 1e3
            record["trace_cov"][key][n] = var
            record["mean_sq_norm"][key][n] = st.mean_sq_norm()
            record["ms_per_grad"][key][n] = ms
            record["var_x_ms"][key][n] = var * ms
            evals = common.model_evaluations(n, layers)
            record.setdefault("evaluations", {}).setdefault(key, {})[n] = evals
            rows.append((n, evals, var, var * evals, var / ref, st.mean_sq_norm(), ms, var * ms))
        steps = 0 if state == "init" else args.train_steps
        common.print_table(
            f"{model_name}, {state} ({steps} ARM steps): encoder-gradient variance, "
            f"batch {args.batch_size}, {args.draws} draws ({args.device})",
            [
                "contender",
                "evals",
                "tr Cov",
                "tr Cov x evals",
                "x plain_arm",
                "|mean|^2",
                "ms/grad",
                "tr Cov x ms",
            ],
            rows,
        )
    return common.finish(
        record,
        "variance",
        args,
        batch_size=args.batch_size,
        draws=args.draws,
        train_steps=args.train_steps,
    )


if __name__ == "__main__":
    main()
