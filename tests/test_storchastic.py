# SPDX-License-Identifier: Apache-2.0
"""
The peer contenders of :mod:`benchmarks.storch_arm` against exact enumeration, on a tiny sigmoid
belief net (5 pixels, 3 latents, one datapoint): what storchastic 0.3.7's ARM and DisARM get right
and wrong, each asserted as measured. Skipped without storchastic (``pip install -e ".[bench]"``).

The checker: ``CHUNKS`` calls, each averaging ``PAIRS`` antithetic pairs (storchastic's
``n_samples``); z-score of the mean of the calls against the exact gradient, standard error from
the spread of the calls. Its power: the same checker accepts the plain-PyTorch DisARM of
:mod:`benchmarks.plain_arm` (itself checked against exact enumeration in
``tests/test_benchmarks.py``) at the same number of pairs.
"""

import pytest
import torch

pytest.importorskip("storch", reason="storchastic is an optional benchmark dependency")

from benchmarks import plain_arm, storch_arm  # noqa: E402
from tests.test_benchmarks import exact_elbo_grads  # noqa: E402

CHUNKS, PAIRS = 20, 200


@pytest.fixture
def tiny():
    """A 5-3 SBN with O(1) parameters, one binary datapoint, and the exact gradient (float64)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    sbn = plain_arm.build_plain_sbn([3], x_dim=5)
    with torch.no_grad():
        for p in sbn.parameters():
            p.normal_(0, 0.8)
    x = (torch.rand(5) < 0.5).double()
    exact, _ = exact_elbo_grads(sbn, x[None])
    yield sbn, x, _split(sbn, exact)
    torch.set_default_dtype(previous)


def _split(sbn, flat: torch.Tensor) -> dict:
    """``{"encoder": ..., "model": ...}``: the guide's and the model's parameters' entries."""
    enc = {id(p) for p in sbn.encoder_parameters()}
    parts, i = {"encoder": [], "model": []}, 0
    for p in sbn.parameters():
        parts["encoder" if id(p) in enc else "model"].append(flat[i : i + p.numel()])
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


def zscores(mean, se, exact) -> torch.Tensor:
    return (mean - exact) / se


def test_storch_arm_encoder_gradient_is_unbiased(tiny):
    sbn, x, exact = tiny
    mean, se = storch_estimate(sbn, x, "ARM")
    z = zscores(mean["encoder"], se["encoder"], exact["encoder"])
    print("storch ARM encoder z:", z.numpy().round(2))
    assert z.abs().max() < 4.5


def test_storch_model_parameter_gradients_are_scaled(tiny):
    """Finding: storchastic's gradient of the decoder and prior is 3x the exact one with ARM,
    1.5x with DisARM (the pathwise part; see benchmarks/storch_arm.py)."""
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


def test_checker_accepts_a_correct_disarm(tiny):
    """The power check: the same checker, same pairs, accepts the plain-PyTorch DisARM."""
    sbn, x, exact = tiny
    mean, se = plain_estimate(sbn, x, "disarm")
    z = zscores(mean["encoder"], se["encoder"], exact["encoder"])
    print("plain DisARM encoder z:", z.numpy().round(2))
    assert z.abs().max() < 4.5


def test_storch_disarm_refuses_batches_with_the_reason():
    from benchmarks import common

    assert "storch_arm" in common.available_contenders()
    assert "storch_disarm" not in common.available_contenders()
    with pytest.raises(SystemExit, match="plate_index"):
        common.check_contenders(["storch_disarm"])
