# SPDX-License-Identifier: Apache-2.0
"""
``pyro-arm train`` when things go wrong: a run folder holding anything is never overwritten, a
diverging run keeps its last good checkpoint, and every bad input or file-system failure ends
with one line ``pyro-arm: error: ...`` and exit status 2, leaving no empty run folder behind.
"""

import errno
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_arm.sbn import checkpoint as checkpoint_module
from pyro_arm.sbn import files, resources
from pyro_arm.sbn.checkpoint import load_checkpoint
from pyro_arm.sbn.cli import main
from pyro_arm.sbn.metrics import read_metrics
from tests.process_state import process_state_fixture  # noqa: F401  (autouse)
from tests.test_data import BOMB_BYTES, fake_mnist, gzip_bomb, idx_header, write_folder

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--eval-k", "2", "--test-size", "4", "--no-progress", "--device", "cpu"]


def train(capsys, *args):
    """Runs ``pyro-arm train``; returns the status, stdout and the one error line (or None)."""
    status = main(["train", *args])
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    if status == 0:
        return status, out.out, None
    assert len(lines) == 1 and lines[0].startswith("pyro-arm: error: "), out.err
    return status, out.out, lines[0]


@pytest.fixture
def finished(tmp_path, capsys):
    """A finished 2-step run with a metrics row per step."""
    run = tmp_path / "run"
    status, _, err = train(
        capsys, "--steps", "2", "--eval-every", "1", "--run-dir", str(run), *FAST
    )
    assert status == 0, err
    return run


# ---------------------------------------------------------------------------------------------
# Never clobber


