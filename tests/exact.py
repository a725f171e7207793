# SPDX-License-Identifier: Apache-2.0
"""
Exact references for tiny models, and a statistical checker of unbiasedness.

:func:`exact_elbo` enumerates the guide as a tree: it runs the guide under
``poutine.condition`` with the values chosen so far and stops at the first latent site that is
not chosen yet, then branches over every joint value of that site:

- discrete sites (Bernoulli, Categorical, OneHotCategorical, wrapped in ``.expand``, ``.mask``,
  ``.to_event``): every joint value of all the site's components (one-hot: of its class
  indices; ``itertools.product`` over the flattened elements), weighted by the UNSCALED,
  UNMASKED guide probability (masks and scales do not change the sampling distribution);
- reparameterized one-dimensional Normal sites: Gauss-Hermite nodes, ``value = loc + scale *
  node`` so that the pathwise gradient flows through autograd;
- subsample sites of plates with a ``subsample_size``: every subset, with equal weight.

Sites that exist only under some values are discovered as the tree is walked. At each leaf the
model is run under ``poutine.condition`` with the guide's values and ``f = sum of scaled, masked
model log-densities - sum of scaled, masked guide log-densities``. The exact ELBO is the weighted
sum of ``f`` over the leaves; autograd gives the exact gradient of every param.
"""

from __future__ import annotations

import itertools
import math
from statistics import NormalDist
from typing import Callable, NamedTuple

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.distributions.util import sum_rightmost
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import prune_subsample_sites

#: Number of Gauss-Hermite nodes per reparameterized scalar site.
NUM_HERMITE_NODES = 40


class _Branch(Exception):
    """Raised at the first latent guide site that has no value yet."""

    def __init__(self, name: str, options: list):
        super().__init__(name)
        self.name = name
        self.options = options  # list of (value, log_weight)


def _unmasked_log_prob(fn, value: torch.Tensor) -> torch.Tensor:
    """``fn.log_prob(value)`` with every ``Distribution.mask`` removed (the sampling density)."""
    if isinstance(fn, MaskedDistribution):
        return _unmasked_log_prob(fn.base_dist, value)
    if isinstance(fn, dist.Independent):
        lp = _unmasked_log_prob(fn.base_dist, value)
        return sum_rightmost(lp, fn.reinterpreted_batch_ndims)
    if isinstance(fn, dist.ExpandedDistribution):
        return _unmasked_log_prob(fn.base_dist, value)
    return fn.log_prob(value)


def _leaf_distribution(fn):
    while isinstance(fn, (MaskedDistribution, dist.Independent, dist.ExpandedDistribution)):
        fn = fn.base_dist
    return fn


def _element_support(fn) -> list:
    leaf = _leaf_distribution(fn)
    if isinstance(leaf, dist.Bernoulli):
        return [0.0, 1.0]
    if isinstance(leaf, (dist.Categorical, dist.OneHotCategorical)):
        return list(range(leaf.logits.shape[-1]))
    raise NotImplementedError(f"exact enumeration does not support {type(leaf).__name__}")


def _value_dtype(fn):
    leaf = _leaf_distribution(fn)
    if isinstance(leaf, (dist.Categorical, dist.OneHotCategorical)):
        return torch.long
    return leaf.logits.dtype if hasattr(leaf, "logits") else torch.get_default_dtype()


def _discrete_options(msg) -> list:
    fn = msg["fn"]
    leaf = _leaf_distribution(fn)
    one_hot = isinstance(leaf, dist.OneHotCategorical)
    shape = fn.shape()[:-1] if one_hot else fn.shape()  # one-hot: the class index per variable
    numel = int(np.prod(shape)) if len(shape) else 1
    support = _element_support(fn)
    if len(support) ** numel > 4096:
        raise NotImplementedError(f"site {msg['name']!r} has too many joint values")
    device = leaf.logits.device
    options = []
    for combo in itertools.product(support, repeat=numel):
        value = torch.tensor(combo, dtype=_value_dtype(fn), device=device).reshape(shape)
        if one_hot:
            value = torch.nn.functional.one_hot(value, len(support)).to(leaf.logits.dtype)
        log_w = _unmasked_log_prob(fn, value).sum()
        options.append((value, log_w))
    return options


