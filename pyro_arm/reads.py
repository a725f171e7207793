# SPDX-License-Identifier: Apache-2.0
"""
Reads of sampled values into Python, the one thing a batched pass cannot follow.

A batched pass runs several rows (particles, antithetic branches) as one run along a plate. Code
that turns a sampled value into Python data -- ``bool``, ``int``, ``float``, ``.item()``,
``.tolist()``, ``.numpy()``, ``torch.equal``, ``if`` on a tensor -- or whose output shape depends
on the values (``nonzero``, boolean masks, ``unique``) then sees every row at once: some of these
raise on a batched tensor, others (``z.any()``, ``torch.equal``, ``.tolist()``) silently mix the
rows. :func:`is_read` tells such calls apart from reads of metadata (shapes, dtypes).

:class:`ReadGuard` watches a batched pass: every latent sample site's value is tainted, every
torch call with a tainted input taints its outputs, and a read of a tainted tensor raises
:class:`SampledValueRead` at once, before the mixed value can reach Python. Reads of data (a
tensor that no sampled value flows into) pass. The guard also keeps a fingerprint of the pass:
the sequence of torch calls and the shapes of what they return, so that a caller can tell
whether two passes took the same code path.
"""

from __future__ import annotations

import os
import sys
import weakref
from typing import Any, Callable, Optional

import torch
from pyro.poutine.messenger import Messenger
from torch.overrides import TorchFunctionMode

from pyro_arm.sites import is_subsample_site

#: Calls that return Python data about a tensor's layout, never about its values.
_METADATA = frozenset(
    {
        "__get__",  # properties: shape, dtype, device, requires_grad, ...
        "__len__",
        "__repr__",
        "__str__",
        "__format__",
        "__hash__",
        "size",
        "dim",
        "ndimension",
        "numel",
        "nelement",
        "stride",
        "storage_offset",
        "data_ptr",
        "element_size",
        "get_device",
        "is_contiguous",
        "is_floating_point",
        "is_complex",
        "is_signed",
        "is_pinned",
        "is_shared",
        "is_set_to",
        "is_same_size",
        "is_inference",
        "untyped_storage",
        "_is_view",
        "_base",
    }
)

#: Calls whose output shape depends on the values of their input.
_VALUE_SHAPED = frozenset(
    {
        "nonzero",
        "argwhere",
        "masked_select",
        "unique",
        "unique_consecutive",
        "bincount",
        "repeat_interleave",
    }
)

#: Calls that write into their first argument.
_IN_PLACE = frozenset({"__setitem__", "copy_", "masked_fill_", "index_put_", "scatter_"})

_PYTHON_DATA = (bool, int, float, complex, list)


def _name(func: Callable) -> str:
    return getattr(func, "__name__", "")


def _tensors(args, kwargs):
    for arg in args:
        if isinstance(arg, torch.Tensor):
            yield arg
        elif isinstance(arg, (tuple, list)):
            yield from (a for a in arg if isinstance(a, torch.Tensor))
    for arg in kwargs.values():
        if isinstance(arg, torch.Tensor):
            yield arg


def is_read(func: Callable, args: tuple, kwargs: dict, result: Any) -> bool:
    """
    Whether a torch call turned its tensor input into Python data that depends on the values
    (``result`` being what it returned), or made an output whose shape depends on them.
    """
    name = _name(func)
    if name in _METADATA:
        return False
    if isinstance(result, _PYTHON_DATA) or type(result).__module__ == "numpy":
        return True
    if name in _VALUE_SHAPED:
        return name != "repeat_interleave" or any(
            isinstance(a, torch.Tensor) and a.dim() > 0 for a in args[1:2]
        )
    if name == "where":
        return len(args) + len(kwargs) == 1
    if name in ("__getitem__", "index", "__setitem__") and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in index
        )
    return False


def unguarded():
    """
    A context for the library's own tensor code inside a guarded pass (the draw rule, summing
    cost terms): a :class:`ReadGuard` does not watch it, which saves its cost per call. Code
    that runs there must read no sampled value into Python, and hands user code nothing but
    sample values, which the guard taints as they leave the site.
    """
    return torch._C.DisableTorchFunction()


