"""The AIM wrapper method: exactness against the formula, for every base-aware
mergekit method, through merge_state_dicts and merge_tensors."""

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
    merge_tensors,
)

from mergekit_aim.errors import AimConfigError, ImportanceError
from mergekit_aim.importance import ImportanceMap
from mergekit_aim.method import AimMergeMethod, aim_method

METHODS = [
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "sce",
    "linear",
    "slerp",
    "nuslerp",
    "multislerp",
    "model_stock",
    "karcher",
    "nearswap",
    "arcee_fusion",
    "ram",
    "ramplus_tl",
]
# Methods that take exactly one model besides the base.
PAIRWISE = {"slerp", "nearswap", "arcee_fusion"}
GENERIC = {"weight": 1.0, "t": 0.4, "density": 0.7}


def _state_dicts(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = {
        "linear.weight": torch.randn(6, 5, generator=generator),
        "conv.weight": torch.randn(5, 6, generator=generator),
        "norm.weight": torch.rand(5, generator=generator) + 0.5,
        "linear.bias": torch.randn(6, generator=generator),
        "embed.weight": torch.randn(7, 5, generator=generator),
    }
    models = [base]
    for _ in range(count - 1):
        models.append(
            {
                k: v + 0.3 * torch.randn(v.shape, generator=generator)
                for k, v in base.items()
            }
        )
    return models


def _importance():
    generator = torch.Generator().manual_seed(1)
    sums = {
        "linear.weight": torch.rand(5, generator=generator) * 10,
        "conv.weight": torch.rand(5, generator=generator) * 10,
        "norm.weight": torch.rand(5, generator=generator) * 10,
    }
    axes = {"linear.weight": -1, "conv.weight": 0, "norm.weight": 0}
    return ImportanceMap(sums, {k: 100 for k in sums}, axes)


def _parameters(method):
    return {
        p.name: GENERIC[p.name] for p in method.spec.parameters if p.name in GENERIC
    }


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("omega", [0.0, 0.4, 1.0])
def test_aim_equals_formula_on_plain_merge(name, omega):
    inner = merge_methods.get(name)
    count = 2 if name in PAIRWISE else 3
    models = _state_dicts(count)
    params = _parameters(inner)
    importance = _importance()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        plain = merge_state_dicts(models, inner, base=0, parameters=params)
        torch.manual_seed(7)
        relaxed = merge_state_dicts(
            models,
            aim_method(name),
            base=0,
            parameters={**params, "omega": omega, "importance": importance},
        )
    for key in plain:
        if key in importance:
            expected = aim_expected(
                models[0][key],
                plain[key],
                importance[key],
                omega,
                importance.input_axis(key),
            )
            torch.testing.assert_close(relaxed[key], expected, rtol=1e-5, atol=1e-5)
        else:  # biases and embeddings keep the merged value
            torch.testing.assert_close(relaxed[key], plain[key])
    if omega == 0.0:
        # The most used channel goes fully back to the base.
        top = importance["linear.weight"].argmax()
        torch.testing.assert_close(
            relaxed["linear.weight"][:, top], models[0]["linear.weight"][:, top]
        )


def test_inputs_are_not_modified():
    models = _state_dicts(3)
    copies = [{k: v.clone() for k, v in m.items()} for m in models]
    merge_state_dicts(
        models,
        aim_method("ties"),
        base=0,
        parameters={"weight": 1.0, "density": 0.5, "importance": _importance()},
    )
    for model, copy in zip(models, copies):
        for key in model:
            torch.testing.assert_close(model[key], copy[key])


def test_output_dtype_follows_the_merge():
    models = [{k: v.to(torch.bfloat16) for k, v in m.items()} for m in _state_dicts(3)]
    result = merge_state_dicts(
        models,
        aim_method("task_arithmetic"),
        base=0,
        parameters={"weight": 0.5, "importance": _importance(), "omega": 0.3},
    )
    assert result["linear.weight"].dtype == torch.bfloat16
    merged = merge_state_dicts(
        models,
        "task_arithmetic",
        base=0,
        parameters={"weight": 0.5},
        out_dtype=torch.float32,
    )
    result32 = merge_state_dicts(
        models,
        aim_method("task_arithmetic"),
        base=0,
        parameters={"weight": 0.5, "importance": _importance(), "omega": 0.3},
        out_dtype=torch.float32,
    )
    assert result32["linear.weight"].dtype == merged["linear.weight"].dtype


def test_merge_tensors_with_key_and_strided_input():
    generator = torch.Generator().manual_seed(3)
    tensors = [torch.randn(5, 6, generator=generator).T for _ in range(3)]
    importance = _importance()
    plain = merge_tensors(
        tensors, "task_arithmetic", base_index=0, parameters={"weight": 1.0}
    )
    relaxed = merge_tensors(
        tensors,
        aim_method("task_arithmetic"),
        base_index=0,
        name="anything",
        parameters={
            "weight": 1.0,
            "importance": importance,
            "importance_key": "linear.weight",
        },
    )
    expected = aim_expected(tensors[0], plain, importance["linear.weight"], 0.4, -1)
    torch.testing.assert_close(relaxed, expected, rtol=1e-5, atol=1e-5)


def test_artifact_path_is_accepted(tmp_path):
    importance = _importance()
    path = str(importance.save(tmp_path / "imp.safetensors"))
    models = _state_dicts(3)
    params = {"weight": 1.0, "omega": 0.2}
    by_object = merge_state_dicts(
        models,
        aim_method("linear"),
        base=0,
        parameters={**params, "importance": importance},
    )
    by_path = merge_state_dicts(
        models, aim_method("linear"), base=0, parameters={**params, "importance": path}
    )
    for key in by_object:
        torch.testing.assert_close(by_object[key], by_path[key])


def test_wrapper_is_registered_once_by_name():
    wrapper = aim_method("ties")
    assert isinstance(wrapper, AimMergeMethod)
    assert merge_methods.get("aim_ties") is wrapper
    assert aim_method("ties") is wrapper
    assert aim_method("aim_ties") is wrapper
    assert wrapper.spec.contract.base == BasePolicy.REQUIRED
    assert {"omega", "importance", "importance_key"} <= {
        p.name for p in wrapper.spec.parameters
    }


def test_wraps_methods_registered_later(monkeypatch):
    from mergekit.merge_methods import registry

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))

    @merge_method(name="halfway", contract=InputContract(base=BasePolicy.REQUIRED))
    def halfway(group: TensorGroup) -> torch.Tensor:
        other = group.non_base[0].tensor
        return (group.base.tensor + other) / 2

    merge_methods.register(halfway)
    wrapper = aim_method("halfway")
    assert merge_methods.get("aim_halfway") is wrapper
    models = _state_dicts(2)
    importance = _importance()
    out = merge_state_dicts(
        models, "aim_halfway", base=0, parameters={"importance": importance}
    )
    plain = (models[0]["linear.weight"] + models[1]["linear.weight"]) / 2
    expected = aim_expected(
        models[0]["linear.weight"], plain, importance["linear.weight"], 0.4, -1
    )
    torch.testing.assert_close(out["linear.weight"], expected, rtol=1e-5, atol=1e-5)


