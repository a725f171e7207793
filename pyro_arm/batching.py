# SPDX-License-Identifier: Apache-2.0
"""
Errors of batched passes: value-dependent control flow in user code (``.item()``, ``if z:``) fails
inside a pass batched over particles or branches; it becomes a :class:`NotImplementedError`
naming the site, and any other error keeps its type and message, with a note.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

from pyro_arm.reads import SampledValueRead

#: Messages of the errors that torch raises when code converts a batched tensor to a Python
#: number or bool: the signature of value-dependent control flow.
_CONTROL_FLOW_ERRORS = (
    "cannot be converted to Scalar",
    "Boolean value of Tensor with more than one value is ambiguous",
    "only one element tensors can be converted to Python scalars",
)


def is_control_flow_error(exc: BaseException) -> bool:
    """Whether ``exc`` is what torch raises when code reads a batched tensor as one number, or
    a :class:`~pyro_arm.reads.SampledValueRead`."""
    if isinstance(exc, SampledValueRead):
        return True
    return isinstance(exc, (RuntimeError, ValueError)) and any(
        message in str(exc) for message in _CONTROL_FLOW_ERRORS
    )


@contextmanager
def batched_pass_errors(seen: Optional[list]):
    """
    Turns an error of value-dependent control flow that user code raises inside a batched pass
    into a clear error naming the last site of ``seen``; inactive when ``seen`` is None. Any
    other error (out of memory, a shape bug) keeps its type and message, with a note added.
    """
    try:
        yield
    except (RuntimeError, ValueError) as exc:
        if seen is None:
            raise
        where = f"after site '{seen[-1]}'" if seen else "before the first site"
        if not is_control_flow_error(exc):
            exc.add_note(f"(raised {where} in a batched pass of particles or antithetic branches)")
            raise
        raise NotImplementedError(
            f"Model or guide failed {where} in a batched pass of particles or antithetic "
            f"branches: {exc}. Code that converts a sampled value to a Python number or "
            "branches on it (.item(), `if z:`, .tolist(), torch.equal) cannot run vectorized; "
            "use vectorize_particles=False"
        ) from exc


def check_all_seen(order: list, seen: list) -> None:
    """
    Raises :class:`NotImplementedError` when a site of the base run (``order``) did not appear in
    a batched pass of branches (``seen``): the guide's structure depends on sampled values.
    """
    missing = [name for name in order if name not in seen]
    if missing:
        raise NotImplementedError(
            f"Site '{missing[0]}' of the base run did not appear in a batched pass of branches: "
            "the guide's structure depends on sampled values, which a vectorized pass cannot "
            "follow; use vectorize_particles=False"
        )
