# SPDX-License-Identifier: Apache-2.0
"""
The peer contenders ``storch_arm``, ``storch_arm_fixed`` and ``storch_disarm``: the ARM and DisARM
estimators of
`storchastic <https://github.com/HEmile/storchastic>`_ (van Krieken et al., 2021), the one other
PyTorch library with an ARM estimator for general stochastic computation graphs, on the same
sigmoid belief net as every other contender.

storchastic is an optional benchmark dependency (``pip install -e ".[bench]"``); without it
:func:`unavailable_reason` says why and the contenders are left out.

The step follows storchastic's own VAE example: the batch is a storch plate ``data`` (summed, like
the Pyro ELBOs' loss), each stochastic layer ``z_k`` is sampled by ``storch.method.ARM("z_k",
n_samples=1)`` (or ``DisARM``), which draws the pair ``(z, z~)`` as a plate of size 2, and the cost
is ``-ELBO = log q(z | x) - log p(x, z)`` per datapoint, with the log-densities of
``torch.distributions.Bernoulli`` (storch broadcasts its plates through them). ``storch.backward``
builds the surrogate loss and backpropagates it.

With ``T`` layers storchastic evaluates the cost on every combination of the layers' pairs
(``2^T`` evaluations of the decoders, against ``T + 1`` for ``TraceARM_ELBO``); its ARM gradient of
layer ``k`` uses the costs averaged over the first member of the later layers' pairs.

What storchastic 0.3.7 gets wrong (measured against exact enumeration in
``tests/test_storchastic.py``; ``docs/results.rst`` has the numbers):

- ``DisARM``'s encoder gradient is biased (its mean is 0 to 0.2 times the right one).
  ``DisARM.estimator`` returns the antithetic cost ``f(z~)`` as a bare control variate, which
  ``storch.inference.surrogate_loss`` multiplies by ``magic_box(L)``, so the gradient is
  ``(f(z) + f(z~)) w`` instead of ``(f(z) - f(z~)) w`` (its ``ARM`` returns
  ``(1 - magic_box(log_prob)) * baseline``); and ``DisARM.plate_weighting`` is never registered
  with the sampling method, so the antithetic member is averaged in with the same weight.
  :class:`PatchedDisARM` fixes both lines (unbiased on a toy model with ``n_samples=1``; with
  more pairs its weighting is still wrong).
- ``DisARM`` fails on a batch (a plate before the sample plate): ``comp_estimator`` indexes with
  ``(None,) * plate_index`` where ``(slice(None),) * plate_index`` is meant. So the
  ``storch_disarm`` contender cannot run on the SBN (:func:`unavailable_reason` says so).
- ``ARM.estimator`` returns the logistic log-density per latent unit, not summed over the
  event dims, so ``magic_box(L) * cost`` in ``surrogate_loss`` holds one copy of the cost per
  unit and every pathwise gradient is multiplied by the number of latent units ``d``: the
  model's parameters get ``d`` times their gradient, and the encoder gets ``d`` times the
  zero-mean gradient of ``log q`` at the sample (a large variance; with one layer the ARM term
  itself is right, so the encoder gradient stays unbiased; with two, the second layer's encoder
  gradient is scaled too, by the first layer's width in the test). :class:`PatchedARM` sums
  over the event dims, as ``DisARM`` does; the contender ``storch_arm_fixed`` runs it.
- ``DisARM``'s model-parameter gradient is 1.5x the right one (the added ``f(z~)`` above).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.distributions import Bernoulli

from benchmarks.plain_arm import PlainSBN

try:
    import storch
    from storch.util import magic_box
except ImportError as _e:  # optional dependency
    storch = None
    _IMPORT_ERROR: Exception | None = _e
else:
    _IMPORT_ERROR = None

#: Contender name -> name of the storchastic method class.
CONTENDERS = {"storch_arm": "ARM", "storch_disarm": "DisARM", "storch_arm_fixed": "PatchedARM"}

#: Whether the contender runs on a batch (a storch plate before the sample plate).
RUNS_ON_BATCHES = {"storch_arm": True, "storch_disarm": False, "storch_arm_fixed": True}

_DISARM_ON_BATCHES = (
    "storchastic 0.3.7's DisARM fails on any batched model: DisARM.comp_estimator indexes its "
    "pair with (None,) * plate_index + (slice(n),) instead of (slice(None),) * plate_index + ..., "
    "so with the data plate in front it slices the batch dimension and raises 'The expanded size "
    "of the tensor (1) must match the existing size'. It runs only on a single datapoint "
    "(tests/test_storchastic.py measures its bias there)"
)


def unavailable_reason(name: str | None = None) -> str | None:
    """``None`` when storchastic imports (and the contender ``name``, if given, runs on batches),
    else why not."""
    if _IMPORT_ERROR is not None:
        return (
            f"storchastic is not importable ({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}); "
            'install the benchmark extra: pip install -e ".[bench]"'
        )
    if name is not None and not RUNS_ON_BATCHES[name]:
        return _DISARM_ON_BATCHES
    return None


def _require_storch() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)


def make_methods(method: str, num_layers: int, n_samples: int = 1) -> list:
    """
    One storchastic method per stochastic layer, on plates ``z1 ... zT``.

    :param method: ``"ARM"``, ``"DisARM"`` (storchastic's classes), ``"PatchedARM"`` or
        ``"PatchedDisARM"`` (fixed here).
    :param n_samples: antithetic pairs per layer (storchastic averages their gradients).
    """
    _require_storch()
    patched = {"PatchedARM": PatchedARM, "PatchedDisARM": PatchedDisARM}
    cls = patched[method] if method in patched else getattr(storch.method, method)
    return [cls(f"z{k + 1}", n_samples=n_samples) for k in range(num_layers)]


def _bernoulli(logits) -> Bernoulli:
    # torch's argument validation (on under Pyro's validation) reduces storch tensors to 0-d
    # tensors, which storch rejects; the logits are finite by construction.
    return Bernoulli(logits=logits, validate_args=False)


def neg_elbo_cost(sbn: PlainSBN, x: Tensor, methods: Sequence) -> None:
    """
    Samples every layer with its storchastic method and registers ``log q(z | x) - log p(x, z)``
    per datapoint as the cost ``neg_elbo``, on a fresh ``storch`` graph.

    :param x: a batch ``(N, D)``, made the storch plate ``data`` (summed, so that the loss is the
        batch's -ELBO as in Pyro), or one datapoint ``(D,)`` (no data plate).
    """
    storch.reset()
    xs = x if x.dim() == 1 else storch.denote_independent(x, 0, "data", weight=x.new_tensor(1.0))
    h, zs, log_q = xs, [], 0.0
    for encoder, method in zip(sbn.encoders, methods):
        q = _bernoulli(encoder(h))
        z = method(q).to(x.dtype)
        log_q = log_q + q.log_prob(z).sum(-1)
        zs.append(z)
        h = z
    log_p = _bernoulli(sbn.prior_logits).log_prob(zs[-1]).sum(-1)
    for decoder, z, below in zip(sbn.decoders, zs, [xs] + zs[:-1]):
        log_p = log_p + _bernoulli(decoder(z)).log_prob(below).sum(-1)
    storch.add_cost(log_q - log_p, "neg_elbo")


def storch_grads(sbn: PlainSBN, x: Tensor, methods: Sequence) -> Tensor:
    """Accumulates storchastic's gradient of the batch's -ELBO into ``.grad``; returns the
    surrogate loss (detached)."""
    neg_elbo_cost(sbn, x, methods)
    return storch.backward().detach()


class StorchStep:
    """
    One training step: zero the gradients, storchastic's gradient, an optimizer step.

    :param sbn: the network (:func:`benchmarks.common.copy_of_plain` of the shared init).
    :param optim: a ``torch.optim`` optimizer over ``sbn``'s parameters.
    :param method: ``"ARM"`` or ``"DisARM"``.
    """

    def __init__(self, sbn: PlainSBN, optim: torch.optim.Optimizer, method: str):
        self.sbn, self.optim = sbn, optim
        self.methods = make_methods(method, sbn.num_layers)

    def grad(self, x: Tensor) -> Tensor:
        """The gradient only (into ``.grad``, zeroed first); returns the surrogate loss."""
        self.sbn.zero_grad(set_to_none=True)
        return storch_grads(self.sbn, x, self.methods)

    def __call__(self, x: Tensor) -> float:
        loss = self.grad(x)
        self.optim.step()
        return loss.item()


if storch is not None:

    class PatchedARM(storch.method.ARM):
        """storchastic's ``ARM`` with its score term summed over the event dims (as its
        ``DisARM`` does). Unpatched, ``magic_box(L) * cost`` keeps one copy of the cost per latent
        unit, so every pathwise gradient (the model's parameters, and the zero-mean gradient of
        ``log q`` at the sample) is multiplied by the number of latent units."""

        def estimator(self, tensor, cost):
            plate = tensor.get_plate(tensor.name)
            index = tensor.get_plate_dim_index(plate.name)
            log_prob, baseline = storch.deterministic(self.comp_estimator)(
                tensor, cost, tensor.distribution.logits, index, plate.n // 2
            )
            log_prob = log_prob.sum(dim=log_prob.event_dim_indices)
            return log_prob, (1 - magic_box(log_prob)) * baseline

    class PatchedDisARM(storch.method.DisARM):
        """storchastic's ``DisARM`` with its two defects fixed (see the module docstring): the
        antithetic member weighted 0 in the plate average, and ``f(z~)`` subtracted as a
        control variate. For the bias check only; not a contender."""

        def __init__(self, plate_name: str, n_samples: int = 1):
            super().__init__(plate_name, n_samples=n_samples)
            self.sampling_method.set_mc_weighting_function(self.plate_weighting)

        def estimator(self, tensor, cost):
            multiplicative, baseline = super().estimator(tensor, cost)
            return multiplicative, (1 - magic_box(multiplicative)) * baseline
