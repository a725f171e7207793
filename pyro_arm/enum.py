# SPDX-License-Identifier: Apache-2.0
"""
Sites marked for enumeration (``infer={"enumerate": ...}``, as
:func:`~pyro.infer.enum.config_enumerate` marks them).

**Model sites marked** ``"parallel"`` that the guide does not sample are summed out exactly, as
:class:`~pyro.infer.traceenum_elbo.TraceEnum_ELBO` does: :func:`enumerated` runs the model under
Pyro's :class:`~pyro.poutine.enum_messenger.EnumMessenger`, its enumeration dims left of every
plate (the plates of particles and branches included), and the log-densities that depend on an
enumerated value (the enumerated sites' own, and those of later sites that read them) are
contracted with :func:`~pyro.ops.contract.contract_tensor_tree`, the enumeration dims summed out
and each plate kept as far as the enumerated variables are local to it:

.. math::

    \\log p(x, z) = \\sum_{f \\notin F} \\log p_f(x, z)
        + s \\sum_t \\log \\sum_{c} \\prod_{f \\in F_t} p_f(x, z, c),

:math:`F` the contracted factors, one term per plate set :math:`t` (its products over the
plates inside :math:`t` taken by the contraction; a mixture assignment per datapoint gives one
term per datapoint), :math:`s` the common subsample scale. These terms replace the contracted
sites among a run's cost terms (:func:`marginalize_trace` for the traces of a base run,
:class:`MarginalMessenger` for the lean runs of :mod:`pyro_arm.costs`), so every signal and the
ELBO see :math:`\\log p(x, z)` with the enumerated variables summed out.

**Guide sites marked** ``"parallel"`` are enumerated in the guide (:class:`Enumeration`, the
model's enumeration dims left of the guide's), and every cost term that their values reach is
replaced by its expectation under their probabilities (:class:`Expectation`, Pyro's
:class:`~pyro.infer.util.Dice` rule kept per plate), differentiated exactly; a site sampled
after them that reads their value must be reparameterized (:func:`expect_traces`).

``"sequential"`` **sites** raise :class:`NotImplementedError` naming the site before it is
sampled (:class:`EnumerationCheck`), and so do sites marked for enumeration under an ELBO that
sums none out: no site marked for enumeration is ever sampled.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Container, Optional

import torch
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.util import scale_and_mask
from pyro.ops import packed
from pyro.ops.contract import contract_tensor_tree
from pyro.poutine import Trace
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.indep_messenger import IndepMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _ENUM_ALLOCATOR, _PYRO_STACK

from pyro_arm.reads import unguarded
from pyro_arm.sites import is_subsample_site

#: The name prefix of the sites that hold the contracted log-densities in a marginalized trace.
MARGINAL_PREFIX = "_enumerated_"


def enumeration(site: dict) -> Optional[str]:
    """The enumeration a latent sample site is marked for (``"parallel"``, ``"sequential"``), or
    ``None``."""
    if site["type"] != "sample" or site["is_observed"]:
        return None
    return (site.get("infer") or {}).get("enumerate") or None


class Unenumerated(Exception):
    """A model site marked for parallel enumeration, outside the guide, that no enumeration
    handler enumerated (the model runs without :func:`enumerated`)."""


class EnumerationCheck:
    """
    Checks the sites marked for enumeration in one run of guide (:meth:`guide`) and model
    (:meth:`model`), before they are sampled: a guide site marked for enumeration, or a model
    site outside the guide marked ``"sequential"``, raises :class:`NotImplementedError` naming
    it and the ELBO (``elbo``); a model site outside the guide marked ``"parallel"`` and not
    enumerated raises :class:`Unenumerated` where the ELBO sums such sites out
    (``sums_out``), else :class:`NotImplementedError`.
    """

    def __init__(self, elbo: str, sums_out: bool) -> None:
        self.elbo, self.sums_out = elbo, sums_out
        self.guide_sites: set[str] = set()

    def guide(self, fn: Callable) -> Callable:
        return _GuideCheck(self)(fn)

    def model(self, fn: Callable) -> Callable:
        return _ModelCheck(self)(fn)

    def refuse(self, msg: dict, where: str) -> NotImplementedError:
        sums = "sums out the sites marked 'parallel'" if self.sums_out else "sums out none"
        return NotImplementedError(
            f"At site '{msg['name']}': the {where} site is marked for enumeration "
            f"(infer={{'enumerate': {enumeration(msg)!r}}}), which {self.elbo} does not sum out "
            f"(it {sums}); sampling it instead would change the objective. Use "
            "pyro.infer.TraceEnum_ELBO, or remove the mark (config_enumerate, "
            "infer['enumerate']) to sample it"
        )


class _GuideCheck(Messenger):
    """Sees each guide site after the handlers inside it (enumeration included)."""

    def __init__(self, check: EnumerationCheck) -> None:
        super().__init__()
        self.check = check

    def _pyro_sample(self, msg) -> None:
        self.check.guide_sites.add(msg["name"])
        kind = enumeration(msg)
        if kind is None:
            return
        if kind == "parallel" and self.check.sums_out:
            if msg["infer"].get("_enumerate_dim") is None:
                raise Unenumerated(msg["name"])
            return
        raise self.check.refuse(msg, "guide")


class _ModelCheck(Messenger):
    """Sees each model site after the handlers inside it (enumeration included) and before
    the replay of the guide's values outside it."""

    def __init__(self, check: EnumerationCheck) -> None:
        super().__init__()
        self.check = check

    def _pyro_sample(self, msg) -> None:
        kind = enumeration(msg)
        if kind is None or msg["name"] in self.check.guide_sites:
            return
        if kind == "parallel" and msg["infer"].get("_enumerate_dim") is not None:
            return
        if kind == "parallel" and self.check.sums_out:
            raise Unenumerated(msg["name"])
        raise self.check.refuse(msg, "model")


