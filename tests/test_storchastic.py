# SPDX-License-Identifier: Apache-2.0
"""
The peer contenders of :mod:`benchmarks.storch_arm` against exact enumeration, on a tiny sigmoid
belief net (5 pixels, 3 latents, one datapoint): what storchastic 0.3.7's ARM and DisARM get right
and wrong, each asserted as measured. Skipped without storchastic (``pip install -e ".[bench]"``).

The checker: ``CHUNKS`` calls, each averaging ``PAIRS`` antithetic pairs (storchastic's
``n_samples``); z-score of the mean of the calls against the exact gradient, standard error from
the spread of the calls. Its power: the same checker, same pairs, accepts ``TraceARM_ELBO``'s
DisARM and the plain-PyTorch DisARM of :mod:`benchmarks.plain_arm` on the same model, and
storchastic's ARM once :class:`benchmarks.storch_arm.PatchedARM` has fixed its one defect.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

pytest.importorskip("storch", reason="storchastic is an optional benchmark dependency")

from benchmarks import plain_arm, storch_arm  # noqa: E402
from pyro_arm import TraceARM_ELBO  # noqa: E402
from tests.test_benchmarks import exact_elbo_grads  # noqa: E402

CHUNKS, PAIRS = 20, 200


def _tiny(layers: list[int]):
    """A 5-pixel SBN with O(1) parameters, one datapoint, and the exact gradient (float64)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    sbn = plain_arm.build_plain_sbn(layers, x_dim=5)
    with torch.no_grad():
        for p in sbn.parameters():
            p.normal_(0, 0.8)
    x = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    exact, _ = exact_elbo_grads(sbn, x[None])
    yield sbn, x, _split(sbn, exact)
    torch.set_default_dtype(previous)


@pytest.fixture
def tiny():
    """5-3: one layer of 3 latent units."""
    yield from _tiny([3])


@pytest.fixture
def tiny2():
    """5-2-1: two layers, of 2 and 1 latent units."""
    yield from _tiny([2, 1])


def _split(sbn, flat: torch.Tensor) -> dict:
    """The entries of ``flat`` (over ``sbn.parameters()``) by part: ``"encoder"`` (all the
    guide's), ``"encoder1"``, ``"encoder2"``, ... (layer by layer) and ``"model"``."""
    owner = {}
    for k, enc in enumerate(sbn.encoders):
        owner.update({id(p): f"encoder{k + 1}" for p in enc.parameters()})
    parts, i = {}, 0
    for p in sbn.parameters():
        piece = flat[i : i + p.numel()]
        for key in ("encoder", owner[id(p)]) if id(p) in owner else ("model",):
            parts.setdefault(key, []).append(piece)
        i += p.numel()
    return {k: torch.cat(v) for k, v in parts.items()}


def _mean_and_se(draw) -> tuple[dict, dict]:
    gs = [draw() for _ in range(CHUNKS)]
    g = torch.stack(gs)
    return g.mean(0), g.std(0) / CHUNKS**0.5


def storch_estimate(sbn, x, method: str):
    torch.manual_seed(1)
    methods = storch_arm.make_methods(method, sbn.num_layers, n_samples=PAIRS)

    def draw():
        sbn.zero_grad()
        storch_arm.storch_grads(sbn, x, methods)
        return torch.cat([p.grad.flatten() for p in sbn.parameters()])

    mean, se = _mean_and_se(draw)
    return _split(sbn, mean), _split(sbn, se)


def plain_estimate(sbn, x, estimator: str):
    torch.manual_seed(1)

    def draw():
        sbn.zero_grad()
        loss, _ = plain_arm.arm_surrogate_loss(sbn, x[None], estimator, num_particles=PAIRS)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in sbn.parameters()])

    mean, se = _mean_and_se(draw)
    return _split(sbn, mean), _split(sbn, se)


def pyro_estimate(sbn, x, estimator: str):
    """``TraceARM_ELBO``'s gradient on the same network written as a Pyro model and guide."""
    (encoder,), (decoder,) = sbn.encoders, sbn.decoders

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(logits=sbn.prior_logits).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=encoder(x)).to_event(1))

    elbo = TraceARM_ELBO(num_particles=PAIRS, vectorize_particles=True, estimator=estimator)
    torch.manual_seed(1)

    def draw():
        loss = elbo.differentiable_loss(model, guide, x[None])
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(sbn.parameters()))])

    mean, se = _mean_and_se(draw)
    return _split(sbn, mean), _split(sbn, se)


def zscores(mean, se, exact) -> torch.Tensor:
    """``(mean - exact) / se``; a component without spread (the weight of a pixel that is 0)
    scores 0 if it equals the exact value, else infinity."""
    z = (mean - exact) / se
    constant = se == 0
    z[constant] = torch.where(torch.isclose(mean, exact, atol=1e-12), 0.0, torch.inf)[constant]
    return z


def test_storch_arm_encoder_gradient_is_unbiased(tiny):
    sbn, x, exact = tiny
    mean, se = storch_estimate(sbn, x, "ARM")
    z = zscores(mean["encoder"], se["encoder"], exact["encoder"])
    print("storch ARM encoder z:", z.numpy().round(2))
    assert z.abs().max() < 4.5


