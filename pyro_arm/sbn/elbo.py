# SPDX-License-Identifier: Apache-2.0
"""
The objective for an ``--objective`` and ``--estimator``: the ELBO with an estimator of the
registry :data:`pyro_arm.estimators.ESTIMATORS` (via :class:`~pyro_arm.TraceARM_ELBO`) or one of
Pyro's score-function baselines (:data:`PYRO_BASELINES`), or the importance-weighted bound
(:class:`~pyro_arm.IWELBO`) with one of :data:`IW_ESTIMATORS`.
"""

from __future__ import annotations

from typing import Optional

from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO

from pyro_arm.estimators import ESTIMATORS
from pyro_arm.iwelbo import IWELBO
from pyro_arm.sbn.models import relaxed
from pyro_arm.trace_arm_elbo import TraceARM_ELBO

#: The temperature of the Gumbel straight-through relaxation (``gumbel``).
GUMBEL_TEMPERATURE = 0.5


class GumbelELBO(TraceMeanField_ELBO):
    """
    ``TraceMeanField_ELBO`` with the categorical VAE's latents relaxed while gradients are taken
    (:func:`~pyro_arm.sbn.models.relaxed`): the decoder sees Pyro's
    ``RelaxedOneHotCategoricalStraightThrough`` sample at :data:`GUMBEL_TEMPERATURE` (hard
    forward, relaxed gradient), the KL term is the categoricals' (Jang, Gu & Poole, 2017): a
    biased but familiar yardstick.
    """

    def loss_and_grads(self, model, guide, *args, **kwargs):
        with relaxed(GUMBEL_TEMPERATURE):
            return super().loss_and_grads(model, guide, *args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        with relaxed(GUMBEL_TEMPERATURE):
            return super().differentiable_loss(model, guide, *args, **kwargs)


#: Pyro's own ELBOs, selectable by name beside the ARM family (``gumbel``: the categorical
#: model only).
PYRO_BASELINES: dict[str, type] = {
    "gumbel": GumbelELBO,
    "trace": Trace_ELBO,
    "tracegraph": TraceGraph_ELBO,
}

#: The objectives: the ELBO, or the importance-weighted bound.
OBJECTIVES: tuple[str, ...] = ("elbo", "iwae")

#: The estimators of the importance-weighted bound: :class:`~pyro_arm.IWELBO`'s, and Pyro's
#: ``RenyiELBO(alpha=0)`` (``renyi``, the reference that gives discrete sites no gradient).
IW_ESTIMATORS: tuple[str, ...] = ("vimco", "disarm", "arms", "renyi")


def estimator_choices() -> tuple[str, ...]:
    """
    The valid estimator names: the registry's, read at call time (so an estimator registered in
    :data:`~pyro_arm.estimators.ESTIMATORS` is accepted), then :data:`PYRO_BASELINES`.
    """
    names = tuple(ESTIMATORS) + IW_ESTIMATORS + tuple(PYRO_BASELINES)
    return tuple(dict.fromkeys(names))


def make_elbo(
    estimator: str,
    num_particles: int = 1,
    vectorize: bool = False,
    num_samples: Optional[int] = None,
    model_grad: Optional[str] = None,
    objective: str = "elbo",
    num_members: Optional[int] = None,
) -> ELBO:
    """
    The ELBO object for an estimator name (one plate: the data plate at dim -1).

    :param estimator: a name of :func:`estimator_choices`.
    :param num_particles: particles per step.
    :param vectorize: vectorize the particles (and, for the ARM family, the antithetic branches).
    :param num_samples: samples per estimate of a multi-sample estimator (``rloo``, ``arms``).
    :param model_grad: ``"base"``, ``"all"`` (``arms`` only) or ``None``: the estimator's
        default (:class:`~pyro_arm.TraceARM_ELBO`).
    :param objective: ``"elbo"``, or ``"iwae"``: the importance-weighted bound with
        ``num_samples`` samples (default 2) and an estimator of :data:`IW_ESTIMATORS`.
    :param num_members: ``arms`` members per Bernoulli site of the iwae objective (default 3).
    :raises ValueError: for an unknown name, or a ``num_samples`` the estimator does not take.
    """
    kwargs = dict(num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=1)
    if objective == "iwae":
        if estimator not in IW_ESTIMATORS or model_grad is not None:
            raise ValueError(
                f"the iwae objective takes an estimator of {', '.join(IW_ESTIMATORS)} and no "
                f"model_grad; got {estimator!r}"
            )
        if estimator == "renyi":
            if num_particles != 1 or num_members is not None:
                raise ValueError("renyi takes neither num_particles nor num_members")
            kwargs["num_particles"] = num_samples or 2
            return RenyiELBO(alpha=0.0, **kwargs)
        if num_members is not None and estimator != "arms":
            raise ValueError("num_members is taken by the arms estimator only")
        members = {} if num_members is None else {"num_members": num_members}
        return IWELBO(num_samples=num_samples or 2, estimator=estimator, **members, **kwargs)
    if objective != "elbo":
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    if estimator in ESTIMATORS:
        return TraceARM_ELBO(
            estimator=estimator, num_samples=num_samples, model_grad=model_grad, **kwargs
        )
    if estimator in PYRO_BASELINES:
        if num_samples is not None or model_grad is not None:
            raise ValueError(f"estimator {estimator!r} takes neither num_samples nor model_grad")
        return PYRO_BASELINES[estimator](**kwargs)
    raise ValueError(
        f"unknown estimator {estimator!r}; expected one of {', '.join(estimator_choices())}"
    )
