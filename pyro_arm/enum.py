# SPDX-License-Identifier: Apache-2.0
"""
Sites marked for enumeration (``infer={"enumerate": "parallel"}`` or ``"sequential"``, as
:func:`~pyro.infer.enum.config_enumerate` marks them).

The ELBOs of this package do not sum such sites out; sampling them instead would optimize a
different, noisier objective than the one the user asked for. :func:`refuse_enumerated` raises
:class:`NotImplementedError` naming the first such site of a run: a guide site, or a model site
that the guide does not sample (model sites the guide samples take the guide's value, as in
:class:`~pyro.infer.traceenum_elbo.TraceEnum_ELBO`).
"""

from __future__ import annotations

from typing import Optional

from pyro.poutine import Trace


def enumeration(site: dict) -> Optional[str]:
    """The enumeration a latent sample site is marked for (``"parallel"``, ``"sequential"``), or
    ``None``."""
    if site["type"] != "sample" or site["is_observed"]:
        return None
    return (site.get("infer") or {}).get("enumerate") or None


def refuse_enumerated(model_trace: Trace, guide_trace: Trace, elbo: str) -> None:
    """
    Raises :class:`NotImplementedError` naming the first site of the guide, then of the model
    (outside the guide), marked for enumeration, and the ELBO (``elbo``) that cannot sum it out.
    """
    marked = [(n, s) for n, s in guide_trace.nodes.items() if enumeration(s)]
    marked += [
        (n, s) for n, s in model_trace.nodes.items() if enumeration(s) and n not in guide_trace
    ]
    if not marked:
        return
    name, site = marked[0]
    raise NotImplementedError(
        f"At site '{name}': the site is marked for enumeration "
        f"(infer={{'enumerate': {enumeration(site)!r}}}), which {elbo} does not sum out; "
        "sampling it instead would change the objective. Use pyro.infer.TraceEnum_ELBO to sum "
        "it out, or remove the mark (config_enumerate, infer['enumerate']) to sample it"
    )