def test_refuses_methods_without_a_base(monkeypatch):
    @merge_method(name="no_base", contract=InputContract(base=BasePolicy.FORBIDDEN))
    def no_base(group: TensorGroup) -> torch.Tensor:
        return group.tensors[0]

    with pytest.raises(AimConfigError, match="does not take a base model"):
        aim_method(no_base, register=False)


def test_refuses_parameter_clash():
    @merge_method(name="clash", contract=InputContract(base=BasePolicy.REQUIRED))
    def clash(group: TensorGroup, omega: float = 1.0) -> torch.Tensor:
        return group.tensors[0]

    with pytest.raises(AimConfigError, match="clash"):
        aim_method(clash, register=False)


def test_missing_importance_is_an_error():
    with pytest.raises(AimConfigError, match="needs importance="):
        merge_state_dicts(
            _state_dicts(3), aim_method("ties"), base=0, parameters={"weight": 1.0}
        )


def test_wrong_length_names_the_tensor():
    importance = ImportanceMap(
        {"linear.weight": torch.ones(4)}, {"linear.weight": 1}, {"linear.weight": -1}
    )
    with pytest.raises(ImportanceError, match="linear.weight.*4 channels"):
        merge_state_dicts(
            _state_dicts(3),
            aim_method("ties"),
            base=0,
            parameters={"weight": 1.0, "importance": importance},
        )


@pytest.mark.parametrize("omega", [-0.1, 1.1])
def test_omega_out_of_range(omega):
    with pytest.raises(Exception, match="within \\[0, 1\\]"):
        merge_state_dicts(
            _state_dicts(3),
            aim_method("ties"),
            base=0,
            parameters={"weight": 1.0, "importance": _importance(), "omega": omega},
        )


def test_base_is_required():
    with pytest.raises(ValueError, match="requires a base input"):
        merge_state_dicts(
            _state_dicts(3),
            aim_method("linear"),
            parameters={"weight": 1.0, "importance": _importance()},
        )
