# SPDX-License-Identifier: Apache-2.0
"""
The README's results table: ``pyro-arm train`` for every (model, estimator, seed), then a
markdown table of the test -ELBO, the k-sample importance-weighted bound and the time per step
(mean and spread over seeds), read from each run's ``summary.json``.

    python scripts/results_table.py --data MNIST_DIR --steps 5000 --seeds 0 1

Runs that already have a ``summary.json`` in their run folder are not run again, so an
interrupted table resumes. ``--jobs`` runs that many trainings at once (each with one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MODELS = ("linear", "two_layer", "nonlinear")
ESTIMATORS = ("arm", "disarm", "ar", "tracegraph", "trace")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="embedded", help="pyro-arm train --data (default embedded)")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-4, help="the same for every estimator")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS))
    p.add_argument("--eval-k", type=int, default=1000)
    p.add_argument("--test-size", type=int, default=1000, help="test images for the k-sample bound")
    p.add_argument(
        "--vectorize", action="store_true", help="TraceARM_ELBO(vectorize_particles=True)"
    )
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="runs/results", help="folder of the run folders")
    return p.parse_args(argv)


def run_dir(args, model: str, estimator: str, seed: int) -> Path:
    return Path(args.out) / f"{model}-{estimator}-s{seed}"


def train(args, model: str, estimator: str, seed: int) -> dict:
    folder = run_dir(args, model, estimator, seed)
    summary = folder / "summary.json"
    if not summary.exists():
        cmd = [
            sys.executable, "-m", "pyro_arm", "train", "--no-progress",
            "--model", model, "--estimator", estimator, "--seed", str(seed),
            "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--data", args.data, "--device", "cpu",
            "--eval-k", str(args.eval_k), "--test-size", str(args.test_size),
            "--eval-every", str(args.steps), "--checkpoint-every", str(args.steps),
            "--run-dir", str(folder),
        ]  # fmt: skip
        if args.vectorize:
            cmd.append("--vectorize")
        if folder.exists():
            cmd.append("--resume")
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(summary.read_text())


def mean_spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}"


def main(argv=None) -> None:
    args = parse_args(argv)
    jobs = [(m, e, s) for m in args.models for e in args.estimators for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        summaries = list(pool.map(lambda job: train(args, *job), jobs))
    results: dict[tuple[str, str], list[dict]] = {}
    for (model, estimator, _), summary in zip(jobs, summaries):
        results.setdefault((model, estimator), []).append(summary)
    print(
        f"\n{args.steps} steps, batch {args.batch_size}, Adam lr {args.lr}, data {args.data}, "
        f"seeds {' '.join(map(str, args.seeds))} (mean ± std over seeds); test -ELBO on the whole "
        f"test split, -IW bound with k={args.eval_k} on its first {args.test_size} images\n"
    )
    print(
        f"| model | estimator | test -ELBO (nats) | test -IW bound, k={args.eval_k} (nats) "
        "| ms/step |"
    )
    print("|---|---|---|---|---|")
    for (model, estimator), rows in results.items():
        print(
            f"| {model} | {estimator} | {mean_spread([r['test_elbo'] for r in rows])} | "
            f"{mean_spread([r['test_iwae'] for r in rows])} | "
            f"{mean_spread([1000 * r['seconds_per_step'] for r in rows])} |"
        )


if __name__ == "__main__":
    main()
