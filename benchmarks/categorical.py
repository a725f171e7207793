# SPDX-License-Identifier: Apache-2.0
"""
The categorical VAE (``pyro-arm train --model categorical``: 20 latents of 10 classes): the
encoder's gradient variance at equal model evaluations, and the step cost of the coupled pair
against RLOO with two samples.

On one fixed batch of the embedded binarized MNIST, every contender draws ``--draws`` gradients
at the same parameters (at initialisation, or those of a ``pyro-arm train`` checkpoint with
``--checkpoint``) and the script reports the trace of their covariance over the encoder's
parameters and the squared norm of their mean. Contenders, by evaluations of model and guide
per gradient: ``disarm`` (the coupled pair), ``rloo2``, ``tracegraph2`` (TraceGraph_ELBO, two
particles) at 2; ``arms4`` (CARMS), ``rloo4``, ``tracegraph4`` at 4; ``gumbel2``
(straight-through, biased) at 2.

Then ``--rounds`` rounds of one training step (``loss_and_grads``, vectorized) of ``disarm``
and ``rloo2``, interleaved in a random order per round; the median per-round time ratio.

    python -m benchmarks.categorical --draws 200 --rounds 200

Prints one JSON line (``--json-out`` writes it too).
"""

from __future__ import annotations

import json
import os
import statistics

import pyro
import torch
from pyro.infer import TraceGraph_ELBO

from benchmarks import common
from pyro_arm import TraceARM_ELBO
from pyro_arm.sbn.data import load_mnist
from pyro_arm.sbn.elbo import GumbelELBO
from pyro_arm.sbn.models import CategoricalVAE

#: name -> (ELBO factory, model evaluations per gradient)
CONTENDERS = {
    "disarm": (lambda: TraceARM_ELBO(estimator="disarm", vectorize_particles=True), 2),
    "rloo2": (lambda: TraceARM_ELBO(estimator="rloo", num_samples=2, vectorize_particles=True), 2),
    "tracegraph2": (
        lambda: TraceGraph_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1),
        2,
    ),
    "gumbel2": (
        lambda: GumbelELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1),
        2,
    ),
    "arms4": (lambda: TraceARM_ELBO(estimator="arms", num_samples=4, vectorize_particles=True), 4),
    "rloo4": (lambda: TraceARM_ELBO(estimator="rloo", num_samples=4, vectorize_particles=True), 4),
    "tracegraph4": (
        lambda: TraceGraph_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1),
        4,
    ),
}


def parse_args(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--draws", type=int, default=200, help="gradients per contender")
    p.add_argument("--rounds", type=int, default=200, help="timed steps per contender")
    p.add_argument("--checkpoint", default=None, help="a pyro-arm train checkpoint to load")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS))
    return p.parse_args(argv)


def encoder_gradients(vae, elbo, x, draws: int) -> torch.Tensor:
    """``draws`` flattened gradients of the encoder's parameters, ``(draws, P)``."""
    params = list(vae.encoder.parameters())
    rows = []
    for _ in range(draws):
        for p in vae.parameters():
            p.grad = None
        elbo.loss_and_grads(vae.model, vae.guide, x)
        rows.append(torch.cat([p.grad.reshape(-1) for p in params]).double())
    return torch.stack(rows)


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.setup(args)
    data = load_mnist(args.data, "threshold")
    x = common.fixed_batch(data, args.batch_size, seed=args.seed)
    torch.manual_seed(args.seed)
    vae = CategoricalVAE(x_mean=data.train_pixel_mean())
    if args.checkpoint:
        vae.load_state_dict(torch.load(args.checkpoint, weights_only=False)["model"])
    result = {"state": args.checkpoint or "init", "load": os.getloadavg()[0], "variance": {}}
    for name in args.contenders:
        make, evals = CONTENDERS[name]
        pyro.set_rng_seed(args.seed + 1)
        grads = encoder_gradients(vae, make(), x, args.draws)
        result["variance"][name] = {
            "evals": evals,
            "trace_cov": grads.var(0).sum().item(),
            "mean_sq_norm": grads.mean(0).pow(2).sum().item(),
        }
        print(name, result["variance"][name], flush=True)
    if args.rounds:
        elbos = {name: CONTENDERS[name][0]() for name in ("disarm", "rloo2")}

        def step(elbo):
            return lambda: elbo.loss_and_grads(vae.model, vae.guide, x)

        times = common.interleaved_times(
            {n: step(e) for n, e in elbos.items()}, args.rounds, warmup=5, seed=args.seed
        )
        result["step_ms"] = {n: 1e3 * statistics.median(t) for n, t in times.items()}
        result["step_ratio_disarm_rloo2"] = common.median_ratio(times["disarm"], times["rloo2"])
        result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result))
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
