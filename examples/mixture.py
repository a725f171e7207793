# SPDX-License-Identifier: Apache-2.0
"""
A Gaussian mixture with an enumerated assignment and a binary outlier indicator per datapoint:
``TraceARM_ELBO`` against Pyro's ``TraceEnum_ELBO``.

The model is that of Pyro's Gaussian mixture tutorial (K components, global weights, locs and a
shared scale, each datapoint's assignment summed out by enumeration), with one more latent per
datapoint: an outlier indicator that inflates the datapoint's scale,

    weights ~ Dirichlet(1),  scale ~ LogNormal(0, 2),  locs_k ~ Normal(0, 10),
    outlier_prob ~ Beta(1, 9),
    outlier_n ~ Bernoulli(outlier_prob),  assignment_n ~ Categorical(weights),
    x_n ~ Normal(locs[assignment_n], scale * inflation^outlier_n).

(The tutorial's Dirichlet(0.5) prior on the weights has no MAP: its density grows without bound
as a weight goes to 0.)

The guide is the tutorial's: ``AutoDelta`` (MAP) for the globals, no guide site for the
assignment (summed out in the model, ``infer={"enumerate": "parallel"}``); and one free
Bernoulli logit per datapoint for the outlier indicator. The data are synthetic, drawn from the
model with known parameters.

``TraceEnum_ELBO`` sums the assignment out as ``TraceARM_ELBO`` does, and samples the outlier
indicator, giving its logits the score-function gradient (plate-local: datapoint n's terms
only); ``TraceARM_ELBO`` gives them DisARM's (or RLOO's) antithetic gradient. The contenders run
the same number of model evaluations per step: one DisARM pair, RLOO with 2 samples and
``TraceEnum_ELBO`` with 2 particles each evaluate model and guide twice (``TraceEnum_ELBO`` with
1 particle, once, is a contender too).

Exact reference: the outlier indicator is local to its datapoint, so the ELBO has a closed form
(``exact_elbo``: both of its values summed out in each datapoint), which the script checks
against ``TraceEnum_ELBO`` with the indicator enumerated in the guide too. The script

1. checks at the initial point that every contender's loss and outlier-logit gradient are
   unbiased (the means of many calls against the exact values, in standard errors), and reports
   the variance of that gradient (the trace of its covariance over the datapoints);
2. trains each contender for the same step time, their steps alternating (so that each step's
   time is measured under the same load), recording the exact ELBO against step time;
3. reports the best ELBO found by L-BFGS on the closed form from every trained point, and the
   gradient variance again at the points that DisARM's and ``TraceEnum_ELBO``'s (2 particles)
   trainings reached.

Usage::

    python examples/mixture.py --out mixture.png
    python examples/mixture.py --smoke
"""

import argparse
import math
import os
import time

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta, init_to_value
from pyro.ops.indexing import Vindex

from pyro_arm import TraceARM_ELBO

GLOBALS = ["weights", "outlier_prob", "scale", "locs"]


def make_data(num_data, seed=0):
    """Data drawn from the model with known parameters; returns the data and the indicators."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.tensor([0.3, 0.5, 0.2])
    locs, scale, outlier_prob, inflation = torch.tensor([-4.0, 0.0, 5.0]), 0.7, 0.1, 5.0
    assignment = torch.multinomial(weights, num_data, replacement=True, generator=gen)
    outlier = (torch.rand(num_data, generator=gen) < outlier_prob).float()
    noise = torch.randn(num_data, generator=gen)
    return locs[assignment] + scale * inflation**outlier * noise, outlier


def model(data, num_components=3, inflation=5.0):
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(num_components)))
    outlier_prob = pyro.sample("outlier_prob", dist.Beta(1.0, 9.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", num_components):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        outlier = pyro.sample("outlier", dist.Bernoulli(outlier_prob))
        assignment = pyro.sample(
            "assignment", dist.Categorical(weights), infer={"enumerate": "parallel"}
        )
        # locs' batch dims (particles, when vectorized) sit left of the data plate's
        loc = Vindex(locs.unsqueeze(-2))[..., assignment]
        pyro.sample("obs", dist.Normal(loc, scale * inflation**outlier), obs=data)


class Guide:
    """``AutoDelta`` for the globals and a free Bernoulli logit per datapoint for the outlier
    indicator; ``enumerate_outlier=True`` marks the indicator for enumeration (the exact ELBO
    under ``TraceEnum_ELBO``)."""

    def __init__(self, data, num_components=3, enumerate_outlier=False):
        quantiles = torch.linspace(0.5 / num_components, 1 - 0.5 / num_components, num_components)
        init = dict(
            weights=torch.ones(num_components) / num_components,
            outlier_prob=torch.tensor(0.1),
            scale=data.std() / num_components,
            locs=data.quantile(quantiles),
        )
        self.globals = AutoDelta(
            poutine.block(model, expose=GLOBALS), init_loc_fn=init_to_value(values=init)
        )
        self.num_data = len(data)
        self.init_logit = init["outlier_prob"].logit().item()  # q(outlier) starts at the prior's
        self.infer = {"enumerate": "parallel"} if enumerate_outlier else {}

    def __call__(self, data, *args):
        self.globals(data, *args)
        logits = pyro.param("outlier_logits", torch.full((self.num_data,), self.init_logit))
        with pyro.plate("data", len(data)):
            pyro.sample("outlier", dist.Bernoulli(logits=logits), infer=self.infer)

    def params(self):
        """The globals' values and the outlier logits (in the current param store scope)."""
        values = {k: v.detach() for k, v in self.globals.median().items()}
        return values, pyro.param("outlier_logits").detach()


