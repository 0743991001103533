"""relaxation.py, the one relaxation core: the decision table, the one
mismatch refusal (on every path), and stacks of experts through ``apply_aim``
on a transformers 5 state dict (experts fused into 3-D parameters)."""

import logging

import pytest
import torch
from fixtures.architectures import MOE_EXPERTS, MOE_LAYOUTS, init_moe
from fixtures.reference import aim_expected, aim_factors
from mergekit.merge_methods import merge_state_dicts

from mergekit_aim.errors import ImportanceError, ShapeMismatchError
from mergekit_aim.importance import ImportanceMap
from mergekit_aim.method import aim_method
from mergekit_aim.offline import apply_aim, relax
from mergekit_aim.relaxation import (
    Part,
    Relaxation,
    Statistic,
    check_statistic_shape,
    input_factor,
    keyed_statistic,
    parts,
    relax_tensor,
)
from mergekit_aim.selection import (
    EXCLUDED,
    NO_OMEGA,
    NO_STATISTIC,
    OMEGA_ONE,
    RELAXED,
    Selection,
)

SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": ((6, 5), -1),  # Linear [out, in]
    "transformer.h.0.attn.c_attn.weight": ((5, 6), 0),  # GPT-2 Conv1D [in, out]
    "model.layers.0.input_layernorm.weight": ((5,), 0),  # a norm: elementwise
    "model.layers.0.mlp.experts.0.down_proj.weight": ((5, 3), -1),
    "model.layers.0.mlp.experts.2.down_proj.weight": ((5, 3), -1),
}
STACK = "model.layers.0.mlp.experts.down_proj"
STACK_KEYS = (
    "model.layers.0.mlp.experts.0.down_proj.weight",
    None,
    "model.layers.0.mlp.experts.2.down_proj.weight",
)


def _artifact(seed=0):
    gen = torch.Generator().manual_seed(seed)
    sums = {
        n: torch.rand(shape[axis], generator=gen) + 0.1
        for n, (shape, axis) in SHAPES.items()
    }
    return ImportanceMap(
        sums, {n: 4 for n in SHAPES}, {n: axis for n, (_, axis) in SHAPES.items()}
    )


def _statistic(name, shape, key):
    return keyed_statistic(name, torch.empty(shape), key)


# --- the decision table -------------------------------------------------------------

LINEAR, CONV1D, NORM = list(SHAPES)[:3]


@pytest.mark.parametrize(
    "name, shape, key, omega, exclude, reason, expected_parts",
    [
        (LINEAR, (6, 5), LINEAR, 0.4, (), RELAXED, [Part(LINEAR, -1)]),
        (CONV1D, (5, 6), CONV1D, 0.4, (), RELAXED, [Part(CONV1D, 0)]),
        (NORM, (5,), NORM, 0.4, (), RELAXED, [Part(NORM, 0)]),
        (
            STACK,
            (3, 5, 3),
            STACK_KEYS,
            0.4,
            (),
            RELAXED,
            [Part(STACK_KEYS[0], 1, 0), Part(STACK_KEYS[2], 1, 2)],
        ),
        (LINEAR, (6, 5), LINEAR, 0.4, ["q_proj"], EXCLUDED, None),
        # a pattern on one expert's checkpoint name leaves the whole stack alone
        (STACK, (3, 5, 3), STACK_KEYS, 0.4, [r"experts\.2\."], EXCLUDED, None),
        (LINEAR, (6, 5), None, 0.4, (), NO_STATISTIC, []),
        (STACK, (3, 5, 3), (None, None, None), 0.4, (), NO_STATISTIC, []),
        (LINEAR, (6, 5), LINEAR, 1.0, (), OMEGA_ONE, None),
        (LINEAR, (6, 5), LINEAR, [{"filter": "mlp", "value": 0.2}], (), NO_OMEGA, None),
    ],
)
def test_decision_table(name, shape, key, omega, exclude, reason, expected_parts):
    imap = _artifact()
    relaxation = Relaxation(Selection(omega, exclude), imap)
    decision = relaxation.decide(name, _statistic(name, shape, key))
    assert decision.reason == reason
    assert relaxation.coverage.summary()["tensors"] == 1
    if expected_parts is not None:
        assert parts(name, shape, imap, key) == expected_parts