class Enumeration:
    """
    Enumerates the sites marked ``"parallel"`` of a guide and of its model with Pyro's
    :class:`~pyro.poutine.enum_messenger.EnumMessenger`: the guide's enumeration dims left of
    the model's ``nesting`` plates and of every plate active when it is called (those over
    particles and branches included), the model's left of the guide's, as in
    :class:`~pyro.infer.traceenum_elbo.TraceEnum_ELBO`.
    """

    def __init__(self, nesting: int) -> None:
        self.nesting = nesting
        #: the enumeration allocator's state after the guide's last run, by first dim
        self.guide_states: dict[int, tuple] = {}

    def first_dim(self) -> int:
        dims = [m.dim for m in _PYRO_STACK if isinstance(m, IndepMessenger) and m.dim is not None]
        return min([-self.nesting - 1] + [dim - 1 for dim in dims])

    def guide(self, guide: Callable) -> Callable:
        def enumerated_guide(*args, **kwargs):
            first = self.first_dim()
            with EnumMessenger(first_available_dim=first), _GuideMarkovCheck():
                result = guide(*args, **kwargs)
            allocator = _ENUM_ALLOCATOR
            self.guide_states[first] = (
                allocator.next_available_dim,
                allocator.next_available_id,
                dict(allocator.dim_to_id),
            )
            return result

        return enumerated_guide

    def model(self, model: Callable) -> Callable:
        def enumerated_model(*args, **kwargs):
            # the model's enumeration dims and ids follow those of the guide's last run in the
            # same plates, as in TraceEnum_ELBO
            first = self.first_dim()
            next_dim, next_id, dim_to_id = self.guide_states.get(first, (first, 0, {}))
            allocator = _ENUM_ALLOCATOR
            allocator.set_first_available_dim(next_dim)
            allocator.next_available_id, allocator.dim_to_id = next_id, dict(dim_to_id)
            with EnumMessenger():
                return model(*args, **kwargs)

        return enumerated_model


class _GuideMarkovCheck(Messenger):
    """Refuses a guide site enumerated inside ``pyro.markov`` (whose dims are recycled)."""

    def _pyro_sample(self, msg) -> None:
        if enumeration(msg) == "parallel" and msg["infer"].get("_markov_scope") is not None:
            raise NotImplementedError(
                f"At site '{msg['name']}': the guide enumerates it inside pyro.markov; "
                "TraceARM_ELBO sums out guide sites enumerated outside pyro.markov (pyro.markov "
                "in the model is supported). Use TraceEnum_ELBO, or drop pyro.markov in the guide"
            )


