"""Mixture-of-experts calibration: routers, stacked experts, shared experts.

Tiny random Mixtral, Qwen2-MoE (with a shared expert) and Qwen3-MoE are saved
the way transformers saves them (one tensor per expert: ``…experts.E.w1``, or
``…experts.E.gate_proj``) and calibrated. The reference never uses our hooks,
kernels or name mapping: one plain forward pass records each router's top-k
indices and each MoE block's input, and the per-expert statistics are
recomputed from the checkpoint's own per-expert tensors, read with safetensors.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures.architectures import MOE_EXPERTS, MOE_FAMILIES, MOE_LAYOUTS, init_moe
from safetensors.torch import load_file

from mergekit_aim.calibration.forward import collect_importance
from mergekit_aim.calibration.loading import load_base_model
from mergekit_aim.calibration.targets import EXPERTS_LAYOUT, NO_TOKENS, find_targets
from mergekit_aim.demo.models import save_checkpoint


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory, tiny_tokenizer):
    """``moe_checkpoint(family) -> Path`` of a saved tiny MoE with the tokenizer."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            model = init_moe(family, len(tiny_tokenizer), seed=0)
            root = tmp_path_factory.mktemp(f"tiny-{family}")
            built[family] = save_checkpoint(model.eval(), tiny_tokenizer, root)
        return built[family]

    return get


def _blocks(vocab, count=6, length=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=generator)


def _abs_sum(x):
    return x.double().abs().reshape(-1, x.shape[-1]).sum(0)


def _routers(model):
    return {
        name: module
        for name, module in model.named_modules()
        if type(module).__name__.endswith("TopKRouter")
    }


def _drop_expert(router, dropped):
    """A forward hook that routes no token of ``router`` to expert ``dropped``:
    its top-k slots go to the first expert the token does not use yet."""

    def hook(module, args, output):
        logits, scores, indices = output
        indices = indices.clone()
        for row in (indices == dropped).any(-1).nonzero().flatten().tolist():
            used = set(indices[row].tolist())
            spare = next(e for e in range(MOE_EXPERTS) if e not in used)
            indices[row][indices[row] == dropped] = spare
        return logits, scores, indices

    return router.register_forward_hook(hook)


