# SPDX-License-Identifier: Apache-2.0
"""
The benchmark scripts: the plain-PyTorch ARM step against an exact enumeration, and a smoke run of
every script with tiny settings.
"""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import plain_arm
from benchmarks.common import plain_from_pyro
from pyro_arm.sbn.models import build_sbn

ROOT = Path(__file__).resolve().parents[1]


def exact_elbo_grads(sbn, x):
    """``-grad E_q[log p(x, z) - log q(z | x)]`` by enumerating every latent configuration."""
    sizes = [lg.shape[-1] for lg in sbn.sample_guide(x)[0]]
    sbn.zero_grad()
    total = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=sum(sizes)):
        flat = torch.tensor(bits).unsqueeze(0)
        zs = list(torch.split(flat, sizes, dim=-1))
        logits, h = [], x
        for enc, z in zip(sbn.encoders, zs):
            logits.append(enc(h))
            h = z
        log_q = sbn.log_q(zs, logits)
        total = total + (log_q.exp() * (sbn.log_joint(x, zs) - log_q)).sum()
    (-total).backward()
    return torch.cat([p.grad.flatten() for p in sbn.parameters()]), total.item()


def monte_carlo_grads(sbn, x, estimator, chunks=20, draws=20000):
    """Mean and standard error of the plain ARM gradient, from ``chunks`` averages of ``draws``."""
    means = []
    for _ in range(chunks):
        sbn.zero_grad()
        surrogate, _ = plain_arm.arm_surrogate_loss(sbn, x, estimator, num_particles=draws)
        surrogate.backward()
        means.append(torch.cat([p.grad.flatten() for p in sbn.parameters()]))
    g = torch.stack(means)
    return g.mean(0), g.std(0) / chunks**0.5


@pytest.mark.slow
@pytest.mark.parametrize("layers", [[3], [2, 1]], ids=["linear", "two_layer"])
@pytest.mark.parametrize("estimator", plain_arm.ESTIMATOR_NAMES)
def test_plain_arm_matches_exact_gradient(layers, estimator):
    torch.manual_seed(0)
    sbn = plain_arm.build_plain_sbn(layers, x_dim=5)
    with torch.no_grad():
        for p in sbn.parameters():
            p.normal_(0.0, 1.0)
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0]])
    exact, _ = exact_elbo_grads(sbn, x)
    mean, se = monte_carlo_grads(sbn, x, estimator)
    z = (mean - exact).abs() / (se + 1e-6)
    assert z.max() < 5.0, (z.max(), mean, exact)


@pytest.mark.slow
def test_plain_arm_catches_a_wrong_branch():
    """Control: branches that do not recompute the layers above are detectably biased."""
    torch.manual_seed(0)
    sbn = plain_arm.build_plain_sbn([2, 1], x_dim=5)
    with torch.no_grad():
        for p in sbn.parameters():
            p.normal_(0.0, 1.0)
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0]])
    exact, _ = exact_elbo_grads(sbn, x)
    right = plain_arm._branch_samples

    def no_recompute(sbn, logits, us, zs):
        bz, bl = right(sbn, logits, us, zs)
        bz[1] = torch.cat([zs[1].unsqueeze(0), bz[1][1:]])
        bl[1] = logits[1].expand(2, *logits[1].shape)
        return bz, bl

    plain_arm._branch_samples = no_recompute
    try:
        mean, se = monte_carlo_grads(sbn, x, "arm")
    finally:
        plain_arm._branch_samples = right
    assert ((mean - exact).abs() / (se + 1e-6)).max() > 10.0


@pytest.mark.slow
def test_plain_arm_elbo_estimate_is_unbiased():
    torch.manual_seed(1)
    sbn = plain_arm.build_plain_sbn([2, 1], x_dim=5)
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0]])
    _, exact = exact_elbo_grads(sbn, x)
    assert abs(sbn.elbo(x, num_samples=200000).item() - exact) < 0.02


def test_plain_arm_step_trains():
    torch.manual_seed(2)
    x = (torch.rand(64, 20) < 0.3).float()
    sbn = plain_arm.build_plain_sbn([8, 4], x_dim=20, x_mean=x.mean(0))
    step = plain_arm.PlainARMStep(sbn, torch.optim.Adam(sbn.parameters(), lr=1e-2), "disarm")
    before = -sbn.elbo(x, 100).mean().item()
    for _ in range(200):
        step(x)
    assert -sbn.elbo(x, 100).mean().item() < before


def run_script(name, *args, tmp_path):
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *args, "--json-out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_plain_view_of_pyro_sbn_computes_the_same_elbo():
    """The plain view shares the Pyro SBN's parameters and gives the same log-densities."""
    import pyro.poutine as poutine

    sbn = build_sbn("nonlinear-6-4", x_mean=torch.full((784,), 0.2))
    x = (torch.rand(7, 784) < 0.2).float()
    guide_tr = poutine.trace(sbn.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(sbn.model, trace=guide_tr)).get_trace(x)
    for tr in (guide_tr, model_tr):
        tr.compute_log_prob()
    pyro_f = sum(s["log_prob"] for s in model_tr.nodes.values() if s["type"] == "sample")
    pyro_f = pyro_f - sum(s["log_prob"] for s in guide_tr.nodes.values() if s["type"] == "sample")
    plain = plain_from_pyro(sbn)
    zs = [guide_tr.nodes[f"z{k + 1}"]["value"] for k in range(2)]
    logits, h = [], x
    for enc, z in zip(plain.encoders, zs):
        logits.append(enc(h))
        h = z
    plain_f = plain.log_joint(x, zs) - plain.log_q(zs, logits)
    assert torch.allclose(pyro_f, plain_f, atol=1e-3)
    assert {id(p) for p in plain.parameters()} == {id(p) for p in sbn.parameters()}


