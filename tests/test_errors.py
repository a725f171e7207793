# SPDX-License-Identifier: Apache-2.0
"""
Errors and warnings: TraceARM_ELBO raises and warns like pyro's Trace_ELBO on invalid models
(same exception type, same message fragment), and rejects bad configuration with clear errors.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_arm import TraceARM_ELBO, trace_arm_elbo

DATA = torch.tensor([1.0, 0.0])


def outcome(elbo, method, model, guide, *args):
    """Runs one ELBO method; returns (exception or None, [(category, first message line)])."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    exc = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            getattr(elbo, method)(model, guide, *args)
        except Exception as e:  # noqa: BLE001 - compared below
            exc = e
    warns = [(w.category, str(w.message).splitlines()[0]) for w in caught]
    return exc, warns


def fragment(text, n=40):
    return text.splitlines()[0][:n] if text else ""


def assert_same_behaviour(
    model, guide, args=(DATA,), expect=None, match_exception=True, **elbo_kwargs
):
    """TraceARM_ELBO raises/warns as Trace_ELBO does (loss and loss_and_grads)."""
    for method in ["loss", "loss_and_grads"]:
        ref_exc, ref_warns = outcome(Trace_ELBO(**elbo_kwargs), method, model, guide, *args)
        exc, warns = outcome(TraceARM_ELBO(**elbo_kwargs), method, model, guide, *args)
        if expect == "raise":
            assert ref_exc is not None, "the invalid case does not make Trace_ELBO raise"
        elif expect == "warn":
            assert ref_warns, "the invalid case does not make Trace_ELBO warn"
        if not match_exception:
            pass
        elif ref_exc is None:
            assert exc is None, f"{method}: Trace_ELBO did not raise, TraceARM_ELBO raised {exc!r}"
        else:
            assert exc is not None, f"{method}: Trace_ELBO raised {ref_exc!r}, TraceARM_ELBO not"
            assert isinstance(exc, type(ref_exc)), (method, exc, ref_exc)
            assert fragment(str(ref_exc)) in str(exc), (method, str(exc), str(ref_exc))
        for category, message in ref_warns:
            assert any(issubclass(c, category) and fragment(message) in m for c, m in warns), (
                f"{method}: missing warning {category.__name__}: {message!r}; got {warns}"
            )


MODES = [
    dict(),
    dict(num_particles=3, vectorize_particles=True, max_plate_nesting=1),
]


def mode_id(m):
    return "vec" if m.get("vectorize_particles") else "seq"


def base_model(data):
    with pyro.plate("data", 2):
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(2)))
        pyro.sample("x", dist.Bernoulli(logits=2 * z - 1), obs=data)


def base_guide(data):
    phi = pyro.param("phi", torch.zeros(2))
    with pyro.plate("data", 2):
        pyro.sample("z", dist.Bernoulli(logits=phi))


# ---------------------------------------------------------------------------------------------
# Bad configuration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rebar", "ARM", "", None, 3])
def test_unknown_estimator(name):
    with pytest.raises(ValueError) as info:
        TraceARM_ELBO(estimator=name)
    message = str(info.value)
    for valid in ["'arm'", "'disarm'", "'ar'"]:
        assert valid in message


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
@pytest.mark.parametrize("bad", ["yes", 1, None.__class__])
def test_arm_flag_must_be_bool(bad, mode):
    def guide(data):
        phi = pyro.param("phi", torch.zeros(2))
        with pyro.plate("data", 2):
            pyro.sample("z_flagged", dist.Bernoulli(logits=phi), infer={"arm": bad})

    def model(data):
        with pyro.plate("data", 2):
            z = pyro.sample("z_flagged", dist.Bernoulli(logits=torch.zeros(2)))
            pyro.sample("x", dist.Bernoulli(logits=2 * z - 1), obs=data)

    with pytest.raises(ValueError, match="z_flagged"):
        TraceARM_ELBO(**mode).loss_and_grads(model, guide, DATA)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_arm_true_on_a_non_bernoulli_site(mode):
    def guide(data):
        loc = pyro.param("loc", torch.zeros(2))
        with pyro.plate("data", 2):
            pyro.sample("y_normal", dist.Normal(loc, 1.0), infer={"arm": True})

    def model(data):
        with pyro.plate("data", 2):
            pyro.sample("y_normal", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="y_normal"):
        TraceARM_ELBO(**mode).loss_and_grads(model, guide, DATA)


