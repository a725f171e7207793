# SPDX-License-Identifier: Apache-2.0
"""
Code against code: the ratio of one vectorized ARM step to one ``Trace_ELBO`` step on the same
SBN, in a plain loop (15 interleaved rounds of 10 steps, 2 threads, medians), with no harness in
between. Run it once per checkout to compare releases of the ELBO:

    python -m benchmarks.elbo_ratio                    # this checkout
    PYTHONPATH=<old checkout> python benchmarks/elbo_ratio.py
"""

import statistics
import time

import pyro
import torch
from pyro.infer import Trace_ELBO

from pyro_arm import TraceARM_ELBO

try:
    from pyro_arm.sbn.models import build_sbn
except ImportError:  # release 0.1.0 kept the models at the top level
    from pyro_arm.models import build_sbn

torch.set_num_threads(2)
pyro.settings.set(module_local_params=True)
torch.manual_seed(0)
res = {}
for model_name, batch in [("linear", 50), ("linear", 500), ("two_layer", 50), ("two_layer", 500)]:
    x = (torch.rand(batch, 784) < 0.2).float()
    runners = {}
    for name, elbo in [
        ("trace", Trace_ELBO(max_plate_nesting=1)),
        ("arm_vec", TraceARM_ELBO(vectorize_particles=True, max_plate_nesting=1)),
    ]:
        sbn = build_sbn(model_name, x.mean(0))
        opt = torch.optim.Adam(sbn.parameters(), lr=1e-3)

        def step(sbn=sbn, opt=opt, elbo=elbo, x=x):
            opt.zero_grad()
            elbo.loss_and_grads(sbn.model, sbn.guide, x)
            opt.step()

        for _ in range(5):
            step()
        runners[name] = step
    ratios = []
    for r in range(15):
        t = {}
        for name in ["trace", "arm_vec"] if r % 2 else ["arm_vec", "trace"]:
            s = time.perf_counter()
            for _ in range(10):
                runners[name]()
            t[name] = time.perf_counter() - s
        ratios.append(t["arm_vec"] / t["trace"])
    print(model_name, batch, f"arm_vec/trace_elbo median ratio {statistics.median(ratios):.3f}")
