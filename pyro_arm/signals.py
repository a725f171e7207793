# SPDX-License-Identifier: Apache-2.0
"""
Plate-local learning signals.

The signal of a guide site is the ELBO integrand :math:`f = \\log p(x, z) - \\log q(z | x)` of
one run, with each cost term (a site's scaled and masked log-density) summed down to the plates
it shares with the site, as in Pyro's :class:`~pyro.infer.tracegraph_elbo.TraceGraph_ELBO`: an
element of a data plate is driven by that datapoint's terms, and terms outside the site's plates
are summed and broadcast to every element, never dropped.

Dropping the other elements' terms is unbiased only while they do not depend on this element's
value. That fails when a guide site sampled later lies outside one of the site's plates and
reads the site's value (every element's terms may then depend on every entry), so
:func:`signal_frames` keeps per-element signals only over plates that contain every later guide
site that depends on the site, and sums over the others. Dependencies come from provenance
(:mod:`pyro_arm.dependencies`); without them every later site is assumed to depend on the site,
which never adds bias, only variance.

The cost terms themselves come from :mod:`pyro_arm.costs`. Score-function sites are
Rao-Blackwellized as in ``TraceGraph_ELBO``: their signals hold only the cost terms whose
provenance names the site.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from pyro.infer.util import MultiFrameTensor
from pyro.poutine import Trace
from pyro.poutine.indep_messenger import CondIndepStackFrame


def signal_frames(
    guide_trace: Trace, name: str, depends_on: Optional[dict] = None
) -> frozenset[CondIndepStackFrame]:
    """
    The plates over which the signal of guide site ``name`` stays per-element: the site's
    vectorized plates that also contain every guide site sampled after it that depends on it.

    :param depends_on: guide site name -> the sampled guide sites its value depends on (see
        :class:`~pyro_arm.dependencies.Dependencies`); when ``None``, every later site is taken
        to depend on ``name``.
    """
    frames = None
    for other_name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        if frames is not None:
            if depends_on is None or name in depends_on.get(other_name, (name,)):
                frames &= set(site["cond_indep_stack"])
        elif other_name == name:
            frames = {f for f in site["cond_indep_stack"] if f.vectorized}
    if frames is None:
        raise KeyError(name)
    return frozenset(frames)


def append_event_dims(signal: Union[torch.Tensor, float], event_dim: int):
    """
    Appends ``event_dim`` trailing singleton dims to a signal over batch dims, so it lines up
    with a sample of the site (right-aligned broadcasting alone would misalign when a plate
    size equals an event size).
    """
    if not torch.is_tensor(signal):
        return signal
    return signal.reshape(signal.shape + (1,) * event_dim)


def select_branch(value: Union[torch.Tensor, float], index: int, nesting: int):
    """
    Index ``index`` of the branch plate, the leftmost of ``nesting`` batch dims, of a tensor
    over batch dims; a tensor without that dim is the same for every branch. Leading singleton
    dims are dropped, as :meth:`~pyro.infer.util.MultiFrameTensor.sum_to` drops them.
    """
    if torch.is_tensor(value) and value.dim() >= nesting:
        value = value.select(value.dim() - nesting, index)
        while value.dim() and value.size(0) == 1:
            value = value.squeeze(0)
    return value


def local_signal(
    costs: MultiFrameTensor, frames: frozenset[CondIndepStackFrame], event_dim: int
) -> Union[torch.Tensor, float]:
    """The costs summed down to ``frames``, with ``event_dim`` trailing singleton dims."""
    return append_event_dims(costs.sum_to(frames), event_dim)
