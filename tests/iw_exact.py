# SPDX-License-Identifier: Apache-2.0
"""
Exact references for the importance-weighted bound (IWAE) on tiny models.

The bound, for ``z_1 .. z_K`` drawn independently from the guide, has two forms:

- **local**: every sample site of model and guide (observed ones and factors included, plate
  subsample sites excluded) lies inside one common vectorized plate, the data plate. The bound is
  formed per element ``n`` of that plate::

      sum_n s_n * log (1/K) sum_k w_{k,n}

  where ``log w_{k,n}`` sums the masked model log-densities minus the masked guide log-densities
  of element ``n`` of the k-th sample (each site's log-density tensor summed down to the data
  plate's dim), WITHOUT scales, and ``s_n`` is the scale of element ``n``, applied outside the
  log: the subsample scale ``N / M`` (plate size ``N``, subsample size ``M``; 1 without
  subsampling) times any ``poutine.scale`` that varies along the data plate only (a weight per
  datapoint). Every site must carry the same ``s_n``; a scale that differs between sites or
  varies within an element is not defined in this form and raises :class:`ValueError`.
- **joint**: otherwise (e.g. a global site outside the plate), ``log (1/K) sum_k w_k`` with
  ``log w_k`` the sum of every scaled, masked model log-density minus every scaled, masked guide
  log-density of the k-th sample: scales, subsample scales included, act inside the log, as
  ``pyro.infer.RenyiELBO(alpha=0)`` forms its bound.

:func:`exact_iw_bound` computes ``E[bound]`` exactly: it enumerates the guide's leaves with
:func:`tests.exact.leaves` (every joint value of the discrete sites, Gauss-Hermite nodes for
reparameterized scalar Normal sites, every subsample), computes the per-element log-weights of
each leaf, and sums the bound over every K-tuple of leaves, weighted by the product of the leaf
weights: the K-tuple of whole-guide draws is exactly the IWAE sampling process, so this is exact
for both forms (and for guides that do not factorize over the plate). Subsample sites are drawn
once per step and shared by the K samples: the leaves are grouped by their subsample values and
the K-tuples are formed within each group. The result is differentiable with respect to every
param (leaf weights and log-weights both carry the graph; Gauss-Hermite values are ``loc +
scale * node``), so autograd gives the exact gradient.

Reparameterized Normal sites: the K-tuple sum is a tensor-product Gauss-Hermite rule in K
dimensions, with ``num_hermite_nodes`` nodes per site and sample. The integrand (a log-mean-exp of
smooth log-weights) is analytic, so the rule converges fast; the tests bound its error on the
models of :mod:`tests.iw_models` by comparing against twice the node count.

:func:`sample_iw_bounds` draws the bound by Monte Carlo with Pyro's own sampling of the guide
(vectorized over draws), for checking the reference.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import prune_subsample_sites

from tests import exact
from tests.exact import leaves, param_tensors

#: Gauss-Hermite nodes per reparameterized scalar site and sample (the K-tuples multiply them).
IW_HERMITE_NODES = 10

#: The most K-tuples of leaves :func:`exact_iw_bound` sums (per subsample group).
MAX_TUPLES = 2_000_000

FORMS = ("local", "joint")


@contextlib.contextmanager
def _hermite_nodes(num_nodes: int):
    """Sets the Gauss-Hermite node count that :func:`tests.exact.leaves` uses."""
    saved = exact.NUM_HERMITE_NODES
    exact.NUM_HERMITE_NODES = num_nodes
    try:
        yield
    finally:
        exact.NUM_HERMITE_NODES = saved


def _sample_sites(trace, exclude_observed: bool = False) -> list:
    return [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample"
        and not isinstance(site["fn"], _Subsample)
        and not (exclude_observed and site["is_observed"])
    ]


def _site_frames(site, ignore: str | None) -> dict:
    return {f.name: f for f in site["cond_indep_stack"] if f.name != ignore}


def detect_form(model_trace, guide_trace, ignore_plate: str | None = None) -> tuple:
    """
    Returns ``("local", frame)`` with the data plate's frame when every sample site of both traces
    lies in one common vectorized plate (the outermost such plate), else ``("joint", None)``. The
    plate named ``ignore_plate`` (a particle plate) is not considered.
    """
    sites = _sample_sites(model_trace) + _sample_sites(guide_trace)
    if not sites:
        return "joint", None
    common = None
    for site in sites:
        names = [
            f.name for f in site["cond_indep_stack"] if f.vectorized and f.name != ignore_plate
        ]
        common = names if common is None else [n for n in common if n in names]
    if not common:
        return "joint", None
    # cond_indep_stack lists the outermost plate first
    frame = _site_frames(sites[0], ignore_plate)[common[0]]
    return "local", frame


def iw_form(model, guide, *args, **kwargs) -> str:
    """The form (``"local"`` or ``"joint"``) of the bound of ``model`` and ``guide``."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return detect_form(model_trace, guide_trace)[0]


