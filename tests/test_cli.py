# SPDX-License-Identifier: Apache-2.0
"""``pyro-arm train`` end to end on the embedded data: outputs, exact resume, error messages."""

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_arm.sbn.checkpoint import load_checkpoint
from pyro_arm.sbn.cli import main
from pyro_arm.sbn.config import TrainConfig
from pyro_arm.sbn.train import TrainingInterrupted, train

ROOT = Path(__file__).resolve().parents[1]
# few steps, a cheap final evaluation
FAST = ["--eval-k", "3", "--test-size", "8", "--no-progress", "--device", "cpu"]


def run_main(capsys, *args):
    status = main(["train", *args])
    out = capsys.readouterr()
    return status, out.out, out.err


def metrics(run_dir):
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def params(run_dir):
    return load_checkpoint(Path(run_dir) / "checkpoint.pt")["model"]


def test_train_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    status, out, err = run_main(
        capsys, "--steps", "6", "--eval-every", "3", "--checkpoint-every", "4",
        "--run-dir", str(run), *FAST,
    )  # fmt: skip
    assert status == 0, err
    names = {p.name for p in run.iterdir()}
    assert names == {
        "config.json",
        "metrics.csv",
        "checkpoint.pt",
        "summary.json",
        "learning_curves.png",
        "reconstructions.png",
        "samples.png",
    }
    summary = json.loads((run / "summary.json").read_text())
    for key in ("test_elbo", "test_iwae", "k", "wall_s", "steps_per_s", "seconds_per_step"):
        assert key in summary
    assert summary["k"] == 3 and summary["steps"] == 6 and summary["iwae_test_size"] == 8
    assert summary["test_size"] == 2000
    assert 50 < summary["test_iwae"] < 400 and 50 < summary["test_elbo"] < 400
    assert "test -ELBO" in out and "steps/s" in out
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["model"] == "linear" and config["config"]["estimator"] == "disarm"
    assert config["data"]["num_train"] == 10_000
    rows = metrics(run)
    assert [int(r["step"]) for r in rows] == [3, 6]
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 6
    for png in ("learning_curves.png", "reconstructions.png", "samples.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_run_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(
        capsys, "--steps", "2", "--model", "two_layer", "--estimator", "disarm",
        "--seed", "3", *FAST,
    )  # fmt: skip
    assert status == 0, err
    assert (tmp_path / "runs" / "two_layer-disarm-s3" / "summary.json").is_file()


