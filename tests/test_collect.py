"""The statistic on tiny real models, against an independent hand computation.

The reference never uses our hooks or kernels: it reads layer inputs from
``output_hidden_states`` and recomputes what a module sees with the model's own
submodules, then sums |x| per channel in float64.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from mergekit_aim.calibration.forward import collect_importance
from mergekit_aim.calibration.targets import find_targets
from mergekit_aim.checkpoint import read_checkpoint
from mergekit_aim.errors import CalibrationError


def _blocks(vocab, count=6, length=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=generator)


def _abs_sum(x):
    return x.double().abs().reshape(-1, x.shape[-1]).sum(0).float()


@pytest.fixture(scope="module")
def llama(tiny_family):
    family = tiny_family("llama")
    return family, AutoModelForCausalLM.from_pretrained(family.base)


def test_llama_statistic_matches_hand_computation(llama):
    family, model = llama
    blocks = _blocks(model.config.vocab_size)
    names = set(read_checkpoint(family.base).tensors)
    imap = collect_importance(model, blocks, batch_size=4, checkpoint_names=names)
    with torch.no_grad():
        hidden = model(input_ids=blocks, output_hidden_states=True).hidden_states
        layer = model.model.layers[0]
        normed = layer.input_layernorm(hidden[0])
    expect = {
        "model.layers.0.input_layernorm.weight": _abs_sum(hidden[0]),
        "model.layers.1.input_layernorm.weight": _abs_sum(hidden[1]),
        "model.layers.0.self_attn.q_proj.weight": _abs_sum(normed),
        "model.layers.0.self_attn.k_proj.weight": _abs_sum(normed),
        # The last hidden state is the final norm's output: the LM head's input.
        "lm_head.weight": _abs_sum(hidden[-1]),
    }
    for name, value in expect.items():
        torch.testing.assert_close(imap[name], value, rtol=1e-4, atol=1e-4)
        assert imap.count(name) == blocks.numel()
        assert imap.input_axis(name) == (0 if "layernorm" in name else -1)
    # Every Linear and norm weight, never the embedding.
    assert "model.embed_tokens.weight" not in imap
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert {f"{n}.weight" for n in linear} <= set(imap)


def test_batching_does_not_change_the_result(llama):
    family, model = llama
    blocks = _blocks(model.config.vocab_size, count=5)
    one = collect_importance(model, blocks, batch_size=1)
    many = collect_importance(model, blocks, batch_size=5)
    streamed = collect_importance(model, iter(blocks.split(2)), batch_size=99)
    for name in one:
        torch.testing.assert_close(one[name], many[name], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(one[name], streamed[name], rtol=1e-4, atol=1e-4)


def test_model_state_is_restored(llama):
    _, model = llama
    model.train()
    hooks_before = sum(len(m._forward_pre_hooks) for m in model.modules())
    collect_importance(model, _blocks(model.config.vocab_size, count=2))
    assert model.training
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    model.eval()


def test_gpt2_conv1d_axis_and_tied_head(tiny_family):
    family = tiny_family("gpt2")
    model = AutoModelForCausalLM.from_pretrained(family.base)
    names = set(read_checkpoint(family.base).tensors)
    targets, skipped = find_targets(model, names)
    by_name = {t.tensor_name: t for t in targets}
    c_attn = next(n for n in by_name if n.endswith("h.0.attn.c_attn.weight"))
    assert by_name[c_attn].kind == "conv1d" and by_name[c_attn].input_axis == 0
    assert by_name[c_attn].channels == model.config.n_embd
    assert "lm_head.weight" in skipped
    blocks = _blocks(model.config.vocab_size)
    imap = collect_importance(model, blocks, checkpoint_names=names)
    with torch.no_grad():
        hidden = model(input_ids=blocks, output_hidden_states=True).hidden_states
        ln = model.transformer.h[0].ln_1(hidden[0])
    torch.testing.assert_close(imap[c_attn], _abs_sum(ln), rtol=1e-4, atol=1e-4)
    ln_name = next(n for n in imap if n.endswith("h.0.ln_1.weight"))
    torch.testing.assert_close(imap[ln_name], _abs_sum(hidden[0]), rtol=1e-4, atol=1e-4)


def test_qwen2_tied_head_is_skipped_and_reported(tiny_family):
    family = tiny_family("qwen2")
    model = AutoModelForCausalLM.from_pretrained(family.base)
    imap = collect_importance(
        model,
        _blocks(model.config.vocab_size),
        checkpoint_names=set(read_checkpoint(family.base).tensors),
    )
    assert "lm_head.weight" not in imap
    assert "lm_head.weight" in imap.provenance["skipped"]
    assert not any(n.endswith(".bias") for n in imap)


def test_bad_blocks_are_refused(llama):
    _, model = llama
    with pytest.raises(CalibrationError, match="integer tensor"):
        collect_importance(model, torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(CalibrationError, match="batch_size"):
        collect_importance(model, _blocks(model.config.vocab_size), batch_size=0)
    with pytest.raises(CalibrationError, match="no token blocks"):
        collect_importance(model, torch.zeros(0, 8, dtype=torch.long))


def test_calibrate_measures_blocks_that_start_with_bos(
    tiny_family, tiny_text_file, monkeypatch
):
    """The tiny tokenizer prepends <s> to every text: auto starts every block
    with it, false is the paper's packing; provenance records which ran."""
    from mergekit_aim.calibration import calibrate, forward
    from mergekit_aim.demo.models import BOS_ID

    measured = []
    original = forward.collect_importance

    def spy(model, blocks, *args, **kwargs):
        measured.append(blocks.clone())
        return original(model, blocks, *args, **kwargs)

    monkeypatch.setattr(forward, "collect_importance", spy)
    base = str(tiny_family("llama").base)
    settings = dict(dataset=str(tiny_text_file), num_samples=48, seq_len=32)
    auto = calibrate(base, quiet=True, **settings)
    paper = calibrate(base, quiet=True, bos_per_block="false", **settings)
    with_bos, without = measured
    assert (with_bos[:, 0] == BOS_ID).all() and (with_bos[:, 1] != BOS_ID).all()
    # Mid-text block starts, as in the paper's code.
    assert (without[:, 0] != BOS_ID).any()
    assert auto.provenance["calibration"]["bos_per_block"] == "auto"
    assert auto.provenance["calibration"]["bos_per_block_resolved"] is True
    assert auto.provenance["data"]["bos_token_id"] == BOS_ID
    assert paper.provenance["calibration"]["bos_per_block"] is False
    assert paper.provenance["calibration"]["bos_per_block_resolved"] is False
    assert auto.provenance["data_fingerprint"] != paper.provenance["data_fingerprint"]
    name = "model.layers.0.self_attn.o_proj.weight"
    assert not torch.allclose(auto[name], paper[name])


def test_calibrate_refuses_a_bad_bos_per_block_before_loading(tiny_family):
    from mergekit_aim.calibration import calibrate
    from mergekit_aim.errors import AimConfigError

    with pytest.raises(AimConfigError, match="^bos_per_block must be auto, true or"):
        calibrate(str(tiny_family("llama").base), bos_per_block="always")