class _Contraction:
    """
    Tells, site by site in the order a run meets them, which sites a contraction takes (the
    enumerated sites and those whose log-density depends on an enumerated value), and
    contracts them. Each enumerated variable is told apart by its unique id (Pyro's
    ``_dim_to_id``), not by its dim, which ``pyro.markov`` recycles.

    :param replayed: names of the sites whose values the guide gives (never enumerated).
    """

    def __init__(self, replayed: Container[str]) -> None:
        self.replayed = replayed
        self.enum_dims: set[int] = set()
        self.enum_ids: set[int] = set()
        self.sites: list[dict] = []

    def take(self, site: dict) -> bool:
        """Whether the contraction takes ``site`` (a message or trace node), keeping what it
        needs: its unscaled, masked log-density, plates, scale and enumeration ids (read when
        contracting, once the run has set them)."""
        if site["type"] != "sample" or is_subsample_site(site):
            return False
        infer = site["infer"]  # the run's own dict: its enumeration ids are set later
        dim = infer.get("_enumerate_dim")
        is_enumerated = dim is not None and site["name"] not in self.replayed
        if not is_enumerated and not self.enum_dims:
            return False
        log_prob = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        if not is_enumerated:
            shape = log_prob.shape
            if not any(-d <= len(shape) and shape[d] > 1 for d in self.enum_dims):
                return False
        else:
            self.enum_dims.add(dim)
            self.enum_ids.add(infer["_dim_to_id"][dim])
        frames = tuple(f for f in site["cond_indep_stack"] if f.vectorized)
        with unguarded():
            log_prob = scale_and_mask(log_prob, 1.0, site["mask"])
        self.sites.append(dict(name=site["name"], log_prob=log_prob, frames=frames, infer=infer))
        self.sites[-1]["scale"] = site["scale"]
        return True

    def terms(self) -> list[tuple[tuple, torch.Tensor]]:
        """The contracted log-densities, ``(plates, tensor)``, one per plate set."""
        if not self.sites:
            return []
        with unguarded():
            return self._contract()

    def _contract(self) -> list[tuple[tuple, torch.Tensor]]:
        scales = {float(site["scale"]) for site in self.sites}
        if len(scales) != 1 or any(
            torch.is_tensor(site["scale"]) and site["scale"].dim() for site in self.sites
        ):
            raise ValueError(
                "Expected the enumerated sites and the sites that depend on them to share one "
                f"scalar poutine.scale (subsample scale), got {sorted(scales)}"
            )
        scale = self.sites[0]["scale"]
        frames = sorted({f for site in self.sites for f in site["frames"]})
        symbol = {f: _symbol(2 * i) for i, f in enumerate(frames)}
        frame_of = {s: f for f, s in symbol.items()}
        id_dim: dict[str, int] = {}  # symbol of each enumerated variable -> its dim
        tree: OrderedDict = OrderedDict()
        for site in self.sites:
            ordinal = frozenset(symbol[f] for f in site["frames"])
            dim_to_symbol = {f.dim: symbol[f] for f in site["frames"]}
            for dim, id_ in site["infer"].get("_dim_to_id", {}).items():
                dim_to_symbol[dim] = _symbol(1 + 2 * id_)
                id_dim[dim_to_symbol[dim]] = dim
            tree.setdefault(ordinal, []).append(packed.pack(site["log_prob"], dim_to_symbol))
        sum_dims = {_symbol(1 + 2 * id_) for id_ in self.enum_ids}
        scaled = not (isinstance(scale, float) and scale == 1.0)
        terms = []
        for ordinal, contracted in contract_tensor_tree(tree, sum_dims).items():
            stack = tuple(frame_of[s] for s in sorted(ordinal))
            depth = max([-f.dim for f in stack], default=0)
            for term in contracted:
                kept = [s for s in term._pyro_dims if s not in ordinal]
                if len({id_dim[s] for s in kept}) < len(kept):
                    raise NotImplementedError(
                        "A summed-out term depends on two enumerated guide sites that share "
                        "one dim (pyro.markov in the guide); enumerate them outside "
                        "pyro.markov, or use TraceEnum_ELBO"
                    )
                symbol_to_dim = {s: frame_of[s].dim for s in ordinal}
                symbol_to_dim.update((s, id_dim[s]) for s in kept)
                term = packed.unpack(term, symbol_to_dim)
                term = term.reshape((1,) * (depth - term.dim()) + term.shape)
                terms.append((stack, term * scale if scaled else term))
        return terms


def _symbol(i: int) -> str:
    """The ``i``-th einsum symbol, as ``opt_einsum.get_symbol`` numbers them."""
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return letters[i] if i < len(letters) else chr(i + 140)


class MarginalMessenger(Messenger):
    """
    Takes, as a run of the model goes, the sites that a contraction sums over
    (:attr:`names`: the enumerated sites outside ``replayed`` and the sites that depend on
    them); :meth:`terms` gives their contracted log-densities. Outside every other cost
    handler of the run, it sees each site first once it is complete.
    """

    def __init__(self, replayed: Container[str]) -> None:
        super().__init__()
        self.contraction = _Contraction(replayed)
        self.names: set[str] = set()

    def _pyro_post_sample(self, msg) -> None:
        if self.contraction.take(msg):
            self.names.add(msg["name"])

    def terms(self) -> list[tuple[tuple, torch.Tensor]]:
        return self.contraction.terms()