class SampledValueRead(RuntimeError):
    """A batched pass read a sampled value into Python (see :func:`is_read`)."""


class _Taint(Messenger):
    """Taints the value of every latent sample site, and records the last site met."""

    def __init__(self, guard: ReadGuard) -> None:
        super().__init__()
        self.guard = guard

    def _pyro_post_sample(self, msg) -> None:
        if msg["is_observed"] or is_subsample_site(msg):
            return
        self.guard.last_site = msg["name"]
        if isinstance(msg["value"], torch.Tensor):
            self.guard.taint(msg["value"])


class ReadGuard(TorchFunctionMode):
    """
    A context that raises :class:`SampledValueRead` where code inside reads a value computed
    from a sampled value into Python, and keeps the pass's :attr:`fingerprint`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._tainted: dict[int, weakref.ref] = {}
        self._taint = _Taint(self)
        self.last_site: str | None = None
        self._calls: list = []

    def __enter__(self):
        self._taint.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._taint.__exit__(*exc)

    def taint(self, tensor: torch.Tensor) -> None:
        key = id(tensor)
        if key not in self._tainted:
            self._tainted[key] = weakref.ref(tensor, lambda _, k=key: self._tainted.pop(k, None))

    def tainted(self, tensor: torch.Tensor) -> bool:
        ref = self._tainted.get(id(tensor))
        return ref is not None and ref() is tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **kwargs) if kwargs else func(*args)
        shape = result.shape if isinstance(result, torch.Tensor) else type(result)
        self._calls.append((func, shape))
        if not self._reads_tainted(args, kwargs):
            return result
        if is_read(func, args, kwargs or {}, result) and not _in_validation():
            where = f"after site '{self.last_site}'" if self.last_site else "before any site"
            raise SampledValueRead(
                f"`{_name(func) or func}` read a sampled value into Python {where} in a "
                "batched pass, which would mix its rows there"
            )
        if isinstance(result, torch.Tensor):
            self.taint(result)
        elif isinstance(result, (tuple, list)):
            for r in result:
                if isinstance(r, torch.Tensor):
                    self.taint(r)
        name = _name(func)
        if (
            args
            and isinstance(args[0], torch.Tensor)
            and (name in _IN_PLACE or (name.endswith("_") and not name.startswith("_")))
        ):
            self.taint(args[0])
        out = kwargs.get("out") if kwargs else None
        if isinstance(out, torch.Tensor):
            self.taint(out)
        return result

    def _reads_tainted(self, args: tuple, kwargs: Optional[dict]) -> bool:
        """Whether a call's arguments (one level into lists and tuples) hold a tainted tensor."""
        tainted = self._tainted
        for arg in args:
            ref = tainted.get(id(arg))
            if ref is not None and ref() is arg:
                return True
            if type(arg) in (tuple, list) and any(self.tainted(a) for a in arg):
                return True
        return bool(kwargs) and any(self.tainted(a) for a in kwargs.values())

    @property
    def fingerprint(self) -> int:
        """The code path of the pass so far: its torch calls and the shapes they returned."""
        return hash(tuple(self._calls))


#: Where torch.distributions and Pyro check arguments, samples and log-densities: reads there
#: can only raise an error or warn about an invalid value, never steer a result.
_VALIDATION = {
    os.path.join("torch", "distributions", "distribution.py"): ("__init__", "_validate_sample"),
    os.path.join("pyro", "util.py"): ("warn_if_nan", "warn_if_inf"),
}
_TORCH_INTERNALS = (os.path.join("torch", "_tensor.py"), os.path.join("torch", "overrides.py"))


def _in_validation() -> bool:
    """Whether the read being handled comes from the validation of a distribution or a
    log-density."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.endswith(_TORCH_INTERNALS):
        frame = frame.f_back
    if frame is None:
        return False
    code = frame.f_code
    return any(
        code.co_filename.endswith(path) and code.co_name in names
        for path, names in _VALIDATION.items()
    )
