# SPDX-License-Identifier: Apache-2.0
"""
One run at a time writes a run folder: a second ``pyro-arm train`` on it (fresh or ``--resume``)
exits at once with one line naming the process that holds it and touches nothing, and a run
killed by SIGKILL does not block its ``--resume``. Real processes: two trainings started
together, and a lock held by another process.

A run folder cannot be turned against its user: a link (or a folder, a FIFO) planted in it is
refused in one line naming it, its target untouched, and ``--resume`` refuses a checkpoint
copied in from another run before it changes anything.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from pyro_arm.sbn.checkpoint import load_checkpoint
from pyro_arm.sbn.cli import main
from pyro_arm.sbn.metrics import read_metrics
from pyro_arm.sbn.rundir import LOCK_FILE
from tests.process_state import process_state_fixture  # noqa: F401  (autouse)
from tests.test_interrupts import ROOT, TIMEOUT, Trainer

# a training far longer than any test waits: the winner is stopped by a signal
LONG = dict(steps=100_000, checkpoint_every=3)
FAST = ["--eval-k", "2", "--test-size", "4", "--no-progress", "--device", "cpu"]


def busy_line(run, pid: int) -> str:
    return (
        f"pyro-arm: error: {run} is in use by another run (pid {pid} on {socket.gethostname()}); "
        "wait for it to finish, or pick another --run-dir"
    )


def race(run, resume: bool) -> tuple[Trainer, int]:
    """
    Starts two trainings on ``run`` together; the one that loses must exit at once with status
    2 and the one line naming the other. The winner is stopped with SIGINT after that; returns
    it and the step its checkpoint holds.
    """
    flags = ["--resume"] if resume else []
    trainers = [Trainer(run, flags=flags, **LONG) for _ in range(2)]
    try:
        return _race(run, trainers)
    finally:
        for trainer in trainers:
            if trainer.proc.poll() is None:
                trainer.proc.kill()
                trainer.proc.wait()


def _race(run, trainers: list[Trainer]) -> tuple[Trainer, int]:
    deadline = time.monotonic() + TIMEOUT / 2
    while all(t.proc.poll() is None for t in trainers):
        assert time.monotonic() < deadline, "neither run stopped"
        time.sleep(0.05)
    loser = next(t for t in trainers if t.proc.poll() is not None)
    winner = next(t for t in trainers if t is not loser)
    assert loser.finish() == 2, "\n".join(loser.lines)
    assert loser.lines == [busy_line(run, winner.proc.pid)]
    assert winner.proc.poll() is None, "the winner ended before the loser"
    winner.wait_for(r"^step \d+:")  # it trains
    winner.proc.send_signal(signal.SIGINT)
    assert winner.finish() == 128 + signal.SIGINT, "\n".join(winner.lines)
    saved = load_checkpoint(run / "checkpoint.pt")["step"]
    assert saved == max(winner.logged_steps())
    # every row once, written by the winner alone
    assert [r["step"] for r in read_metrics(run / "metrics.csv")] == list(range(1, saved + 1))
    assert not (run / LOCK_FILE).exists()  # removed when the run ended
    return winner, saved


@pytest.mark.slow
def test_two_runs_started_together_on_one_folder(tmp_path):
    run = tmp_path / "run"
    _, first = race(run, resume=False)
    _, second = race(run, resume=True)
    assert second > first


@pytest.mark.slow
def test_a_run_killed_by_sigkill_does_not_block_its_resume(tmp_path, capsys):
    run = tmp_path / "run"
    trainer = Trainer(run, **LONG)
    trainer.wait_for(r"^step 4:")  # after the checkpoint of step 3
    trainer.proc.kill()
    assert trainer.finish() == -signal.SIGKILL
    # the lock file stays, naming the dead process; the kernel released its lock
    assert (run / LOCK_FILE).read_text().split() == [str(trainer.proc.pid), socket.gethostname()]
    saved = load_checkpoint(run / "checkpoint.pt")["step"]
    steps = str(saved + 2)
    status = main(["train", "--resume", "--steps", steps, "--run-dir", str(run), *FAST])
    assert status == 0, capsys.readouterr().err
    assert [r["step"] for r in read_metrics(run / "metrics.csv")] == list(range(1, saved + 3))
    assert not (run / LOCK_FILE).exists()


HOLDER = """\
import fcntl, os, socket, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, f"{os.getpid()} {socket.gethostname()}\\n".encode())
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def held(tmp_path):
    """A finished run whose folder's lock is held by another process (until the test ends)."""
    run = tmp_path / "run"
    status = main(
        ["train", "--steps", "2", "--checkpoint-every", "1", "--run-dir", str(run), *FAST]
    )
    assert status == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run / LOCK_FILE)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    assert holder.stdout.readline() == "locked\n"
    yield run, holder.pid
    holder.stdin.close()
    holder.wait(timeout=TIMEOUT)


def snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.parametrize("how", ["resume", "fresh"])
def test_a_folder_held_by_another_process(held, capsys, how):
    run, pid = held
    before = snapshot(run)
    args = ["--resume", "--steps", "4"] if how == "resume" else ["--steps", "4"]
    status = main(["train", *args, "--run-dir", str(run), *FAST])
    assert status == 2
    assert capsys.readouterr().err.splitlines() == [busy_line(run, pid)]
    assert snapshot(run) == before  # nothing written, nothing removed


def test_a_fresh_run_on_a_folder_being_created(tmp_path, capsys):
    """Another process holds the lock of a folder that holds nothing else yet."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run / LOCK_FILE)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "locked\n"
        status = main(["train", "--steps", "2", "--run-dir", str(run), *FAST])
        assert status == 2
        assert capsys.readouterr().err.splitlines() == [busy_line(run, holder.pid)]
        assert [p.name for p in run.iterdir()] == [LOCK_FILE]
    finally:
        holder.stdin.close()
        holder.wait(timeout=TIMEOUT)
    # the holder is gone: its lock file no longer keeps a fresh run out
    assert main(["train", "--steps", "2", "--run-dir", str(run), *FAST]) == 0
    assert not (run / LOCK_FILE).exists()


def test_the_lock_is_released_by_every_ending(tmp_path, capsys):
    """A run that fails or succeeds leaves no lock file (and a failed fresh run no folder)."""
    run = tmp_path / "run"
    status = main(["train", "--lr", "1e20", "--steps", "9", "--run-dir", str(run), *FAST])
    assert status == 2 and not run.exists()
    assert main(["train", "--resume", "--run-dir", str(run), *FAST]) == 2
    assert not run.exists()  # a --resume of nothing creates nothing
    assert main(["train", "--steps", "1", "--run-dir", str(run), *FAST]) == 0
    assert not (run / LOCK_FILE).exists()
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# A run folder cannot be turned against its user


def test_a_link_planted_as_the_lock_leaves_its_target_untouched(tmp_path):
    """The command line of a shared folder's trap: one line, the linked file unchanged."""
    (tmp_path / "victim").write_text("precious\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / LOCK_FILE).symlink_to(tmp_path / "victim")
    result = subprocess.run(
        [sys.executable, "-m", "pyro_arm", "train", "--steps", "5", "--run-dir", "d"],
        capture_output=True, text=True, cwd=tmp_path, timeout=TIMEOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "pyro-arm: error: d/.lock is a symbolic link, not a regular file: a run folder holds only "
        "the run's own files; remove it, or pick another --run-dir"
    ]
    assert (tmp_path / "victim").read_text() == "precious\n"
    assert [p.name for p in (tmp_path / "d").iterdir()] == [LOCK_FILE]


def plant(path, kind: str, target) -> None:
    """Puts a ``kind`` entry at ``path``: a link to ``target``, a folder or a FIFO."""
    if kind == "link":
        path.symlink_to(target)
    elif kind == "folder":
        path.mkdir()
    else:
        os.mkfifo(path)


KINDS = {"link": "a symbolic link", "folder": "a folder", "fifo": "a FIFO"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_lock_that_is_not_a_regular_file_is_named(tmp_path, capsys, kind):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    plant(run / LOCK_FILE, kind, victim)
    status = main(["train", "--steps", "2", "--run-dir", str(run), *FAST])
    assert status == 2
    assert capsys.readouterr().err.splitlines() == [
        f"pyro-arm: error: {run / LOCK_FILE} is {KINDS[kind]}, not a regular file: a run folder "
        "holds only the run's own files; remove it, or pick another --run-dir"
    ]
    assert victim.read_text() == "precious\n"
    assert [p.name for p in run.iterdir()] == [LOCK_FILE]


@pytest.mark.parametrize("name", ["metrics.csv", "checkpoint.pt", "summary.json", LOCK_FILE])
def test_resume_refuses_a_link_planted_in_the_run(held_free, capsys, name):
    """A link in a finished run's folder, to a file of the user's: refused before anything is
    opened, the linked file and the run unchanged."""
    run, victim = held_free
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(victim)
    before = snapshot(run)
    status = main(["train", "--resume", "--steps", "4", "--run-dir", str(run), *FAST])
    assert status == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"pyro-arm: error: {run / name} is a symbolic link, not a regular file: a run folder "
        "holds only the run's own files; remove it, or pick another --run-dir"
    ]
    assert victim.read_text() == "precious\n"
    assert snapshot(run) == before


@pytest.fixture
def held_free(tmp_path):
    """A finished 2-step run (no lock held) and a file of the user's beside it."""
    run = tmp_path / "run"
    args = ["--steps", "2", "--checkpoint-every", "1", "--eval-every", "1", "--run-dir", str(run)]
    assert main(["train", *args, *FAST]) == 0
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    return run, victim


def test_a_folder_holding_only_a_stale_lock_is_fresh(tmp_path, capsys):
    """A lock file left by a run that died (nobody holds it) does not keep a fresh run out."""
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(f"999999999 {socket.gethostname()}\n")
    assert main(["train", "--steps", "1", "--run-dir", str(run), *FAST]) == 0, (
        capsys.readouterr().err
    )
    assert (run / "checkpoint.pt").is_file() and not (run / LOCK_FILE).exists()


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, capsys):
    """checkpoint.pt copied in from another run folder: one line, before metrics.csv changes."""
    runs = {}
    for name, steps in (("a", "2"), ("b", "3")):
        runs[name] = tmp_path / name
        args = ["--steps", steps, "--eval-every", "1", "--run-dir", str(runs[name])]
        assert main(["train", *args, *FAST]) == 0
    a, b = runs["a"], runs["b"]
    ids = {n: load_checkpoint(r / "checkpoint.pt")["config"]["run_id"] for n, r in runs.items()}
    assert ids["a"] != ids["b"]
    assert json.loads((b / "config.json").read_text())["config"]["run_id"] == ids["b"]
    shutil.copy(a / "checkpoint.pt", b / "checkpoint.pt")
    capsys.readouterr()
    before = snapshot(b)
    status = main(["train", "--resume", "--steps", "4", "--run-dir", str(b), *FAST])
    assert status == 2
    assert capsys.readouterr().err.splitlines() == [
        f"pyro-arm: error: {b / 'checkpoint.pt'} belongs to another run (run id {ids['a']}; "
        f"{b / 'config.json'} has {ids['b']}): it was copied from another run folder; put back "
        "this run's checkpoint, or --resume the other run in its own folder"
    ]
    assert snapshot(b) == before
    # the run's own checkpoint carries the run on, keeping its identity
    shutil.copy(a / "checkpoint.pt", tmp_path / "a.pt")
    assert main(["train", "--resume", "--steps", "3", "--run-dir", str(a), *FAST]) == 0
    assert load_checkpoint(a / "checkpoint.pt")["config"]["run_id"] == ids["a"]
    assert [r["step"] for r in read_metrics(a / "metrics.csv")] == [1, 2, 3]