def marginalize_trace(model_trace: Trace, replayed: Container[str]) -> dict[str, list[str]]:
    """
    Replaces the sites of ``model_trace`` that a contraction sums over by observed sites that
    hold the contracted log-densities (named with :data:`MARGINAL_PREFIX`, one per plate set,
    ``log_prob`` and ``log_prob_sum`` computed), and returns each new site's name with the
    sites it replaces (every contracted site: the terms share them).
    """
    contraction = _Contraction(replayed)
    taken = [name for name, site in model_trace.nodes.items() if contraction.take(site)]
    if not taken:
        return {}
    terms = contraction.terms()
    for name in taken:
        model_trace.remove_node(name)
    replaced = {}
    for i, (stack, term) in enumerate(terms):
        name = f"{MARGINAL_PREFIX}{i}"
        model_trace.add_node(
            name,
            type="sample",
            name=name,
            fn=None,
            value=term,
            is_observed=True,
            args=(),
            kwargs={},
            infer={},
            scale=1.0,
            mask=None,
            cond_indep_stack=stack,
            done=True,
            stop=False,
            continuation=None,
            log_prob=term,
            unscaled_log_prob=term,
            log_prob_sum=term.sum(),
        )
        replaced[name] = taken
    return replaced


class Expectation:
    """
    The expectation over the guide's enumerated sites :math:`c`, as in Pyro's
    :class:`~pyro.infer.util.Dice`: a cost term :math:`t` over plates :math:`P` becomes

    .. math::

        \\mathbb{E}_q[t] = \\sum_c \\prod_{j:\\, P_j \\subseteq P} q(c_j \\mid \\cdot)\\; t(c),

    summed over the enumeration dims, its plates kept; the product is over the enumerated guide
    sites (:meth:`add`) whose plates :math:`P_j` lie within the term's, their unscaled,
    unmasked probabilities (those of later sites sum to one). A term that no enumerated value
    reaches is itself.
    """

    def __init__(self) -> None:
        self.factors: list[tuple[frozenset, torch.Tensor]] = []
        self.dims: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self.factors)

    @classmethod
    def of_trace(cls, guide_trace: Trace) -> Expectation:
        """The expectation over the enumerated sites of a guide trace."""
        expectation = cls()
        for site in guide_trace.nodes.values():
            expectation.add(site)
        return expectation

    def add(self, site: dict) -> None:
        """Adds ``site`` (a message or trace node) if it is an enumerated guide site."""
        dim = (site.get("infer") or {}).get("_enumerate_dim")
        if site["type"] != "sample" or site["is_observed"] or dim is None:
            return
        log_q = site["fn"].score_parts(site["value"], *site["args"], **site["kwargs"])
        self.factors.append((_plates(site["cond_indep_stack"]), log_q.score_function))
        self.dims.add(dim)

    def __call__(self, value, stack: tuple, grad: bool = True):
        """The expectation of ``value``, a cost term over the plates of ``stack``; with
        ``grad``, differentiable in the guide's probabilities too."""
        if not self.factors or not torch.is_tensor(value):
            return value
        shape = value.shape
        dims = [d for d in self.dims if -d <= len(shape) and shape[d] > 1]
        if not dims:
            return value
        plates = _plates(stack)
        factors = [log_q for frames, log_q in self.factors if frames <= plates]
        if not factors:
            return value
        with unguarded():
            log_w = sum(factors)
            w = log_w.exp() if grad else log_w.detach().exp()
            value = torch.where(w > 0, value, torch.zeros((), dtype=value.dtype))
            total = (w * value).sum([d for d in self.dims if -d <= max(w.dim(), len(shape))])
            depth = max([-f.dim for f in plates], default=0)
            total = total.reshape(total.shape[max(total.dim() - depth, 0) :])
        return total


def _plates(stack) -> frozenset:
    return frozenset(f for f in stack if f.vectorized)


def expect_traces(model_trace: Trace, guide_trace: Trace) -> None:
    """
    Replaces the log-densities of the sites of both traces that the guide's enumerated values
    reach by their :class:`Expectation` (``log_prob``, ``log_prob_sum`` and, in the guide, the
    score parts: an enumerated site's, or a reparameterized site's, entropy term is its
    expected log-density, differentiated exactly). A site the guide samples otherwise that
    they reach (a Bernoulli, categorical or other score-function site) raises
    :class:`NotImplementedError` naming it.
    """
    expectation = Expectation.of_trace(guide_trace)
    if not expectation:
        return
    for trace in (model_trace, guide_trace):
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            log_prob = expectation(site["log_prob"], site["cond_indep_stack"])
            if log_prob is site["log_prob"]:
                continue
            site["log_prob"], site["log_prob_sum"] = log_prob, log_prob.sum()
            if trace is model_trace or site["is_observed"]:
                continue
            enumerated_site = (site.get("infer") or {}).get("_enumerate_dim") is not None
            if not enumerated_site and not site["fn"].has_rsample:
                raise NotImplementedError(
                    f"At site '{name}': the guide samples it after a site it enumerates, and "
                    "its distribution depends on the enumerated value; TraceARM_ELBO sums out "
                    "enumerated guide sites that no later sampled discrete site depends on. "
                    "Enumerate this site too, or sample it before the enumerated ones"
                )
            site["score_parts"] = ScoreParts(log_prob, 0.0, log_prob)
