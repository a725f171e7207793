# SPDX-License-Identifier: Apache-2.0
"""
The branch handler of pyro_arm/sampler.py: batched, it gives, at each index of the
plate over branches, exactly the values of the sequential handler's branch for that site.
"""

import pyro
import pytest
import torch
from pyro.infer.util import MultiFrameTensor

from pyro_arm.costs import CostMessenger
from pyro_arm.estimators import get_estimator
from pyro_arm.sampler import BranchMessenger, SampleMessenger
from tests import tiny_models

pytestmark = pytest.mark.usefixtures("float64")


def guide_values(guide, args) -> dict:
    values: dict = {}
    with torch.no_grad(), CostMessenger(MultiFrameTensor(), -1.0, values):
        guide(*args)
    return values


@pytest.mark.parametrize("case", ["two_layer", "three_layer"])
def test_batched_branches_match_sequential_ones(case):
    model, guide, args = getattr(tiny_models, case)()
    base = SampleMessenger(get_estimator("arm"))
    with torch.no_grad():
        base(guide)(*args)
    names = list(base.samples)
    plan = [(name, 1) for name in names]
    branch_dim = -2 if case == "two_layer" else -1  # left of the data plate, if any
    branches = pyro.plate("branches", len(names), dim=branch_dim)
    batched = guide_values(BranchMessenger(base, plan, branch_dim)(branches(guide)), args)
    for index, name in enumerate(names):
        sequential = guide_values(BranchMessenger(base, [(name, 1)])(guide), args)
        for site in names:
            assert torch.equal(batched[site][index], sequential[site]), (name, site)
        assert torch.equal(sequential[name], base.samples[name].z[1])
        before = names[: names.index(name)]
        assert all(torch.equal(sequential[s], base.values[s]) for s in before)


def test_pair_is_base_value_and_twin():
    """The base run's value of an ARM site is the z2 of its pair; u is kept in float64 here."""
    model, guide, args = tiny_models.two_layer()
    base = SampleMessenger(get_estimator("arm"))
    with torch.no_grad():
        base(guide)(*args)
    for name, sample in base.samples.items():
        assert torch.equal(base.values[name], sample.z[0])
        assert sample.v.dtype == torch.float64