def test_a_fresh_run_never_writes_into_a_folder_holding_anything(finished, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    (copy / "checkpoint.pt").unlink()
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    status, _, err = train(capsys, "--steps", "5", "--run-dir", str(copy), *FAST)
    assert status == 2 and f"{copy} is not empty; pass --resume" in err
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before

    status, _, err = train(capsys, "--steps", "5", "--run-dir", str(finished), *FAST)
    assert status == 2 and "already holds a run; pass --resume" in err

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    status, _, err = train(capsys, "--steps", "1", "--run-dir", str(other), *FAST)
    assert status == 2 and "is not empty" in err
    assert [p.name for p in other.iterdir()] == ["todo.txt"]


def test_a_fresh_run_may_use_an_empty_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train(capsys, "--steps", "1", "--run-dir", str(empty), *FAST)[0] == 0
    assert (empty / "checkpoint.pt").is_file()


# ---------------------------------------------------------------------------------------------
# Divergence


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--lr", "1e20", "--checkpoint-every", "1", "--eval-every", "1", "--run-dir", str(run)]
    status, _, err = train(capsys, "--steps", "20", *args, *FAST)
    assert status == 2
    # Adam moves every parameter by ~1e20 in step 1 (finite), and to NaN in step 2
    assert err == (
        f"pyro-arm: error: training diverged at step 2: the parameters became non-finite after "
        f"the optimizer step; the checkpoint of step 1 in {run} is kept; start again with a "
        "smaller --lr (now 1e+20) in a new --run-dir"
    )
    good = load_checkpoint(run / "checkpoint.pt")
    assert good["step"] == 1
    assert all(torch.isfinite(t).all() for t in good["model"].values())
    # --resume continues from the good checkpoint: the same step diverges again, with the same
    # line (the trajectory is exact), and the good checkpoint stays
    status, out, err2 = train(capsys, "--resume", "--run-dir", str(run), "--no-progress")
    assert status == 2 and "resuming" in out and "at step 1 of 20" in out and err2 == err
    assert torch.equal(load_checkpoint(run / "checkpoint.pt")["torch_rng"], good["torch_rng"])
    # and its parameters are usable: evaluating the run at step 1 works
    status, out, _ = train(capsys, "--resume", "--steps", "1", "--run-dir", str(run), *FAST)
    assert status == 0 and "already reached step 1" in out
    assert json.loads((run / "summary.json").read_text())["steps"] == 1


def test_divergence_before_the_first_checkpoint_leaves_no_folder(tmp_path, capsys):
    run = tmp_path / "run"
    status, _, err = train(capsys, "--lr", "1e20", "--steps", "9", "--run-dir", str(run), *FAST)
    assert status == 2 and "no checkpoint had been written" in err and "smaller --lr" in err
    assert not run.exists()


# ---------------------------------------------------------------------------------------------
# One-line errors


def test_run_dir_is_a_file_or_below_one(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    status, _, err = train(capsys, "--run-dir", str(path), *FAST)
    assert status == 2 and f"--run-dir {path} is a file, not a folder" in err
    status, _, err = train(capsys, "--run-dir", str(path / "run"), *FAST)
    assert status == 2 and f"would be inside {path}, which is a file" in err
    status, _, err = train(capsys, "--resume", "--run-dir", str(path / "run"), *FAST)
    assert status == 2 and f"would be inside {path}, which is a file" in err
    assert path.read_text() == "x"


def test_read_only_run_folder(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: refuse the writes as the kernel would

        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))

        monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    status, _, err = train(capsys, "--steps", "1", "--run-dir", str(folder / "run"), *FAST)
    folder.chmod(0o755)
    assert status == 2 and "Permission denied on" in err and "writable" in err
    assert list(folder.iterdir()) == []  # no empty run folder left behind


@pytest.mark.parametrize(
    "seed, message",
    [
        ("-1", "--seed: expected an integer from 0 to 2**64-1, got -1"),
        ("1e21", "argument --seed: invalid int value: '1e21'"),
        (str(10**21), "--seed: expected an integer from 0 to 2**64-1"),
    ],
)
def test_bad_seed(seed, message, tmp_path, capsys):
    status, _, err = train(capsys, "--seed", seed, "--run-dir", str(tmp_path / "r"), *FAST)
    assert status == 2 and message in err
    assert not (tmp_path / "r").exists()


def test_full_disk_during_a_checkpoint(finished, capsys, monkeypatch):
    def half_then_full(path, data):
        def write(f):
            f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        files.atomic_write(path, write)

    good = (finished / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", half_then_full)
    status, _, err = train(capsys, "--resume", "--steps", "3", "--run-dir", str(finished), *FAST)
    assert status == 2
    assert f"No space left on device on {finished / 'checkpoint.pt'}; check" in err
    assert (finished / "checkpoint.pt").read_bytes() == good
    assert not list(finished.glob("*.tmp"))


@pytest.mark.slow
def test_file_size_limit_in_a_subprocess(tmp_path):
    """A real write failure: RLIMIT_FSIZE below the checkpoint's size (Python ignores SIGXFSZ,
    so the write fails with EFBIG)."""
    run = tmp_path / "run"
    # the limit is set by the child itself (no preexec_fn in this multi-threaded process)
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))\n"
        "from pyro_arm.sbn.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["train", "--steps", "2", "--run-dir", str(run), *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("pyro-arm: error: File too large on ")
    assert "checkpoint.pt" in result.stderr and result.stderr.count("\n") == 1
    assert not run.exists()  # failed before its first checkpoint: nothing left behind


def test_checkpoint_of_another_architecture_or_missing_a_key(finished, tmp_path, capsys):
    ckpt = torch.load(finished / "checkpoint.pt", weights_only=True)
    ckpt["model"] = {k: v[..., :3] if v.dim() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, finished / "checkpoint.pt")
    status, _, err = train(capsys, "--resume", "--steps", "3", "--run-dir", str(finished), *FAST)
    assert status == 2 and "the checkpoint does not fit this model (" in err
    assert "size mismatch" in err
    del ckpt["step"]
    torch.save(ckpt, finished / "checkpoint.pt")
    status, _, err = train(capsys, "--resume", "--run-dir", str(finished), *FAST)
    assert status == 2 and "lacks 'step'; it is damaged" in err