def _site_element_scale(site, frame) -> torch.Tensor:
    """
    The site's scale of each element of the data plate, ``[M]`` (subsample scale included).

    :raises ValueError: if the scale varies within an element (along another dim).
    """
    lp = site["fn"].log_prob(site["value"])
    scale = torch.as_tensor(site["scale"], dtype=lp.dtype)
    rank = max(lp.dim(), scale.dim(), -frame.dim)
    shape = torch.broadcast_shapes((1,) * rank, lp.shape, scale.shape)
    per_element = scale.expand(shape).movedim(frame.dim, -1).reshape(-1, shape[frame.dim])
    if not torch.all(per_element == per_element[:1]):
        raise ValueError(
            f"site {site['name']!r} has a scale that varies within an element of the data plate: "
            "the per-element bound is not defined for it"
        )
    return per_element[0]


def element_scale(model_trace, guide_trace, frame) -> torch.Tensor:
    """
    The scale ``s_n`` of each element of the data plate (local form), ``[M]``: the same at every
    sample site of both traces.

    :raises ValueError: if the sites carry different scales, or a scale that varies within an
        element.
    """
    scales = {}
    for trace in (model_trace, guide_trace):
        for site in _sample_sites(trace):
            scales[site["name"]] = _site_element_scale(site, frame)
    values = torch.broadcast_tensors(*scales.values())
    if not all(torch.equal(v, values[0]) for v in values):
        raise ValueError(
            f"the sites carry different scales {dict(scales)}: the per-element bound is not "
            "defined for them"
        )
    return values[0]


def _site_log_density(site, form: str, frame) -> torch.Tensor:
    """
    The site's masked log-density tensor; scaled in the joint form, unscaled in the local form
    (the scale of each element is applied outside the log: :func:`element_scale`).
    """
    lp = site["fn"].log_prob(site["value"])
    scale = site["scale"]
    if form == "local":
        scale = 1.0
    mask = site["mask"]
    if mask is not None and mask is not True:
        lp = torch.where(torch.as_tensor(mask, device=lp.device), lp, lp.new_zeros(()))
    return lp * scale


def _reduce(lp: torch.Tensor, keep: list) -> torch.Tensor:
    """Sums ``lp`` over every dim but the negative dims in ``keep`` (kept in their order)."""
    rank = max([-d for d in keep] + [lp.dim()])
    lp = lp.reshape((1,) * (rank - lp.dim()) + lp.shape)
    keep_pos = [rank + d for d in keep]
    other = [i for i in range(rank) if i not in keep_pos]
    if other:
        lp = lp.sum(other, keepdim=True)
    return lp.reshape([lp.shape[i] for i in keep_pos])


def log_weights(
    model_trace,
    guide_trace,
    form: str,
    frame=None,
    particle_dim: int | None = None,
    particle_plate: str | None = None,
) -> torch.Tensor:
    """
    The log-weights of a pair of traces: shape ``[M]`` (local: one per data plate element) or
    ``[1]`` (joint), with a leading particle dim of the traces' size when ``particle_dim`` (the
    negative dim of a particle plate named ``particle_plate``) is given.
    """
    keep = [] if particle_dim is None else [particle_dim]
    if form == "local":
        keep = keep + [frame.dim]
    total = 0.0
    for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
        for site in _sample_sites(trace):
            if form == "local" and frame.name not in _site_frames(site, particle_plate):
                raise ValueError(f"site {site['name']!r} is outside the data plate {frame.name!r}")
            lp = _site_log_density(site, form, frame)
            total = total + sign * _reduce(lp, keep)
    total = torch.as_tensor(total)
    if form == "joint":
        total = total.unsqueeze(-1)
    return total


