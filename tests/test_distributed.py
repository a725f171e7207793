# SPDX-License-Identifier: Apache-2.0
"""
Data parallelism on CPU (gloo, 2 processes): ``TraceARM_ELBO`` inside DDP, ``pyro-arm train``
under ``torchrun`` (identical parameters, rank-0 files, exact resume), and :class:`Ranks`.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from pyro.nn import PyroModule
from torch.nn.parallel import DistributedDataParallel

import pyro_arm.sbn.train as train_module
from pyro_arm import TraceARM_ELBO
from pyro_arm.sbn.checkpoint import load_checkpoint
from pyro_arm.sbn.cli import main
from pyro_arm.sbn.config import ConfigError, TrainConfig
from pyro_arm.sbn.distributed import Ranks, step_function
from pyro_arm.sbn.elbo import make_elbo
from pyro_arm.sbn.metrics import read_metrics
from pyro_arm.sbn.models import SigmoidBeliefNet
from pyro_arm.sbn.train import train
from tests.test_interrupts import COMMON, Trainer, cli_args

WORLD = 2
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
FAST = ["--eval-k", "2", "--test-size", "4", "--no-progress", "--device", "cpu"]


def _join(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD
    )


def _spawn(fn, *args) -> None:
    mp.spawn(fn, args=args, nprocs=WORLD, join=True)


# ------------------------------------------------------------------ TraceARM_ELBO inside DDP


class Decoder(PyroModule):
    """A two-layer SBN's generative model as its own module (``ELBOModule`` wants modules)."""

    def __init__(self):
        super().__init__()
        self.prior = torch.nn.Parameter(torch.zeros(2))
        self.top = torch.nn.Linear(2, 3)
        self.out = torch.nn.Linear(3, 6)

    def forward(self, x):
        with pyro.plate("data", x.shape[-2], dim=-1):
            z2 = pyro.sample("z2", dist.Bernoulli(logits=self.prior).expand([2]).to_event(1))
            z1 = pyro.sample("z1", dist.Bernoulli(logits=self.top(z2)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.out(z1)).to_event(1), obs=x)


class Encoder(PyroModule):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(6, 3)
        self.second = torch.nn.Linear(3, 2)

    def forward(self, x):
        with pyro.plate("data", x.shape[-2], dim=-1):
            z1 = pyro.sample("z1", dist.Bernoulli(logits=self.first(x)).to_event(1))
            pyro.sample("z2", dist.Bernoulli(logits=self.second(z1)).to_event(1))


def _grads(module) -> list:
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return grads


def _shard_and_seed(rank: int):
    x = torch.bernoulli(torch.full((10, 6), 0.4, dtype=torch.float64),
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    return x[5 * rank : 5 * (rank + 1)], 100 + rank


def _ddp_grads_worker(rank: int, tmp: str, vectorize: bool) -> None:
    """Each rank: single-process and DDP gradients of its shard under the same random numbers."""
    _join(rank, tmp)
    torch.set_default_dtype(torch.float64)
    pyro.settings.set(module_local_params=True)
    shard, seed = _shard_and_seed(rank)
    elbo = TraceARM_ELBO(num_particles=3, vectorize_particles=vectorize, max_plate_nesting=1)
    torch.manual_seed(0)
    loss_fn = elbo(Decoder(), Encoder())  # Pyro's ELBOModule: params exist at construction
    out = {}
    torch.manual_seed(seed)
    loss_fn(shard).backward()
    out["elbo_module_single"] = _grads(loss_fn)
    torch.manual_seed(seed)
    ddp = DistributedDataParallel(loss_fn)  # keep a reference: its reducer holds the hooks
    ddp(shard).backward()
    out["elbo_module_ddp"] = _grads(loss_fn)
    # pyro-arm train's step: the SBN's model/guide methods, the loss scaled to a sum
    torch.manual_seed(0)
    sbn = SigmoidBeliefNet(6, (3, 2))
    torch.manual_seed(seed)
    elbo.loss_and_grads(sbn.model, sbn.guide, shard)
    out["train_single"] = _grads(sbn)
    torch.manual_seed(seed)
    step_function(Ranks(WORLD, rank, rank), sbn, elbo)(shard)
    out["train_ddp"] = _grads(sbn)
    torch.save(out, f"{tmp}/grads{rank}.pt")
    torch_dist.destroy_process_group()


@pytest.mark.parametrize("vectorize", [False, True], ids=["sequential", "vectorized"])
def test_trace_arm_elbo_in_ddp(tmp_path, vectorize):
    _spawn(_ddp_grads_worker, str(tmp_path), vectorize)
    r0, r1 = (torch.load(tmp_path / f"grads{r}.pt") for r in range(WORLD))
    for name, reduce in (("elbo_module", "mean"), ("train", "sum")):
        single0, single1 = r0[f"{name}_single"], r1[f"{name}_single"]
        for ddp0, ddp1, g0, g1 in zip(r0[f"{name}_ddp"], r1[f"{name}_ddp"], single0, single1):
            assert torch.equal(ddp0, ddp1)  # all-reduced: the same on every rank
            # ELBOModule in DDP: the average of the shards' gradients; pyro-arm train's step:
            # their sum, the one-process gradient of the global batch (the loss is a sum)
            expected = (g0 + g1) / 2 if reduce == "mean" else g0 + g1
            assert torch.allclose(ddp0, expected, rtol=1e-12, atol=1e-12)
        # power: the shards' random numbers differ, so one shard alone is not the answer
        assert any(not torch.allclose(g0, g1, atol=1e-6) for g0, g1 in zip(single0, single1))


# --------------------------------------------------------------- pyro-arm train on two ranks


def _train_worker(rank: int, tmp: str) -> None:
    """Trains with a relative run folder, each rank in its own working directory."""
    _join(rank, tmp)
    os.chdir(f"{tmp}/rank{rank}")
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))
    config = TrainConfig(
        steps=4, batch_size=11, eval_every=2, checkpoint_every=2, eval_k=2, test_size=3,
        device="cpu", run_dir="run",
    )  # fmt: skip
    runs = []  # the run that train builds, to read this rank's parameters
    build = train_module._build
    train_module._build = lambda config: runs.append(build(config)) or runs[-1]
    summary = train(config, progress=False, log=lambda message: None)
    params = {n: p.detach().clone() for n, p in runs[0].sbn.named_parameters()}
    torch.save({"summary": summary, "params": params}, f"{tmp}/out{rank}.pt")
    torch_dist.destroy_process_group()