def _gauss_hermite_options(msg) -> list:
    fn = msg["fn"]
    base = fn
    while isinstance(base, (dist.Independent, dist.ExpandedDistribution)):
        base = base.base_dist
    if not isinstance(base, dist.Normal) or fn.shape().numel() != 1:
        raise NotImplementedError(
            f"exact reference handles only scalar reparameterized Normal sites, not {msg['name']!r}"
        )
    nodes, weights = np.polynomial.hermite_e.hermegauss(NUM_HERMITE_NODES)
    weights = weights / weights.sum()
    shape = fn.shape()
    loc = base.loc.reshape(shape)
    scale = base.scale.reshape(shape)
    return [(loc + scale * float(x), math.log(w)) for x, w in zip(nodes, weights)]


def _subsample_options(msg) -> list:
    fn = msg["fn"]
    size, k = fn.size, fn.subsample_size
    if k is None or k >= size:
        return [(torch.arange(size, device=fn.device), 0.0)]
    combos = list(itertools.combinations(range(size), k))
    log_w = -math.log(len(combos))
    return [(torch.tensor(c, device=fn.device), log_w) for c in combos]


class _Discover(Messenger):
    """Stops the guide at the first latent site without a value and lists its options."""

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["value"] is not None:
            return
        if isinstance(msg["fn"], _Subsample):
            raise _Branch(msg["name"], _subsample_options(msg))
        if msg["fn"].has_rsample:
            raise _Branch(msg["name"], _gauss_hermite_options(msg))
        raise _Branch(msg["name"], _discrete_options(msg))


class Leaf(NamedTuple):
    values: dict
    log_weight: torch.Tensor
    f: torch.Tensor


def leaves(model, guide, *args, **kwargs):
    """Yields every leaf of the guide's enumeration tree, as :class:`Leaf`."""
    stack = [({}, 0.0)]
    while stack:
        values, log_w = stack.pop()
        try:
            guide_trace = poutine.trace(
                _Discover()(poutine.condition(guide, data=values))
            ).get_trace(*args, **kwargs)
        except _Branch as b:
            for value, lw in reversed(b.options):
                stack.append(({**values, b.name: value}, log_w + lw))
            continue
        model_trace = poutine.trace(poutine.condition(model, data=values)).get_trace(
            *args, **kwargs
        )
        for name, site in model_trace.nodes.items():
            if (
                site["type"] == "sample"
                and not site["is_observed"]
                and not isinstance(site["fn"], _Subsample)
            ):
                raise ValueError(f"model latent site {name!r} is not in the guide")
        model_trace = prune_subsample_sites(model_trace)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        f = 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                f = f + site["log_prob"].sum()
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                f = f - site["log_prob"].sum()
        yield Leaf(values, torch.as_tensor(log_w), f)


def exact_elbo(model, guide, *args, **kwargs) -> torch.Tensor:
    """The exact ELBO, differentiable with respect to every param."""
    total = 0.0
    for leaf in leaves(model, guide, *args, **kwargs):
        total = total + leaf.log_weight.exp() * leaf.f
    return total


def param_tensors() -> dict:
    """The unconstrained tensors of the param store, by name (the ones that get ``.grad``)."""
    return dict(pyro.get_param_store().named_parameters())


def exact_loss_and_grads(model, guide, *args, **kwargs):
    """
    Returns ``(loss, grads)``: the exact ``-ELBO`` (a float) and a dict name -> exact gradient of
    ``-ELBO`` with respect to each unconstrained param (zeros where it does not depend on it).
    """
    loss = -exact_elbo(model, guide, *args, **kwargs)
    params = param_tensors()
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    grads = {
        name: torch.zeros_like(p) if g is None else g.detach()
        for (name, p), g in zip(params.items(), grads)
    }
    return loss.item(), grads


# ---------------------------------------------------------------------------------------------
# The statistical checker
# ---------------------------------------------------------------------------------------------


class UnbiasedReport(NamedTuple):
    names: list  # component labels, "loss" first
    exact: torch.Tensor
    mean: torch.Tensor
    se: torch.Tensor
    z: float
    num_calls: int

    def zscores(self) -> torch.Tensor:
        return (self.mean - self.exact) / self.se.clamp_min(1e-300)

    def table(self) -> str:
        rows = [f"{'component':>24} {'exact':>12} {'mean':>12} {'se':>10} {'z':>8}"]
        for i, name in enumerate(self.names):
            rows.append(
                f"{name:>24} {self.exact[i].item():12.6f} {self.mean[i].item():12.6f} "
                f"{self.se[i].item():10.6f} {self.zscores()[i].item():8.2f}"
            )
        return "\n".join(rows)