def _leaf_rows(model, guide, form: str | None, args, kwargs) -> tuple:
    """
    For every leaf: its log weight, its log-weight row, the scale of each element (applied
    outside the log) and its subsample key. Returns ``(form, groups)``: the bound's form, and a
    dict subsample key -> list of ``(log_weight, row, scale)``.
    """
    groups: dict = {}
    forms = set()
    for leaf in leaves(model, guide, *args, **kwargs):
        guide_trace = poutine.trace(poutine.condition(guide, data=leaf.values)).get_trace(
            *args, **kwargs
        )
        model_trace = poutine.trace(poutine.condition(model, data=leaf.values)).get_trace(
            *args, **kwargs
        )
        key = tuple(
            (name, tuple(site["value"].tolist()))
            for name, site in guide_trace.nodes.items()
            if site["type"] == "sample" and isinstance(site["fn"], _Subsample)
        )
        leaf_form, frame = detect_form(model_trace, guide_trace)
        if form is None:
            use = leaf_form
        elif form == "local" and leaf_form != "local":
            raise ValueError("the sites do not all lie in one common vectorized plate")
        else:
            use = form
        forms.add(use)
        model_trace = prune_subsample_sites(model_trace)
        guide_trace = prune_subsample_sites(guide_trace)
        scale = element_scale(model_trace, guide_trace, frame) if use == "local" else 1.0
        row = log_weights(model_trace, guide_trace, use, frame)
        groups.setdefault(key, []).append((leaf.log_weight, row, scale))
    if len(forms) > 1:
        raise ValueError(f"the bound's form depends on the sampled values: {sorted(forms)}")
    return forms.pop(), groups


def _tuples_bound(log_w: torch.Tensor, rows: torch.Tensor, K: int, scale) -> torch.Tensor:
    """``sum over K-tuples of prod(weights) * sum_n s_n log mean_k exp(rows)``, the weights given
    by ``log_w`` (normalized), ``s_n`` by ``scale``."""
    num = log_w.shape[0]
    if num**K > MAX_TUPLES:
        raise ValueError(f"{num} leaves give {num**K} K-tuples (more than {MAX_TUPLES})")
    idx = torch.cartesian_prod(*[torch.arange(num)] * K).reshape(-1, K)
    tuple_log_w = log_w[idx].sum(-1)  # [T]
    bound = torch.logsumexp(rows[idx], dim=1) - math.log(K)  # [T, M]
    return (tuple_log_w.exp() * (scale * bound).sum(-1)).sum()


def exact_iw_bound(
    model,
    guide,
    K: int,
    *args,
    form: str | None = None,
    num_hermite_nodes: int = IW_HERMITE_NODES,
    **kwargs,
) -> torch.Tensor:
    """
    The exact ``E[bound]`` of the K-sample importance-weighted bound, differentiable with respect
    to every param.

    :param K: the number of samples in the bound (``K >= 1``; ``K = 1`` gives the ELBO).
    :param form: ``None`` (detected), ``"local"`` or ``"joint"``: forcing ``"joint"`` on a model
        of the local form gives the (valid but looser) joint bound over the whole plate, the
        bound a wrong estimator would target.
    :param num_hermite_nodes: Gauss-Hermite nodes per reparameterized scalar Normal site.
    """
    if K < 1:
        raise ValueError("K must be at least 1")
    if form is not None and form not in FORMS:
        raise ValueError(f"unknown form {form!r}")
    with _hermite_nodes(num_hermite_nodes):
        form, groups = _leaf_rows(model, guide, form, args, kwargs)
    total = 0.0
    for members in groups.values():
        log_w = torch.stack([torch.as_tensor(lw) for lw, _, _ in members])
        rows = torch.stack([row for _, row, _ in members])
        scale = members[0][2]  # the leaves of one subsample share it
        group_log_w = torch.logsumexp(log_w, 0)  # the probability of the subsample
        conditional = log_w - group_log_w
        total = total + group_log_w.exp() * _tuples_bound(conditional, rows, K, scale)
    return total


def exact_iw_loss_and_grads(model, guide, K: int, *args, **kwargs):
    """
    Returns ``(loss, grads)``: the exact ``-E[bound]`` (a float) and a dict name -> exact gradient
    of it with respect to each unconstrained param (zeros where it does not depend on it).
    Keyword arguments ``form`` and ``num_hermite_nodes`` go to :func:`exact_iw_bound`.
    """
    loss = -exact_iw_bound(model, guide, K, *args, **kwargs)
    params = param_tensors()
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    grads = {
        name: torch.zeros_like(p) if g is None else g.detach()
        for (name, p), g in zip(params.items(), grads)
    }
    return loss.item(), grads


