# SPDX-License-Identifier: Apache-2.0
"""
Bayesian variable selection with a spike-and-slab prior, guided by ``AutoGuideList(AutoNormal,
AutoDiscrete)`` and trained with ``TraceARM_ELBO``.

The data are scikit-learn's diabetes data (442 patients, 10 covariates, and disease progression
after a year as the response), standardized, with the 45 pairwise interactions and the 9
squares (all but sex's): p = 64 candidate features. Each feature has an inclusion indicator and
a slab coefficient (the Kuo-Mallick form of the spike and slab),

    gamma_j ~ Bernoulli(prior_inclusion),  beta_j ~ Normal(0, slab_scale),
    y_n ~ Normal(sum_j x_nj gamma_j beta_j, sigma),

with the noise scale sigma fixed at the residual scale of the least-squares fit. The guide is
mean field: ``AutoNormal`` for beta, ``AutoDiscrete`` for gamma, whose ``probs()`` are the
posterior inclusion probabilities (PIPs).

Exact references:

- For this model and guide the ELBO has a closed form (a Gaussian log-likelihood's expectation
  under independent gamma_j beta_j): the script gives every trained guide its exact ELBO, and
  finds the mean-field optimum by L-BFGS on the closed form (several starts, the best kept).
- On the 10 main effects (2^10 models), the exact posterior PIPs, from the closed-form marginal
  likelihood of every gamma (beta integrated out). With beta integrated out the model's only
  latents are the gammas (``collapsed_model``); ``AutoDiscrete`` alone guides it, and the
  optimum of its mean-field family is found by L-BFGS on the enumerated ELBO.

The mean-field spike and slab has several local optima: the guide starts with every feature
likely in (``AutoDiscrete(..., init_logits=...)``, ``--init-inclusion``), so that each
coefficient's guide learns before its indicator is decided. The script also reports the local
optimum that L-BFGS reaches from the trained guide.

Finally it compares ``TraceARM_ELBO`` (DisARM) with Pyro's ``TraceGraph_ELBO`` on the same guide
and all 64 features at equal time (the two runs alternate, each step timed), and plots the PIPs.

Usage::

    python examples/variable_selection.py --out pips.png
    python examples/variable_selection.py --smoke
"""

import argparse
import itertools
import math
import time

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceGraph_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal

from pyro_arm import AutoDiscrete, TraceARM_ELBO