@pytest.mark.slow
def test_interrupt_then_resume_is_exact(tmp_path, capsys):
    common = dict(steps=10, eval_every=2, checkpoint_every=4, eval_k=3, test_size=8, device="cpu")
    straight = tmp_path / "straight"
    train(TrainConfig(run_dir=str(straight), **common), progress=False, log=lambda _: None)

    cut = tmp_path / "cut"

    def interrupt(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as info:
        train(TrainConfig(run_dir=str(cut), **common), progress=False, callback=interrupt)
    assert info.value.step == 5
    assert load_checkpoint(cut / "checkpoint.pt")["step"] == 5  # nothing lost
    assert [int(r["step"]) for r in metrics(cut)] == [2, 4]
    assert not (cut / "summary.json").exists()

    status, out, err = run_main(capsys, "--resume", "--run-dir", str(cut), "--no-progress")
    assert status == 0, err
    assert "resuming" in out and "at step 5" in out
    assert load_checkpoint(cut / "checkpoint.pt")["step"] == 10
    a, b = metrics(straight), metrics(cut)
    assert [int(r["step"]) for r in b] == [2, 4, 6, 8, 10]
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == rb["train_loss"] and ra["valid_neg_elbo"] == rb["valid_neg_elbo"]
    pa, pb = params(straight), params(cut)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    sa = json.loads((straight / "summary.json").read_text())
    sb = json.loads((cut / "summary.json").read_text())
    assert sa["test_elbo"] == sb["test_elbo"] and sa["test_iwae"] == sb["test_iwae"]


@pytest.mark.slow
@pytest.mark.parametrize("binarization", ["threshold", "dynamic"])
def test_resume_extends_a_finished_run(tmp_path, capsys, binarization):
    args = ["--estimator", "ar", "--eval-every", "3", "--binarization", binarization, *FAST]
    status, _, err = run_main(
        capsys, "--steps", "7", "--run-dir", str(tmp_path / "a"), *args,
        "--checkpoint-every", "100",
    )  # fmt: skip
    assert status == 0, err
    status, _, err = run_main(capsys, "--steps", "4", "--run-dir", str(tmp_path / "b"), *args)
    assert status == 0, err
    rows_before = metrics(tmp_path / "b")
    status, _, err = run_main(
        capsys, "--steps", "7", "--run-dir", str(tmp_path / "b"), "--resume", *args
    )
    assert status == 0, err
    rows = metrics(tmp_path / "b")
    assert rows[: len(rows_before)] == rows_before
    assert [int(r["step"]) for r in rows] == [3, 4, 6, 7]
    # the straight run logs at 3, 6, 7; the steps run identically
    pa, pb = params(tmp_path / "a"), params(tmp_path / "b")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.slow
def test_vectorized_particles_and_pyro_estimators(tmp_path, capsys):
    for est in ("trace", "tracegraph", "disarm"):
        status, _, err = run_main(
            capsys, "--steps", "2", "--estimator", est, "--num-particles", "2", "--vectorize",
            "--model", "nonlinear", "--run-dir", str(tmp_path / est), *FAST,
        )  # fmt: skip
        assert status == 0, err
        assert json.loads((tmp_path / est / "config.json").read_text())["config"]["vectorize"]


def test_data_folder(tmp_path, capsys, mnist_dir):
    status, _, err = run_main(
        capsys, "--steps", "1", "--data", str(mnist_dir), "--run-dir", str(tmp_path / "r"), *FAST
    )
    assert status == 0, err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["test_size"] == 10_000


def corrupt_folder(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    one = (1).to_bytes(4, "big")
    headers = {  # one image, one label, their data missing
        "train-images-idx3-ubyte": b"\x00\x00\x08\x03" + one + (28).to_bytes(4, "big") * 2,
        "train-labels-idx1-ubyte": b"\x00\x00\x08\x01" + one,
    }
    for stem, header in headers.items():
        (folder / (stem + ".gz")).write_bytes(gzip.compress(header))
    return folder


ERRORS = {
    "model": (["--model", "resnet"], "unknown model 'resnet'"),
    "estimator": (["--estimator", "rebar"], "invalid choice: 'rebar'"),
    "steps": (["--steps", "0"], "--steps: expected a positive integer"),
    "lr": (["--lr", "-1"], "--lr: expected a positive number"),
    "option": (["--bogus"], "unrecognized arguments: --bogus"),
    "data": (["--data", "/no/such/folder"], "data folder /no/such/folder does not exist"),
    "resume": (["--resume"], "no checkpoint"),
    "num_samples": (
        ["--objective", "iwae", "--estimator", "vimco", "--num-samples", "10000000"],
        "--num-samples: IWELBO: num_samples=10,000,000 is beyond 10,000",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors(case, tmp_path, capsys):
    args, message = ERRORS[case]
    status, out, err = run_main(capsys, *args, "--run-dir", str(tmp_path / "r"), *FAST)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyro-arm: error: "), err
    assert message in lines[0]


def test_corrupt_data_file(tmp_path, capsys):
    folder = corrupt_folder(tmp_path)
    status, _, err = run_main(capsys, "--data", str(folder), "--run-dir", str(tmp_path / "r"))
    assert status == 2
    assert err.startswith("pyro-arm: error: ") and err.count("\n") == 1
    assert "train-images-idx3-ubyte.gz" in err and "truncated" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_absent(tmp_path, capsys, device):
    status, _, err = run_main(
        capsys, "--device", device, "--run-dir", str(tmp_path / "r"), "--no-progress"
    )
    assert status == 2
    assert err.startswith(f"pyro-arm: error: --device {device} was asked for but CUDA is not")
    assert "use --device cpu" in err


def test_existing_run_and_resume_mismatch(tmp_path, capsys):
    run = str(tmp_path / "r")
    assert run_main(capsys, "--steps", "2", "--run-dir", run, *FAST)[0] == 0
    status, _, err = run_main(capsys, "--steps", "2", "--run-dir", run, *FAST)
    assert status == 2 and "already holds a run; pass --resume" in err
    status, _, err = run_main(capsys, "--resume", "--model", "nonlinear", "--run-dir", run, *FAST)
    assert status == 2 and "started with model='linear'" in err
    (Path(run) / "checkpoint.pt").write_bytes(b"garbage")
    status, _, err = run_main(capsys, "--resume", "--run-dir", run, *FAST)
    assert status == 2 and "cannot read checkpoint" in err


def test_subprocess_entry_points(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    help_ = subprocess.run(
        [sys.executable, "-m", "pyro_arm", "train", "--help"],
        capture_output=True, text=True, cwd=ROOT, env=env, check=False,
    )  # fmt: skip
    assert help_.returncode == 0
    for option in ("--model", "--estimator", "--eval-k", "--resume", "--checkpoint-every"):
        assert option in help_.stdout
    script = Path(sys.executable).with_name("pyro-arm")  # the console script, when installed
    if script.is_file():
        run = subprocess.run([script, "train", "--help"], capture_output=True, text=True, env=env)
        assert run.returncode == 0 and run.stdout == help_.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "pyro_arm", "train", "--model", "nope", "--run-dir",
         str(tmp_path / "r")],
        capture_output=True, text=True, cwd=ROOT, env=env, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.startswith("pyro-arm: error: unknown model 'nope'")
    assert "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


@pytest.mark.slow
def test_interrupt_during_validation_falls_back_to_the_last_checkpoint(
    tmp_path, capsys, monkeypatch
):
    common = dict(steps=6, eval_every=2, checkpoint_every=3, eval_k=2, test_size=4, device="cpu")
    straight = tmp_path / "straight"
    train(TrainConfig(run_dir=str(straight), **common), progress=False, log=lambda _: None)

    import pyro_arm.sbn.train as train_module

    real = train_module._evaluate_valid

    def flaky(sbn, x, seed, step, device):
        if step == 4:
            raise KeyboardInterrupt
        return real(sbn, x, seed, step, device)

    monkeypatch.setattr(train_module, "_evaluate_valid", flaky)
    cut = tmp_path / "cut"
    with pytest.raises(TrainingInterrupted) as info:
        train(TrainConfig(run_dir=str(cut), **common), progress=False, log=lambda _: None)
    assert info.value.step == 3 and load_checkpoint(cut / "checkpoint.pt")["step"] == 3
    monkeypatch.setattr(train_module, "_evaluate_valid", real)
    status, _, err = run_main(capsys, "--resume", "--run-dir", str(cut), "--no-progress")
    assert status == 0, err
    keys = ("step", "epoch", "train_loss", "valid_neg_elbo")  # not the wall time
    assert [[r[k] for k in keys] for r in metrics(cut)] == [
        [r[k] for k in keys] for r in metrics(straight)
    ]
    pa, pb = params(straight), params(cut)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize(
    "estimator",
    [
        ["--estimator", "disarm"],
        pytest.param(["--estimator", "arms", "--num-samples", "3"], marks=pytest.mark.slow),
        pytest.param(["--estimator", "rloo", "--num-samples", "2"], marks=pytest.mark.slow),
        pytest.param(["--estimator", "tracegraph", "--num-particles", "2"], marks=pytest.mark.slow),
        pytest.param(["--estimator", "gumbel", "--num-particles", "2"], marks=pytest.mark.slow),
    ],
    ids=lambda args: args[1],
)
def test_categorical_model(tmp_path, capsys, estimator):
    """The categorical VAE trains a few steps with each of its estimators, vectorized."""
    run = tmp_path / "r"
    status, _, err = run_main(
        capsys, "--model", "categorical", *estimator, "--steps", "3", "--vectorize",
        "--run-dir", str(run), *FAST,
    )  # fmt: skip
    assert status == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "categorical" and torch.isfinite(torch.tensor(summary["test_elbo"]))


def test_gumbel_needs_the_categorical_model(tmp_path, capsys):
    status, _, err = run_main(capsys, "--estimator", "gumbel", "--run-dir", str(tmp_path), *FAST)
    assert status == 2 and "gumbel: only with --model categorical" in err
