# SPDX-License-Identifier: Apache-2.0
"""
Baselines for the score-function sites of :class:`~pyro_arm.TraceARM_ELBO`.

A score-function site :math:`z \\sim q_\\phi` contributes :math:`\\nabla_\\phi \\log q_\\phi(z)\\,
(f - b)` to the gradient, where :math:`f` is its (Rao-Blackwellized, plate-local) signal and
:math:`b` a baseline; it stays unbiased while :math:`b` does not depend on :math:`z`.

- A site's own ``infer={"baseline": {...}}`` options work as in Pyro's
  :class:`~pyro.infer.tracegraph_elbo.TraceGraph_ELBO`, with the same names:
  ``use_decaying_avg_baseline`` and ``baseline_beta`` (an average of past signals kept in the param
  store as ``"__baseline_avg_downstream_cost_" + site``), ``nn_baseline`` with
  ``nn_baseline_input`` (a module the user registers with :func:`pyro.module`), or
  ``baseline_value``. The last two are trained by the loss :math:`\\sum (f - b)^2`, added to the
  surrogate loss.
- A site without options, among ``num_particles >= 2`` particles, gets the leave-one-out mean of
  the other particles' signals, per plate element: :math:`b_i = \\frac{1}{P - 1}\\sum_{j \\ne i}
  f_j` (:func:`leave_one_out`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import pyro
import torch
from pyro.distributions.util import detach
from torch import Tensor


class BaselineOptions(NamedTuple):
    """A site's ``infer["baseline"]`` options, with ``TraceGraph_ELBO``'s names and defaults."""

    nn_baseline: Optional[torch.nn.Module] = None
    nn_baseline_input: Optional[Tensor] = None
    use_decaying_avg_baseline: bool = False
    baseline_beta: float = 0.90
    baseline_value: Optional[Tensor] = None

    @property
    def any(self) -> bool:
        return (
            self.nn_baseline is not None
            or self.use_decaying_avg_baseline
            or self.baseline_value is not None
        )


def baseline_options(site: dict) -> BaselineOptions:
    """
    Reads ``site["infer"]["baseline"]``.

    :raises ValueError: on an unknown option, or on both ``nn_baseline`` and ``baseline_value``.
    """
    options = dict((site.get("infer") or {}).get("baseline", {}))
    unknown = set(options) - set(BaselineOptions._fields)
    if unknown:
        raise ValueError(f"Unrecognized baseline options at site '{site['name']}': {unknown}")
    result = BaselineOptions(**options)
    if result.nn_baseline is not None and result.baseline_value is not None:
        raise ValueError(
            f"At site '{site['name']}': cannot use baseline_value and nn_baseline together"
        )
    return result


def leave_one_out(signals: Tensor, dim: int) -> Tensor:
    """
    The mean of the other particles' signals along the particle dim ``dim`` (size >= 2):
    independent of each particle's own sample, so it keeps the estimate unbiased.
    """
    num = signals.size(dim)
    return (signals.sum(dim, keepdim=True) - signals) / (num - 1)


def decaying_average(old: Tensor, signal: Tensor, beta: float) -> Tensor:
    """The next decaying average of the signal: ``beta * old + (1 - beta) * signal``."""
    return beta * old + (1 - beta) * signal


def squared_error(signal: Tensor, baseline: Tensor) -> Tensor:
    """The loss that trains a learned baseline: ``sum((signal - baseline) ** 2)``."""
    return (signal.detach() - baseline).pow(2).sum()


def site_baseline(
    name: str, site: dict, signal: Tensor, options: BaselineOptions
) -> tuple[Union[Tensor, float], Union[Tensor, float]]:
    """
    The baseline of a site with its own options, and the loss that trains it, as
    ``TraceGraph_ELBO`` builds them.

    :raises ValueError: if the baseline does not broadcast to the signal's shape.
    """
    baseline = 0.0
    loss = 0.0
    if options.use_decaying_avg_baseline:
        param_name = "__baseline_avg_downstream_cost_" + name
        with torch.no_grad():
            old = pyro.param(param_name, torch.zeros(signal.shape, device=signal.device))
            new = decaying_average(old, signal, options.baseline_beta)
        pyro.get_param_store()[param_name] = new
        baseline = baseline + old
    if options.nn_baseline is not None:
        baseline = baseline + options.nn_baseline(detach(options.nn_baseline_input))
    elif options.baseline_value is not None:
        baseline = baseline + options.baseline_value
    shape = torch.as_tensor(baseline).shape
    try:
        torch.broadcast_shapes(shape, signal.shape)
    except RuntimeError:
        raise ValueError(
            f"Expected the baseline at site '{name}' to broadcast to {tuple(signal.shape)}, "
            f"got {tuple(shape)}"
        ) from None
    if options.nn_baseline is not None or options.baseline_value is not None:
        loss = squared_error(signal, baseline)
    return baseline, loss