def load_data(interactions: bool = True):
    """Standardized diabetes covariates (with interactions and squares) and response."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    X = torch.tensor(data.data, dtype=torch.float64)
    X = (X - X.mean(0)) / X.std(0)
    names = list(data.feature_names)
    columns, labels = [X], list(names)
    if interactions:
        for i, j in itertools.combinations_with_replacement(range(X.shape[1]), 2):
            if i == j and names[i] == "sex":  # binary: its square adds nothing
                continue
            columns.append((X[:, i] * X[:, j]).unsqueeze(-1))
            labels.append(f"{names[i]}^2" if i == j else f"{names[i]}:{names[j]}")
    X = torch.cat(columns, -1)
    X = (X - X.mean(0)) / X.std(0)
    y = torch.tensor(data.target, dtype=torch.float64)
    y = (y - y.mean()) / y.std()
    return X, y, labels


def residual_scale(X, y):
    """The residual standard deviation of the least-squares fit of y on X."""
    coef = torch.linalg.lstsq(X, y.unsqueeze(-1)).solution.squeeze(-1)
    return ((y - X @ coef).pow(2).sum() / (X.shape[0] - X.shape[1])).sqrt().item()


def model(X, y, sigma, slab_scale, prior_inclusion):
    with pyro.plate("features", X.shape[-1]):
        gamma = pyro.sample("gamma", dist.Bernoulli(prior_inclusion))
        beta = pyro.sample("beta", dist.Normal(0.0, slab_scale))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((gamma * beta) @ X.T, sigma), obs=y)


def make_guide(init_logits=None):
    guide = AutoGuideList(model)
    guide.append(AutoNormal(poutine.block(model, hide=["gamma"])))
    guide.append(AutoDiscrete(poutine.block(model, expose=["gamma"]), init_logits=init_logits))
    return guide


def exact_elbo(logits, loc, scale, X, y, sigma, slab_scale, prior_inclusion):
    """The closed-form ELBO of the mean-field guide Bernoulli(logits) x Normal(loc, scale)."""
    pi = logits.sigmoid()
    mean = pi * loc
    var = pi * (loc**2 + scale**2) - mean**2
    sq = (y - X @ mean).pow(2).sum() + (X.pow(2).sum(0) * var).sum()
    loglik = -0.5 * X.shape[0] * math.log(2 * math.pi * sigma**2) - 0.5 * sq / sigma**2
    log_pi, log_not_pi = (
        torch.nn.functional.logsigmoid(logits),
        torch.nn.functional.logsigmoid(-logits),
    )
    kl_gamma = (
        pi * (log_pi - math.log(prior_inclusion))
        + (1 - pi) * (log_not_pi - math.log(1 - prior_inclusion))
    ).sum()
    kl_beta = (
        math.log(slab_scale) - scale.log() + (scale**2 + loc**2) / (2 * slab_scale**2) - 0.5
    ).sum()
    return loglik - kl_gamma - kl_beta


def collapsed_model(X, y, sigma, slab_scale, prior_inclusion):
    """The same model with beta integrated out: the only latents are the gammas."""
    with pyro.plate("features", X.shape[-1]):
        gamma = pyro.sample("gamma", dist.Bernoulli(prior_inclusion))
    # y | gamma ~ Normal(0, sigma^2 I + slab_scale^2 X diag(gamma) X^T)
    cov_factor = slab_scale * X * gamma[..., None, None, :]
    noise = torch.full_like(y, sigma**2)
    pyro.sample("y", dist.LowRankMultivariateNormal(torch.zeros_like(y), cov_factor, noise), obs=y)


def log_joint_table(X, y, sigma, slab_scale, prior_inclusion):
    """Every gamma in {0, 1}^p and its log p(y, gamma), beta integrated out (Woodbury)."""
    p = X.shape[1]
    gammas = torch.tensor(list(itertools.product([0.0, 1.0], repeat=p)), dtype=X.dtype)
    r = (slab_scale / sigma) ** 2
    G, b = X.T @ X, X.T @ y
    A = torch.eye(p, dtype=X.dtype) + r * gammas.unsqueeze(-1) * G * gammas.unsqueeze(-2)
    gb = gammas * b
    chol = torch.linalg.cholesky(A)
    quad = y @ y - r * (gb.unsqueeze(-2) @ torch.cholesky_solve(gb.unsqueeze(-1), chol)).flatten()
    logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    loglik = -0.5 * (X.shape[0] * math.log(2 * math.pi * sigma**2) + logdet + quad / sigma**2)
    k = gammas.sum(-1)
    logprior = k * math.log(prior_inclusion) + (p - k) * math.log(1 - prior_inclusion)
    return gammas, loglik + logprior


def enumerated_elbo(logits, gammas, log_joint):
    """The exact ELBO of the mean-field guide Bernoulli(logits) over gamma, by enumeration."""
    log_q = gammas @ F.logsigmoid(logits) + (1 - gammas) @ F.logsigmoid(-logits)
    return (log_q.exp() * (log_joint - log_q)).sum()


def maximize(objective, starts, max_iter=500):
    """The best local maximum of ``objective(*params)`` found by L-BFGS from ``starts``."""
    best = None
    for start in starts:
        params = [t.detach().clone().requires_grad_() for t in start]
        optim = torch.optim.LBFGS(
            params, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
            line_search_fn="strong_wolfe",
        )  # fmt: skip

        def closure(optim=optim, params=params):
            optim.zero_grad()
            loss = -objective(*params)
            loss.backward()
            return loss

        optim.step(closure)
        value = -closure().item()
        if best is None or value > best[1]:
            best = ([t.detach() for t in params], value)
    return best


def train(elbos, model, make_guide, X, y, hyper, num_steps=None, seconds=None, lr=0.1):
    """
    Trains one guide per ELBO in ``elbos`` (a dict name -> ELBO), each in its own param scope,
    alternating steps; each stops after ``num_steps`` steps, or ``seconds`` of its own step time.
    The learning rate decays to a hundredth over ``num_steps`` (else over 5000 steps).
    Returns name -> dict(guide, steps, seconds, scope).
    """
    store = pyro.get_param_store()
    runs = {}
    for name, elbo in elbos.items():
        with store.scope() as scope:
            guide = make_guide()
            guide(X, y, *hyper)
            optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.01 ** (1 / (num_steps or 5000))})
            runs[name] = dict(svi=SVI(model, guide, optim, elbo), guide=guide, scope=scope)
            runs[name].update(steps=0, seconds=0.0)

    def going(run):
        if num_steps is not None:
            return run["steps"] < num_steps
        return run["seconds"] < seconds

    while any(going(run) for run in runs.values()):
        for run in runs.values():
            if going(run):
                with store.scope(run["scope"]):
                    start = time.perf_counter()
                    run["svi"].step(X, y, *hyper)
                    run["seconds"] += time.perf_counter() - start
                    run["steps"] += 1
    for run in runs.values():
        del run["svi"]
    return runs


def slab_guide_params(run):
    """The logits of gamma and the loc and scale of beta of a trained AutoGuideList."""
    guide = run["guide"]
    with pyro.get_param_store().scope(run["scope"]):
        return (
            guide[1].logits.gamma.detach().double(),
            guide[0].locs.beta.detach().double(),
            guide[0].scales.beta.detach().double(),
        )


def slab_starts(X, y, hyper, trained):
    """L-BFGS starts on the closed-form ELBO: the guide's own initialization, all features in
    (ridge coefficients), all out, and each trained guide's end point."""
    p = X.shape[1]
    zeros, ones = torch.zeros(p, dtype=X.dtype), torch.ones(p, dtype=X.dtype)
    prior_logit = math.log(hyper[2] / (1 - hyper[2]))
    eye = torch.eye(p, dtype=X.dtype)
    ridge = torch.linalg.solve(X.T @ X + (hyper[0] / hyper[1]) ** 2 * eye, X.T @ y)
    starts = [
        (zeros + prior_logit, zeros, 0.1 * ones),
        (zeros + 3.0, ridge, 0.1 * ones),
        (zeros - 3.0, ridge, 0.1 * ones),
    ] + list(trained)
    return [(logits, loc, scale.log()) for logits, loc, scale in starts]


