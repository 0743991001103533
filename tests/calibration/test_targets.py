"""Target kinds declare how their input is observed; the observer dispatches on it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from mergekit_aim.calibration.observer import ChannelStatistics
from mergekit_aim.calibration.targets import (
    FIRST_INPUT,
    HOOK_STRATEGIES,
    find_targets,
    target_kinds,
)
from mergekit_aim.errors import CalibrationError
from mergekit_aim.importance import STATISTIC


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 3)

    def forward(self, x):
        return self.proj(self.norm(x))


def test_every_kind_declares_a_known_strategy():
    kinds = target_kinds()
    assert {kind.name for kind in kinds} == {
        "linear",
        "conv1d",
        "router",
        "experts",
        "norm",
    }
    assert all(kind.hook in HOOK_STRATEGIES for kind in kinds)
    targets, _ = find_targets(_Tiny())
    assert [(t.tensor_name, t.hook) for t in targets] == [
        ("norm.weight", FIRST_INPUT),
        ("proj.weight", FIRST_INPUT),
    ]


def test_first_input_strategy_sums_abs_input_per_channel():
    model = _Tiny()
    targets, _ = find_targets(model)
    x = torch.randn(2, 5, 4)
    with ChannelStatistics(model, targets) as stats, torch.no_grad():
        model(x)
    assert stats.statistic == STATISTIC
    torch.testing.assert_close(stats.sums[0], x.abs().sum((0, 1)))
    assert stats.rows == [10, 10]


def test_unknown_strategy_is_refused_and_leaves_no_hook():
    model = _Tiny()
    targets, _ = find_targets(model)
    targets[1] = dataclasses.replace(targets[1], hook="experts")
    with pytest.raises(CalibrationError, match="proj: no observer for hook .*experts"):
        with ChannelStatistics(model, targets):
            pass
    assert not model.norm._forward_pre_hooks and not model.proj._forward_pre_hooks
