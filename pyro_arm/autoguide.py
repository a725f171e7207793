# SPDX-License-Identifier: Apache-2.0
"""
An autoguide for the discrete latent sites of a model, to train with
:class:`~pyro_arm.TraceARM_ELBO`.
"""

from __future__ import annotations

import numbers
from contextlib import ExitStack
from operator import attrgetter
from typing import Any, Callable, Optional, Union

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn.module import PyroModule, PyroParam
from pyro.ops.tensor_utils import periodic_repeat
from torch.distributions import Bernoulli, Categorical, OneHotCategorical

from pyro_arm.sites import innermost

#: The families :class:`AutoDiscrete` guides, by the name it records for each site.
FAMILIES = {"bernoulli": Bernoulli, "categorical": Categorical, "one_hot": OneHotCategorical}


def _family(base: torch.distributions.Distribution) -> Optional[str]:
    for kind, family in FAMILIES.items():
        if isinstance(base, family):
            return kind
    return None


class AutoDiscrete(AutoGuide):
    r"""
    A mean-field guide over the latent discrete sites of a model: every ``Bernoulli``,
    ``Categorical`` and ``OneHotCategorical`` sample site, however wrapped (``.expand``,
    ``.to_event``, ``.mask``), gets a guide site of its own family with free logits

    .. math::

        q(z) = \prod_{\text{sites } s} \prod_i q(z_{s,i}), \qquad
        q(z_{s,i} = 1) = \sigma(\phi_{s,i}) \ \text{(Bernoulli)}, \qquad
        q(z_{s,i} = c) = \operatorname{softmax}(\phi_{s,i})_c \ \text{(categorical)}.

    The logits :math:`\phi_s` have the site's shape at the full size of its plates (and the
    classes last for a categorical site); under subsampling the guide reads the rows of the
    subsample, as :class:`~pyro.infer.autoguide.AutoNormal` does. Plates come from
    :class:`~pyro.infer.autoguide.AutoGuide`'s plate machinery, so the guide composes in an
    :class:`~pyro.infer.autoguide.AutoGuideList` with the continuous autoguides::

        guide = AutoGuideList(model)
        guide.append(AutoNormal(poutine.block(model, hide=["gamma"])))
        guide.append(AutoDiscrete(poutine.block(model, expose=["gamma"])))
        svi = SVI(model, guide, optim, TraceARM_ELBO(estimator="disarm"))

    Observed sites and sites marked for enumeration (``infer={"enumerate": ...}``) are left
    to the model and the ELBO. The Bernoulli sites get :class:`~pyro_arm.TraceARM_ELBO`'s
    antithetic estimator; each site's sample is one tensor, so a model with :math:`T` such
    sites costs :math:`T + 1` runs per particle whatever their plate sizes.

    :param callable model: a Pyro model whose latent sites are all discrete (hide the others
        with :func:`pyro.poutine.block`).
    :param init_logits: the initial logits. ``None`` (default): the prior's, read from a run of
        the model. A number or tensor: the same value at every site, broadcast to the site's
        logits. A dict from site name to such a value, or a callable taking the prototype
        site and returning one (``None`` keeps the prior's).
    :param callable create_plates: as for :class:`~pyro.infer.autoguide.AutoGuide`.
    :raises ValueError: at the first call, naming the site, if a latent site is not one of the
        three families, or if the model has no latent discrete site to guide.
    """

    def __init__(
        self,
        model: Callable,
        init_logits: Union[None, float, torch.Tensor, dict, Callable] = None,
        *,
        create_plates: Optional[Callable] = None,
    ) -> None:
        super().__init__(model, create_plates=create_plates)
        self.init_logits = init_logits

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        self.logits = PyroModule()
        #: per guided site: family name and event dims of its samples
        self._sites: dict[str, tuple[str, int]] = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            if site["infer"].get("enumerate"):
                continue
            fn = site["fn"]
            kind = _family(innermost(fn))
            if kind is None:
                raise ValueError(_unsupported_message(name, fn))
            logits, param_event_dim = self._initial_logits(site, kind)
            for frame in site["cond_indep_stack"]:
                full_size = frame.full_size or frame.size
                if full_size != frame.size:
                    dim = frame.dim - param_event_dim
                    logits = periodic_repeat(logits, full_size, dim).contiguous()
            deep_setattr(self.logits, name, PyroParam(logits, constraints.real, param_event_dim))
            self._sites[name] = (kind, fn.event_dim)
        if not self._sites:
            raise ValueError(
                "AutoDiscrete found no latent Bernoulli, Categorical or OneHotCategorical site "
                "to guide in the model (observed and enumerated sites are not guided)"
            )

    def _initial_logits(self, site: dict, kind: str) -> tuple[torch.Tensor, int]:
        """The site's initial logits in its (subsampled) shape, and their event dims."""
        fn = site["fn"]
        base = innermost(fn)
        shape = fn.batch_shape + fn.event_shape
        event_dim = fn.event_dim
        if kind == "categorical":
            shape = shape + base.logits.shape[-1:]
            event_dim += 1
        init = self.init_logits
        if isinstance(init, dict):
            init = init.get(site["name"])
        elif callable(init):
            init = init(site)
        if init is None:
            logits = base.logits.detach()
        elif isinstance(init, (numbers.Number, torch.Tensor)):
            logits = torch.as_tensor(init, dtype=base.logits.dtype, device=base.logits.device)
        else:
            raise TypeError(
                f"At site '{site['name']}': init_logits gave {type(init).__name__}; "
                "expected None, a number or a tensor"
            )
        try:
            logits = logits.expand(shape)
        except RuntimeError as e:
            raise ValueError(
                f"At site '{site['name']}': initial logits of shape {tuple(logits.shape)} do "
                f"not broadcast to the site's logits shape {tuple(shape)}"
            ) from e
        return logits.clone(), event_dim

    def _distribution(self, name: str, logits: torch.Tensor) -> dist.TorchDistribution:
        kind, event_dim = self._sites[name]
        if kind == "bernoulli":
            return dist.Bernoulli(logits=logits).to_event(event_dim)
        if kind == "categorical":
            return dist.Categorical(logits=logits).to_event(event_dim)
        return dist.OneHotCategorical(logits=logits).to_event(event_dim - 1)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """
        Samples every guided site, with the same ``*args, **kwargs`` as the model.

        :return: a dict from site name to sampled value.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name in self._sites:
            site = self.prototype_trace.nodes[name]
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                logits = attrgetter(name)(self.logits)
                result[name] = pyro.sample(name, self._distribution(name, logits))
        return result

    @torch.no_grad()
    def probs(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """
        The guide's marginal probabilities by site, at the full size of the site's plates:
        :math:`q(z = 1)` for a Bernoulli site (posterior inclusion probabilities, say), the
        class probabilities, classes last, for a categorical site. The model's arguments are
        needed only before the guide's first call.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        result = {}
        for name, (kind, _) in self._sites.items():
            logits = attrgetter(name)(self.logits)
            result[name] = logits.sigmoid() if kind == "bernoulli" else logits.softmax(-1)
        return result

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """
        The guide's most probable value of each site, at the full size of its plates:
        ``1.`` where :math:`q(z = 1) > 1/2`, else ``0.``; the most probable class (one-hot
        encoded at a ``OneHotCategorical`` site).
        """
        result = {}
        for name, probs in self.probs(*args, **kwargs).items():
            kind = self._sites[name][0]
            if kind == "bernoulli":
                result[name] = (probs > 0.5).to(probs.dtype)
            elif kind == "categorical":
                result[name] = probs.argmax(-1)
            else:
                result[name] = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).to(
                    probs.dtype
                )
        return result


def _unsupported_message(name: str, fn: torch.distributions.Distribution) -> str:
    family = type(innermost(fn)).__name__
    if fn.support.is_discrete:
        return (
            f"At site '{name}': AutoDiscrete guides Bernoulli, Categorical and "
            f"OneHotCategorical sites, not {family}"
        )
    return (
        f"At site '{name}': AutoDiscrete guides discrete sites only, and this one is "
        f"{family}; hide it with poutine.block(model, hide=['{name}']) and guide it with "
        "another autoguide in an AutoGuideList"
    )
