# SPDX-License-Identifier: Apache-2.0
"""
MNIST quality of the estimators at equal settings: trains an SBN (``--model``) with
``pyro-arm train`` (vectorized, Adam lr 1e-3, batch 50, threshold binarization) under each
configuration, ``--jobs`` runs at a time with one thread each, then prints per configuration the
model evaluations per step, the validation -ELBO at half the steps and at the end, the test
-ELBO (all test images, one sample each) and the k=1000 importance-weighted bound.

    python -m benchmarks.estimator_quality --data MNIST_DIR --steps 100000

(``MNIST_DIR``: a folder holding the four MNIST IDX files, or ``download``.)

Configurations (``--configs``): ``arm1``, ``disarm1`` (one particle, 2 evaluations per step),
``disarm2p`` (two particles), ``rloo4``, ``arms4`` (4 evaluations; ARMS with
``--model-grad base``: the decoder and prior gradient at the base sample), and ``arms2all``,
``arms4all`` (ARMS with ``--model-grad all``, the default: that gradient averaged over every
evaluated sample; ARMS-2 with ``base`` is DisARM).

The importance-weighted bound at equal evaluations per step (10 on the linear SBN, 15 on the
two-layer one): ``iw_vimco`` (VIMCO, K = 10 / 15), ``iw_disarm`` (local DisARM, K = 5),
``iw_arms`` (ARMS, K = 2 with 5 members / K = 3 with 3 members), ``iw_renyi`` (Pyro's
``RenyiELBO(alpha=0)``, K = 10 / 15), and beside them the ELBO with ``elbo_disarm`` (DisARM,
5 particles) and ``elbo_rloo`` (RLOO, n = 10 / 15):

    python -m benchmarks.estimator_quality --model two_layer --configs iw_vimco iw_disarm \
        iw_arms iw_renyi elbo_disarm elbo_rloo --data MNIST_DIR --steps 10000

Each runs in ``<run-root>/<name>``; a
folder that already holds ``summary.json`` is tabulated, not run again, after checking that its
config matches; an interrupted run is resumed. ``ms/step`` is wall time with ``--jobs`` runs
sharing the machine.

Prints a markdown table and one JSON line (``--json-out`` writes it too).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import common

#: The Adam learning rate of every configuration.
LR = 1e-3

#: name -> (the options that set the estimator, model evaluations per step)
CONFIGS: dict[str, tuple[list[str], int]] = {
    "arm1": (["--estimator", "arm"], 2),
    "disarm1": (["--estimator", "disarm"], 2),
    "disarm2p": (["--estimator", "disarm", "--num-particles", "2"], 4),
    "rloo4": (["--estimator", "rloo", "--num-samples", "4"], 4),
    "arms4": (["--estimator", "arms", "--num-samples", "4", "--model-grad", "base"], 4),
    "arms2all": (["--estimator", "arms", "--num-samples", "2", "--model-grad", "all"], 2),
    "arms4all": (["--estimator", "arms", "--num-samples", "4", "--model-grad", "all"], 4),
}

#: The importance-weighted-bound comparison: name -> model -> (options, evaluations per step)
IW_CONFIGS: dict[str, dict[str, tuple[list[str], int]]] = {
    "iw_vimco": {
        m: (["--objective", "iwae", "--estimator", "vimco", "--num-samples", k], int(k))
        for m, k in (("linear", "10"), ("two_layer", "15"))
    },
    "iw_disarm": {
        m: (["--objective", "iwae", "--estimator", "disarm", "--num-samples", "5"], e)
        for m, e in (("linear", 10), ("two_layer", 15))
    },
    "iw_arms": {
        "linear": (
            [
                "--objective",
                "iwae",
                "--estimator",
                "arms",
                "--num-samples",
                "2",
                "--num-members",
                "5",
            ],
            10,
        ),
        "two_layer": (
            [
                "--objective",
                "iwae",
                "--estimator",
                "arms",
                "--num-samples",
                "3",
                "--num-members",
                "3",
            ],
            15,
        ),
    },  # fmt: skip
    "iw_renyi": {
        m: (["--objective", "iwae", "--estimator", "renyi", "--num-samples", k], int(k))
        for m, k in (("linear", "10"), ("two_layer", "15"))
    },
    "elbo_disarm": {
        m: (["--estimator", "disarm", "--num-particles", "5"], e)
        for m, e in (("linear", 10), ("two_layer", 15))
    },
    "elbo_rloo": {
        m: (["--estimator", "rloo", "--num-samples", k], int(k))
        for m, k in (("linear", "10"), ("two_layer", "15"))
    },
}


def options_of(name: str, model: str) -> tuple[list[str], int]:
    """The options and evaluations per step of configuration ``name`` on ``model``."""
    return IW_CONFIGS[name][model] if name in IW_CONFIGS else CONFIGS[name]


def parse_args(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument(
        "--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS) + list(IW_CONFIGS)
    )
    p.add_argument("--model", default="linear", choices=["linear", "two_layer"])
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--eval-every", type=int, default=5000, help="validation every N steps")
    p.add_argument("--eval-k", type=int, default=1000, help="k of the test bound")
    p.add_argument("--test-size", type=int, default=None, help="test images of the k bound")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--run-root", default="runs/estimator_quality")
    args = p.parse_args(argv)
    if args.quick:  # a smoke run: two configurations, a few steps, a small k
        args.configs = args.configs[:2] if len(args.configs) > 2 else args.configs
        args.steps, args.eval_every, args.eval_k = 20, 10, 5
        args.test_size = args.test_size or 20
    return args


def train_command(args, name: str) -> list[str]:
    """The ``pyro-arm train`` command line of configuration ``name``."""
    run_dir = Path(args.run_root) / name
    command = [sys.executable, "-m", "pyro_arm", "train", "--model", args.model, "--lr", str(LR)]
    command += ["--batch-size", "50", "--vectorize", "--data", args.data, "--seed", str(args.seed)]
    command += ["--steps", str(args.steps), "--eval-every", str(args.eval_every)]
    command += ["--checkpoint-every", str(args.eval_every), "--eval-k", str(args.eval_k)]
    command += ["--threads", "1", "--device", args.device, "--no-progress"]
    command += ["--run-dir", str(run_dir), *options_of(name, args.model)[0]]
    if args.test_size is not None:
        command += ["--test-size", str(args.test_size)]
    if (run_dir / "checkpoint.pt").exists():
        command.append("--resume")
    return command


def run(args, name: str) -> None:
    """Trains configuration ``name`` unless its run folder already holds a summary."""
    run_dir = Path(args.run_root) / name
    if (run_dir / "summary.json").exists():
        check_config(args, name, run_dir)
        return
    log = run_dir.parent / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        subprocess.run(train_command(args, name), stdout=out, stderr=subprocess.STDOUT, check=True)


def check_config(args, name: str, run_dir: Path) -> None:
    """The saved run was made with this script's settings (estimator options, data, seed, steps)."""
    config = json.loads((run_dir / "config.json").read_text())["config"]
    options, _ = options_of(name, args.model)
    expected = dict(zip(options[::2], options[1::2]))
    saved = {
        "--objective": config.get("objective", "elbo"),
        "--num-members": str(config.get("num_members")),
        "--estimator": config["estimator"],
        "--num-particles": str(config["num_particles"]),
        "--num-samples": str(config["num_samples"]),
        "--model-grad": config["model_grad"],
    }
    wrong = {k: saved[k] for k in expected if saved[k] != expected[k]}
    if not same_data(config["data"], args.data):
        wrong["--data"] = config["data"]
    if config["seed"] != args.seed:
        wrong["--seed"] = config["seed"]
    if config["model"] != args.model:
        wrong["--model"] = config["model"]
    if wrong or config["steps"] != args.steps or config["lr"] != LR or not config["vectorize"]:
        raise SystemExit(f"{run_dir} was made with other settings ({config}); pick --run-root")