def _reference(model, blocks):
    """Per MoE layer: its input rows [T, H] and the routers' top-k [T, k]."""
    inputs, routes, handles = {}, {}, []
    for name, router in _routers(model).items():
        layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
        block = model.get_submodule(name.rsplit(".", 1)[0])
        handles.append(
            block.register_forward_pre_hook(
                lambda m, args, layer=layer: inputs.__setitem__(
                    layer, args[0].reshape(-1, args[0].shape[-1])
                )
            )
        )
        handles.append(
            router.register_forward_hook(
                lambda m, args, out, layer=layer: routes.__setitem__(layer, out[2])
            )
        )
    try:
        with torch.no_grad():
            model(input_ids=blocks, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, routes


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def measured(request, moe_checkpoint):
    """A family's checkpoint, model, tensors, blocks, the map and the reference,
    with layer 0's router never choosing expert 3 (so it gets no token)."""
    family = request.param
    path = moe_checkpoint(family)
    model = load_base_model(str(path), device="cpu", dtype="float32")
    tensors = load_file(str(path / "model.safetensors"))
    blocks = _blocks(model.config.vocab_size)
    handle = _drop_expert(_routers(model)["model.layers.0.mlp.gate"], 3)
    try:
        imap = collect_importance(
            model, blocks, batch_size=4, checkpoint_names=set(tensors)
        )
        inputs, routes = _reference(model, blocks)
    finally:
        handle.remove()
    return family, model, tensors, blocks, imap, inputs, routes


def test_experts_match_an_independent_computation(measured):
    family, model, tensors, blocks, imap, inputs, routes = measured
    gate_name, up_name, down_name, _ = MOE_LAYOUTS[family]
    checked = 0
    for layer, x in inputs.items():
        for expert in range(MOE_EXPERTS):
            rows = (routes[layer] == expert).any(-1)
            names = [
                n.format(L=layer, e=expert) for n in (gate_name, up_name, down_name)
            ]
            if not rows.any():
                continue
            x_e = x[rows].double()
            w_gate, w_up, w_down = (tensors[n].double() for n in names)
            inner = F.silu(x_e @ w_gate.T) * (x_e @ w_up.T)
            assert inner.shape[-1] == w_down.shape[-1]
            expected = (_abs_sum(x_e), _abs_sum(x_e), _abs_sum(inner))
            for name, expect in zip(names, expected):
                torch.testing.assert_close(
                    imap[name].double(), expect, rtol=1e-4, atol=1e-4
                )
                assert imap.count(name) == int(rows.sum())
                assert imap.input_axis(name) == -1
            checked += 1
    # Most experts got tokens; one was starved on purpose.
    assert checked >= 2 * MOE_EXPERTS - 2


def test_gate_and_up_projections_carry_the_same_statistic(measured):
    family, _, tensors, _, imap, _, _ = measured
    gate_name, up_name, _, _ = MOE_LAYOUTS[family]
    for layer in range(2):
        for expert in range(MOE_EXPERTS):
            gate = gate_name.format(L=layer, e=expert)
            up = up_name.format(L=layer, e=expert)
            if gate in imap:
                torch.testing.assert_close(imap[gate], imap[up], rtol=0, atol=0)
                assert imap.count(gate) == imap.count(up)
                # Separate tensors: the artifact saves with safetensors.
                assert imap[gate].data_ptr() != imap[up].data_ptr()


def test_routers_and_shared_experts_see_every_token(measured):
    family, _, tensors, blocks, imap, inputs, _ = measured
    router_name = MOE_LAYOUTS[family][3]
    for layer, x in inputs.items():
        everything = {router_name.format(L=layer)}
        if family == "qwen2_moe":
            prefix = f"model.layers.{layer}.mlp."
            everything |= {
                prefix + "shared_expert_gate.weight",
                prefix + "shared_expert.gate_proj.weight",
                prefix + "shared_expert.up_proj.weight",
            }
            assert prefix + "shared_expert.down_proj.weight" in imap
        for name in everything:
            assert name in tensors
            torch.testing.assert_close(
                imap[name].double(), _abs_sum(x), rtol=1e-4, atol=1e-4
            )
            assert imap.count(name) == blocks.numel()


def test_an_expert_without_tokens_is_named_in_skipped(measured):
    family, _, tensors, _, imap, _, routes = measured
    assert not (routes[0] == 3).any()
    starved = {n.format(L=0, e=3) for n in MOE_LAYOUTS[family][:3]}
    skipped = imap.provenance["skipped"]
    assert {name: skipped.get(name) for name in starved} == dict.fromkeys(
        starved, NO_TOKENS
    )
    assert not starved & set(imap)


def test_calibrate_covers_every_checkpoint_weight(moe_checkpoint, tiny_text_file):
    from mergekit_aim import calibrate

    for family in MOE_FAMILIES:
        path = moe_checkpoint(family)
        imap = calibrate(
            str(path),
            dataset=str(tiny_text_file),
            num_samples=16,
            seq_len=32,
            batch_size=4,
            quiet=True,
        )
        tensors = load_file(str(path / "model.safetensors"))
        skipped = imap.provenance["skipped"]
        assert set(skipped.values()) <= {NO_TOKENS}
        for name in tensors:
            if name.endswith(".bias") or "embed_tokens" in name:
                assert name not in imap
                continue
            assert name in imap or skipped.get(name) == NO_TOKENS, (family, name)
            if name in imap:
                assert imap[name].shape == (tensors[name].shape[-1],)


class _TransposedExperts(torch.nn.Module):
    """Stacked experts in a layout the hook does not compute (transposed)."""

    has_gate, has_bias, is_transposed, is_concatenated = True, False, True, True

    def __init__(self):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.zeros(2, 4, 6))
        self.down_proj = torch.nn.Parameter(torch.zeros(2, 3, 4))


def test_an_unsupported_experts_layout_is_reported_not_measured():
    model = torch.nn.Module()
    model.experts = _TransposedExperts()
    targets, skipped = find_targets(model)
    assert targets == []
    assert skipped == {
        "experts.gate_up_proj": EXPERTS_LAYOUT,
        "experts.down_proj": EXPERTS_LAYOUT,
    }