def test_train_two_ranks_rank0_writes(tmp_path):
    for rank in range(WORLD):
        (tmp_path / f"rank{rank}").mkdir()
    _spawn(_train_worker, str(tmp_path))
    out = [torch.load(tmp_path / f"out{r}.pt") for r in range(WORLD)]
    for name, p0 in out[0]["params"].items():
        assert torch.equal(p0, out[1]["params"][name]), name
    # rank 0 wrote the whole run folder, rank 1 nothing
    assert {p.name for p in (tmp_path / "rank0" / "run").iterdir()} >= {
        "config.json", "metrics.csv", "checkpoint.pt", "summary.json", "samples.png",
    }  # fmt: skip
    assert list((tmp_path / "rank1").iterdir()) == []
    # the reduced test numbers agree on every rank
    for key in ("test_elbo", "test_iwae"):
        assert out[0]["summary"][key] == out[1]["summary"][key]
    assert out[0]["summary"]["world_size"] == WORLD


def _torchrun(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m pyro_arm train ...`` (as docs/scaling.rst)."""
    command = [TORCHRUN, "--standalone", "--nproc-per-node", str(WORLD), "-m", "pyro_arm"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, "train", *args, *FAST], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_torchrun_trains_on_two_ranks(tmp_path):
    """One launch of the documented command on a few steps: rank 0 writes the whole run."""
    opts = ["--batch-size", "9", "--eval-every", "1"]
    _torchrun(tmp_path, "--steps", "2", "--run-dir", "run", *opts)
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == WORLD and summary["steps"] == 2
    assert json.loads((run / "config.json").read_text())["world_size"] == WORLD
    assert load_checkpoint(run / "checkpoint.pt")["world_size"] == WORLD
    assert len(read_metrics(run / "metrics.csv")) == 2


def test_torchrun_resume_is_exact(tmp_path, capsys):
    opts = ["--batch-size", "9", "--eval-every", "2", "--checkpoint-every", "2"]
    _torchrun(tmp_path, "--steps", "2", "--run-dir", "cut", *opts)
    _torchrun(tmp_path, "--steps", "4", "--run-dir", "cut", "--resume", *opts)
    _torchrun(tmp_path, "--steps", "4", "--run-dir", "full", *opts)
    cut, full = (load_checkpoint(tmp_path / r / "checkpoint.pt") for r in ("cut", "full"))
    assert cut["step"] == full["step"] == 4 and cut["world_size"] == WORLD
    for name, value in full["model"].items():  # bit for bit
        assert torch.equal(cut["model"][name], value), name
    for a, b in zip(cut["rank_rng"], full["rank_rng"]):
        assert torch.equal(a["torch"], b["torch"])
    rows = [(tmp_path / r / "metrics.csv").read_text().splitlines() for r in ("cut", "full")]
    columns = [[line.split(",")[:4] for line in r] for r in rows]  # all but the wall time
    assert columns[0] == columns[1] and len(columns[0]) == 3
    # another number of processes: one line, exit status 2
    status = main(["train", "--run-dir", str(tmp_path / "cut"), "--resume", "--steps", "8", *FAST])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "trained by 2 process(es), not 1" in err and "--nproc-per-node 2" in err


# ------------------------------------------------------------------------------------- Ranks


def test_ranks_from_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    alone = Ranks.from_env()
    assert not alone.distributed and alone.is_main and alone.stream_index == ()
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    ranks = Ranks.from_env()
    assert ranks == Ranks(3, 2, 0) and not ranks.is_main and ranks.stream_index == (3, 2)


def test_ranks_shard_covers_the_batch():
    x = torch.arange(10)
    assert torch.equal(Ranks().shard(x), x)
    shards = [Ranks(3, r, r).shard(x) for r in range(3)]
    assert torch.equal(torch.cat(shards), x) and [len(s) for s in shards] == [4, 3, 3]


def test_ranks_refuse_bad_setups():
    ranks = Ranks(2, 0, 0)
    with pytest.raises(ConfigError, match="--batch-size 1 is smaller than the 2 processes"):
        ranks.setup(torch.device("cpu"), 1)
    with pytest.raises(ConfigError, match="trained by 1 process"):
        ranks.restore_rng({})
    Ranks().restore_rng({})  # a one-process checkpoint resumes alone
    with pytest.raises(ConfigError, match="TraceGraph_ELBO has no differentiable_loss"):
        step_function(ranks, SigmoidBeliefNet(4, (2,)), make_elbo("tracegraph"))
    assert Ranks().info() == {} and ranks.info() == {"world_size": 2}


# ----------------------------------------------------------------- stop signals under torchrun

STOP_OPTS = dict(steps=10, batch_size=9, eval_every=1, checkpoint_every=100, test_size=4)


@pytest.mark.slow
def test_torchrun_sigterm_saves_the_last_finished_step_and_resumes_exactly(tmp_path):
    """SIGTERM to torchrun (which forwards it to both workers) after a logged step: every rank
    stops after the same finished step, rank 0 saves it, and --resume is bit-exact."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    _torchrun(tmp_path, *cli_args({**COMMON, **STOP_OPTS, "run_dir": full}))
    launcher = (TORCHRUN, "--standalone", "--nproc-per-node", str(WORLD))
    trainer = Trainer(cut, launcher=launcher, **STOP_OPTS)
    trainer.wait_for(r"^step 3:")
    trainer.proc.send_signal(signal.SIGTERM)
    trainer.finish()
    log = "\n".join(trainer.lines)
    stops = [m for x in trainer.lines if (m := re.search(r"interrupted by SIGTERM; (.*)", x))]
    assert len(stops) == 1, log  # rank 0 alone says it; rank 1 agreed silently
    saved = int(re.match(r"checkpoint of step (\d+) saved in", stops[0].group(1)).group(1))
    # nothing after the last finished step is lost
    assert 3 <= saved < STOP_OPTS["steps"] and saved == max(trainer.logged_steps()), log
    ckpt = load_checkpoint(cut / "checkpoint.pt")
    assert ckpt["step"] == saved and ckpt["world_size"] == WORLD
    _torchrun(tmp_path, "--run-dir", str(cut), "--resume")
    a, b = (load_checkpoint(r / "checkpoint.pt") for r in (full, cut))
    assert a["step"] == b["step"] == STOP_OPTS["steps"]
    for name, value in a["model"].items():  # bit for bit
        assert torch.equal(b["model"][name], value), name
    for ra, rb in zip(a["rank_rng"], b["rank_rng"]):
        assert torch.equal(ra["torch"], rb["torch"])
    rows = [read_metrics(r / "metrics.csv") for r in (full, cut)]
    keys = ("step", "train_loss", "valid_neg_elbo")
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]


def test_torchrun_divergence_ends_every_rank_at_the_same_step(tmp_path):
    """Both ranks see the same all-reduced loss and identical parameters: both stop, exit 2."""
    run = tmp_path / "div"
    opts = {**COMMON, **STOP_OPTS, "lr": 1e20, "checkpoint_every": 1, "run_dir": run}
    command = [TORCHRUN, "--standalone", "--nproc-per-node", str(WORLD), "-m", "pyro_arm"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, "train", *cli_args(opts), *FAST], env=env, capture_output=True, text=True
    )
    lines = [x for x in done.stderr.splitlines() if x.startswith("pyro-arm: error:")]
    assert len(lines) == 1, done.stderr[-3000:]  # rank 0 alone says it
    match = re.search(r"training diverged at step (\d+): .*checkpoint of step (\d+)", lines[0])
    assert match and int(match.group(2)) == int(match.group(1)) - 1, lines[0]
    assert done.returncode != 0 and "exitcode  : 2" in done.stderr
    ckpt = load_checkpoint(run / "checkpoint.pt")  # the last good step, finite
    assert ckpt["step"] == int(match.group(2)) and ckpt["world_size"] == WORLD
    assert all(value.isfinite().all() for value in ckpt["model"].values())