def same_data(a: str, b: str) -> bool:
    """Whether two ``--data`` sources are the same (folders compared by their real path)."""
    named = ("embedded", "download")
    return a == b if a in named or b in named else Path(a).resolve() == Path(b).resolve()


def valid_at(run_dir: Path, step: int) -> float:
    """The validation -ELBO logged at ``step`` (nan if there is none)."""
    with open(run_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if int(row["step"]) == step and row["valid_neg_elbo"]:
                return float(row["valid_neg_elbo"])
    return float("nan")


def main(argv=None):
    args = parse_args(argv)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda name: run(args, name), args.configs))
    rows, record = [], {"runs": {}}
    half = args.steps // 2 // args.eval_every * args.eval_every
    for name in args.configs:
        run_dir = Path(args.run_root) / name
        summary = json.loads((run_dir / "summary.json").read_text())
        result = {
            "evals_per_step": options_of(name, args.model)[1],
            "valid_half": valid_at(run_dir, half),
            "valid_end": valid_at(run_dir, args.steps),
            "test_neg_elbo": summary["test_elbo"],
            "test_neg_iw": summary["test_iwae"],
            "ms_per_step": 1000 * summary["seconds_per_step"],
        }
        record["runs"][name] = result
        rows.append((name, *result.values()))
    common.print_table(
        f"{args.model} SBN, {args.steps} steps of batch 50, Adam lr {LR}, seed {args.seed}: "
        f"-ELBO and -IW(k={args.eval_k}) in nats (lower is better)",
        ["config", "evals/step", f"valid @{half}", f"valid @{args.steps}", "test -ELBO",
         f"test -IW(k={args.eval_k})", f"ms/step ({args.jobs} jobs)"],
        rows,
    )  # fmt: skip
    return common.finish(
        record, "estimator_quality", args, steps=args.steps, seed=args.seed, jobs=args.jobs
    )


if __name__ == "__main__":
    main()
