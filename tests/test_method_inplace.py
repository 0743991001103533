"""The wrapper relaxes its inner method's fresh result in place, and never
writes a tensor the inner method returned from its inputs."""

import pytest
import torch
from fixtures.reference import aim_expected
from mergekit import merge_methods
from mergekit.merge_methods import (
    BasePolicy,
    InputContract,
    TensorGroup,
    merge_method,
    merge_state_dicts,
    registry,
)
from test_method import _importance, _state_dicts

import mergekit_aim.kernels as kernels
from mergekit_aim.method import aim_method


@pytest.fixture
def relax_calls(monkeypatch):
    calls = {"in_place": 0, "new": 0}
    in_place, new = kernels.aim_relax_, kernels.aim_relax

    def counting_in_place(*args, **kwargs):
        calls["in_place"] += 1
        return in_place(*args, **kwargs)

    def counting_new(*args, **kwargs):
        calls["new"] += 1
        return new(*args, **kwargs)

    monkeypatch.setattr(kernels, "aim_relax_", counting_in_place)
    monkeypatch.setattr(kernels, "aim_relax", counting_new)
    return calls


def _register(monkeypatch, name, body):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    method = merge_method(name=name, contract=InputContract(base=BasePolicy.REQUIRED))(
        body
    )
    merge_methods.register(method)
    return aim_method(name)


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("returns_base", lambda group: group.base.tensor),
        (
            "returns_view",
            lambda group: (
                group.non_base[0].tensor.view(-1).view_as(group.non_base[0].tensor)
            ),
        ),
        (
            "returns_slice",
            lambda group: torch.cat([group.base.tensor, group.non_base[0].tensor])[
                : group.base.tensor.shape[0]
            ],
        ),
    ],
)
def test_inputs_returned_by_the_inner_method_are_not_written(
    monkeypatch, relax_calls, name, body
):
    def method(group: TensorGroup) -> torch.Tensor:
        return body(group)

    method.__name__ = name
    wrapper = _register(monkeypatch, name, method)
    models = _state_dicts(2)
    before = [{k: v.clone() for k, v in m.items()} for m in models]
    importance = _importance()
    plain = merge_state_dicts(models, name, base=0)
    out = merge_state_dicts(
        models, wrapper, base=0, parameters={"importance": importance, "omega": 0.2}
    )
    for model, saved in zip(models, before):
        for key in model:
            assert torch.equal(model[key], saved[key]), key
    assert relax_calls == {"in_place": 0, "new": len(importance)}
    expected = aim_expected(
        models[0]["linear.weight"],
        plain["linear.weight"],
        importance["linear.weight"],
        0.2,
        -1,
    )
    torch.testing.assert_close(out["linear.weight"], expected, rtol=1e-5, atol=1e-6)


def test_fresh_results_are_relaxed_in_place(relax_calls):
    models = _state_dicts(3)
    importance = _importance()
    plain = merge_state_dicts(
        models, "task_arithmetic", base=0, parameters={"weight": 1.0}
    )
    out = merge_state_dicts(
        models,
        aim_method("task_arithmetic"),
        base=0,
        parameters={"weight": 1.0, "importance": importance, "omega": 0.4},
    )
    assert relax_calls["in_place"] == len(importance)
    assert relax_calls["new"] == 0
    for key in importance:
        expected = aim_expected(
            models[0][key], plain[key], importance[key], 0.4, importance.input_axis(key)
        )
        torch.testing.assert_close(out[key], expected, rtol=1e-5, atol=1e-6)