def test_storch_model_parameter_gradients_are_scaled(tiny):
    """Finding: storchastic's gradient of the decoder and prior is d = 3 (the number of latent
    units) times the exact one with ARM, 1.5 times with DisARM (see benchmarks/storch_arm.py)."""
    sbn, x, exact = tiny
    for method, factor in (("ARM", 3.0), ("DisARM", 1.5)):
        mean, se = storch_estimate(sbn, x, method)
        z_unit = zscores(mean["model"], se["model"], exact["model"])
        z_scaled = zscores(mean["model"], se["model"], factor * exact["model"])
        print(f"storch {method} model z vs exact: max {z_unit.abs().max():.1f}, "
              f"vs {factor}x exact: max {z_scaled.abs().max():.2f}")  # fmt: skip
        assert z_unit.abs().max() > 8
        assert z_scaled.abs().max() < 4.5


def test_storch_disarm_encoder_gradient_is_biased(tiny):
    """Finding: storchastic 0.3.7's DisARM encoder gradient is biased (its mean is near zero)."""
    sbn, x, exact = tiny
    mean, se = storch_estimate(sbn, x, "DisARM")
    z = zscores(mean["encoder"], se["encoder"], exact["encoder"])
    ratio = mean["encoder"] / exact["encoder"]
    print("storch DisARM encoder z:", z.numpy().round(1), "mean/exact:", ratio.numpy().round(2))
    assert z.abs().max() > 8


@pytest.mark.parametrize("implementation", ["pyro_arm", "plain"])
def test_checker_accepts_a_correct_disarm(tiny, implementation):
    """The power check: the same checker, same pairs, accepts a correct DisARM."""
    sbn, x, exact = tiny
    estimate = pyro_estimate if implementation == "pyro_arm" else plain_estimate
    mean, se = estimate(sbn, x, "disarm")
    z = zscores(mean["encoder"], se["encoder"], exact["encoder"])
    print(f"{implementation} DisARM encoder z:", z.numpy().round(2))
    assert z.abs().max() < 4.5


def test_storch_arm_second_layer_is_biased(tiny2):
    """Finding: with two layers storchastic's ARM gradient of the second encoder (and of the
    model) is d1 = 2 (the first layer's units) times the right one; the first encoder's is
    right."""
    sbn, x, exact = tiny2
    mean, se = storch_estimate(sbn, x, "ARM")
    z1 = zscores(mean["encoder1"], se["encoder1"], exact["encoder1"])
    print(f"storch ARM two layers, encoder1 z: max {z1.abs().max():.2f}")
    assert z1.abs().max() < 4.5
    for part in ("encoder2", "model"):
        z = zscores(mean[part], se[part], exact[part])
        z2x = zscores(mean[part], se[part], 2 * exact[part])
        print(f"{part}: max z {z.abs().max():.1f} against exact, {z2x.abs().max():.2f} against 2x")
        assert z.abs().max() > 8
        assert z2x.abs().max() < 4.5


@pytest.mark.parametrize("model", ["tiny", "tiny2"])
def test_patched_storch_arm_is_unbiased_everywhere(model, request):
    """Summing ARM's score term over the event dims (PatchedARM) is the whole fix."""
    sbn, x, exact = request.getfixturevalue(model)
    mean, se = storch_estimate(sbn, x, "PatchedARM")
    for part in ("encoder", "model"):
        z = zscores(mean[part], se[part], exact[part])
        print(f"patched storch ARM {part} z: max {z.abs().max():.2f}")
        assert z.abs().max() < 4.5


def test_storch_disarm_refuses_batches_with_the_reason():
    from benchmarks import common

    assert {"storch_arm", "storch_arm_fixed"} <= set(common.available_contenders())
    assert "storch_disarm" not in common.available_contenders()
    with pytest.raises(SystemExit, match="plate_index"):
        common.check_contenders(["storch_disarm"])


@pytest.mark.slow
def test_storch_contenders_in_the_benchmarks(tmp_path):
    """The peers run interleaved with the others in step_time and variance (smoke runs)."""
    from tests.test_benchmarks import run_script

    peers = ["storch_arm", "storch_arm_fixed"]
    out, record = run_script(
        "step_time", "--rounds", "1", "--quick", "--models", "linear", "two_layer",
        "--contenders", "plain_arm", "arm_vec", *peers, tmp_path=tmp_path,
    )  # fmt: skip
    assert "| two_layer | 50 | storch_arm |" in out
    assert record["ratios"]["linear/b50"]["storch_arm/plain_torch_arm"] > 0
    assert record["ratios"]["two_layer/linear/b50/storch_arm_fixed"] > 0
    out, record = run_script(
        "variance", "--quick", "--draws", "3", "--train-steps", "2",
        "--contenders", "plain_arm", *peers, tmp_path=tmp_path,
    )  # fmt: skip
    assert set(record["trace_cov"]["linear/init"]) == {"plain_arm", *peers}


def test_without_storchastic_the_peers_are_left_out(monkeypatch):
    from benchmarks import common

    monkeypatch.setattr(storch_arm, "_IMPORT_ERROR", ImportError("No module named 'storch'"))
    assert not any(n.startswith("storch_") for n in common.available_contenders())
    common.check_contenders(["plain_arm", "arm_vec"])
    with pytest.raises(SystemExit, match=r"not importable.*\[bench\]"):
        common.check_contenders(["storch_arm"])