# ---------------------------------------------------------------------------------------------
# Invalid models: the same errors and warnings as Trace_ELBO
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_guide_site_missing_in_model(mode):
    def guide(data):
        base_guide(data)
        pyro.sample("extra", dist.Bernoulli(logits=torch.tensor(0.3)))

    assert_same_behaviour(base_model, guide, expect="warn", **mode)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_model_site_missing_in_guide(mode):
    def model(data):
        base_model(data)
        pyro.sample("extra", dist.Bernoulli(logits=torch.tensor(0.3)))

    # Trace_ELBO warns, then loss_and_grads crashes with an incidental KeyError('extra') while
    # building its score-function signals; only the warning is required of TraceARM_ELBO.
    assert_same_behaviour(model, base_guide, expect="warn", match_exception=False, **mode)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_shape_mismatch(mode):
    def guide(data):
        phi = pyro.param("phi", torch.zeros(2, 3))
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Bernoulli(logits=phi).to_event(1))

    assert_same_behaviour(base_model, guide, expect="raise", **mode)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_plate_in_guide_not_in_model(mode):
    def model(data):
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(2)).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=2 * z - 1).to_event(1), obs=data)

    assert_same_behaviour(model, base_guide, **mode)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_batch_shape_outside_plate(mode):
    def guide(data):
        phi = pyro.param("phi", torch.zeros(2))
        pyro.sample("z", dist.Bernoulli(logits=phi))  # batch shape (2,) without a plate

    # (vectorized, Trace_ELBO lets it pass: then TraceARM_ELBO must not raise either)
    expect = None if mode.get("vectorize_particles") else "raise"
    assert_same_behaviour(base_model, guide, expect=expect, **mode)


def test_plate_stack_overflow():
    def model(data):
        with pyro.plate("a", 2, dim=-1), pyro.plate("b", 2, dim=-2):
            pyro.sample("z", dist.Bernoulli(logits=torch.zeros(2, 2)))

    def guide(data):
        phi = pyro.param("phi", torch.zeros(2, 2))
        with pyro.plate("a", 2, dim=-1), pyro.plate("b", 2, dim=-2):
            pyro.sample("z", dist.Bernoulli(logits=phi))

    assert_same_behaviour(model, guide, expect="raise", max_plate_nesting=1)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_invalid_distribution_parameter(mode):
    def guide(data):
        p = pyro.param("p", torch.tensor([0.3, 0.6]))
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Bernoulli(probs=p + 1.0))  # probs outside [0, 1]

    assert_same_behaviour(base_model, guide, expect="raise", **mode)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_nan_loss_warns(mode):
    def model(data):
        base_model(data)
        pyro.factor("bad", torch.tensor(float("nan")))

    with pyro.validation_enabled(False):  # validation would reject the NaN factor itself
        assert_same_behaviour(model, base_guide, expect="warn", **mode)
        with pytest.warns(UserWarning, match="NaN"):
            TraceARM_ELBO(**mode).differentiable_loss(model, base_guide, DATA)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_valid_model_is_silent(mode):
    """The comparisons above are meaningful: a valid model neither raises nor warns."""
    for elbo in [Trace_ELBO(**mode), TraceARM_ELBO(**mode)]:
        exc, warns = outcome(elbo, "loss_and_grads", base_model, base_guide, DATA)
        assert exc is None and warns == [], (exc, warns)


@pytest.mark.parametrize("num_particles", [0, -1, 1.5, "2"])
def test_num_particles_must_be_positive(num_particles):
    with pytest.raises(ValueError, match="num_particles"):
        TraceARM_ELBO(num_particles=num_particles)


# ---------------------------------------------------------------------------------------------
# Non-finite signals: finite loss, infinite gradient
# ---------------------------------------------------------------------------------------------


def inf_when_one_model():
    z = pyro.sample("z_inf", dist.Bernoulli(logits=torch.tensor(0.0)))
    pyro.factor("forbidden", torch.where(z == 1, -math.inf, 0.0))


def inf_when_one_guide():
    phi = pyro.param("phi", torch.tensor(0.0))
    pyro.sample("z_inf", dist.Bernoulli(logits=phi))


@pytest.mark.parametrize("mode", MODES[:1] + [dict(num_particles=3, vectorize_particles=True)])
@pytest.mark.parametrize("estimator", ["arm", "disarm"])
def test_infinite_signal_warns_naming_the_site(estimator, mode):
    """Guide logit 0, a model factor of -inf when z = 1: whenever the base sample is z = 0 the
    loss is finite and the gradient infinite; the step warns as Pyro does, naming the site."""
    check_infinite_signal_warnings(TraceARM_ELBO(estimator=estimator, **mode))


def check_infinite_signal_warnings(elbo):
    finite_losses = infinite_grads = 0
    for seed in range(10):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = elbo.loss_and_grads(inf_when_one_model, inf_when_one_guide)
        grad = pyro.param("phi").unconstrained().grad
        messages = [str(w.message) for w in caught]
        if math.isfinite(loss):
            finite_losses += 1
        if not bool(torch.isfinite(grad).all()):
            infinite_grads += 1
            assert any("inf" in m and "'z_inf'" in m for m in messages), messages
    assert finite_losses > 0 and infinite_grads > 0, "the case never occurred"


def test_checker_rejects_silent_infinite_signals(monkeypatch):
    monkeypatch.setattr(trace_arm_elbo, "_warn_if_not_finite", lambda values: None)
    with pytest.raises(AssertionError, match="z_inf|\\[\\]"):
        check_infinite_signal_warnings(TraceARM_ELBO())


def test_finite_signals_do_not_warn():
    """The same model with a finite factor: no warning (the check above is not always on)."""

    def model():
        z = pyro.sample("z_inf", dist.Bernoulli(logits=torch.tensor(0.0)))
        pyro.factor("forbidden", torch.where(z == 1, -50.0, 0.0))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(5):
            pyro.set_rng_seed(seed)
            TraceARM_ELBO().loss_and_grads(model, inf_when_one_guide)