def exact_elbo(values, logits, data, inflation=5.0):
    """The closed-form ELBO: log p of the globals (the MAP guide's log q is 0) and, for each
    datapoint, both values of the outlier indicator and every assignment summed out."""
    w, rho, scale, locs = (values[k] for k in GLOBALS)
    log_prior = (
        dist.Dirichlet(torch.ones_like(w)).log_prob(w)
        + dist.Beta(1.0, 9.0).log_prob(rho)
        + dist.LogNormal(0.0, 2.0).log_prob(scale)
        + dist.Normal(0.0, 10.0).log_prob(locs).sum()
    )
    z = torch.tensor([0.0, 1.0]).unsqueeze(-1)  # (2, 1): both values, against (N,) datapoints
    log_q = torch.stack([F.logsigmoid(-logits), F.logsigmoid(logits)])  # (2, N)
    log_p_z = dist.Bernoulli(rho).log_prob(z)
    comp = dist.Normal(locs, scale * inflation ** z.unsqueeze(-1))  # (2, 1, K)
    log_lik = (w.log() + comp.log_prob(data.unsqueeze(-1))).logsumexp(-1)  # (2, N)
    return log_prior + (log_q.exp() * (log_p_z + log_lik - log_q)).sum()


def unconstrained(values, logits):
    """An unconstrained parametrization of the closed form's arguments, for L-BFGS."""
    return [
        values["weights"].log(),
        values["outlier_prob"].logit(),
        values["scale"].log(),
        values["locs"],
        logits,
    ]


def constrained(w_log, rho_logit, scale_log, locs, logits):
    values = dict(
        weights=w_log.softmax(-1),
        outlier_prob=rho_logit.sigmoid(),
        scale=scale_log.exp(),
        locs=locs,
    )
    return values, logits


def best_elbo(starts, data, max_iter=500):
    """The best local maximum of the closed-form ELBO that L-BFGS reaches from ``starts``."""
    best = -math.inf
    for start in starts:
        params = [t.detach().double().clone().requires_grad_() for t in unconstrained(*start)]
        optim = torch.optim.LBFGS(
            params, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
            line_search_fn="strong_wolfe",
        )  # fmt: skip

        def closure(optim=optim, params=params):
            optim.zero_grad()
            loss = -exact_elbo(*constrained(*params), data.double())
            loss.backward()
            return loss

        optim.step(closure)
        best = max(best, -closure().item())
    return best


def contenders():
    """name -> ELBO; model and guide run twice per step in each but the last."""
    enum = dict(max_plate_nesting=1)
    elbos = {
        "TraceARM_ELBO disarm": TraceARM_ELBO(estimator="disarm", **enum),
        "TraceARM_ELBO rloo-2": TraceARM_ELBO(
            estimator="rloo", num_samples=2, vectorize_particles=True, **enum
        ),
        "TraceEnum_ELBO, 2 particles": TraceEnum_ELBO(
            num_particles=2, vectorize_particles=True, **enum
        ),
        "TraceEnum_ELBO, 1 particle": TraceEnum_ELBO(**enum),
    }
    return elbos