def slab_elbo_of_log_scale(logits, loc, log_scale, X, y, hyper):
    return exact_elbo(logits, loc, log_scale.exp(), X, y, *hyper)


def slab_comparison(X, y, hyper, args, elbos, seconds=None):
    """Trains AutoGuideList(AutoNormal, AutoDiscrete) with each ELBO; returns name -> (PIPs,
    exact ELBO, steps, seconds), the mean-field optimum included."""
    init_logits = math.log(args.init_inclusion / (1 - args.init_inclusion))
    runs = train(
        elbos, model, lambda: make_guide(init_logits), X.float(), y.float(), hyper,
        num_steps=None if seconds else args.num_steps, seconds=seconds, lr=args.lr,
    )  # fmt: skip
    results, trained = {}, []
    for name, run in runs.items():
        params = slab_guide_params(run)
        trained.append(params)
        elbo = exact_elbo(*params, X, y, *hyper).item()
        results[name] = (params[0].sigmoid(), elbo, run["steps"], run["seconds"])
    objective = lambda *params: slab_elbo_of_log_scale(*params, X, y, hyper)  # noqa: E731
    starts = slab_starts(X, y, hyper, trained)
    (logits, _, _), elbo = maximize(objective, starts)
    results["mean-field optimum"] = (logits.sigmoid(), elbo, None, None)
    # the local optimum that L-BFGS reaches from the first ELBO's end point
    (logits, _, _), elbo = maximize(objective, starts[-len(trained) :][:1])
    results["nearest local optimum"] = (logits.sigmoid(), elbo, None, None)
    return results


