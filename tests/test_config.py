# SPDX-License-Identifier: Apache-2.0
"""The training config: one rule per field, estimator names from the registry, CLI options
generated from the fields, and ``import pyro_arm`` free of the application's dependencies."""

import dataclasses
import json
import subprocess
import sys

import pytest

from pyro_arm.estimators import ESTIMATORS, Estimator, arm
from pyro_arm.sbn.cli import build_parser, main
from pyro_arm.sbn.config import TRAJECTORY_FIELDS, ConfigError, TrainConfig, flag
from pyro_arm.sbn.elbo import estimator_choices, make_elbo


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"steps": 0}, "--steps: expected a positive integer"),
        ({"test_size": -1}, "--test-size: expected a positive integer"),
        ({"lr": float("nan")}, "--lr: expected a positive number"),
        ({"estimator": "rebar"}, "--estimator: invalid choice: 'rebar'"),
        ({"binarization": "otsu"}, "--binarization: invalid choice: 'otsu'"),
        ({"device": "tpu"}, "--device: unknown device 'tpu'"),
        ({"model": "resnet"}, "unknown model 'resnet'"),
        ({"seed": -1}, "--seed: expected an integer from 0 to 2\\*\\*64-1, got -1"),
        ({"seed": 10**21}, "--seed: expected an integer from 0 to 2\\*\\*64-1"),
        ({"seed": 1e21}, "--seed: expected an integer"),
        ({"threads": 0}, "--threads: expected a positive integer"),
    ],
)
def test_validate(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes).validate()


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "auto"])
def test_devices(device):
    TrainConfig(device=device, seed=2**64 - 1, test_size=None).validate()


def test_every_field_is_a_cli_option():
    actions = {
        a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions
    }
    for field in dataclasses.fields(TrainConfig):
        assert field.name in actions, field.name
        assert flag(field.name) in actions[field.name].option_strings
        assert actions[field.name].default is None


def test_a_newly_registered_estimator_is_accepted(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(ESTIMATORS, "arm2", Estimator("arm2", True, arm))
    assert "arm2" in estimator_choices()
    assert type(make_elbo("arm2")).__name__ == "TraceARM_ELBO"
    TrainConfig(estimator="arm2").validate()
    status = main(["train", "--estimator", "arm2", "--model", "bad", "--run-dir", str(tmp_path)])
    assert status == 2 and "unknown model 'bad'" in capsys.readouterr().err  # got past estimator


def test_baselines_and_unknown_estimator():
    assert estimator_choices()[-2:] == ("trace", "tracegraph")
    assert type(make_elbo("tracegraph")).__name__ == "TraceGraph_ELBO"
    with pytest.raises(ValueError, match="unknown estimator 'rebar'"):
        make_elbo("rebar")


def test_import_pyro_arm_is_light():
    # pyro.infer itself imports tqdm (a pyro-ppl dependency), so the check is that pyro_arm adds
    # no module of tqdm, matplotlib or the application to what torch and Pyro import.
    code = (
        "import sys, torch, pyro, pyro.infer, pyro.poutine\n"
        "before = set(sys.modules)\n"
        "import pyro_arm, pyro_arm.estimators\n"
        "new = [m for m in set(sys.modules) - before if m.split('.')[0] != 'pyro_arm']\n"
        "assert 'matplotlib' not in sys.modules and 'pyro_arm.sbn' not in sys.modules\n"
        "assert not [m for m in new if m.split('.')[0] in ('tqdm', 'matplotlib')], new\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"estimator": "rloo", "num_samples": 1}, "--num-samples: .*num_samples >= 2"),
        ({"estimator": "disarm", "num_samples": 4}, "--num-samples: .*'rloo', 'arms'"),
        ({"estimator": "tracegraph", "num_samples": 4}, "--num-samples: tracegraph does not"),
        ({"estimator": "arms", "num_samples": 10**7}, "--num-samples: .* is beyond 10,000"),
        (
            {"objective": "iwae", "estimator": "disarm", "num_samples": 10**7},
            "--num-samples: IWELBO: num_samples=10,000,000 is beyond 10,000",
        ),
    ],
)
def test_validate_num_samples(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes).validate()


@pytest.mark.parametrize("estimator", ["rloo", "arms"])
def test_make_elbo_num_samples(estimator):
    elbo = make_elbo(estimator, 2, True, num_samples=3)
    assert (elbo.estimator.name, elbo.num_samples, elbo.num_particles) == (estimator, 3, 2)
    with pytest.raises(ValueError, match="takes neither num_samples"):
        make_elbo("trace", num_samples=3)


def test_model_grad_option():
    TrainConfig(estimator="arms", model_grad="all").validate()
    TrainConfig(estimator="disarm", model_grad="base").validate()
    for changes, message in [
        ({"estimator": "disarm", "model_grad": "all"}, "--model-grad all: only with"),
        ({"estimator": "arms", "model_grad": "every"}, "--model-grad: invalid choice"),
    ]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**changes).validate()
    assert make_elbo("arms", num_samples=3, model_grad="base").model_grad == "base"
    assert make_elbo("arms").model_grad == "all"  # TraceARM_ELBO's default for arms
    assert make_elbo("disarm").model_grad == "base"
    with pytest.raises(ValueError, match="takes neither"):
        make_elbo("tracegraph", model_grad="all")
    assert "model_grad" in TRAJECTORY_FIELDS


@pytest.mark.parametrize("vectorize", [[], ["--vectorize"]])
@pytest.mark.parametrize("estimator", ["rloo", "arms"])
def test_train_multisample(estimator, vectorize, tmp_path, capsys):
    run = tmp_path / estimator
    status = main(
        ["train", "--steps", "2", "--estimator", estimator, "--num-samples", "3",
         "--model", "two_layer", "--run-dir", str(run), "--eval-k", "3", "--test-size", "8",
         "--no-progress", "--device", "cpu", *vectorize]
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    config = json.loads((run / "config.json").read_text())["config"]
    assert (config["estimator"], config["num_samples"]) == (estimator, 3)
