"""The fixtures other tests stand on: isolated caches, the tiny text, and the
tiny model families (tests/fixtures/tiny_models.py), which build, save and
reload."""

import os

import pytest
import torch
from fixtures.tiny_models import CHAT_TEMPLATE, FAMILIES, tiny_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from benchmarks.synthetic import finetune_variant, generate_sentences
from mergekit_aim.demo.models import BOS_ID, token_stream


def checkpoint_names(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        return set(handle.keys())


def test_environment_is_isolated(isolated_caches, tmp_path_factory):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    for name in ("HF_HOME", "HF_HUB_CACHE", "MERGEKIT_AIM_CACHE"):
        assert os.environ[name] == isolated_caches[name]
        assert "mergekit-aim-tests-" in os.environ[name]


def test_tiny_text_is_deterministic_and_long_enough(tiny_text, tiny_tokenizer):
    assert tiny_text == generate_sentences(400, seed=0)
    assert generate_sentences(5, seed=1) != generate_sentences(5, seed=2)
    assert token_stream(tiny_tokenizer, tiny_text).numel() > 40 * 32


def test_tokenizer_special_tokens_and_chat_template(tiny_tokenizer, tiny_text):
    ids = tiny_tokenizer(tiny_text[0])["input_ids"]
    assert ids[0] == BOS_ID == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == tiny_text[0]
    assert (tiny_tokenizer.pad_token_id, tiny_tokenizer.eos_token_id) == (0, 2)
    rendered = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}],
        tokenize=False,
    )
    assert rendered == "<s><|user|>\nHello</s>\n<|assistant|>\nHi</s>\n"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_saves_and_reloads(family, tiny_family, tiny_text):
    built = tiny_family(family)
    assert built.family == family
    assert [p.name for p in built.finetunes] == ["ft_a", "ft_b"]
    tokenizer = AutoTokenizer.from_pretrained(built.base)
    model = AutoModelForCausalLM.from_pretrained(built.base)
    assert model.dtype == torch.float32
    # transformers 5 may pick a family-specific tokenizer class; whichever it
    # is, it must keep BOS, round-trip text and split it into the same pieces
    # on this corpus.
    for text in tiny_text[:20]:
        ids = tokenizer(text)["input_ids"]
        assert ids == built.tokenizer(text)["input_ids"]
        assert ids[0] == BOS_ID
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.chat_template == CHAT_TEMPLATE
    batch = torch.tensor([tokenizer(tiny_text[0])["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=batch).logits
    assert logits.shape == (1, batch.shape[1], len(built.tokenizer))
    assert torch.isfinite(logits).all()
    base, ft_a, ft_b = (
        AutoModelForCausalLM.from_pretrained(p).state_dict()
        for p in (built.base, *built.finetunes)
    )
    assert base.keys() == ft_a.keys() == ft_b.keys()
    for name in base:
        assert not torch.equal(base[name], ft_a[name]), name
        assert not torch.equal(ft_a[name], ft_b[name]), name


def test_llama_layout(tiny_family):
    names = checkpoint_names(tiny_family("llama").base)
    assert "lm_head.weight" in names
    assert not any(n.endswith(".bias") for n in names)


def test_qwen2_has_qkv_biases_and_tied_embeddings(tiny_family):
    built = tiny_family("qwen2")
    names = checkpoint_names(built.base)
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert f"model.layers.0.self_attn.{proj}.bias" in names
    assert "model.layers.0.self_attn.o_proj.bias" not in names
    assert "lm_head.weight" not in names
    model = AutoModelForCausalLM.from_pretrained(built.base)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_gpt2_uses_conv1d_stored_in_by_out(tiny_family):
    built = tiny_family("gpt2")
    model = AutoModelForCausalLM.from_pretrained(built.base)
    layer = model.transformer.h[0]
    assert isinstance(layer.attn.c_attn, Conv1D)
    hidden = model.config.n_embd
    assert layer.attn.c_attn.weight.shape == (hidden, 3 * hidden)
    assert layer.mlp.c_fc.weight.shape == (hidden, model.config.n_inner)
    assert "lm_head.weight" not in checkpoint_names(built.base)
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_is_deterministic_and_keeps_global_rng(family):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = tiny_model(family, 300, seed=7).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    second = tiny_model(family, 300, seed=7).state_dict()
    other = tiny_model(family, 300, seed=8).state_dict()
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="mamba"):
        tiny_model("mamba", 100)


def test_finetune_variant_is_seeded_and_copies(tiny_tokenizer):
    model = tiny_model("qwen2", len(tiny_tokenizer))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    a = finetune_variant(model, seed=1, scale=0.1).state_dict()
    b = finetune_variant(model, seed=1, scale=0.1).state_dict()
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(
        a["model.layers.0.self_attn.q_proj.bias"],
        before["model.layers.0.self_attn.q_proj.bias"],
    )