def print_table(title, labels, columns, elbos=None):
    print(f"\n{title}")
    if elbos:
        for name, (elbo, steps, seconds) in elbos.items():
            where = "" if steps is None else f"  ({steps} steps, {seconds:.1f} s)"
            print(f"  {name:34s} exact ELBO {elbo:10.3f}{where}")
    names = list(columns)
    print("  " + "PIP".ljust(10) + "".join(n[:24].rjust(25) for n in names))
    for j, label in enumerate(labels):
        print("  " + label.ljust(10) + "".join(f"{columns[n][j].item():25.3f}" for n in names))


def plot(full, labels, subset, sub_labels, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(12, 7.5), gridspec_kw={"height_ratios": [3, 2]})
    for ax, columns, names, title in (
        (axes[0], full, labels, f"All {len(labels)} features (the 24 highest PIPs), equal time"),
        (axes[1], subset, sub_labels, "The 10 main effects, against the exact references"),
    ):
        if ax is axes[0]:
            order = torch.stack(list(columns.values())).amax(0).argsort(descending=True)[:24]
        else:
            order = torch.arange(len(names))
        width = 0.8 / len(columns)
        for k, (name, pips) in enumerate(columns.items()):
            x = torch.arange(len(order)) + (k - (len(columns) - 1) / 2) * width
            ax.bar(x, pips[order], width, label=name)
        ax.set_xticks(range(len(order)), [names[j] for j in order], rotation=60, fontsize=8)
        ax.set_ylabel("inclusion probability")
        ax.set_ylim(0, 1.25)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, ncol=len(columns), loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    print(f"\nsaved {path}")