def test_offloaded_experts_measure_the_same(moe_checkpoint):
    # Under max_memory accelerate keeps offloaded experts on the meta device
    # until their own forward: the hook reads the values it would load.
    path = str(moe_checkpoint("qwen2_moe"))
    names = set(load_file(f"{path}/model.safetensors"))
    resident = load_base_model(path, device="cpu", dtype="float32")
    blocks = _blocks(resident.config.vocab_size, count=4)
    offloaded = load_base_model(path, device="cpu", dtype="float32", max_memory="64KB")
    experts = offloaded.get_submodule("model.layers.1.mlp.experts")
    assert experts.gate_up_proj.device.type == "meta"
    expect = collect_importance(resident, blocks, batch_size=2, checkpoint_names=names)
    got = collect_importance(offloaded, blocks, batch_size=2, checkpoint_names=names)
    assert set(got) == set(expect)
    for name in expect:
        torch.testing.assert_close(got[name], expect[name], rtol=1e-5, atol=1e-5)
        assert got.count(name) == expect.count(name)


def test_routed_experts_hook_takes_positional_or_keyword_arguments(moe_checkpoint):
    from mergekit_aim.calibration.observer import ChannelStatistics

    path = moe_checkpoint("mixtral")
    model = load_base_model(str(path), device="cpu", dtype="float32")
    tensors = load_file(str(path / "model.safetensors"))
    targets, _ = find_targets(model, set(tensors))
    experts = model.get_submodule("model.layers.1.mlp.experts")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(7, 32, generator=generator)
    index = torch.tensor([[0, 2], [2, 0], [1, 2], [2, 1], [0, 1], [1, 0], [2, 0]])
    weights = torch.full((7, 2), 0.5)
    with ChannelStatistics(model, targets) as stats, torch.no_grad():
        experts(x, index, weights)
        experts(x, top_k_index=index, top_k_weights=weights)
        experts(hidden_states=x, top_k_index=index, top_k_weights=weights)
    by_name = dict(zip((t.tensor_name for t in targets), zip(stats.sums, stats.rows)))
    prefix = "model.layers.1.block_sparse_moe.experts"
    for expert in range(MOE_EXPERTS):
        rows = (index == expert).any(-1)
        gate = f"{prefix}.{expert}.w1.weight"
        total, count = by_name[gate]
        assert count == 3 * int(rows.sum())
        if not rows.any():
            assert total is None
            continue
        torch.testing.assert_close(
            total.double(), 3 * _abs_sum(x[rows]), rtol=1e-5, atol=1e-5
        )
        w1, w3 = tensors[gate], tensors[f"{prefix}.{expert}.w3.weight"]
        inner = F.silu(x[rows] @ w1.T) * (x[rows] @ w3.T)
        total, count = by_name[f"{prefix}.{expert}.w2.weight"]
        torch.testing.assert_close(
            total.double(), 3 * _abs_sum(inner), rtol=1e-5, atol=1e-5
        )


@pytest.mark.gpu
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_experts_on_cuda_measure_as_on_the_cpu(moe_checkpoint, cuda_device, family):
    # On CUDA every Σ|x| (routed rows, intermediate activations) goes through
    # the Triton kernel; the statistics and counts must match the CPU run.
    path = str(moe_checkpoint(family))
    names = set(load_file(f"{path}/model.safetensors"))
    cpu = load_base_model(path, device="cpu", dtype="float32")
    gpu = load_base_model(path, device=str(cuda_device), dtype="float32")
    blocks = _blocks(cpu.config.vocab_size, count=8, length=32)
    expect = collect_importance(cpu, blocks, batch_size=4, checkpoint_names=names)
    got = collect_importance(gpu, blocks, batch_size=4, checkpoint_names=names)
    assert set(got) == set(expect) and any(".experts." in n for n in got)
    for name in expect:
        assert got.count(name) == expect.count(name), name
        torch.testing.assert_close(got[name], expect[name], rtol=2e-4, atol=1e-4)