@pytest.mark.parametrize("name", [LINEAR, CONV1D, NORM, STACK])
def test_every_kind_relaxes_as_the_formula(name):
    imap = _artifact()
    gen = torch.Generator().manual_seed(1)
    key = STACK_KEYS if name == STACK else name
    shape = (3, 5, 3) if name == STACK else SHAPES[name][0]
    base = torch.randn(shape, generator=gen)
    merged = base + torch.randn(shape, generator=gen)
    before = merged.clone()
    out = relax_tensor(name, base, merged, imap, key, 0.3)
    assert torch.equal(merged, before)  # inputs are never written
    if name != STACK:
        axis = imap.input_axis(name)
        torch.testing.assert_close(
            out, aim_expected(base, merged, imap[name], 0.3, axis)
        )
        return
    for expert, member in enumerate(STACK_KEYS):
        if member is None:
            assert torch.equal(out[expert], merged[expert])
        else:
            want = aim_expected(base[expert], merged[expert], imap[member], 0.3, -1)
            torch.testing.assert_close(out[expert], want)
    in_place = merged.clone()
    assert relax_tensor(name, base, in_place, imap, key, 0.3, in_place=True) is in_place
    assert torch.equal(in_place, out)


def test_an_adapter_takes_the_factor_alone():
    """lora_A [r, in]: its input columns scale by the factor (axis −1)."""
    imap = _artifact()
    factor = input_factor("lora_A", imap, LINEAR, 0.25, channels=5)
    torch.testing.assert_close(
        factor, aim_factors(imap[LINEAR], 0.25).to(torch.float32)
    )
    with pytest.raises(ShapeMismatchError, match=r"tensor lora_A: .* 5 channels"):
        input_factor("lora_A", imap, LINEAR, 0.25, channels=7)


# --- the one mismatch refusal ----------------------------------------------------


@pytest.mark.parametrize(
    "name, base_shape, merged_shape, key, match",
    [
        (
            LINEAR,
            (6, 4),
            (6, 4),
            LINEAR,
            r"tensor .*q_proj\.weight: .*5 channels.*expected 5",
        ),
        (LINEAR, (6, 5), (6, 6), LINEAR, r"merged shape \(6, 6\).*expected .*\(6, 5\)"),
        (
            STACK,
            (2, 5, 3),
            (2, 5, 3),
            STACK_KEYS,
            r"down_proj: 3 experts.*expected a stack of 3",
        ),
        (
            STACK,
            (3, 5, 4),
            (3, 5, 4),
            STACK_KEYS,
            r"down_proj\[0\]: .*3 channels.*expected 3",
        ),
    ],
)
def test_mismatch_names_the_tensor_and_what_was_expected(
    name, base_shape, merged_shape, key, match
):
    imap = _artifact()
    with pytest.raises(ShapeMismatchError, match=match):
        relax_tensor(
            name, torch.zeros(base_shape), torch.ones(merged_shape), imap, key, 0.4
        )


def test_headers_are_checked_with_the_same_refusal():
    stack = Statistic(
        STACK, ("a", "b", "c"), 45, 3, experts=STACK_KEYS, expert_elements=(15,) * 3
    )
    check_statistic_shape(stack, (3, 5, 3), {}.get)
    with pytest.raises(ShapeMismatchError, match=rf"{STACK}: .*expected 45 elements"):
        check_statistic_shape(stack, (3, 5, 4), {}.get)
    with pytest.raises(ShapeMismatchError, match=r"expected a stack of 3 experts"):
        check_statistic_shape(stack, (5, 3, 3), {}.get)
    renamed = Statistic("model.lm_head.weight", ("lm_head.weight",), 30, 2)
    with pytest.raises(ShapeMismatchError, match=r"expected the base's shape \(6, 5\)"):
        check_statistic_shape(renamed, (5, 6), {"lm_head.weight": (6, 5)}.get)


def test_every_path_refuses_with_the_core_error():
    imap = _artifact()
    base = {LINEAR: torch.zeros(6, 4)}
    merged = {LINEAR: torch.ones(6, 4)}
    with pytest.raises(ShapeMismatchError, match="q_proj"):
        apply_aim(base, merged, imap, 0.4)
    with pytest.raises(ShapeMismatchError, match="weight"):
        relax(base[LINEAR], merged[LINEAR], imap[LINEAR], 0.4)
    models = [base, merged, {LINEAR: torch.full((6, 4), 2.0)}]
    with pytest.raises(ShapeMismatchError, match="q_proj"):
        merge_state_dicts(
            models,
            aim_method("task_arithmetic"),
            base=0,
            parameters={"weight": 1.0, "importance": imap},
        )