def main(args):
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)
    X, y, labels = load_data()
    arm = TraceARM_ELBO(
        estimator="disarm", num_particles=args.num_particles, vectorize_particles=True,
        max_plate_nesting=1,
    )  # fmt: skip
    tracegraph = TraceGraph_ELBO(
        num_particles=args.num_particles, vectorize_particles=True, max_plate_nesting=1
    )

    # 1. The 10 main effects (2^10 models): exact references
    Xs, sub_labels = X[:, :10], labels[:10]
    hyper = (residual_scale(Xs, y), args.slab_scale, args.prior_inclusion)
    gammas, log_joint = log_joint_table(Xs, y, *hyper)
    exact = log_joint.softmax(0) @ gammas
    # beta integrated out: AutoDiscrete alone, against the optimum of the enumerated ELBO
    runs = train(
        {"collapsed": arm}, collapsed_model, lambda: AutoDiscrete(collapsed_model),
        Xs.float(), y.float(), hyper, num_steps=args.num_steps, lr=args.collapsed_lr,
    )  # fmt: skip
    collapsed = runs["collapsed"]
    with pyro.get_param_store().scope(collapsed["scope"]):
        logits = collapsed["guide"].logits.gamma.detach().double()
    zeros = torch.zeros(10, dtype=X.dtype)
    starts = [(zeros + v,) for v in (-3.0, 0.0, 3.0)] + [(logits,)]
    (optimum,), optimum_elbo = maximize(lambda l: enumerated_elbo(l, gammas, log_joint), starts)
    # the spike and slab, against the optimum of its closed-form ELBO
    slab = slab_comparison(Xs, y, hyper, args, {"TraceARM_ELBO": arm})
    columns = {
        "exact posterior": exact,
        "collapsed: mean-field opt.": optimum.sigmoid(),
        "collapsed: TraceARM_ELBO": logits.sigmoid(),
        "slab: mean-field opt.": slab["mean-field optimum"][0],
        "slab: TraceARM_ELBO": slab["TraceARM_ELBO"][0],
        "slab: nearest local opt.": slab["nearest local optimum"][0],
    }
    elbos = {
        "log p(y) (exact)": (log_joint.logsumexp(0).item(), None, None),
        "collapsed: mean-field optimum": (optimum_elbo, None, None),
        "collapsed: TraceARM_ELBO": (
            enumerated_elbo(logits, gammas, log_joint).item(), collapsed["steps"],
            collapsed["seconds"],
        ),
        "slab: mean-field optimum": slab["mean-field optimum"][1:],
        "slab: TraceARM_ELBO": slab["TraceARM_ELBO"][1:],
        "slab: nearest local optimum": slab["nearest local optimum"][1:],
    }  # fmt: skip
    print_table(f"Main effects, p = 10, sigma = {hyper[0]:.3f}", sub_labels, columns, elbos)
    for trained, reference in (
        ("collapsed: TraceARM_ELBO", "collapsed: mean-field opt."),
        ("slab: TraceARM_ELBO", "slab: mean-field opt."),
        ("slab: TraceARM_ELBO", "slab: nearest local opt."),
    ):
        gap = (columns[trained] - columns[reference]).abs().max()
        print(f"  largest PIP difference, {trained} from {reference}: {gap:.3f}")
    plotted = {k: v for k, v in columns.items() if "nearest" not in k}

    # 2. All 64 features: TraceARM_ELBO against TraceGraph_ELBO at equal time
    hyper = (residual_scale(X, y), args.slab_scale, args.prior_inclusion)
    full = slab_comparison(
        X, y, hyper, args, {"TraceARM_ELBO": arm, "TraceGraph_ELBO": tracegraph}, args.seconds
    )
    top = full["mean-field optimum"][0].argsort(descending=True)[:12]
    print_table(
        f"Main effects and interactions, p = {X.shape[1]}, sigma = {hyper[0]:.3f}: equal time "
        "(the 12 highest PIPs of the mean-field optimum)",
        [labels[j] for j in top],
        {name: r[0][top] for name, r in full.items()},
        {name: r[1:] for name, r in full.items()},
    )
    if args.out:
        full = {name: r[0] for name, r in full.items() if name != "nearest local optimum"}
        plot(full, labels, plotted, sub_labels, args.out)


if __name__ == "__main__":
    assert pyro.__version__.startswith("1.9")
    parser = argparse.ArgumentParser(description="Spike-and-slab variable selection")
    parser.add_argument(
        "--num-steps", default=3000, type=int, help="training steps on the main effects"
    )
    parser.add_argument(
        "--seconds", default=120.0, type=float,
        help="training time of each ELBO on all features (its own step time)",
    )  # fmt: skip
    parser.add_argument("--num-particles", default=4, type=int)
    parser.add_argument("--lr", default=0.1, type=float, help="Adam's learning rate, decaying")
    parser.add_argument(
        "--collapsed-lr", default=0.3, type=float, help="the same for the collapsed model"
    )
    parser.add_argument(
        "--init-inclusion", default=0.95, type=float,
        help="initial inclusion probabilities of AutoDiscrete in the spike and slab (every "
        "coefficient's guide learns before its indicator is decided; started at the prior "
        "inclusion probability, training settles in sparser local optima)",
    )  # fmt: skip
    parser.add_argument("--slab-scale", default=0.5, type=float)
    parser.add_argument("--prior-inclusion", default=0.1, type=float)
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--threads", default=1, type=int)
    parser.add_argument("--out", default=None, help="file for the figure of the PIPs")
    parser.add_argument("--smoke", action="store_true", help="a few steps, for the tests")
    args = parser.parse_args()
    if args.smoke:
        args.num_steps, args.seconds = 20, 1.0
    main(args)
