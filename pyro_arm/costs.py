# SPDX-License-Identifier: Apache-2.0
"""
The cost terms of a run, keyed by plates, and a lean pass that makes them without a Trace.

A run's cost terms are every model site's scaled, masked log-density :math:`\\log p` and every
guide site's :math:`-\\log q` (observed guide sites, ``pyro.factor``, included), each keyed by
its ``cond_indep_stack`` in a :class:`~pyro.infer.util.MultiFrameTensor`, which sums them down
to the plates a signal keeps (:mod:`pyro_arm.signals`). They are detached, in at least float32
(:func:`~pyro_arm.estimators.working_dtype`), so that low-precision log-densities are summed
without rounding.

- :func:`trace_cost_terms` reads them from the traces of a base run, whose log-densities Pyro
  has already computed;
- :class:`CostMessenger` adds them as a run goes, straight from each sample message
  (``fn.log_prob(value)`` through :func:`~pyro.distributions.util.scale_and_mask` with the
  message's ``scale`` and ``mask``; ``Distribution.mask`` lives in ``fn``), and
  :func:`run_costs` runs an antithetic branch's guide and model under it: no site copies, no
  pruning of subsample sites, no second walk over the sites.

Where the model sums out enumerated sites (:mod:`pyro_arm.enum`), the model's terms that depend
on an enumerated value are replaced by their contraction: in the traces by
:func:`~pyro_arm.enum.marginalize_trace`, in a lean run by a
:class:`~pyro_arm.enum.MarginalMessenger` outside the cost handlers, which skip the sites it
takes.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Container, NamedTuple, Optional

import pyro
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import MultiFrameTensor
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger

from pyro_arm.enum import Expectation, MarginalMessenger
from pyro_arm.estimators import working_dtype
from pyro_arm.reads import unguarded
from pyro_arm.sites import is_subsample_site


class CostTerm(NamedTuple):
    """One cost term: ``key`` is ``"model:name"`` or ``"guide:name"``."""

    key: str
    stack: tuple
    value: torch.Tensor


def _detached(log_prob: torch.Tensor) -> torch.Tensor:
    log_prob = log_prob.detach()
    return log_prob.to(working_dtype(log_prob.dtype))


def trace_cost_terms(model_trace: Trace, guide_trace: Trace) -> list[CostTerm]:
    """The cost terms of a base run, from its traces (log-densities already computed)."""
    terms = []
    for prefix, sign, trace in (("model", 1.0, model_trace), ("guide", -1.0, guide_trace)):
        for name, site in trace.nodes.items():
            if site["type"] == "sample":
                value = _detached(site["log_prob"])
                terms.append(CostTerm(f"{prefix}:{name}", site["cond_indep_stack"], sign * value))
    return terms


def costs_of(
    terms: list[CostTerm], keep: Optional[Callable[[str], bool]] = None
) -> MultiFrameTensor:
    """The terms (those whose key ``keep`` accepts, all when ``None``) keyed by their plates."""
    return MultiFrameTensor(*((t.stack, t.value) for t in terms if keep is None or keep(t.key)))


class CostMessenger(Messenger):
    """
    Adds each sample site's scaled, masked log-density, times ``sign``, to ``costs`` as the
    run goes; with ``values``, also records every sampled value (subsamples included). Sites
    named in ``skip`` are left out.
    """

    def __init__(
        self,
        costs: MultiFrameTensor,
        sign: float,
        values: Optional[dict] = None,
        skip: Container[str] = (),
        expectation: Optional[Expectation] = None,
    ) -> None:
        super().__init__()
        self.costs, self.sign, self.values, self.skip = costs, sign, values, skip
        self.expectation = Expectation() if expectation is None else expectation

    def _pyro_post_sample(self, msg) -> None:
        if msg["name"] in self.skip:
            return
        if self.values is not None and not msg["is_observed"]:
            self.values[msg["name"]] = msg["value"]
        if is_subsample_site(msg):
            return
        if self.sign < 0:  # the guide's enumerated sites, as they come
            self.expectation.add(msg)
        log_prob = msg["fn"].log_prob(msg["value"], *msg["args"], **msg["kwargs"])
        with unguarded():
            log_prob = scale_and_mask(log_prob, msg["scale"], msg["mask"])
            log_prob = self.expectation(log_prob, msg["cond_indep_stack"], grad=False)
            self.costs.add((msg["cond_indep_stack"], self.sign * _detached(log_prob)))


class ReplayValuesMessenger(Messenger):
    """
    Holds the model's latent sites at the guide's values, as :func:`pyro.poutine.replay`
    does from a trace, from a dict of values.
    """

    def __init__(self, values: dict) -> None:
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["name"] not in self.values:
            return
        msg["value"] = self.values[msg["name"]]
        msg["done"] = True


class LogPMessenger(Messenger):
    """Sums the model's scaled, masked log-densities, with gradient, into :attr:`log_p`
    (sites named in :attr:`skip` left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.log_p: torch.Tensor | float = 0.0
        self.skip: Container[str] = ()
        self.expectation = Expectation()

    def _pyro_post_sample(self, msg) -> None:
        if is_subsample_site(msg) or msg["name"] in self.skip:
            return
        log_prob = msg["fn"].log_prob(msg["value"], *msg["args"], **msg["kwargs"])
        with unguarded():
            log_prob = scale_and_mask(log_prob, msg["scale"], msg["mask"])
            log_prob = self.expectation(log_prob, msg["cond_indep_stack"], grad=False)
            self.log_p = self.log_p + log_prob.sum()


def detached(values: dict) -> dict:
    """The values of a dict, detached."""
    return {name: value.detach() for name, value in values.items()}


def model_costs(
    model,
    args,
    kwargs,
    costs: MultiFrameTensor,
    values: dict,
    log_p: Optional[LogPMessenger],
    expectation: Optional[Expectation] = None,
) -> dict:
    """
    Runs the model with its latent sites at ``values`` and adds its cost terms to ``costs``;
    with ``log_p``, also sums its log-density with gradient there. Terms that the guide's
    enumerated values reach are replaced by their ``expectation`` over them. Returns the values
    of the latent sites the model met (summed-out enumerated sites excluded).
    """
    seen: dict = {}
    grad = log_p is not None and torch.is_grad_enabled()
    marginal = MarginalMessenger(values)
    expectation = Expectation() if expectation is None else expectation
    if log_p is not None:
        log_p.skip, log_p.expectation = marginal.names, expectation
    cost = CostMessenger(costs, 1.0, seen, marginal.names, expectation)
    with torch.set_grad_enabled(grad), marginal, cost:
        with log_p or nullcontext(), ReplayValuesMessenger(values):
            model(*args, **kwargs)
        for stack, term in marginal.terms():
            with unguarded():
                term = expectation(term, stack, grad=False)
            costs.add((stack, _detached(term)))
            if log_p is not None:
                log_p.log_p = log_p.log_p + term.sum()
    return seen


def run_costs(model, guide, args, kwargs, log_p: Optional[LogPMessenger] = None):
    """
    Runs guide and model once, without validation, and returns their costs: the guide without
    gradient, the model at the guide's detached values (with ``log_p``, summing its
    log-density with gradient; else without gradient).
    """
    costs: MultiFrameTensor = MultiFrameTensor()
    values: dict = {}
    expectation = Expectation()
    with pyro.validation_enabled(False):
        with torch.no_grad(), CostMessenger(costs, -1.0, values, expectation=expectation):
            guide(*args, **kwargs)
        with unguarded():
            values = detached(values)
        model_costs(model, args, kwargs, costs, values, log_p, expectation)
    return costs