def bonferroni_z(num_components: int, alpha: float = 1e-3, minimum: float = 4.5) -> float:
    """The two-sided normal quantile for a family-wise error ``alpha`` over the components."""
    return max(minimum, NormalDist().inv_cdf(1 - alpha / (2 * num_components)))


def draw_estimates(
    elbo,
    model,
    guide,
    args=(),
    kwargs=None,
    num_calls: int = 100,
    method: str = "loss_and_grads",
    names: list | None = None,
) -> tuple[list, torch.Tensor]:
    """
    Calls the ELBO ``num_calls`` times and returns ``(labels, samples)`` where ``samples`` has
    one row per call: the loss, then every component of every param's gradient.
    """
    kwargs = kwargs or {}
    params = param_tensors()
    if names is None:
        names = list(params)
    rows = []
    for _ in range(num_calls):
        for p in params.values():
            p.grad = None
        if method == "loss_and_grads":
            loss = elbo.loss_and_grads(model, guide, *args, **kwargs)
            grads = [params[n].grad for n in names]
        elif method == "differentiable_loss":
            loss_t = elbo.differentiable_loss(model, guide, *args, **kwargs)
            grads = torch.autograd.grad(loss_t, [params[n] for n in names], allow_unused=True)
            loss = loss_t.item()
        elif method == "module":
            loss_t = elbo(model, guide)(*args, **kwargs)
            grads = torch.autograd.grad(loss_t, [params[n] for n in names], allow_unused=True)
            loss = loss_t.item()
        else:
            raise ValueError(method)
        row = [torch.tensor([float(loss)], dtype=torch.float64, device="cpu")]
        for n, g in zip(names, grads):
            g = torch.zeros_like(params[n]) if g is None else g
            row.append(g.detach().reshape(-1).to("cpu", torch.float64))
        rows.append(torch.cat(row))
    labels = ["loss"]
    for n in names:
        numel = params[n].numel()
        labels += [n] if numel == 1 else [f"{n}[{i}]" for i in range(numel)]
    return labels, torch.stack(rows)


def assert_unbiased(
    elbo,
    model: Callable,
    guide: Callable,
    args=(),
    kwargs=None,
    num_samples: int = 4000,
    seed: int = 0,
    z: float | None = None,
    alpha: float = 1e-3,
    atol: float = 1e-7,
    rtol: float = 1e-6,
    method: str = "loss_and_grads",
    check_loss: bool = True,
    min_calls: int = 30,
    params: list | None = None,
    reference: Callable | None = None,
) -> UnbiasedReport:
    """
    Draws ``num_samples`` particles' worth of independent estimates (``num_samples //
    elbo.num_particles`` calls), and requires ``|mean - exact| <= z * SE + atol + rtol * |exact|``
    for the loss and every component of every param's gradient. ``z`` defaults to a
    Bonferroni-corrected normal quantile (at least 4.5). Raises :class:`AssertionError` with a
    table otherwise. Params must already be in the param store (or be created by the model and
    guide with fixed initial values). ``params`` restricts the check to the gradients of the
    params it names (e.g. to leave out the params of a learned baseline, which have their own
    loss). ``reference`` replaces :func:`exact_loss_and_grads` as the exact reference.
    """
    kwargs = kwargs or {}
    exact_loss, exact_grads = (reference or exact_loss_and_grads)(model, guide, *args, **kwargs)
    names = [n for n in exact_grads if params is None or n in params]
    exact = torch.cat(
        [torch.tensor([exact_loss], dtype=torch.float64, device="cpu")]
        + [exact_grads[n].reshape(-1).to("cpu", torch.float64) for n in names]
    )
    num_calls = max(num_samples // elbo.num_particles, 1)
    assert num_calls >= min_calls, "too few calls to estimate the standard error"
    pyro.set_rng_seed(seed)
    labels, samples = draw_estimates(elbo, model, guide, args, kwargs, num_calls, method, names)
    mean = samples.mean(0)
    se = samples.std(0) / math.sqrt(num_calls)
    if z is None:
        z = bonferroni_z(len(labels) - (0 if check_loss else 1), alpha)
    report = UnbiasedReport(labels, exact, mean, se, z, num_calls)
    ok = (mean - exact).abs() <= z * se + atol + rtol * exact.abs()
    if not check_loss:
        ok[0] = True
    if not bool(ok.all()):
        bad = [labels[i] for i in range(len(labels)) if not ok[i]]
        raise AssertionError(f"biased components {bad} (z={z:.2f}):\n{report.table()}")
    return report
