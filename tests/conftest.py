# SPDX-License-Identifier: Apache-2.0
import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _isolate():
    """One thread (tiny tensors on a shared machine), a clean param store, a fixed seed, and the
    default dtype restored after each test."""
    threads = torch.get_num_threads()
    dtype = torch.get_default_dtype()
    torch.set_num_threads(1)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


@pytest.fixture
def float64():
    """Runs the test in float64 (tiny models: no precision noise in statistical checks)."""
    torch.set_default_dtype(torch.float64)
    yield
