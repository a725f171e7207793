# SPDX-License-Identifier: Apache-2.0
"""
Time per training step of ``pyro-arm train`` on 1 process against N data-parallel processes
(``torchrun``, gloo on CPU), each process with one thread, at a fixed global batch.

Each configuration is one short ``pyro-arm train`` run in a temporary folder (the final
evaluation made tiny); the script reads ``steps_per_s`` from its ``summary.json`` (training steps
only: forward, backward, the all-reduce of the gradients and the Adam step; no evaluation).

    python -m benchmarks.ddp_step_time                          # linear SBN, batch 500, 1 vs 2
    python -m benchmarks.ddp_step_time --model nonlinear --nprocs 1 2 --steps 300
    python -m benchmarks.ddp_step_time --device cuda --nprocs 1 2 4   # GPUs: one per process

Prints a markdown table and one JSON line (``--json-out`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import emit_json, environment, print_table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="linear")
    p.add_argument("--estimator", default="arm")
    p.add_argument("--vectorize", action="store_true")
    p.add_argument("--batch-size", type=int, default=500, help="the global batch")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per process)")
    p.add_argument("--threads", type=int, default=1, help="threads per process (OMP_NUM_THREADS)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 3 steps of batch 20")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size = 3, 20
    return args


def _command(args: argparse.Namespace, nprocs: int, run_dir: Path) -> list[str]:
    if nprocs == 1:
        launcher = [sys.executable, "-m", "pyro_arm"]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        launcher = [torchrun, "--standalone", "--nproc-per-node", str(nprocs), "-m", "pyro_arm"]
    options = [
        "--model", args.model, "--estimator", args.estimator, "--steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--device", args.device,
        "--eval-every", str(args.steps + 1), "--checkpoint-every", str(args.steps + 1),
        "--eval-k", "1", "--test-size", "10", "--no-progress", "--run-dir", str(run_dir),
    ]  # fmt: skip
    return [*launcher, "train", *options, *(["--vectorize"] if args.vectorize else [])]


def steps_per_second(args: argparse.Namespace, nprocs: int) -> float:
    """Runs one training and returns its ``steps_per_s``."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run(_command(args, nprocs, run_dir), env=env, check=True, capture_output=True)
        return json.loads((run_dir / "summary.json").read_text())["steps_per_s"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    rates = {n: steps_per_second(args, n) for n in args.nprocs}
    base = rates[args.nprocs[0]]
    rows = [(n, f"{r:.2f}", f"{1000 / r:.1f}", f"{r / base:.2f}") for n, r in rates.items()]
    print_table(
        f"{args.model}/{args.estimator}, global batch {args.batch_size}, {args.threads} thread(s) "
        f"per process, {args.device}",
        ["processes", "steps/s", "ms/step", "speed-up"],
        rows,
    )
    record = {
        "benchmark": "ddp_step_time",
        "steps_per_s": {str(n): r for n, r in rates.items()},
        **{k: getattr(args, k) for k in ("model", "estimator", "vectorize", "batch_size")},
        **{k: getattr(args, k) for k in ("steps", "device", "threads")},
        "env": environment(),
    }
    emit_json(record, args.json_out)
    return record


if __name__ == "__main__":
    main()
