"""Checkpoint names that differ from the loaded model's: GPT-NeoX's untied head
(``embed_out.weight`` on disk, ``lm_head.weight`` in memory), a GPT-2
checkpoint saved without the ``transformer.`` prefix, and a vision-language
model (Qwen2-VL) whose text tower is calibrated through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures.architectures import pythia_config, vl_model
from safetensors.torch import load_file

from mergekit_aim.calibration.forward import collect_importance
from mergekit_aim.calibration.targets import VISION_TOWER, find_targets
from mergekit_aim.demo.models import init_model, save_checkpoint
from mergekit_aim.importance import ImportanceMap

CLI = str(Path(sys.executable).with_name("mergekit-aim"))


def _blocks(vocab, count=4, length=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=generator)


def _abs_sum(x):
    return x.double().abs().reshape(-1, x.shape[-1]).sum(0)


def test_gpt_neox_untied_head_is_measured_as_embed_out(tmp_path, tiny_tokenizer):
    model = init_model(pythia_config(len(tiny_tokenizer)), seed=0)
    config = model.config
    path = save_checkpoint(model, tiny_tokenizer, tmp_path / "neox")
    names = set(load_file(str(path / "model.safetensors")))
    assert "embed_out.weight" in names and "lm_head.weight" not in names
    blocks = _blocks(config.vocab_size)
    imap = collect_importance(model, blocks, batch_size=2, checkpoint_names=names)
    with torch.no_grad():
        final = model(input_ids=blocks, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(
        imap["embed_out.weight"].double(), _abs_sum(final), rtol=1e-4, atol=1e-4
    )
    assert imap.count("embed_out.weight") == blocks.numel()
    assert "lm_head.weight" not in imap
    assert not imap.provenance["skipped"]
    assert set(imap) == {
        n for n in names if n.endswith(".weight") and n != "gpt_neox.embed_in.weight"
    }


def test_gpt2_checkpoint_without_prefix_keeps_its_names(tiny_family):
    from transformers import AutoModelForCausalLM

    family = tiny_family("gpt2")
    model = AutoModelForCausalLM.from_pretrained(family.base)
    names = {
        n.removeprefix("transformer.")
        for n in load_file(str(Path(family.base) / "model.safetensors"))
    }
    targets, skipped = find_targets(model, names)
    assert "h.0.attn.c_attn.weight" in {t.tensor_name for t in targets}
    assert all(not t.tensor_name.startswith("transformer.") for t in targets)
    assert skipped == {"lm_head.weight": "tied to the input embedding (not relaxed)"}


@pytest.mark.slow
def test_qwen2_vl_text_tower_calibrates_through_the_cli(
    tmp_path, tiny_tokenizer, tiny_text_file
):
    model = vl_model(len(tiny_tokenizer))
    path = save_checkpoint(model, tiny_tokenizer, tmp_path / "qwen2-vl")
    names = set(load_file(str(path / "model.safetensors")))
    out = tmp_path / "imp.safetensors"
    result = subprocess.run(
        [
            CLI,
            "calibrate",
            str(path),
            "-o",
            str(out),
            "--dataset",
            str(tiny_text_file),
            "--num-samples",
            "16",
            "--seq-len",
            "32",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    imap = ImportanceMap.load(out)
    text = {
        n
        for n in names
        if n.endswith(".weight") and not n.startswith(("visual.", "model.embed"))
    }
    assert "model.layers.0.self_attn.q_proj.weight" in text
    assert "lm_head.weight" in text
    assert set(imap) == text
    vision = {n for n in names if n.startswith("visual.") and n.endswith(".weight")}
    assert "visual.blocks.0.mlp.fc1.weight" in vision
    assert imap.provenance["skipped"] == dict.fromkeys(vision, VISION_TOWER)


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_qwen_vl_loads_and_measures_its_text_path(tmp_path, tiny_tokenizer, version):
    # What calibration relies on: the architectures class loads the checkpoint
    # AutoModelForCausalLM refuses, and input_ids alone run the text path.
    from mergekit_aim.calibration.loading import load_base_model

    path = save_checkpoint(
        vl_model(len(tiny_tokenizer), version), tiny_tokenizer, tmp_path
    )
    model = load_base_model(str(path), device="cpu", dtype="float32")
    names = set(load_file(str(path / "model.safetensors")))
    blocks = _blocks(len(tiny_tokenizer))
    imap = collect_importance(model, blocks, batch_size=2, checkpoint_names=names)
    with torch.no_grad():
        final = model(input_ids=blocks, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(
        imap["lm_head.weight"].double(), _abs_sum(final), rtol=1e-4, atol=1e-4
    )
    assert imap.count("model.layers.1.mlp.down_proj.weight") == blocks.numel()
    skipped = imap.provenance["skipped"]
    assert skipped and set(skipped.values()) == {VISION_TOWER}
    assert all(n.startswith("visual.") for n in skipped)
    # Without checkpoint names the model's own names are used.
    own = collect_importance(model, blocks, batch_size=2)
    assert "model.language_model.layers.1.mlp.down_proj.weight" in own
