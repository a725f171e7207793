# SPDX-License-Identifier: Apache-2.0
"""pyro-arm: antithetic ARM / DisARM gradients for Bernoulli latent variables in Pyro."""

from pyro_arm.autoguide import AutoDiscrete
from pyro_arm.estimators import ESTIMATORS, Estimator, get_estimator, register_estimator
from pyro_arm.iwelbo import IWELBO
from pyro_arm.trace_arm_elbo import TraceARM_ELBO

__version__ = "0.1.0"

__all__ = [
    "AutoDiscrete",
    "ESTIMATORS",
    "Estimator",
    "IWELBO",
    "TraceARM_ELBO",
    "get_estimator",
    "register_estimator",
    "__version__",
]