def gradient_draws(elbo, guide, data, repeats):
    """``repeats`` calls of ``elbo.loss_and_grads`` at the current parameters: the losses (R,)
    and the gradients of the outlier logits (R, N)."""
    logits = pyro.param("outlier_logits").unconstrained()
    losses, grads = [], []
    for _ in range(repeats):
        for p in pyro.get_param_store().values():
            p.unconstrained().grad = None
        losses.append(elbo.loss_and_grads(model, guide, data))
        grads.append(logits.grad.detach().clone())
    return torch.tensor(losses), torch.stack(grads)


def exact_logit_grad(guide, data):
    """The gradient of the exact loss (-ELBO) with respect to the outlier logits."""
    values, logits = guide.params()
    logits = logits.clone().requires_grad_()
    (-exact_elbo(values, logits, data)).backward()
    return logits.grad


def variance_table(elbos, guide, data, repeats, check):
    """Per contender: the trace of the covariance of the outlier logits' gradient over
    ``repeats`` calls at the current parameters; with ``check``, also the z-score of the mean
    loss and the root mean square of the gradient mean's z-scores against the exact values."""
    values, logits = guide.params()
    exact_loss = -exact_elbo(values, logits, data).item()
    exact_grad = exact_logit_grad(guide, data)
    rows = {}
    for name, elbo in elbos.items():
        losses, grads = gradient_draws(elbo, guide, data, repeats)
        var = grads.var(0)
        row = dict(variance=var.sum().item())
        if check:
            loss_z = (losses.mean().item() - exact_loss) / (losses.std().item() / repeats**0.5)
            varies = var > 0  # a datapoint whose draws all agree has no z-score
            grad_z = (grads.mean(0) - exact_grad)[varies] / (var[varies] / repeats).sqrt()
            row.update(loss_z=loss_z, grad_rms_z=grad_z.pow(2).mean().sqrt().item())
        rows[name] = row
    return exact_loss, rows


def print_variances(title, exact_loss, rows, reference):
    print(f"\n{title} (exact loss {exact_loss:.3f})")
    base = rows[reference]["variance"]
    for name, row in rows.items():
        line = f"  {name:30s} tr Cov {row['variance']:11.4g}  ratio to {reference}: "
        line += f"{row['variance'] / base if base else math.inf:8.3g}"
        if "loss_z" in row:
            line += f"   loss z {row['loss_z']:+.2f}   gradient rms z {row['grad_rms_z']:.2f}"
        print(line)


def train(elbos, data, seconds, lr, num_points):
    """
    Trains one guide per ELBO, each in its own param scope, alternating steps until each has
    run ``seconds`` of its own step time; the exact ELBO is recorded (untimed) ``num_points``
    times along the way. Returns name -> dict(guide, scope, steps, seconds, step_times, curve).
    """
    store = pyro.get_param_store()
    torch.optim.Adam([torch.zeros(1)])  # its first construction imports torch._dynamo: untimed
    runs = {}
    for name, elbo in elbos.items():
        with store.scope() as scope:
            guide = Guide(data)
            guide(data)
            optim = pyro.optim.Adam({"lr": lr})
            runs[name] = dict(svi=SVI(model, guide, optim, elbo), guide=guide, scope=scope)
            runs[name].update(steps=0, seconds=0.0, step_times=[])
            runs[name]["curve"] = [(0.0, 0, exact_elbo(*guide.params(), data).item())]
    while any(run["seconds"] < seconds for run in runs.values()):
        for run in runs.values():
            if run["seconds"] >= seconds:
                continue
            with store.scope(run["scope"]):
                start = time.perf_counter()
                run["svi"].step(data)
                elapsed = time.perf_counter() - start
                run["seconds"] += elapsed
                run["step_times"].append(elapsed)
                run["steps"] += 1
                due = seconds * len(run["curve"]) / num_points
                if run["seconds"] >= due or run["seconds"] >= seconds:
                    elbo = exact_elbo(*run["guide"].params(), data).item()
                    run["curve"].append((run["seconds"], run["steps"], elbo))
    for run in runs.values():
        del run["svi"]
    return runs


