# SPDX-License-Identifier: Apache-2.0
"""
Sigmoid belief networks (SBNs) with Bernoulli latent layers, as Pyro model/guide pairs.

The architectures of the ARM paper (Yin & Zhou, 2019; after REBAR, Tucker et al., 2017), with
200 Bernoulli units per stochastic layer, on 784-pixel binarized MNIST:

======================== ======================================================================
name                     structure
======================== ======================================================================
``linear``               784-200: one stochastic layer, linear (logistic) maps both ways
``two_layer``            784-200-200: two stochastic layers, linear maps
``nonlinear``            784-200-200-200: one stochastic layer; each map has two deterministic
                         LeakyReLU layers of 200 units (encoder 784-200-200-200, decoder
                         200-200-200-784)
``linear-D1-..-DL``      any depth of linear stochastic layers of the given sizes
``nonlinear-D1-..-DL``   any depth, each map with two LeakyReLU layers of 200 units
``categorical``          not an SBN: :class:`CategoricalVAE`, 20 categorical latents of 10
                         classes, 784-200-(20x10), one LeakyReLU layer of 200 units per map
======================== ======================================================================

Generative model: ``zL ~ Bernoulli(sigmoid(prior_logits))`` (learnable), then
``z_{l-1} | z_l ~ Bernoulli(sigmoid(decoder_l(z_l)))`` down to ``x | z1``. Guide (recognition
network): ``z1 | x``, then ``z2 | z1``, ..., ``zL | z_{L-1}``. Sites: ``"z1"`` (nearest to
``x``) ... ``"zL"`` (top) and the observed ``"x"``, each ``Bernoulli(logits=...).to_event(1)``
inside ``pyro.plate("data", B, dim=-1)``.

Every computation broadcasts over extra leftmost batch dimensions (a latent has shape
``(..., B, D)``), so particle or antithetic plates at dims ``-2``, ``-3`` vectorize; ``x`` itself
is always ``(B, 784)``.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, pyro_method
from pyro.nn.module import to_pyro_module_
from torch import Tensor, nn
from torch.distributions.kl import kl_divergence, register_kl

#: Named architectures: ``name -> (nonlinear, latent sizes)``, 784 pixels.
ARCHITECTURES: dict[str, tuple[bool, tuple[int, ...]]] = {
    "linear": (False, (200,)),
    "two_layer": (False, (200, 200)),
    "nonlinear": (True, (200,)),
}

#: Width of the deterministic layers of ``nonlinear`` architectures.
HIDDEN_UNITS = 200
#: Number of pixels of a binarized MNIST image.
X_DIM = 784

_NAME_RE = re.compile(r"^(linear|nonlinear)((?:-[1-9][0-9]*)+)$")


def parse_architecture(name: str) -> tuple[bool, tuple[int, ...]]:
    """
    ``name -> (nonlinear, latent sizes)`` for a name of :data:`ARCHITECTURES` or of the form
    ``linear-200-200`` / ``nonlinear-200``.

    :raises ValueError: for an unknown name, saying which names are valid.
    """
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    match = _NAME_RE.match(name) if isinstance(name, str) else None
    if match is None:
        valid = ", ".join(ARCHITECTURES)
        raise ValueError(
            f"unknown model {name!r}; expected one of {valid}, or 'linear-D1-D2-...' / "
            "'nonlinear-D1-...' with layer sizes (e.g. linear-200-200-200)"
        )
    return match.group(1) == "nonlinear", tuple(int(d) for d in match.group(2)[1:].split("-"))


def _mlp(sizes: Sequence[int]) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))


def run_map(layers: Sequence[nn.Module], h: Tensor, negative_slope: float) -> Tensor:
    """
    One map between stochastic layers: ``Linear (LeakyReLU Linear)*``. ``nn.Linear`` broadcasts
    over leading dims, so ``h`` may carry particle or branch dims.
    """
    for i, layer in enumerate(layers):
        if i > 0:
            h = F.leaky_relu(h, negative_slope)
        h = layer(h)
    return h


class SigmoidBeliefNet(PyroModule):
    """
    A sigmoid belief network and its recognition network.

    :param x_dim: number of observed binary units.
    :param latent_dims: sizes of the stochastic layers, from the one nearest ``x`` (``z1``) to the
        top (``zL``).
    :param hidden_dims: sizes of the deterministic layers inside each map between consecutive
        stochastic layers (``()`` for linear maps). The encoder goes ``in -> hidden... -> out``,
        the decoder mirrors it.
    :param x_mean: training pixel means, shape ``(x_dim,)``; the decoder's output bias starts at
        their logits (clamped to ``[1e-3, 1 - 1e-3]``), as is customary for SBNs on MNIST.
    :param negative_slope: slope of the LeakyReLU for ``x < 0``.
    """

    def __init__(
        self,
        x_dim: int = X_DIM,
        latent_dims: Sequence[int] = (200,),
        hidden_dims: Sequence[int] = (),
        x_mean: Optional[Tensor] = None,
        negative_slope: float = 0.3,
    ):
        super().__init__()
        if not latent_dims:
            raise ValueError("a sigmoid belief net needs at least one latent layer")
        self.x_dim = int(x_dim)
        self.latent_dims = tuple(int(d) for d in latent_dims)
        self.hidden_dims = tuple(int(h) for h in hidden_dims)
        self.negative_slope = float(negative_slope)
        dims = (self.x_dim,) + self.latent_dims
        # encoders[l] maps dims[l] -> dims[l+1] (x -> z1, z1 -> z2, ...);
        # decoders[l] maps dims[l+1] -> dims[l] (z1 -> x, z2 -> z1, ...).
        self.encoders = nn.ModuleList(
            _mlp((dims[i],) + self.hidden_dims + (dims[i + 1],)) for i in range(len(dims) - 1)
        )
        self.decoders = nn.ModuleList(
            _mlp((dims[i + 1],) + self.hidden_dims[::-1] + (dims[i],)) for i in range(len(dims) - 1)
        )
        self.prior_logits = nn.Parameter(torch.zeros(self.latent_dims[-1]))
        # Submodules as PyroModules: each parameter read is then one pyro.param statement,
        # where a plain nn.Module attribute would re-register all of its parameters.
        to_pyro_module_(self.encoders)
        to_pyro_module_(self.decoders)
        if x_mean is not None:
            self.init_output_bias(x_mean)

    @property
    def num_layers(self) -> int:
        """Number of stochastic layers ``L``."""
        return len(self.latent_dims)

    @property
    def latent_names(self) -> tuple[str, ...]:
        """``("z1", ..., "zL")``."""
        return tuple(f"z{i + 1}" for i in range(self.num_layers))

    def init_output_bias(self, x_mean: Tensor) -> None:
        """Sets the decoder's output bias to ``logit(clamp(x_mean, 1e-3, 1 - 1e-3))``."""
        x_mean = torch.as_tensor(x_mean, dtype=torch.float32).reshape(-1)
        if x_mean.shape != (self.x_dim,):
            raise ValueError(f"x_mean has {x_mean.numel()} values, expected {self.x_dim}")
        layer = self.decoders[0][-1]
        with torch.no_grad():
            layer.bias.copy_(torch.logit(x_mean.clamp(1e-3, 1 - 1e-3)))

    def encode(self, level: int, h: Tensor) -> Tensor:
        """Logits of ``z_{level+1}`` given ``h`` (``x`` for level 0, else ``z_level``)."""
        return run_map(self.encoders[level], h, self.negative_slope)

    def decode(self, level: int, z: Tensor) -> Tensor:
        """Logits of the layer below ``z_{level+1}`` (``x`` for level 0) given it."""
        return run_map(self.decoders[level], z, self.negative_slope)

    @pyro_method
    def model(self, x: Tensor) -> Tensor:
        """
        The generative model, observing ``x`` of shape ``(B, x_dim)``.

        :returns: the logits of ``x`` (shape ``(..., B, x_dim)``).
        """
        batch = x.shape[:-1]
        with pyro.plate("data", x.shape[-2], dim=-1):
            logits = self.prior_logits.expand(batch + (self.latent_dims[-1],))
            z = pyro.sample(f"z{self.num_layers}", dist.Bernoulli(logits=logits).to_event(1))
            for level in reversed(range(1, self.num_layers)):
                z = pyro.sample(
                    f"z{level}", dist.Bernoulli(logits=self.decode(level, z)).to_event(1)
                )
            x_logits = self.decode(0, z)
            pyro.sample("x", dist.Bernoulli(logits=x_logits).to_event(1), obs=x)
        return x_logits

    @pyro_method
    def guide(self, x: Tensor) -> Tensor:
        """
        The recognition network ``q(z1 | x) q(z2 | z1) ...``.

        :returns: the top latent ``zL``.
        """
        with pyro.plate("data", x.shape[-2], dim=-1):
            h = x
            for level in range(self.num_layers):
                h = pyro.sample(
                    f"z{level + 1}", dist.Bernoulli(logits=self.encode(level, h)).to_event(1)
                )
        return h

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Pixel probabilities of ``x`` given ``z1 ~ q(z1 | x)`` (one draw), shape like ``x``."""
        z1 = torch.bernoulli(torch.sigmoid(self.encode(0, x)))
        return torch.sigmoid(self.decode(0, z1))

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """Pixel probabilities of ``x`` given ancestral samples of the latents, ``(n, x_dim)``."""
        z = torch.bernoulli(torch.sigmoid(self.prior_logits).expand(n, self.latent_dims[-1]))
        for level in reversed(range(1, self.num_layers)):
            z = torch.bernoulli(torch.sigmoid(self.decode(level, z)))
        return torch.sigmoid(self.decode(0, z))


def build_sbn(name: str, x_mean: Optional[Tensor] = None, **kwargs) -> PyroModule:
    """
    Builds a :class:`SigmoidBeliefNet` for 784-pixel MNIST by architecture name.

    :param name: ``"linear"``, ``"two_layer"``, ``"nonlinear"``, or ``"linear-200-200-200"`` /
        ``"nonlinear-200-200"`` style names (sizes of the stochastic layers, bottom to top), or
        ``"categorical"`` (:class:`CategoricalVAE`).
    :param x_mean: training pixel means for the decoder's output bias.
    :param kwargs: passed on to :class:`SigmoidBeliefNet` (e.g. ``negative_slope``).
    :raises ValueError: for an unknown name.
    """
    if name == CATEGORICAL_MODEL:
        return CategoricalVAE(x_mean=x_mean, **kwargs)
    nonlinear, latent_dims = parse_architecture(name)
    hidden = (HIDDEN_UNITS, HIDDEN_UNITS) if nonlinear else ()
    return SigmoidBeliefNet(X_DIM, latent_dims, hidden, x_mean=x_mean, **kwargs)


#: The name of the categorical VAE among the ``--model`` choices.
CATEGORICAL_MODEL = "categorical"
#: Its latent variables and their classes.
NUM_VARIABLES, NUM_CLASSES = 20, 10

_RELAXED: list[float] = []


class StraightThrough(dist.RelaxedOneHotCategoricalStraightThrough):
    """Pyro's straight-through relaxed one-hot categorical, whose KL divergence to another is
    that of the categoricals of their logits (the Gumbel-softmax VAE's objective with
    ``TraceMeanField_ELBO``: the decoder sees the hard sample, the KL term is exact)."""


@register_kl(StraightThrough, StraightThrough)
def _kl_straight_through(q: StraightThrough, p: StraightThrough) -> Tensor:
    return kl_divergence(
        dist.Categorical(logits=q.base_dist.logits), dist.Categorical(logits=p.base_dist.logits)
    )


@contextmanager
def relaxed(temperature: float):
    """
    Inside, :class:`CategoricalVAE` samples its latents from Pyro's
    :class:`~pyro.distributions.RelaxedOneHotCategoricalStraightThrough` at ``temperature``
    (:class:`StraightThrough`; a uniform-logits one in the model) while gradients are
    enabled: the Gumbel straight-through yardstick, biased. Evaluation (without gradients)
    stays discrete.
    """
    _RELAXED.append(float(temperature))
    try:
        yield
    finally:
        _RELAXED.pop()


class CategoricalVAE(PyroModule):
    """
    A discrete VAE with ``20`` categorical latents of ``10`` classes, nonlinear: encoder
    ``784 -> 200 -> 20 x 10`` logits, decoder ``20 x 10`` one-hot ``-> 200 -> 784``, with one
    LeakyReLU layer of 200 units in each map, a uniform prior. One guide site ``"z1"``,
    ``OneHotCategorical(logits=...).to_event(1)`` of shape ``(..., B, 20, 10)``, in the data
    plate at dim -1, like the SBN's ``"z1"``.
    """

    latent_names = ("z1",)
    num_layers = 1

    def __init__(
        self,
        x_dim: int = X_DIM,
        num_variables: int = NUM_VARIABLES,
        num_classes: int = NUM_CLASSES,
        hidden: int = HIDDEN_UNITS,
        x_mean: Optional[Tensor] = None,
        negative_slope: float = 0.3,
    ):
        super().__init__()
        self.x_dim, self.negative_slope = int(x_dim), float(negative_slope)
        self.num_variables, self.num_classes = int(num_variables), int(num_classes)
        latent = self.num_variables * self.num_classes
        self.encoder = _mlp((self.x_dim, hidden, latent))
        self.decoder = _mlp((latent, hidden, self.x_dim))
        to_pyro_module_(self.encoder)
        to_pyro_module_(self.decoder)
        if x_mean is not None:
            x_mean = torch.as_tensor(x_mean, dtype=torch.float32).reshape(-1)
            with torch.no_grad():
                self.decoder[-1].bias.copy_(torch.logit(x_mean.clamp(1e-3, 1 - 1e-3)))

    def encode(self, x: Tensor) -> Tensor:
        """The latents' logits ``(..., 20, 10)``."""
        h = run_map(self.encoder, x, self.negative_slope)
        return h.reshape(h.shape[:-1] + (self.num_variables, self.num_classes))

    def decode(self, z: Tensor) -> Tensor:
        """The pixels' logits given one-hot latents ``(..., 20, 10)``."""
        return run_map(self.decoder, z.flatten(-2), self.negative_slope)

    def _latent(self, logits: Tensor):
        if _RELAXED and torch.is_grad_enabled():
            temperature = torch.tensor(_RELAXED[-1], device=logits.device)
            # float32 soft samples miss the simplex check's tolerance now and then
            return StraightThrough(temperature, logits=logits, validate_args=False)
        return dist.OneHotCategorical(logits=logits)

    @pyro_method
    def model(self, x: Tensor) -> Tensor:
        """The generative model, observing ``x`` ``(B, 784)``; returns the pixels' logits."""
        shape = x.shape[:-1] + (self.num_variables, self.num_classes)
        with pyro.plate("data", x.shape[-2], dim=-1):
            prior = self._latent(x.new_zeros(shape)).to_event(1)
            z = pyro.sample("z1", prior)
            x_logits = self.decode(z)
            pyro.sample("x", dist.Bernoulli(logits=x_logits).to_event(1), obs=x)
        return x_logits

    @pyro_method
    def guide(self, x: Tensor) -> Tensor:
        """The recognition network ``q(z | x)``; returns the one-hot latents."""
        with pyro.plate("data", x.shape[-2], dim=-1):
            return pyro.sample("z1", self._latent(self.encode(x)).to_event(1))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Pixel probabilities of ``x`` given ``z ~ q(z | x)`` (one draw), shape like ``x``."""
        z = dist.OneHotCategorical(logits=self.encode(x)).sample()
        return torch.sigmoid(self.decode(z))

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """Pixel probabilities of ``x`` given ``n`` draws of the prior, ``(n, 784)``."""
        logits = torch.zeros(n, self.num_variables, self.num_classes)
        return torch.sigmoid(self.decode(dist.OneHotCategorical(logits=logits).sample()))
