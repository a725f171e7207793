# SPDX-License-Identifier: Apache-2.0
"""
Fixtures shared by the tests, and the one place that splits them into two tiers.

- The **fast tier**, ``pytest -m "not slow"`` (``bash scripts/test.sh``, on two processes),
  covers every module in a budget of three minutes on two cores: every estimator on every tiny
  model against exact enumeration, vectorized at the checker's smallest size, and one case
  sequential per family (``scripts/check_fast_tier.py`` checks the coverage); the CLI end to end
  on a few steps.
- The **full tier**, ``pytest`` (``bash scripts/test.sh --full``, ``.ci/run``), adds the tests
  marked ``slow``: those with ``@pytest.mark.slow`` in their file, and those whose node ids match
  :data:`SLOW` below (Monte Carlo checks at the larger sizes and in sequential mode, power checks
  of the checkers, subprocess and notebook runs, the installed wheel).
"""

import os
import re
from pathlib import Path

import pyro
import pytest
import torch

#: Regular expressions searched in each collected test's node id
#: (``tests/test_file.py::test_name[param-ids]``); a match marks the test ``slow``.
SLOW = (
    # Monte Carlo checks against exact enumeration: the fast tier runs every estimator on every
    # case, vectorized at the checker's smallest size (30 calls), and one case sequential;
    # scripts/check_fast_tier.py checks that every (estimator, case) pair stays in it
    r"test_trace_arm_elbo\.py::test_unbiased\[[^]]*-vec-P200\]",
    r"test_trace_arm_elbo\.py::test_unbiased\[(?!one_layer-arm-)[^]]*-seq-",
    r"test_trace_arm_elbo\.py::test_factor_in_guide\[.*-seq-",
    r"test_trace_arm_elbo\.py::test_unbiased_differentiable_loss\[module\]",
    r"test_trace_arm_elbo\.py::test_switch_at_last_site\[",
    r"test_trace_arm_elbo\.py::test_checker_rejects_model_only_branch_at_switch",
    r"test_trace_arm_elbo\.py::test_checker_rejects_wrong_estimator\[.*two_layer",
    r"test_trace_arm_elbo\.py::test_value_dependent_structure_vectorized\[ar-1\]",
    r"test_trace_arm_elbo\.py::test_value_dependent_structure_sequential\[(ar|disarm)\]",
    r"test_multisample_elbo\.py::test_arms_uses_site_baseline_unbiased\[(?!value-vec)",
    r"test_multisample_elbo\.py::test_model_grad_base_unbiased\[(?!one_layer-vec)",
    r"test_baselines\.py::test_unbiased_categorical_with_baseline\[.*-seq-",
    r"test_baselines\.py::test_checker_rejects_baseline_including_own_particle",
    r"test_baselines\.py::test_unbiased_categorical_with_baseline\[(?!value-)",
    r"test_baselines\.py::test_nn_baseline_is_registered_and_trained\[arm\]",
    r"test_dependencies\.py::test_unbiased_global_after_locals\[.*-seq-",
    r"test_dependencies\.py::test_unbiased_global_after_locals\[[^]]*-(disarm|ar)-",
    r"test_dependencies\.py::test_unbiased_categorical_steering_control_flow",
    r"test_dependencies\.py::test_checker_rejects_provenance_only_signal_under_control_flow",
    r"test_iwelbo\.py::test_unbiased\[[^]]*-3-",
    r"test_iwelbo\.py::test_unbiased\[(?!one_layer-2-vimco-)[^]]*-seq\]",
    r"test_iwelbo\.py::test_checker_rejects_missing_(debiasing_factor|explicit_log_q_term)",
    r"test_engine\.py::test_estimator_registered_from_outside\[(?!one_layer-vec)",
    r"test_engine\.py::test_probe_keeps_a_model_that_breaks_batching_looped",
    r"test_engine\.py::test_checker_rejects_batching_a_model_that_breaks_it",
    # checks of the exact IW reference itself: the fast tier keeps K = 2 and one gradient case
    r"test_iw_reference\.py::test_value_matches_monte_carlo\[[^]]*-3\]",
    r"test_iw_reference\.py::test_gradient_matches_monte_carlo\[(?!two_layer)",
    r"test_iw_reference\.py::test_hermite_nodes_suffice",
    r"test_iw_reference\.py::test_one_sample_bound_is_the_elbo\[[^]]*-joint\]",
    # low precision: the fast tier keeps the unbiasedness checks in bfloat16
    r"test_low_precision\.py::test_(multisample_)?gradients_unbiased\[[^]]*-torch\.float16\]",
    # the IW bound against enumeration on the smallest SBN
    r"test_evaluate\.py::test_bounds_against_enumeration\[(?!latent_dims0-)",
    # variance comparisons: the fast tier keeps ARM against the score function and DisARM
    # against ARM
    r"test_variance\.py::(?!test_arm_variance_well_below|test_disarm_variance_below_arm)",
    # processes: torchrun launches and DDP runs are in the full tier
    r"test_distributed\.py::test_trace_arm_elbo_in_ddp\[",
    r"test_distributed\.py::test_train_two_ranks_rank0_writes",
    r"test_distributed\.py::test_torchrun_resume_is_exact",
    r"test_distributed\.py::test_torchrun_divergence_ends_every_rank_at_the_same_step",
    r"test_lightning_example\.py::",
    # the gallery's examples in smoke mode (subprocesses; the exact references take a while)
    r"test_examples\.py::",
    # subprocess runs and repeats: the fast tier keeps the CLI end to end in process
    # (test_cli.py), one signal during the final evaluation, one SGD run of the toy, one wrong
    # copula weight (the console script runs in the full tier, also from the installed wheel)
    r"test_iwae_cli\.py::test_trains_on_the_bound",
    r"test_config\.py::test_train_multisample\[[^]]*-vectorize0\]",
    r"test_cli\.py::test_subprocess_entry_points",
    r"test_toy\.py::test_toy_sgd_moves_phi_up\[disarm\]",
    r"test_multisample_elbo\.py::test_checker_rejects_wrong_copula_weight\[4\]",
    r"test_interrupts\.py::test_a_signal_during_the_final_evaluation\[SIGTERM\]",
    # enumeration against references summed out by hand: the fast tier keeps one case per
    # model, vectorized, and one sequential
    r"test_enum\.py::test_unbiased_enumerated\[(?!mixture-arm-vec|global-ar-vec|"
    r"chain-disarm-vec|categorical-arms-vec|mixture-disarm-seq)",
    r"test_enum\.py::test_unbiased_enumerated_guide\[(?!posterior-disarm-vec|both_sides-rloo-vec|"
    r"reparameterized-arms-vec|both_sides-arm-seq)",
    # the fast tier's budget (3 minutes on 2 cores): its longest checks run in the full tier
    r"test_executors\.py::test_read_starting_after_some_calls_unbiased",
    r"test_executors\.py::test_checker_rejects_batching_regardless",
    r"test_distributed\.py::test_torchrun_trains_on_two_ranks",
    r"test_iwelbo\.py::test_a_weight_per_datapoint_sequential",
    r"test_iwelbo\.py::test_checker_rejects_joint_bound_where_local",
    r"test_categorical\.py::test_checker_rejects_explicit_log_q_kept",
    r"test_trace_arm_elbo\.py::test_checker_detects_branch_subsample_not_reused",
    r"test_trace_arm_elbo\.py::test_value_dependent_structure_sequential",
    r"test_config\.py::test_import_pyro_arm_is_light",
    r"test_rundir\.py::test_resume_refuses_a_checkpoint_of_another_run",
    r"test_storchastic\.py::test_storch_arm_second_layer_is_biased",
    r"test_multisample_elbo\.py::test_checker_rejects_site_baseline_including_own_sample",
    r"test_train_failures\.py::test_out_of_memory_in_a_step_keeps_the_last_checkpoint\[(cuda|python)\]",
    r"test_train_failures\.py::test_threads_is_applied_and_recorded",
)
_SLOW = re.compile("|".join(f"(?:{pattern})" for pattern in SLOW))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _SLOW.search(item.nodeid):
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture
def mnist_dir() -> Path:
    """
    A folder holding the four MNIST IDX files (gzip): ``$PYRO_ARM_MNIST_DIR``, else the download
    cache of ``--data download``. Skips the test when neither holds them.
    """
    from pyro_arm.sbn.data import MNIST_FILES, default_cache_dir

    named = os.environ.get("PYRO_ARM_MNIST_DIR")
    folder = Path(named) if named else default_cache_dir()
    if not all((folder / f"{stem}.gz").is_file() for stem, _ in MNIST_FILES.values()):
        pytest.skip(f"no MNIST IDX files in {folder} (set PYRO_ARM_MNIST_DIR)")
    return folder
