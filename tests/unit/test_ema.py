"""train/ema.py: the update rule, integer buffers, state round trip and evaluation copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipjob.train.ema import EMA


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_should_move_by_the_momentum_when_updated():
    net = _net()
    w0 = net[0].weight.detach().clone()
    ema = EMA(net, momentum=0.1)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update(net)
    torch.testing.assert_close(ema.state_dict()["0.weight"], 0.9 * w0 + 0.1 * (w0 + 1.0))
    ema.update(net)
    torch.testing.assert_close(ema.state_dict()["0.weight"], 0.9 * (w0 + 0.1) + 0.1 * (w0 + 1.0))


def test_should_copy_integer_buffers_when_updated():
    net = _net()
    ema = EMA(net, momentum=0.5)
    net.train()
    net(torch.randn(8, 3))
    net(torch.randn(8, 3))
    ema.update(net)
    assert ema.state_dict()["1.num_batches_tracked"].item() == 2
    assert ema.state_dict()["1.running_mean"].dtype == torch.float32


def test_should_round_trip_and_load_into_a_model_when_saved():
    net = _net()
    ema = EMA(net, momentum=0.2)
    with torch.no_grad():
        net[0].weight.mul_(3)
    ema.update(net)
    other = EMA(_net(), momentum=0.2)
    other.load_state_dict({k: v.clone() for k, v in ema.state_dict().items()})
    target = _net()
    target.load_state_dict(other.state_dict())
    torch.testing.assert_close(target[0].weight, ema.state_dict()["0.weight"])
    with pytest.raises(KeyError):
        other.load_state_dict({"nope": torch.zeros(1)})


@pytest.mark.parametrize("m", [0.0, 1.0, -0.1])
def test_should_refuse_a_momentum_outside_0_1(m):
    with pytest.raises(ValueError):
        EMA(_net(), m)
