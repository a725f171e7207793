# SPDX-License-Identifier: Apache-2.0
"""
A plain-PyTorch (no Pyro) ARM / DisARM / AR training step for sigmoid belief nets.

This is the hand-written lower bound the benchmarks compare :class:`pyro_arm.TraceARM_ELBO`
against: the same algorithm with none of Pyro's tracing.

The network has ``T`` stochastic layers ``z_1`` (nearest ``x``) ... ``z_T`` (top):

- guide (encoder) ``q(z_1 | x) q(z_2 | z_1) ... q(z_T | z_{T-1})``, ``q(z_k | h) =
  Bernoulli(sigmoid(encoders[k-1](h)))``;
- model ``p(z_T) p(z_{T-1} | z_T) ... p(x | z_1)`` with learnable top prior logits and
  ``p(h | z_k) = Bernoulli(sigmoid(decoders[k-1](z_k)))``.

The signal is the per-datapoint ELBO ``f = log p(x, z) - log q(z | x)``. One step draws the
uniforms ``u_k`` of every layer once and makes ``T + 1`` evaluations of ``f`` with common random
numbers: the base sample ``z_k = 1[u_k < sigmoid(phi_k)]``, and for every layer ``t`` a branch
that keeps the layers ``< t``, sets layer ``t`` to its antithetic twin ``1[u_t > sigmoid(-phi_t)]``
and recomputes the layers ``> t`` from the same uniforms. The model parameters get the ordinary
gradient of ``f`` at the base sample; the encoder logits of layer ``t`` get
``(f(branch t) - f(base)) * (u_t - 1/2)`` (ARM) or the DisARM weight. The branches run under
``torch.no_grad`` and are stacked along a new leading dimension, so each decoder runs once over all
branches.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ESTIMATOR_NAMES = ("arm", "disarm", "ar")


def bernoulli_log_prob(logits: Tensor, value: Tensor) -> Tensor:
    """``log Bernoulli(value; logits)`` summed over the last dimension (broadcasting logits)."""
    if logits.shape != value.shape:
        shape = torch.broadcast_shapes(logits.shape, value.shape)
        logits, value = logits.expand(shape), value.expand(shape)
    return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


class PlainSBN(nn.Module):
    """
    A sigmoid belief net as plain modules.

    :param encoders: ``T`` modules; ``encoders[k]`` maps layer ``k`` (``x`` for ``k = 0``) to the
        logits of ``z_{k+1}``.
    :param decoders: ``T`` modules; ``decoders[k]`` maps ``z_{k+1}`` to the logits of layer ``k``.
    :param prior_logits: a parameter of shape ``(d_T,)``, the logits of ``p(z_T)``.
    """

    def __init__(
        self,
        encoders: Sequence[Callable[[Tensor], Tensor]],
        decoders: Sequence[Callable[[Tensor], Tensor]],
        prior_logits: Tensor,
    ):
        super().__init__()
        assert len(encoders) == len(decoders) >= 1
        self.encoders = nn.ModuleList(encoders)
        self.decoders = nn.ModuleList(decoders)
        if not isinstance(prior_logits, nn.Parameter):
            prior_logits = nn.Parameter(prior_logits)
        self.prior_logits = prior_logits

    @property
    def num_layers(self) -> int:
        return len(self.encoders)

    def encoder_parameters(self):
        """The guide's parameters (what the ARM signal trains)."""
        return self.encoders.parameters()

    def log_joint(self, x: Tensor, zs: Sequence[Tensor]) -> Tensor:
        """``log p(x, z)`` per datapoint; ``zs[k]`` may carry extra leading (branch) dims."""
        out = bernoulli_log_prob(self.prior_logits, zs[-1])
        below = [x] + list(zs[:-1])
        for k, dec in enumerate(self.decoders):
            out = out + bernoulli_log_prob(dec(zs[k]), below[k])
        return out

    def log_q(self, zs: Sequence[Tensor], logits: Sequence[Tensor]) -> Tensor:
        """``log q(z | x)`` per datapoint from the guide's logits of every layer."""
        return sum(bernoulli_log_prob(lg, z) for lg, z in zip(logits, zs))

    def sample_guide(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """One draw from the guide: ``(logits, uniforms, samples)`` per layer (logits keep grad)."""
        logits, us, zs = [], [], []
        h = x
        for enc in self.encoders:
            lg = enc(h)
            u = torch.rand(lg.shape, generator=generator, device=lg.device, dtype=lg.dtype)
            z = (u < torch.sigmoid(lg.detach())).to(lg.dtype)
            logits.append(lg)
            us.append(u)
            zs.append(z)
            h = z
        return logits, us, zs

    def elbo(self, x: Tensor, num_samples: int = 1) -> Tensor:
        """A Monte Carlo estimate of the per-datapoint ELBO (no grad), averaged over samples."""
        with torch.no_grad():
            xs = x.expand(num_samples, *x.shape)
            logits, _, zs = self.sample_guide(xs)
            return (self.log_joint(xs, zs) - self.log_q(zs, logits)).mean(0)


def build_plain_sbn(
    layers: Sequence[int],
    x_dim: int = 784,
    x_mean: Tensor | None = None,
    hidden: Sequence[int] = (),
    activation: Callable[[], nn.Module] = nn.Tanh,
) -> PlainSBN:
    """
    A fresh :class:`PlainSBN` with ``layers`` stochastic units per layer (``z_1`` first).

    ``hidden`` gives deterministic hidden layers inside every encoder and decoder (the
    "nonlinear" SBN); the output bias of the ``x`` decoder starts at the logit of ``x_mean``.
    """

    def mlp(d_in: int, d_out: int) -> nn.Module:
        dims = [d_in, *hidden, d_out]
        mods: list[nn.Module] = []
        for i in range(len(dims) - 1):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                mods.append(activation())
        return mods[0] if len(mods) == 1 else nn.Sequential(*mods)

    sizes = [x_dim, *layers]
    encoders = [mlp(sizes[k], sizes[k + 1]) for k in range(len(layers))]
    decoders = [mlp(sizes[k + 1], sizes[k]) for k in range(len(layers))]
    if x_mean is not None:
        out = decoders[0] if isinstance(decoders[0], nn.Linear) else decoders[0][-1]
        with torch.no_grad():
            p = x_mean.clamp(1e-3, 1 - 1e-3)
            out.bias.copy_(torch.log(p) - torch.log1p(-p))
    return PlainSBN(encoders, decoders, torch.zeros(layers[-1]))


def _branch_samples(
    sbn: PlainSBN, logits: list[Tensor], us: list[Tensor], zs: list[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """
    The ``T`` antithetic branches, stacked along a new leading dimension (call under no_grad).

    Row ``t`` keeps the layers ``< t`` of the base sample, sets layer ``t`` to its antithetic twin
    and recomputes the layers ``> t`` from the same uniforms. Returns per layer the ``(T, ...)``
    samples and guide logits.
    """
    T = len(zs)
    bz: list[Tensor] = []
    bl: list[Tensor] = []
    for k in range(T):
        anti = (us[k] > torch.sigmoid(-logits[k])).to(zs[k].dtype).unsqueeze(0)
        keep = T - k - 1  # rows t > k keep the base sample of layer k
        parts_z, parts_l = [], []
        if k > 0:  # rows t < k recompute layer k from their own layer k - 1
            lr = sbn.encoders[k](bz[k - 1][:k])
            parts_z.append((us[k] < torch.sigmoid(lr)).to(lr.dtype))
            parts_l.append(lr)
        parts_z.append(anti)
        parts_l.append(logits[k].expand(keep + 1, *logits[k].shape))
        if keep:
            parts_z.append(zs[k].expand(keep, *zs[k].shape))
        bz.append(torch.cat(parts_z) if len(parts_z) > 1 else parts_z[0])
        bl.append(torch.cat(parts_l) if len(parts_l) > 1 else parts_l[0])
    return bz, bl


def logits_signal(
    estimator: str, f1: Tensor | None, f2: Tensor, u: Tensor, logits: Tensor
) -> Tensor:
    """Per-unit gradient estimate of the layer's logits (``f1``, ``f2`` broadcast to ``u``)."""
    if estimator == "arm":
        return (f1 - f2) * (u - 0.5)
    if estimator == "disarm":
        z1 = (u > torch.sigmoid(-logits)).to(logits.dtype)
        z2 = (u < torch.sigmoid(logits)).to(logits.dtype)
        weight = 0.5 * (1 - 2 * z2) * (z1 != z2).to(z2.dtype) * torch.sigmoid(logits.abs())
        return (f1 - f2) * weight
    if estimator == "ar":
        return f2 * (1 - 2 * u)
    raise ValueError(f"Unknown estimator {estimator!r}; expected one of {ESTIMATOR_NAMES}")


def arm_surrogate_loss(
    sbn: PlainSBN,
    x: Tensor,
    estimator: str = "arm",
    num_particles: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """
    A surrogate loss whose gradient is the ARM-family estimate of ``-grad ELBO``.

    The loss is summed over the batch (as Pyro's loss over a full ``plate``) and averaged over
    ``num_particles`` independent draws per datapoint.

    :returns: ``(surrogate, loss)``: backpropagate ``surrogate``; ``loss`` is the detached
        ``-ELBO`` estimate (same scale).
    """
    if estimator not in ESTIMATOR_NAMES:
        raise ValueError(f"Unknown estimator {estimator!r}; expected one of {ESTIMATOR_NAMES}")
    if num_particles > 1:
        x = x.expand(num_particles, *x.shape)
    logits, us, zs = sbn.sample_guide(x, generator)
    ld = [lg.detach() for lg in logits]
    # Model parameters: ordinary gradient at the base sample. The guide's logits enter only
    # through the estimator below (log q's own gradient has mean zero and is left out).
    f = sbn.log_joint(x, zs) - sbn.log_q(zs, ld)
    fd = f.detach()
    signals = []
    if estimator == "ar":
        signals = [logits_signal("ar", None, fd.unsqueeze(-1), u, lg) for u, lg in zip(us, ld)]
    else:
        with torch.no_grad():
            bz, bl = _branch_samples(sbn, ld, us, zs)
            f1 = sbn.log_joint(x, bz) - sbn.log_q(bz, bl)  # (T, *batch)
            for t in range(len(zs)):
                signals.append(
                    logits_signal(estimator, f1[t].unsqueeze(-1), fd.unsqueeze(-1), us[t], ld[t])
                )
    surrogate = f.sum() + sum((s * lg).sum() for s, lg in zip(signals, logits))
    scale = 1.0 / num_particles
    return -surrogate * scale, -fd.sum() * scale


class PlainARMStep:
    """
    One optimiser step of plain-PyTorch ARM: ``step(x)`` returns the ``-ELBO`` estimate (float).

    :param sbn: the network.
    :param optimizer: a torch optimiser over ``sbn.parameters()``.
    :param estimator: ``"arm"``, ``"disarm"`` or ``"ar"``.
    """

    def __init__(
        self,
        sbn: PlainSBN,
        optimizer: torch.optim.Optimizer,
        estimator: str = "arm",
        num_particles: int = 1,
        generator: torch.Generator | None = None,
    ):
        self.sbn = sbn
        self.optimizer = optimizer
        self.estimator = estimator
        self.num_particles = num_particles
        self.generator = generator

    def __call__(self, x: Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        surrogate, loss = arm_surrogate_loss(
            self.sbn, x, self.estimator, self.num_particles, self.generator
        )
        surrogate.backward()
        self.optimizer.step()
        return loss.item()
