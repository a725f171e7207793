# SPDX-License-Identifier: Apache-2.0
"""
A noisy-OR network on binarized handwritten digits, guided by ``AutoDiscrete`` and trained with
``TraceARM_ELBO``: no guide written by hand.

The noisy-OR model, long used in diagnosis networks (QMR-DT) and for binary data with hidden
causes, explains each 8x8 binarized digit of scikit-learn's digits data (1,797 images) by K
binary hidden sources z_k that each turn pixel d on with probability w_kd, independently, plus
a leak:

    z_k ~ Bernoulli(sigmoid(a_k)),
    P(x_d = 0 | z) = (1 - leak_d) prod_k (1 - w_kd)^(z_k).

The sources' prior logits a, the weights w and the leaks are learned by maximizing the ELBO
(variational EM); ``AutoDiscrete`` gives every image its own free logits for its K sources
(a mean-field guide at the full size of the data plate, read at the subsample of each step).
The figure shows the learned sources (w_k as an image) and the training -ELBO.

Usage::

    python examples/noisy_or.py --out noisy_or.png
    python examples/noisy_or.py --smoke
"""

import argparse
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI

from pyro_arm import AutoDiscrete, TraceARM_ELBO


def load_data():
    """scikit-learn's digits, binarized at half intensity: (1797, 64) in {0, 1}."""
    from sklearn.datasets import load_digits

    return (torch.tensor(load_digits().data) >= 8).float()


def model(x, num_sources, batch_size):
    num_pixels = x.shape[-1]
    source_logits = pyro.param("source_logits", torch.full((num_sources,), -1.0))
    weight_logits = pyro.param("weight_logits", -2.0 + 0.5 * torch.randn(num_sources, num_pixels))
    leak_logits = pyro.param("leak_logits", torch.full((num_pixels,), -4.0))
    with pyro.plate("data", x.shape[0], subsample_size=batch_size) as index:
        z = pyro.sample("z", dist.Bernoulli(logits=source_logits).to_event(1))
        # log P(x_d = 0 | z) = log(1 - leak_d) + sum_k z_k log(1 - w_kd)
        log_off = -torch.nn.functional.softplus(leak_logits) - z @ torch.nn.functional.softplus(
            weight_logits
        )
        logits_on = torch.log(-torch.expm1(log_off)) - log_off
        pyro.sample("x", dist.Bernoulli(logits=logits_on).to_event(1), obs=x[index])


def plot(weights, losses, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = weights.shape[0]
    cols = min(k, 8)
    rows = (k + cols - 1) // cols
    fig = plt.figure(figsize=(1.2 * cols + 3.5, 1.3 * rows + 0.4))
    grid = fig.add_gridspec(rows, cols + 3)
    for i in range(k):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        ax.imshow(weights[i].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
    ax = fig.add_subplot(grid[:, cols:])
    ax.plot(losses)
    ax.set_xlabel("step")
    ax.set_ylabel("-ELBO per image (nats, running mean)")
    ax.yaxis.set_label_position("right")
    ax.yaxis.tick_right()
    fig.suptitle("Noisy-OR sources learned from the digits (w_k as 8x8 images)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    print(f"saved {path}")


def main(args):
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    x = load_data()
    guide = AutoDiscrete(model)
    elbo = TraceARM_ELBO(
        estimator=args.estimator,
        num_particles=args.num_particles,
        vectorize_particles=args.num_particles > 1,
    )
    optim = pyro.optim.Adam({"lr": args.lr})
    svi = SVI(model, guide, optim, elbo)
    losses, running = [], None
    start = time.perf_counter()
    for step in range(args.num_steps):
        loss = svi.step(x, args.num_sources, args.batch_size) / x.shape[0]
        running = loss if running is None else 0.99 * running + 0.01 * loss
        losses.append(running)
        if step % max(1, args.num_steps // 10) == 0 or step == args.num_steps - 1:
            print(f"step {step:5d}  -ELBO per image {running:8.3f}", flush=True)
    seconds = time.perf_counter() - start
    weights = -torch.expm1(-torch.nn.functional.softplus(pyro.param("weight_logits").detach()))
    usage = guide.probs()["z"].mean(0)
    print(f"{args.num_steps} steps in {seconds:.1f} s")
    print("mean posterior usage of each source:", " ".join(f"{u:.2f}" for u in usage.tolist()))
    if args.out:
        plot(weights, losses, args.out)


if __name__ == "__main__":
    assert pyro.__version__.startswith("1.9")
    parser = argparse.ArgumentParser(description="Noisy-OR network on binarized digits")
    parser.add_argument("--num-steps", default=3000, type=int)
    parser.add_argument("--num-sources", default=16, type=int)
    parser.add_argument("--batch-size", default=100, type=int)
    parser.add_argument("--num-particles", default=1, type=int)
    parser.add_argument("--estimator", default="disarm")
    parser.add_argument("--lr", default=0.05, type=float)
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--threads", default=1, type=int)
    parser.add_argument("--out", default=None, help="file for the figure")
    parser.add_argument("--smoke", action="store_true", help="a few steps, for the tests")
    args = parser.parse_args()
    if args.smoke:
        args.num_steps = 20
    main(args)
