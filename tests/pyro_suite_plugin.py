# SPDX-License-Identifier: Apache-2.0
"""
A pytest plugin that runs Pyro's own ``tests/infer/test_valid_models.py`` and
``tests/infer/test_gradient.py`` (release 1.9.1, not part of this repository) against
:class:`~pyro_arm.TraceARM_ELBO`: every test item parametrized with ``Elbo=Trace_ELBO``,
``TraceGraph_ELBO`` or ``DiffTrace_ELBO`` runs with ``TraceARM_ELBO`` (its
``differentiable_loss`` for ``DiffTrace_ELBO``) in its place; all other items, and
``test_particle_gradient`` (its expected values are ``Trace_ELBO``'s), are deselected.
Test ids keep Pyro's names. ``ARM_TEST_SEED=<int>`` seeds each test (Pyro's gradient tests are
statistical and unseeded). Usage, from a copy of Pyro's tests::

    git --git-dir=<pyro mirror> archive 1.9.1 tests/__init__.py tests/common.py \\
        tests/conftest.py tests/infer/__init__.py tests/infer/test_valid_models.py \\
        tests/infer/test_gradient.py setup.cfg | tar x -C /tmp/pyro_tests
    cd /tmp/pyro_tests && PYTHONPATH=/tmp/pyro_tests:<repo>/tests ARM_TEST_SEED=0 \\
        <repo>/.venv/bin/python -m pytest -p pyro_suite_plugin -p no:cacheprovider -q \\
        tests/infer/test_valid_models.py tests/infer/test_gradient.py
"""

import os

import pyro
import pytest
from pyro.infer import Trace_ELBO, TraceGraph_ELBO

from pyro_arm import TraceARM_ELBO


def DiffTraceARM_ELBO(*args, **kwargs):
    return TraceARM_ELBO(*args, **kwargs).differentiable_loss


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        elbo = params.get("Elbo")
        if "test_particle_gradient" in item.name:
            dropped.append(item)
        elif elbo in (Trace_ELBO, TraceGraph_ELBO):
            params["Elbo"] = TraceARM_ELBO
            kept.append(item)
        elif getattr(elbo, "__name__", None) == "DiffTrace_ELBO":
            params["Elbo"] = DiffTraceARM_ELBO
            kept.append(item)
        else:
            dropped.append(item)
    items[:] = kept
    config.hook.pytest_deselected(items=dropped)


def pytest_runtest_setup(item):
    seed = os.environ.get("ARM_TEST_SEED")
    if seed is not None:
        pyro.set_rng_seed(int(seed))
