# SPDX-License-Identifier: Apache-2.0
"""
Time per training step (ELBO forward + backward + torch.optim.Adam step) of TraceARM_ELBO against
Pyro's ELBOs and the plain-PyTorch ARM step, on sigmoid belief nets fed real binarized MNIST
batches.

Every (model, batch size, contender) runs in this one process, interleaved round by round in a
fresh random order, so that load on a shared machine hits all alike; the script reports the median
time per step and medians of per-round ratios.

    python -m benchmarks.step_time                       # CPU, 2 threads
    python -m benchmarks.step_time --device cuda          # on a GPU

Prints a markdown table and one JSON line (``--json-out`` also writes it to a file).
"""

from __future__ import annotations

import itertools
import statistics

import torch

from benchmarks import common
from pyro_arm.sbn.data import load_mnist

KEY_RATIOS = {  # name in the JSON -> (numerator, denominator), same (model, batch)
    "arm_vectorized/trace_elbo": ("arm_vec", "trace_elbo"),
    "arm_vectorized/plain_torch_arm": ("arm_vec", "plain_arm"),
    "arm_sequential/trace_elbo": ("arm_seq", "trace_elbo"),
    "arm_vectorized/arm_sequential": ("arm_vec", "arm_seq"),
    "disarm_vectorized/plain_torch_disarm": ("disarm_vec", "plain_disarm"),
    "ar_vectorized/plain_torch_ar": ("ar_vec", "plain_ar"),
    "trace_elbo/plain_torch_arm": ("trace_elbo", "plain_arm"),
    "tracegraph_elbo/trace_elbo": ("tracegraph_elbo", "trace_elbo"),
    "storch_arm/plain_torch_arm": ("storch_arm", "plain_arm"),
    "arm_vectorized/storch_arm": ("arm_vec", "storch_arm"),
}


def parse_args(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    p.add_argument("--steps", type=int, default=2, help="steps per contender per round")
    p.add_argument("--models", nargs="+", default=["linear", "two_layer"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[50, 500])
    p.add_argument("--contenders", nargs="+", default=None, help="default: all available")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time (default) or this process's CPU time, steadier on a busy machine",
    )
    args = p.parse_args(argv)
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu times the host only; use the wall clock on a GPU")
    if args.quick:  # batch 50, 1 warmup round, 1 step
        args.batch_sizes, args.warmup, args.steps = [min(args.batch_sizes)], 1, 1
    return args


def make_runner(contender: common.Contender, batches: list[torch.Tensor], steps: int):
    """A zero-argument callable doing ``steps`` training steps on the next batches (cycled)."""
    cycle = itertools.cycle(batches)

    def run():
        for _ in range(steps):
            contender.step(next(cycle))

    return run


def plain_reference(name: str) -> str:
    """The plain-PyTorch contender to compare ``name`` with: same estimator, else ``plain_arm``."""
    estimator = name.split("_")[-1 if name.startswith("storch_") else 0]
    if name.startswith(common.MULTI_SAMPLE_ESTIMATORS):
        return "plain_arm"  # multi-sample contenders (rloo4_vec) have no plain twin
    if name.endswith(("_seq", "_vec")) or name.startswith("storch_"):
        return f"plain_{estimator}"
    return name if name.startswith("plain_") else "plain_arm"


def build_runners(args, names: list[str]) -> dict:
    """``{(model, batch, contender): run}`` on 8 real training batches per (model, batch)."""
    data = load_mnist(args.data)
    x_mean = data.train.mean(0)
    runners = {}
    for model, batch in itertools.product(args.models, args.batch_sizes):
        gen = torch.Generator().manual_seed(args.seed)
        batches = [
            b.to(args.device) for b, _ in zip(data.batches("train", batch, generator=gen), range(8))
        ]
        for name in names:
            c = common.make_contender(name, model, x_mean, seed=args.seed, device=args.device)
            runners[(model, batch, name)] = make_runner(c, batches, args.steps)
    return runners


def summarize(args, names: list[str], per_step: dict) -> tuple[list[tuple], dict]:
    """The table rows and the ``ms_per_step`` / ``ratios`` record of the per-step times."""
    rows, record = [], {"ms_per_step": {}, "ratios": {}}
    for model, batch in itertools.product(args.models, args.batch_sizes):
        group = f"{model}/b{batch}"
        record["ms_per_step"][group] = {}
        record["ratios"][group] = {}
        for name in names:
            t = per_step[(model, batch, name)]
            med = statistics.median(t) * 1e3
            record["ms_per_step"][group][name] = med
            vs = [
                common.median_ratio(t, per_step[(model, batch, ref)])
                if ref in names
                else float("nan")
                for ref in ("trace_elbo", plain_reference(name))
            ]
            rows.append((model, batch, name, med, *vs))
        for key, (num, den) in KEY_RATIOS.items():
            if num in names and den in names:
                record["ratios"][group][key] = common.median_ratio(
                    per_step[(model, batch, num)], per_step[(model, batch, den)]
                )
    if "linear" in args.models and "two_layer" in args.models:
        for batch in args.batch_sizes:
            for name in [
                n for n in names if n.endswith("_vec") or n.startswith(("plain_", "storch_"))
            ]:
                record["ratios"][f"two_layer/linear/b{batch}/{name}"] = common.median_ratio(
                    per_step[("two_layer", batch, name)], per_step[("linear", batch, name)]
                )
    return rows, record


def main(argv=None):
    args = parse_args(argv)
    common.setup(args)
    names = args.contenders or common.available_contenders()
    common.check_contenders(names)
    runners = build_runners(args, names)
    times = common.interleaved_times(
        runners, args.rounds, args.warmup, common.device_sync(args.device), args.seed, args.clock
    )
    per_step = {k: [t / args.steps for t in v] for k, v in times.items()}
    rows, record = summarize(args, names, per_step)
    common.print_table(
        f"Time per training step ({args.clock} clock), "
        f"median of {args.rounds} interleaved rounds ({args.device})",
        ["model", "batch", "contender", "ms/step", "x trace_elbo", "x plain (same est.)"],
        rows,
    )
    return common.finish(
        record,
        "step_time",
        args,
        rounds=args.rounds,
        clock=args.clock,
        steps_per_round=args.steps,
    )


if __name__ == "__main__":
    main()