def plot(runs, best, variances, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    for name, run in runs.items():
        t, _, elbo = zip(*run["curve"])
        ax.plot(t, [max(best - e, 1e-3) for e in elbo], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step time (s), steps alternating")
    ax.set_ylabel("best ELBO found - exact ELBO (nats)")
    ax.set_title("Training at equal time", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    names = list(variances[0][1])
    width = 0.8 / len(variances)
    for k, (label, rows) in enumerate(variances):
        x = torch.arange(len(names)) + (k - (len(variances) - 1) / 2) * width
        ax.bar(x, [rows[n]["variance"] for n in names], width, label=label)
    ax.set_xticks(range(len(names)), [n.replace(" ", "\n", 1) for n in names], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("tr Cov of the outlier logits' gradient")
    ax.set_title("Gradient variance", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    print(f"\nsaved {path}")


def main(args):
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    data, outlier = make_data(args.num_data, args.seed)
    print(f"{args.num_data} datapoints, {int(outlier.sum())} drawn as outliers")
    elbos = contenders()
    reference = next(iter(elbos))
    store = pyro.get_param_store()

    # the closed form against TraceEnum_ELBO with the indicator enumerated in the guide too
    with store.scope():
        guide = Guide(data)
        guide(data)
        initial_point = guide.params()
        closed = exact_elbo(*initial_point, data).item()
        enum_guide = Guide(data, enumerate_outlier=True)
        enumerated = -TraceEnum_ELBO(max_plate_nesting=1).loss(model, enum_guide, data)
        print(
            f"exact ELBO at the initial point: closed form {closed:.4f}, TraceEnum_ELBO with the "
            f"indicator enumerated {enumerated:.4f}"
        )
        # 1. unbiasedness and gradient variance at the initial point
        init = variance_table(elbos, guide, data, args.repeats, check=True)
    print_variances(
        f"Initial point, {args.repeats} calls each: loss and outlier-logit gradient", *init,
        reference,
    )  # fmt: skip

    # 2. training at equal step time, steps alternating
    runs = train(elbos, data, args.seconds, args.lr, args.num_points)
    starts = [initial_point]
    for run in runs.values():
        with store.scope(run["scope"]):
            starts.append(run["guide"].params())
    best = best_elbo(starts, data)
    print(
        f"\nTraining for {args.seconds:.0f} s of step time each, Adam lr {args.lr}, "
        "steps alternating"
    )
    print(f"  best ELBO found (L-BFGS on the closed form from every end point): {best:.3f}")
    ms = {name: 1e3 * torch.tensor(run["step_times"]).median().item() for name, run in runs.items()}
    for name, run in runs.items():
        t, steps, elbo = run["curve"][-1]
        quarter = next(e for s, _, e in run["curve"] if s >= args.seconds / 4)
        half = next(e for s, _, e in run["curve"] if s >= args.seconds / 2)
        print(
            f"  {name:30s} {steps:6d} steps, median {ms[name]:6.2f} ms/step "
            f"({ms[name] / ms[reference]:.2f}x; first step {1e3 * run['step_times'][0]:.0f} ms), "
            f"exact ELBO at 1/4, 1/2, all of the time: {quarter:.3f} {half:.3f} {elbo:.3f}"
        )
    print("  gap to the best ELBO found over the second half of the time (nats):")
    for name, run in runs.items():
        gaps = torch.tensor([best - e for s, _, e in run["curve"] if s >= args.seconds / 2])
        print(
            f"  {name:30s} mean {gaps.mean():.3f}, from {gaps.min():.3f} to {gaps.max():.3f} "
            f"({len(gaps)} points)"
        )

    # 3. gradient variance at the points that DisARM's and TraceEnum_ELBO's trainings reached
    variances = [("initial point", init[1])]
    for name in (reference, "TraceEnum_ELBO, 2 particles"):
        with store.scope(runs[name]["scope"]):
            trained = variance_table(elbos, runs[name]["guide"], data, args.repeats, check=False)
        print_variances(f"At {name}'s end point, {args.repeats} calls each", *trained, reference)
        variances.append((f"{name.split(',')[0]}'s end point", trained[1]))
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.out:
        plot(runs, best, variances, args.out)


if __name__ == "__main__":
    assert pyro.__version__.startswith("1.9")
    parser = argparse.ArgumentParser(description="Gaussian mixture with outlier indicators")
    parser.add_argument("--num-data", default=300, type=int)
    parser.add_argument(
        "--repeats", default=500, type=int, help="calls per contender for the gradient variance"
    )
    parser.add_argument(
        "--seconds", default=60.0, type=float, help="training step time of each contender"
    )
    parser.add_argument("--num-points", default=60, type=int, help="points of each curve")
    parser.add_argument("--lr", default=0.05, type=float, help="Adam's learning rate")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--threads", default=1, type=int)
    parser.add_argument("--out", default=None, help="file for the figure")
    parser.add_argument("--smoke", action="store_true", help="a few steps, for the tests")
    args = parser.parse_args()
    if args.smoke:
        args.num_data, args.repeats, args.seconds, args.num_points = 40, 10, 1.0, 4
    main(args)
