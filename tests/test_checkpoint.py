# SPDX-License-Identifier: Apache-2.0
"""TrainState: ``from_checkpoint`` inverts ``to_checkpoint``, through a file; bad files are
reported as ConfigError."""

import pytest
import torch

from pyro_arm.sbn.checkpoint import TrainState, load_checkpoint, save_checkpoint
from pyro_arm.sbn.config import ConfigError
from pyro_arm.sbn.models import SigmoidBeliefNet
from tests.process_state import process_state_fixture  # noqa: F401  (autouse)


def state_after_two_steps():
    torch.manual_seed(0)
    sbn = SigmoidBeliefNet(x_dim=6, latent_dims=(3,))
    optimizer = torch.optim.Adam(sbn.parameters(), lr=0.1)
    state = TrainState(sbn, optimizer, torch.device("cpu"))
    for loss in (5.0, 3.0):
        optimizer.zero_grad()
        sum(p.sum() for p in sbn.parameters()).backward()
        optimizer.step()
        state.record(loss, seconds=0.5)
    return state


def test_round_trip(tmp_path):
    state = state_after_two_steps()
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(state.to_checkpoint({"model": "tiny"}), path)
    expected_rng = torch.get_rng_state()
    torch.rand(5)  # moves the global RNG on: restoring must bring it back

    ckpt = load_checkpoint(path)
    assert ckpt["config"] == {"model": "tiny"}
    torch.manual_seed(1)
    sbn = SigmoidBeliefNet(x_dim=6, latent_dims=(3,))
    restored = TrainState.from_checkpoint(
        ckpt, sbn, torch.optim.Adam(sbn.parameters(), lr=0.1), torch.device("cpu")
    )
    assert torch.equal(torch.get_rng_state(), expected_rng)
    for name in ("step", "train_wall_s", "interval_sum", "interval_count", "ema"):
        assert getattr(restored, name) == getattr(state, name), name
    assert (restored.step, restored.interval_count) == (2, 2)
    a, b = state.module.state_dict(), restored.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = state.optimizer.state_dict()["state"], restored.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    # the round trip is the identity on the checkpoint itself
    again = restored.to_checkpoint({"model": "tiny"})
    assert again.keys() == ckpt.keys() and again["step"] == ckpt["step"]


def test_interval_mean_resets():
    state = state_after_two_steps()
    assert state.pop_interval_mean() == 4.0
    assert state.interval_count == 0 and state.pop_interval_mean() == 0.0
    assert state.ema == pytest.approx(0.98 * 5.0 + 0.02 * 3.0)


@pytest.mark.parametrize(
    "content, message",
    [(None, "no checkpoint"), (b"garbage", "cannot read checkpoint"), ({}, "not a pyro-arm")],
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "checkpoint.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(ConfigError, match=message):
        load_checkpoint(path)


class NotATensor:
    """A pickled object that ``weights_only=True`` refuses to load."""


def test_an_unsafe_checkpoint_is_refused_without_torch_advice(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "model": NotATensor()}, path)
    with pytest.raises(ConfigError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "holds objects other than tensors and plain values" in message
    assert "weights_only" not in message and "\n" not in message


def test_missing_key(tmp_path):
    state = state_after_two_steps()
    ckpt = state.to_checkpoint({"model": "tiny"})
    del ckpt["optimizer"]
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(ckpt, path)
    with pytest.raises(ConfigError, match="lacks 'optimizer'; it is damaged"):
        load_checkpoint(path)


def test_another_architecture(tmp_path):
    ckpt = state_after_two_steps().to_checkpoint({"model": "tiny"})
    other = SigmoidBeliefNet(x_dim=6, latent_dims=(4,))
    optimizer = torch.optim.Adam(other.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"does not fit this model \(.*size mismatch"):
        TrainState.from_checkpoint(ckpt, other, optimizer, torch.device("cpu"))
    deeper = SigmoidBeliefNet(x_dim=6, latent_dims=(3, 2))
    optimizer = torch.optim.Adam(deeper.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="does not fit this model .*Missing key"):
        TrainState.from_checkpoint(ckpt, deeper, optimizer, torch.device("cpu"))