# ---------------------------------------------------------------------------------------------
# Monte Carlo draws of the bound, with Pyro's own sampling of the guide
# ---------------------------------------------------------------------------------------------


def _subsample_choices(guide, args, kwargs) -> list:
    """Every joint choice of the guide's subsample sites, as condition dicts (equal weights)."""
    trace = poutine.trace(guide).get_trace(*args, **kwargs)
    names, options = [], []
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and isinstance(site["fn"], _Subsample):
            names.append(name)
            options.append([value for value, _ in exact._subsample_options(site)])
    return [dict(zip(names, combo)) for combo in itertools.product(*options)]


def sample_iw_bounds(
    model,
    guide,
    K: int,
    num_draws: int,
    *args,
    max_plate_nesting: int = 1,
    form: str | None = None,
    surrogate: bool = False,
    **kwargs,
):
    """
    Returns ``num_draws`` independent draws of the bound (a detached tensor), each from ``K``
    guide samples drawn by Pyro in one vectorized run (a particle plate of ``num_draws * K`` at
    dim ``-(max_plate_nesting + 1)``). With subsampled plates the draws are split evenly over every
    subsample choice (stratified: their mean estimates ``E[bound]`` with equal subsample weights;
    ``num_draws`` must be a multiple of the number of choices).

    With ``surrogate=True`` returns ``(bounds, surrogate)``: ``surrogate`` is the mean over the
    draws of ``bound + bound.detach() * (S - S.detach())``, with ``S`` the sum over the K samples
    of the sampling log-density of every non-reparameterized guide site. Its gradient is the plain
    unbiased estimate of ``grad E[bound]``: the score function of the K draws plus the gradient at
    fixed draws, in which the guide's log-density inside the log-weights gives
    ``-sum_k wbar_k grad log q(z_k)`` (``wbar``: normalized weights) and reparameterized sites
    their pathwise term.
    """
    choices = _subsample_choices(guide, args, kwargs)
    if num_draws % len(choices):
        raise ValueError(f"num_draws must be a multiple of {len(choices)} subsample choices")
    per_choice = num_draws // len(choices)
    dim = -(max_plate_nesting + 1)
    name = "_iw_particles"
    out, surrogates = [], []
    grad_mode = torch.enable_grad() if surrogate else torch.no_grad()
    for choice in choices:

        def particles(fn, choice=choice):
            def wrapped(*a, **k):
                with pyro.plate(name, per_choice * K, dim=dim):
                    return poutine.condition(fn, data=choice)(*a, **k)

            return wrapped

        with grad_mode:
            guide_trace = poutine.trace(particles(guide)).get_trace(*args, **kwargs)
            model_trace = poutine.trace(
                poutine.replay(particles(model), trace=guide_trace)
            ).get_trace(*args, **kwargs)
            use, frame = detect_form(model_trace, guide_trace, ignore_plate=name)
            use = form or use
            scale = 1.0
            if use == "local":
                scale = element_scale(
                    prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace), frame
                )
            rows = log_weights(
                prune_subsample_sites(model_trace),
                prune_subsample_sites(guide_trace),
                use,
                frame,
                particle_dim=dim,
                particle_plate=name,
            )  # [per_choice * K, M]
            rows = rows.expand(per_choice * K, rows.shape[-1]).reshape(per_choice, K, -1)
            bound = (scale * (torch.logsumexp(rows, dim=1) - math.log(K))).sum(-1)
            out.append(bound.detach())
            if surrogate:
                score = 0.0
                for site in _sample_sites(guide_trace, exclude_observed=True):
                    if not site["fn"].has_rsample:
                        lp = exact._unmasked_log_prob(site["fn"], site["value"])
                        score = score + _reduce(lp, [dim])
                score = torch.as_tensor(score).expand(per_choice * K).reshape(per_choice, K)
                score = score.sum(-1)
                surrogates.append((bound + bound.detach() * (score - score.detach())).sum())
    if surrogate:
        return torch.cat(out), sum(surrogates) / num_draws
    return torch.cat(out)