def test_metrics_garbage_row_and_torn_last_line(finished, capsys):
    path = finished / "metrics.csv"
    good = path.read_text()
    path.write_text(good + "abc,def\n")
    status, _, err = train(capsys, "--resume", "--steps", "3", "--run-dir", str(finished), *FAST)
    assert status == 2 and f"{path} line 4 is not a metrics row ('abc,def')" in err
    # a last line without its newline is a row cut off by a killed run: dropped on resume
    path.write_text(good + "6")
    status, _, err = train(capsys, "--resume", "--steps", "3", "--run-dir", str(finished), *FAST)
    assert status == 0, err
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_model_too_large(tmp_path, capsys, monkeypatch):
    run = str(tmp_path / "r")
    status, _, err = train(capsys, "--model", "linear-2000000000", "--run-dir", run, *FAST)
    assert status == 2 and "--model linear-2000000000 is too large" in err
    # a model too large for a machine with 32 GiB (it needs 16 bytes x 3.14e9 parameters)
    monkeypatch.setattr(resources, "device_memory", lambda device: 32 * 2**30)
    status, _, err = train(capsys, "--model", "linear-2000000", "--run-dir", run, *FAST)
    assert (
        status == 2
        and (
            "--model linear-2000000 is too large: its 3,140,000,784 parameters need 46.8 GiB to "
            "train, and cpu has 32.0 GiB; choose smaller layers"
        )
        in err
    )
    assert not (tmp_path / "r").exists()


def test_allocation_error_while_building(tmp_path, capsys, monkeypatch):
    import pyro_arm.sbn.train as train_module

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")

    monkeypatch.setattr(train_module, "build_sbn", out_of_memory)
    status, _, err = train(capsys, "--run-dir", str(tmp_path / "r"), *FAST)
    assert status == 2 and "does not fit in memory (CUDA out of memory." in err
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------
# Smaller things


def test_resume_past_steps(finished, capsys):
    status, _, err = train(capsys, "--resume", "--steps", "1", "--run-dir", str(finished), *FAST)
    assert (
        status == 2
        and (f"the checkpoint in {finished} is at step 2, past --steps 1; pass --steps 2 or more")
        in err
    )


def test_data_naming_a_file(tmp_path, capsys):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"x")
    status, _, err = train(capsys, "--data", str(path), "--run-dir", str(tmp_path / "r"), *FAST)
    assert status == 2 and f"--data {path} is a file, not a folder" in err


def bomb_folder(folder: Path) -> Path:
    """A data folder whose training images are a gzip bomb: the header of 60,000 images, then
    far more zeros than it declares."""
    write_folder(folder, fake_mnist())
    path = folder / "train-images-idx3-ubyte.gz"
    gzip_bomb(path, idx_header(60_000, 28, 28), BOMB_BYTES)
    return path


def test_a_data_folder_holding_a_gzip_bomb(tmp_path, capsys):
    path = bomb_folder(tmp_path / "mnist")
    run = tmp_path / "r"
    status, _, err = train(capsys, "--data", str(path.parent), "--run-dir", str(run), *FAST)
    assert status == 2
    assert err == (
        f"pyro-arm: error: {path}: file has trailing data: the header declares (60000, 28, 28) = "
        "47040000 bytes of data, found more (download it again)"
    )
    assert not run.exists()


def test_out_of_memory_reading_a_data_file_names_it(tmp_path, capsys, monkeypatch):
    from pyro_arm.sbn import data

    folder = write_folder(tmp_path / "mnist", fake_mnist())

    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(data, "read_idx", out_of_memory)
    status, _, err = train(capsys, "--data", str(folder), "--run-dir", str(tmp_path / "r"), *FAST)
    assert status == 2
    assert err == (
        f"pyro-arm: error: out of memory reading {folder / 'train-images-idx3-ubyte.gz'}; give the "
        "process more memory (the file holds MNIST's sizes at most)"
    )


def test_out_of_memory_loading_the_data_names_it(tmp_path, capsys, monkeypatch):
    import pyro_arm.sbn.train as train_module

    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(train_module, "load_mnist", out_of_memory)
    status, _, err = train(capsys, "--run-dir", str(tmp_path / "r"), *FAST)
    assert status == 2
    assert (
        err
        == "pyro-arm: error: out of memory loading --data embedded; give the process more memory"
    )


