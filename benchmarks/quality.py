# SPDX-License-Identifier: Apache-2.0
"""
Test -ELBO after a fixed step budget: TraceARM_ELBO against the plain-PyTorch ARM step.

For every seed both start from the same initial parameters and see the same sequence of
minibatches with the same Adam settings; only their random draws differ (``--common-draws`` gives
them the same global random stream too: as both make the same computation, their trajectories
then differ only by floating-point rounding, a check of the implementation rather than of the
statistics). Both are evaluated by the
same code (a Monte Carlo ELBO on the test split, the same evaluation seed). The script reports,
per contender, the mean and standard deviation over seeds, and the paired difference with its
standard error: agreement means a difference within seed noise.

    python -m benchmarks.quality

Prints a markdown table and one JSON line (``--json-out`` writes it too).
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from benchmarks import common
from pyro_arm.sbn.data import load_mnist
from pyro_arm.sbn.models import build_sbn


def parse_args(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--model", default="linear")
    p.add_argument("--steps", type=int, default=3000, help="Adam steps per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--estimator", default="arm", choices=common.ESTIMATORS)
    p.add_argument("--pyro", default="vec", choices=["vec", "seq"], help="TraceARM_ELBO mode")
    p.add_argument("--eval-samples", type=int, default=10, help="ELBO samples per test image")
    p.add_argument("--eval-max", type=int, default=None, help="evaluate on the first N images")
    p.add_argument(
        "--common-draws",
        action="store_true",
        help="give both contenders the same global RNG stream (by default independent): their\n"
        "trajectories then differ only by rounding",
    )
    args = p.parse_args(argv)
    if args.quick:  # 2 seeds, 2 samples per image, 500 test images
        args.seeds, args.eval_samples = args.seeds[:2], 2
        args.eval_max = args.eval_max or 500
    return args


@torch.no_grad()
def test_neg_elbo(module, data, samples, max_images, seed, device) -> float:
    """Mean per-image -ELBO on the test split (``samples`` draws per image, fixed seed)."""
    plain = module if isinstance(module, common.PlainSBN) else common.plain_from_pyro(module)
    torch.manual_seed(seed)
    total, count = 0.0, 0
    for x in data.batches("test", 500, device=device, shuffle=False):
        if max_images is not None:
            x = x[: max_images - count]
        total += -plain.elbo(x, samples).sum().item()
        count += x.shape[0]
        if max_images is not None and count >= max_images:
            break
    return total / count


def run(name, args, data, x_mean, seed, draw_seed):
    """
    Trains contender ``name`` from the initial parameters and batch order of ``seed``, with its
    own random draws from ``draw_seed``; returns (test -ELBO, seconds).
    """
    torch.manual_seed(seed)
    init = build_sbn(args.model, x_mean)
    c = common.make_contender(
        name, args.model, x_mean, lr=args.lr, seed=seed, device=args.device, init=init
    )
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(draw_seed)
    t0 = time.perf_counter()
    batches = common.train_batches(data, args.batch_size, gen, args.device)
    for _, x in zip(range(args.steps), batches):
        c.step(x)
    seconds = time.perf_counter() - t0
    score = test_neg_elbo(
        c.module, data, args.eval_samples, args.eval_max, 12345 + seed, args.device
    )
    return score, seconds


def summary(values):
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return mean, std


def main(argv=None):
    args = parse_args(argv)
    common.setup(args)
    data = load_mnist(args.data)
    x_mean = data.train.mean(0)
    names = [f"{args.estimator}_{args.pyro}", f"plain_{args.estimator}"]
    scores = {n: [] for n in names}
    seconds = {n: [] for n in names}
    for seed in args.seeds:
        for i, n in enumerate(names):
            draw_seed = 1000 * (seed + 1) + (0 if args.common_draws else i)
            s, t = run(n, args, data, x_mean, seed, draw_seed)
            scores[n].append(s)
            seconds[n].append(t)
            print(f"seed {seed} {n}: test -ELBO {s:.3f} ({t:.1f} s)", flush=True)

    rows = []
    record = {"test_neg_elbo": scores, "seconds": seconds, "summary": {}}
    for n in names:
        mean, std = summary(scores[n])
        rows.append((n, mean, std, statistics.fmean(seconds[n])))
        record["summary"][n] = {"mean": mean, "std": std}
    diffs = [a - b for a, b in zip(scores[names[0]], scores[names[1]])]
    d_mean, d_std = summary(diffs)
    d_se = d_std / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    record["difference"] = {"pairs": diffs, "mean": d_mean, "std": d_std, "se": d_se}
    record["within_2se"] = bool(abs(d_mean) <= 2 * d_se) if len(diffs) > 1 else None

    print()
    common.print_table(
        f"Test -ELBO (nats, lower is better), {args.model}, {args.steps} steps of batch "
        f"{args.batch_size}, lr {args.lr}, seeds {args.seeds} ({args.device})",
        ["contender", "mean", "std over seeds", "s/run"],
        rows,
    )
    pair = f"{names[0]} - {names[1]}"
    print(f"paired difference {pair}: {d_mean:+.3f} (std {d_std:.3f}, se {d_se:.3f})\n")
    return common.finish(
        record,
        "quality",
        args,
        model=args.model,
        steps=args.steps,
        seeds=args.seeds,
        common_draws=args.common_draws,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_samples=args.eval_samples,
    )


if __name__ == "__main__":
    main()