@pytest.mark.slow
def test_step_time_smoke(tmp_path):
    out, record = run_script(
        "step_time",
        "--rounds", "2", "--quick", "--models", "linear", "two_layer",
        "--contenders", "trace_elbo", "tracegraph_elbo", "arm_seq", "arm_vec", "plain_arm",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert "| linear | 50 | arm_vec |" in out
    ratios = record["ratios"]
    for group in ("linear/b50", "two_layer/b50"):
        for key in ("arm_vectorized/trace_elbo", "arm_vectorized/plain_torch_arm",
                    "arm_sequential/trace_elbo"):  # fmt: skip
            assert ratios[group][key] > 0
    assert ratios["two_layer/linear/b50/arm_vec"] > 0


@pytest.mark.slow
def test_variance_smoke(tmp_path):
    out, record = run_script(
        "variance",
        "--quick", "--draws", "3", "--train-steps", "3",
        "--contenders", "trace_elbo", "disarm_seq", "arm_vec", "plain_arm",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert "## linear, trained" in out
    for state in ("linear/init", "linear/trained"):
        assert set(record["trace_cov"][state]) == {"trace_elbo", "disarm_seq", "arm_vec",
                                                   "plain_arm"}  # fmt: skip
        assert all(v > 0 for v in record["var_x_ms"][state].values())


@pytest.mark.slow
def test_quality_smoke(tmp_path):
    out, record = run_script(
        "quality", "--quick", "--steps", "5", "--eval-max", "50", tmp_path=tmp_path
    )
    assert "paired difference" in out
    assert len(record["difference"]["pairs"]) == 2
    assert set(record["summary"]) == {"arm_vec", "plain_arm"}


@pytest.mark.slow
def test_estimator_quality_smoke(tmp_path):
    root = tmp_path / "runs"
    args = ["--quick", "--run-root", str(root), "--configs", "disarm1", "arms2all"]
    out, record = run_script("estimator_quality", *args, tmp_path=tmp_path)
    assert "| disarm1 | 2 |" in out and "| arms2all | 2 |" in out
    assert all(r["test_neg_elbo"] > 0 and r["test_neg_iw"] > 0 for r in record["runs"].values())
    config = json.loads((root / "arms2all" / "config.json").read_text())["config"]
    assert (config["estimator"], config["model_grad"]) == ("arms", "all")
    # a second call tabulates the finished runs, and refuses a folder made otherwise
    again, _ = run_script("estimator_quality", *args, tmp_path=tmp_path)
    assert again.splitlines()[:8] == out.splitlines()[:8]
    with pytest.raises(AssertionError, match="other settings"):
        run_script("estimator_quality", *args, "--seed", "1", tmp_path=tmp_path)


@pytest.mark.slow
def test_ddp_step_time_smoke(tmp_path):
    out, record = run_script("ddp_step_time", "--quick", tmp_path=tmp_path)
    assert "| processes | steps/s |" in out
    assert set(record["steps_per_s"]) == {"1", "2"}
    assert all(rate > 0 for rate in record["steps_per_s"].values())


def test_multi_sample_contenders_and_evaluations():
    from benchmarks import common

    names = common.available_contenders(include_plain=False, include_peers=False)
    for n in (2, 4, 8):
        assert {f"rloo{n}_vec", f"arms{n}_vec"} <= set(names)
    elbo = common.pyro_loss("arms4_vec")
    assert (elbo.estimator.name, elbo.num_samples, elbo.vectorize_particles) == ("arms", 4, True)
    assert common.pyro_loss("rloo8_seq").num_samples == 8
    evals = {n: common.model_evaluations(n, 2) for n in ("arm_vec", "rloo4_vec", "arms4_vec")}
    assert evals == {"arm_vec": 3, "rloo4_vec": 4, "arms4_vec": 7}
    assert common.model_evaluations("arms4_vec", 1) == common.model_evaluations("rloo4_vec", 1)
    assert common.model_evaluations("disarm_vec", 1, num_particles=2) == 4
    for n in (2, 4, 8):
        assert f"arms{n}all_vec" in names
    elbo = common.pyro_loss("arms4all_vec")
    assert (elbo.estimator.name, elbo.num_samples, elbo.model_grad) == ("arms", 4, "all")
    assert common.pyro_loss("arms4_vec").model_grad == "base"
    assert common.model_evaluations("arms4all_vec", 1) == 5


@pytest.mark.slow
def test_categorical_smoke(tmp_path):
    _, record = run_script(
        "categorical", "--draws", "2", "--rounds", "2", "--threads", "1",
        "--contenders", "disarm", "arms4", tmp_path=tmp_path,
    )  # fmt: skip
    assert set(record["variance"]) == {"disarm", "arms4"}
    assert record["step_ratio_disarm_rloo2"] > 0