# --- stacks of experts in a transformers 5 state dict -----------------------------


def _moe_artifact(family, model, left_out=(1, 2)):
    """Statistics keyed by checkpoint names (experts one by one, the renamed
    router), as calibration writes them; expert ``left_out`` has none."""
    gate, up, down, router = MOE_LAYOUTS[family]
    config = model.config
    hidden = config.hidden_size
    inner = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    gen = torch.Generator().manual_seed(3)
    sums, axes = {}, {}
    for name, tensor in model.state_dict().items():
        if "experts" in name or name.endswith(".mlp.gate.weight") or "embed" in name:
            continue
        if name.endswith(".bias"):
            continue
        sums[name] = torch.rand(tensor.shape[-1], generator=gen) + 0.1
        axes[name] = -1 if tensor.ndim == 2 else 0
    for layer in range(config.num_hidden_layers):
        sums[router.format(L=layer)] = torch.rand(hidden, generator=gen) + 0.1
        axes[router.format(L=layer)] = -1
        for expert in range(MOE_EXPERTS):
            if (layer, expert) == left_out:
                continue
            shared = torch.rand(hidden, generator=gen) + 0.1
            for pattern, vector in (
                (gate, shared),
                (up, shared.clone()),
                (down, torch.rand(inner, generator=gen) + 0.1),
            ):
                sums[pattern.format(L=layer, e=expert)] = vector
                axes[pattern.format(L=layer, e=expert)] = -1
    return ImportanceMap(sums, {n: 10 for n in sums}, axes)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_apply_aim_relaxes_each_expert_slice_of_a_fused_state_dict(family, caplog):
    model = init_moe(family, 64)
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(5)
    merged_sd = {
        k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base_sd.items()
    }
    imap = _moe_artifact(family, model)
    gate, _, down, router = MOE_LAYOUTS[family]

    with caplog.at_level(logging.WARNING, logger="mergekit_aim.offline"):
        out = apply_aim(base_sd, merged_sd, imap, 0.4, model=model)
    checked = 0
    for layer in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp."
        for fused, pattern in (
            ("experts.gate_up_proj", gate),
            ("experts.down_proj", down),
        ):
            name = prefix + fused
            for expert in range(MOE_EXPERTS):
                got, was = out[name][expert], merged_sd[name][expert]
                key = pattern.format(L=layer, e=expert)
                if key not in imap:
                    assert (layer, expert) == (1, 2)
                    assert torch.equal(got, was)
                    continue
                want = aim_expected(base_sd[name][expert], was, imap[key], 0.4, -1)
                torch.testing.assert_close(got, want)
                checked += 1
        gate_name = prefix + "gate.weight"
        want = aim_expected(
            base_sd[gate_name], merged_sd[gate_name], imap[router.format(L=layer)], 0.4
        )
        torch.testing.assert_close(out[gate_name], want)
    assert checked == 2 * 2 * MOE_EXPERTS - 2
    # The left-out expert is named, not silently kept.
    assert "model.layers.1.mlp.experts.gate_up_proj[2]" in caplog.text
    assert torch.equal(
        out["model.embed_tokens.weight"], merged_sd["model.embed_tokens.weight"]
    )


def test_apply_aim_refuses_a_stack_it_cannot_map():
    model = init_moe("mixtral", 64)
    base_sd = {k: v.detach() for k, v in model.state_dict().items()}
    merged_sd = {k: v + 1 for k, v in base_sd.items()}
    imap = _moe_artifact("mixtral", model)
    with pytest.raises(
        ImportanceError, match=r"tensor model\.layers\.0\.mlp\.experts\.\w+_proj: "
    ):
        apply_aim(base_sd, merged_sd, imap, 0.4)
    # Excluded stacks are the user's choice: kept as merged.
    out = apply_aim(base_sd, merged_sd, imap, 0.4, exclude=[r"\.experts\."])
    name = "model.layers.0.mlp.experts.down_proj"
    assert torch.equal(out[name], merged_sd[name])
