# SPDX-License-Identifier: Apache-2.0
"""pyro-arm train --objective iwae: the options are checked, and a few steps train and resume."""

import json
import subprocess
import sys

import pytest
from pyro.infer import RenyiELBO

from pyro_arm.iwelbo import IWELBO
from pyro_arm.sbn.config import ConfigError, TrainConfig
from pyro_arm.sbn.elbo import make_elbo


def test_make_elbo_iwae():
    elbo = make_elbo("arms", num_samples=4, objective="iwae", num_members=5)
    assert isinstance(elbo, IWELBO) and elbo.num_samples == 4 and elbo.num_members == 5
    renyi = make_elbo("renyi", num_samples=4, objective="iwae")
    assert isinstance(renyi, RenyiELBO) and renyi.alpha == 0 and renyi.num_particles == 4
    with pytest.raises(ValueError, match="iwae objective takes"):
        make_elbo("rloo", num_samples=4, objective="iwae")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(objective="iwae", estimator="rloo"), "iwae objective takes"),
        (dict(objective="iwae", estimator="vimco", model_grad="all"), "not taken"),
        (dict(objective="elbo", estimator="vimco"), "only with --objective iwae"),
        (dict(objective="bound"), "invalid choice"),
        (dict(objective="iwae", estimator="vimco", num_members=3), "arms only"),
        (dict(objective="elbo", estimator="disarm", num_members=3), "only with --objective iwae"),
        (dict(objective="iwae", estimator="renyi", num_particles=2), "renyi takes"),
    ],
)
def test_invalid_options(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options).validate()


def test_trains_on_the_bound(tmp_path):
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "pyro_arm.sbn",
        "train",
        "--objective",
        "iwae",
        "--estimator",
        "vimco",
    ]
    command += ["--num-samples", "3", "--steps", "4", "--eval-every", "2", "--eval-k", "5"]
    command += ["--test-size", "20", "--checkpoint-every", "2", "--run-dir", str(run)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["objective"] == "iwae" and config["config"]["estimator"] == "vimco"
    assert (run / "summary.json").exists()
