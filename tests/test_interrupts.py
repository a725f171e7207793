# SPDX-License-Identifier: Apache-2.0
"""
SIGINT and SIGTERM stop a run cleanly: the step in progress finishes, a checkpoint of it is
saved, and ``--resume`` continues bit for bit; a second signal aborts at once and leaves the last
checkpoint. Real signals: sent to a real ``pyro-arm`` subprocess at random steps (seeded), the
test waiting on its log lines, never on time; and sent by the process to itself in a callback.
"""

import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pyro_arm.sbn import distributed
from pyro_arm.sbn.checkpoint import load_checkpoint
from pyro_arm.sbn.cli import main
from pyro_arm.sbn.config import TrainConfig
from pyro_arm.sbn.interrupts import StopSignals
from pyro_arm.sbn.metrics import read_metrics
from pyro_arm.sbn.train import TrainingInterrupted, train
from tests.process_state import process_state_fixture  # noqa: F401  (autouse)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40
# a row (and a log line) after every step; checkpoints only at the end or on a stop
COMMON = dict(steps=STEPS, eval_every=1, eval_k=2, test_size=4, device="cpu", threads=1)
TIMEOUT = 300  # seconds; only reached if something hangs


def cli_args(config: dict) -> list:
    return [a for k, v in config.items() for a in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run: its final parameters, metrics and summary."""
    threads = torch.get_num_threads()
    run = tmp_path_factory.mktemp("straight")
    train(TrainConfig(run_dir=str(run), **COMMON), progress=False, log=lambda _: None)
    torch.set_num_threads(threads)
    return run


def same_run(a: Path, b: Path) -> None:
    """Bit-for-bit the same final parameters, metrics (but the wall time) and test bounds."""
    pa, pb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert pa["step"] == pb["step"] == STEPS
    assert all(torch.equal(pa["model"][k], pb["model"][k]) for k in pa["model"])
    keys = ("step", "epoch", "train_loss", "valid_neg_elbo")
    ra, rb = read_metrics(a / "metrics.csv"), read_metrics(b / "metrics.csv")
    assert [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb]
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    assert (sa["test_elbo"], sa["test_iwae"]) == (sb["test_elbo"], sb["test_iwae"])


class Trainer:
    """
    ``pyro-arm train`` in a subprocess (``launcher -m pyro_arm train``; e.g. under torchrun),
    its output read line by line by a thread.
    """

    def __init__(self, run_dir: Path, launcher=(sys.executable,), flags=(), **extra):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        args = cli_args({**COMMON, **extra, "run_dir": run_dir})
        self.proc = subprocess.Popen(
            [*launcher, "-m", "pyro_arm", "train", *args, *flags, "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env,
        )  # fmt: skip
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str) -> str:
        """Reads lines until one matches ``pattern``."""
        while True:
            line = self._queue.get(timeout=TIMEOUT)
            assert line is not None, f"ended before {pattern!r}:\n" + "\n".join(self.lines)
            self.lines.append(line)
            if re.search(pattern, line):
                return line

    def finish(self) -> int:
        status = self.proc.wait(timeout=TIMEOUT)
        while (line := self._queue.get(timeout=TIMEOUT)) is not None:
            self.lines.append(line)
        return status

    def logged_steps(self) -> list[int]:
        return [int(m.group(1)) for x in self.lines if (m := re.match(r"step (\d+):", x))]


def resume_to_the_end(capsys, run: Path) -> None:
    status = main(["train", "--resume", "--run-dir", str(run), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 0, err


TRIALS = [(signal.SIGINT if i % 2 == 0 else signal.SIGTERM, i) for i in range(4)]


@pytest.mark.slow
@pytest.mark.parametrize("signum, trial", TRIALS, ids=[f"{s.name}-{i}" for s, i in TRIALS])
def test_a_signal_saves_the_last_finished_step(tmp_path, capsys, straight, signum, trial):
    at = random.Random(trial).randrange(1, STEPS // 3)  # the step after which the signal goes
    run = tmp_path / "cut"
    trainer = Trainer(run)
    trainer.wait_for(rf"^step {at}:")
    trainer.proc.send_signal(signum)
    status = trainer.finish()
    assert status == 128 + signum, "\n".join(trainer.lines)
    last = trainer.lines[-1]
    match = re.fullmatch(
        rf"pyro-arm: error: interrupted by {signum.name}; checkpoint of step (\d+) saved in "
        rf"{re.escape(str(run))}; continue with the same command plus --resume",
        last,
    )
    assert match, last
    saved = int(match.group(1))
    assert any(
        line.startswith(f"{signum.name}: stopping after the current step") for line in trainer.lines
    )
    # nothing after the last finished step is lost
    assert at <= saved < STEPS and saved == max(trainer.logged_steps())
    assert load_checkpoint(run / "checkpoint.pt")["step"] == saved
    assert [r["step"] for r in read_metrics(run / "metrics.csv")] == list(range(1, saved + 1))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.csv"]
    resume_to_the_end(capsys, run)
    same_run(straight, run)


@pytest.mark.slow
@pytest.mark.parametrize("trial", [10, 11])
def test_a_second_signal_keeps_a_consistent_checkpoint(tmp_path, capsys, straight, trial):
    at = random.Random(trial).randrange(4, STEPS // 3)
    run = tmp_path / "cut"
    trainer = Trainer(run, checkpoint_every=3)
    trainer.wait_for(rf"^step {at}:")
    trainer.proc.send_signal(signal.SIGINT)
    trainer.wait_for("stopping after the current step")
    trainer.proc.send_signal(signal.SIGTERM)
    status = trainer.finish()
    # aborted mid-step or mid-save, or after the clean stop: 143 with one line, either way
    assert status == 143, "\n".join(trainer.lines)
    saved = load_checkpoint(run / "checkpoint.pt")["step"]
    assert 3 <= saved <= max(trainer.logged_steps())
    assert one_error_line(trainer)
    # the line names the step the checkpoint holds
    aborted = rf"aborted by a second SIGTERM; .* is unchanged \(step {saved}\)"
    stopped = rf"interrupted by SIGINT; checkpoint of step {saved} saved in "
    assert re.search(f"{aborted}|{stopped}", trainer.lines[-1]), trainer.lines[-1]
    assert not list(run.glob("*.tmp"))
    resume_to_the_end(capsys, run)
    same_run(straight, run)


def one_error_line(trainer: Trainer) -> bool:
    """The output of ``trainer`` ends with its only error line, and holds no traceback."""
    errors = [line for line in trainer.lines if line.startswith("pyro-arm: error: ")]
    tracebacks = [line for line in trainer.lines if "Traceback" in line]
    return errors == trainer.lines[-1:] and not tracebacks


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(20, 26))
def test_a_second_signal_after_a_clean_stop_exits_at_once(tmp_path, trial):
    """The second Ctrl-C comes after the stop is complete, while the process shuts down."""
    rng = random.Random(trial)
    at, delay = rng.randrange(1, STEPS // 3), rng.uniform(0.0, 0.05)
    run = tmp_path / "cut"
    trainer = Trainer(run)
    trainer.wait_for(rf"^step {at}:")
    trainer.proc.send_signal(signal.SIGINT)
    trainer.wait_for(r"^pyro-arm: error: interrupted by SIGINT; checkpoint of step \d+ saved")
    time.sleep(delay)
    trainer.proc.send_signal(signal.SIGINT)
    status = trainer.finish()
    assert status == 130, "\n".join(trainer.lines)
    assert one_error_line(trainer), "\n".join(trainer.lines)
    saved = int(re.search(r"checkpoint of step (\d+)", trainer.lines[-1]).group(1))
    assert load_checkpoint(run / "checkpoint.pt")["step"] == saved == max(trainer.logged_steps())


def stop_with(*signals, at: int):
    """A callback sending ``signals`` to this process after step ``at``."""

    def callback(step, loss):
        if step == at:
            for signum in signals:
                os.kill(os.getpid(), signum)

    return callback


@pytest.mark.slow
def test_second_signal_aborts_at_once_in_process(tmp_path, capsys, straight, process_state):
    run = tmp_path / "cut"
    config = TrainConfig(run_dir=str(run), checkpoint_every=3, **COMMON)
    callback = stop_with(signal.SIGINT, signal.SIGTERM, at=4)
    with pytest.raises(TrainingInterrupted) as info:
        train(config, progress=False, log=lambda _: None, callback=callback)
    e = info.value
    assert e.aborted and e.signum == signal.SIGTERM and e.step == 3
    assert str(e) == (
        f"aborted by a second SIGTERM; {run / 'checkpoint.pt'} is unchanged (step 3); continue "
        "with the same command plus --resume"
    )
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 3
    for signum, handler in process_state.handlers.items():  # those before the run
        assert signal.getsignal(signum) == handler
    resume_to_the_end(capsys, run)
    same_run(straight, run)


def test_one_signal_in_process_stops_after_the_step(tmp_path, process_state):
    run = tmp_path / "cut"
    config = TrainConfig(run_dir=str(run), **{**COMMON, "steps": 6})
    with pytest.raises(TrainingInterrupted) as info:
        train(config, progress=False, log=lambda _: None, callback=stop_with(signal.SIGTERM, at=2))
    e = info.value
    assert not e.aborted and e.signum == signal.SIGTERM and e.step == 2
    assert str(e).startswith("interrupted by SIGTERM; checkpoint of step 2 saved in")
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 2
    assert signal.getsignal(signal.SIGTERM) == process_state.handlers[signal.SIGTERM]


def test_abort_before_the_first_checkpoint_leaves_no_folder(tmp_path):
    run = tmp_path / "cut"
    config = TrainConfig(run_dir=str(run), **{**COMMON, "steps": 6})
    with pytest.raises(TrainingInterrupted) as info:
        train(
            config,
            progress=False,
            log=lambda _: None,
            callback=stop_with(signal.SIGINT, signal.SIGINT, at=2),
        )
    assert info.value.aborted and info.value.step == 0
    assert "no checkpoint had been written yet" in str(info.value)
    assert not run.exists()


def test_stop_signals_outside_the_main_thread_do_nothing(process_state):
    result = []

    def enter():
        with StopSignals() as stop:
            result.append(signal.getsignal(signal.SIGINT) == process_state.handlers[signal.SIGINT])
            result.append(stop.requested)

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert result == [True, False]


def test_a_signal_while_loading_stops_before_the_first_step(tmp_path, monkeypatch):
    import pyro_arm.sbn.train as train_module

    real = train_module.load_mnist

    def load_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "load_mnist", load_then_signal)
    run = tmp_path / "cut"
    with pytest.raises(TrainingInterrupted) as info:
        train(TrainConfig(run_dir=str(run), **COMMON), progress=False, log=lambda _: None)
    assert info.value.step == 0 and info.value.signum == signal.SIGTERM
    assert str(info.value) == (
        "interrupted by SIGTERM; no checkpoint had been written yet, so nothing was kept"
    )
    assert not run.exists()  # nothing left behind: a fresh run may start there again


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_signal_during_the_final_evaluation(tmp_path, capsys, monkeypatch, signum):
    real = distributed.evaluate_sbn

    def signal_then_evaluate(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(distributed, "evaluate_sbn", signal_then_evaluate)
    run = tmp_path / "cut"
    status = main(["train", *cli_args({**COMMON, "steps": 3}), "--run-dir", str(run)])
    assert status == 128 + signum
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"pyro-arm: error: interrupted by {signum.name} during the final evaluation; checkpoint "
        f"of step 3 saved in {run}; the same command plus --resume finishes the evaluation "
        "without retraining"
    )
    assert not (run / "summary.json").exists()
    checkpoint, rows = (run / "checkpoint.pt").read_bytes(), (run / "metrics.csv").read_text()
    monkeypatch.undo()
    status = main(["train", "--resume", "--run-dir", str(run), "--no-progress"])
    assert status == 0, capsys.readouterr().err
    assert "already reached step 3 (--steps); evaluating it again" in capsys.readouterr().out
    assert (run / "checkpoint.pt").read_bytes() == checkpoint  # no step was trained again
    assert (run / "metrics.csv").read_text() == rows
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