def test_threads_is_applied_and_recorded(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    run = tmp_path / "r"
    assert train(capsys, "--threads", "1", "--steps", "1", "--run-dir", str(run), *FAST)[0] == 0
    assert calls == [1]
    info = json.loads((run / "config.json").read_text())
    assert info["config"]["threads"] == 1 and info["threads"] == torch.get_num_threads()
    default = tmp_path / "d"
    assert train(capsys, "--steps", "1", "--run-dir", str(default), *FAST)[0] == 0
    assert calls == [1]  # not called: torch's own default
    assert json.loads((default / "config.json").read_text())["config"]["threads"] is None


# ---------------------------------------------------------------------------------------------
# Out of memory

# run by a subprocess: caps the address space at what the process maps once torch is imported,
# plus argv[1] MiB, then runs ``pyro-arm`` with the other arguments
UNDER_RLIMIT_AS = """\
import resource, sys
from pyro_arm.sbn.cli import main
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[1]) * 2**20, resource.RLIM_INFINITY))
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--batch-size", "10000"],
            r"out of memory in step 1 \(could not allocate [\d.]+ MiB\); no checkpoint had been "
            r"written; start again in a new --run-dir with a smaller --batch-size \(now 10000\) "
            r"or smaller layers \(--model linear\)",
        ),
        (
            ["--model", "linear-30000"],
            r"--model linear-30000 is too large: its 47,100,784 parameters need 0.7 GiB to "
            r"train, and this process's RLIMIT_AS leaves 0\.[0-3] GiB; choose smaller layers",
        ),
    ],
    ids=["batch", "model"],
)
def test_out_of_memory_under_rlimit_as(tmp_path, args, message):
    """A real allocator failure: 300 MiB more than torch needs, a batch or a model too large."""
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", UNDER_RLIMIT_AS, "300", "train", *args, "--steps", "2",
         "--run-dir", str(run), *FAST],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert re.fullmatch(f"pyro-arm: error: {message}\n", result.stderr), result.stderr
    assert not run.exists()  # failed before its first checkpoint: nothing left behind


@pytest.mark.slow
def test_a_gzip_bomb_under_rlimit_as(tmp_path):
    """Under a memory cap smaller than the bomb, the bomb is still named, not the batch size."""
    path = bomb_folder(tmp_path / "mnist")
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", UNDER_RLIMIT_AS, "300", "train", "--data", str(path.parent),
         "--run-dir", str(run), *FAST],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"pyro-arm: error: {path}: file has trailing data: the header declares (60000, 28, 28) = "
        "47040000 bytes of data, found more (download it again)\n"
    )
    assert not run.exists()


def test_process_memory_limit_reads_rlimit_data():
    before = resource.getrlimit(resource.RLIMIT_DATA)
    used = resources._status_bytes("VmData")
    assert used > 0
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (used + 2**30, before[1]))
        left, name = resources.process_memory_limit()
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, before)
    assert resource.getrlimit(resource.RLIMIT_DATA) == before
    assert name == "RLIMIT_DATA" and 2**30 - 2**26 < left <= 2**30


def fail_at(step: int, error: BaseException):
    """A stand-in for a training step that raises ``error`` in step ``step``."""
    import pyro_arm.sbn.train as train_module

    real = train_module._train_step

    def step_or_fail(run, state):
        if state.step + 1 == step:
            raise error
        return real(run, state)

    return step_or_fail


ALLOCATOR_ERRORS = {
    "cuda": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "cpu": RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
        "you tried to allocate 1048576000 bytes. Error code 12 (Cannot allocate memory)"
    ),
    "python": MemoryError(),
}


@pytest.mark.parametrize("kind", list(ALLOCATOR_ERRORS))
def test_out_of_memory_in_a_step_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch, kind):
    import pyro_arm.sbn.train as train_module

    run = tmp_path / "run"
    args = ["--steps", "6", "--checkpoint-every", "2", "--eval-every", "1", "--run-dir", str(run)]
    monkeypatch.setattr(train_module, "_train_step", fail_at(4, ALLOCATOR_ERRORS[kind]))
    status, _, err = train(capsys, *args, *FAST)
    assert status == 2
    size = {"cuda": "2.00 GiB", "cpu": "1,000.0 MiB", "python": None}[kind]
    reason = f"could not allocate {size}" if size else "an allocation failed"
    assert err == (
        f"pyro-arm: error: out of memory in step 4 ({reason}); the checkpoint of step 2 in {run} "
        "is kept; start again in a new --run-dir with a smaller --batch-size (now 50) or smaller "
        "layers (--model linear)"
    )
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 2
    assert not list(run.glob("*.tmp"))
    monkeypatch.undo()  # --resume redoes step 3 (its row is dropped) and carries on
    status, _, err = train(capsys, "--resume", "--run-dir", str(run), *FAST)
    assert status == 0, err
    assert [r["step"] for r in read_metrics(run / "metrics.csv")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "options, advice",
    [
        (
            ["--objective", "iwae", "--estimator", "disarm", "--num-samples", "5"],
            "a smaller --batch-size (now 50), fewer --num-samples (now 5) or smaller layers",
        ),
        (
            ["--objective", "iwae", "--estimator", "arms", "--num-particles", "2"],
            "a smaller --batch-size (now 50), fewer --num-particles (now 2), fewer --num-samples "
            "(now 2), fewer --num-members (now 3) or smaller layers",
        ),
        (
            ["--estimator", "rloo", "--num-samples", "4"],
            "a smaller --batch-size (now 50), fewer --num-samples (now 4) or smaller layers",
        ),
    ],
    ids=["iwae", "iwae-arms", "rloo"],
)
def test_out_of_memory_names_the_sample_counts(tmp_path, capsys, monkeypatch, options, advice):
    """The options that multiply a step's memory are named with their values."""
    import pyro_arm.sbn.train as train_module

    run = tmp_path / "run"
    monkeypatch.setattr(train_module, "_train_step", fail_at(1, MemoryError()))
    status, _, err = train(capsys, "--steps", "2", *options, "--run-dir", str(run), *FAST)
    assert status == 2
    assert err == (
        "pyro-arm: error: out of memory in step 1 (an allocation failed); no checkpoint had been "
        f"written; start again in a new --run-dir with {advice} (--model linear)"
    )


def test_out_of_memory_in_the_final_evaluation(finished, capsys, monkeypatch):
    from pyro_arm.sbn import distributed

    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(distributed, "evaluate_sbn", out_of_memory)
    (finished / "summary.json").unlink()
    good = (finished / "checkpoint.pt").read_bytes()
    status, _, err = train(capsys, "--resume", "--steps", "3", "--run-dir", str(finished), *FAST)
    assert status == 2
    assert err == (
        "pyro-arm: error: out of memory in the final evaluation (an allocation failed); the "
        f"checkpoint of step 3 in {finished} is kept: give the process more memory and --resume "
        "to finish the evaluation, or start again in a new --run-dir with smaller layers "
        "(--model linear)"
    )
    assert load_checkpoint(finished / "checkpoint.pt")["step"] == 3
    assert (finished / "checkpoint.pt").read_bytes() != good
    assert not (finished / "summary.json").exists()
    monkeypatch.undo()
    status, out, _ = train(capsys, "--resume", "--run-dir", str(finished), *FAST)
    assert status == 0 and "already reached step 3" in out


def test_a_runtime_error_that_is_not_an_allocation_is_not_reported_as_one(tmp_path, monkeypatch):
    import pyro_arm.sbn.train as train_module

    monkeypatch.setattr(train_module, "_train_step", fail_at(1, RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["train", "--steps", "2", "--run-dir", str(tmp_path / "run"), *FAST])
    assert not (tmp_path / "run").exists()


def test_out_of_memory_reading_the_checkpoint_is_not_damage(finished, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(checkpoint_module.torch, "load", out_of_memory)
    status, _, err = train(capsys, "--resume", "--steps", "3", "--run-dir", str(finished), *FAST)
    assert status == 2
    assert err == (
        "pyro-arm: error: out of memory (an allocation failed); give the process more memory, or "
        "train with a smaller --batch-size, fewer --num-samples (with --objective iwae, rloo or "
        "arms) or smaller layers (--model)"
    )
