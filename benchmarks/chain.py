# SPDX-License-Identifier: Apache-2.0
"""
Cost as the number of Bernoulli sites grows: a binary Markov chain of T sites (batch 16, one
``pyro.sample`` per step in ``pyro.markov``, mean-field guide). Prints ms per ``loss_and_grads``
of Trace_ELBO, TraceGraph_ELBO and DisARM in its default mode (its branches batched under the
read guard once the first call has proven the code path) and vectorized, interleaved in one
process, and the ratios to Trace_ELBO.

    python -m benchmarks.chain --sites 10 50 100 --repeats 20
"""

from __future__ import annotations

import argparse
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO, TraceGraph_ELBO

from pyro_arm import TraceARM_ELBO


def chain(num_sites: int, batch: int = 16):
    data = torch.ones(batch, num_sites)

    def model():
        with pyro.plate("batch", batch, dim=-1):
            z = torch.zeros(batch)
            for t in pyro.markov(range(num_sites)):
                z = pyro.sample(f"z_{t}", dist.Bernoulli(logits=2 * z - 1))
                pyro.sample(f"x_{t}", dist.Normal(z, 1.0), obs=data[:, t])

    def guide():
        phi = pyro.param("phi", torch.zeros(num_sites, batch))
        with pyro.plate("batch", batch, dim=-1):
            for t in pyro.markov(range(num_sites)):
                pyro.sample(f"z_{t}", dist.Bernoulli(logits=phi[t]))

    return model, guide


def contenders() -> dict:
    return {
        "Trace_ELBO": lambda: Trace_ELBO(),
        "TraceGraph_ELBO": lambda: TraceGraph_ELBO(),
        "DisARM default": lambda: TraceARM_ELBO(estimator="disarm"),
        "DisARM vectorized": lambda: TraceARM_ELBO(estimator="disarm", vectorize_particles=True),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    print(f"{'T':>4} " + " ".join(f"{name:>18}" for name in contenders()) + "  (ms; x Trace_ELBO)")
    for num_sites in args.sites:
        model, guide = chain(num_sites)
        elbos = {name: make() for name, make in contenders().items()}
        times = {name: [] for name in elbos}
        for elbo in elbos.values():  # warm-up: guesses, probes
            pyro.clear_param_store()
            elbo.loss_and_grads(model, guide)
            elbo.loss_and_grads(model, guide)
        for _ in range(args.repeats):
            for name, elbo in elbos.items():
                start = time.perf_counter()
                elbo.loss_and_grads(model, guide)
                times[name].append(time.perf_counter() - start)
        ms = {name: 1000 * sorted(t)[len(t) // 2] for name, t in times.items()}
        base = ms["Trace_ELBO"]
        cells = " ".join(f"{ms[n]:8.1f} ({ms[n] / base:5.2f}x)" for n in elbos)
        print(f"{num_sites:>4} {cells}")


if __name__ == "__main__":
    main()
