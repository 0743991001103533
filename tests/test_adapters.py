"""AIM on PEFT LoRA adapters (:mod:`mergekit_aim.adapters`).

Every LoRA that PEFT's ``add_weighted_adapter`` makes, on a tiny Llama
(Linear) and a tiny GPT-2 (Conv1D, ``fan_in_fan_out``), with an artifact from
the project's calibration of the tiny base: the relaxed adapter's ``B·A`` is
the formula applied to the original's (factors from the independent reference
in ``fixtures/reference.py``), ranks and config are unchanged, PEFT loads it,
and its ``merge_and_unload()`` equals ``relax_checkpoint`` (what
``mergekit-aim relax`` writes) on the merged-and-unloaded original.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures.checkpoint_files import load_dir
from fixtures.reference import aim_expected, aim_factors
from safetensors.torch import load_file

from mergekit_aim.adapters import relax_adapter, relax_adapter_, relax_module_
from mergekit_aim.errors import AimConfigError, ImportanceError
from mergekit_aim.importance import ImportanceMap
from mergekit_aim.offline import apply_aim, relax_checkpoint

peft = pytest.importorskip("peft")

OMEGA = 0.3
TARGETS = {
    "llama": [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "pythia": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
TARGETS["qwen2"] = TARGETS["llama"]
COMBINATIONS = [
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]
CLI = str(Path(sys.executable).with_name("mergekit-aim"))


def load_base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def calibrated(base, directory):
    """``(base, ImportanceMap)``: the project's calibration
    (``collect_importance``) of the checkpoint ``base``, saved and reloaded."""
    from mergekit_aim.calibration import collect_importance
    from mergekit_aim.checkpoint import read_checkpoint

    model = load_base(base)
    blocks = torch.randint(
        4, model.config.vocab_size, (4, 32), generator=torch.Generator()
    )
    names = set(read_checkpoint(base).tensors)
    imap = collect_importance(model, blocks, checkpoint_names=names)
    return base, ImportanceMap.load(imap.save(directory / "imp.safetensors"))


@pytest.fixture(scope="module")
def tiny(tiny_family, tiny_tokenizer, tmp_path_factory):
    """``tiny(family) -> (base dir, ImportanceMap)``: the artifact is the
    project's calibration of the tiny base. Families: the tiny models'
    (``llama``, ``qwen2`` with a tied head, ``gpt2``) and ``pythia``, whose
    head is ``embed_out`` on disk and ``lm_head`` in memory."""
    from fixtures.architectures import pythia_config

    from mergekit_aim.demo.models import init_model, save_checkpoint

    built = {}

    def get(family):
        if family not in built:
            directory = tmp_path_factory.mktemp(f"adapter-{family}")
            if family == "pythia":
                model = init_model(pythia_config(len(tiny_tokenizer)), seed=0)
                base = save_checkpoint(model, tiny_tokenizer, directory / "base")
            else:
                base = tiny_family(family).base
            built[family] = calibrated(base, directory)
        return built[family]

    return get


def lora(base, family, names=("default",), seed=0, **options):
    """A ``PeftModel`` on ``base`` with randomly initialised LoRAs ``names``."""
    from peft import LoraConfig, get_peft_model

    settings = dict(r=4, lora_alpha=8, init_lora_weights=False)
    settings.update({"target_modules": TARGETS[family], **options})
    if family == "gpt2":
        settings["fan_in_fan_out"] = True
    torch.manual_seed(seed)
    model = get_peft_model(load_base(base), LoraConfig(**settings), names[0])
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(**settings))
    return model


def merged_and_unloaded(base, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(base), adapter_dir).merge_and_unload()


def statistic_for(imap, key):
    """The artifact key of an adapter's ``lora_A`` key (test-side naming)."""
    name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
    return imap[name] if name in imap else None


def check_relaxed(original, relaxed, imap, omega):
    """B·A of every relaxed module is the formula on the original's B·A."""
    scaled = 0
    assert set(original) == set(relaxed)
    for key, tensor in original.items():
        assert relaxed[key].shape == tensor.shape and relaxed[key].dtype == tensor.dtype
        if ".lora_A." not in key:
            if "lm_head" not in key:
                torch.testing.assert_close(relaxed[key], tensor, rtol=0, atol=0)
            continue
        stat = statistic_for(imap, key)
        if stat is None:
            continue
        factor = aim_factors(stat, omega, dtype=torch.float32)
        b = original[key.replace(".lora_A.", ".lora_B.")]
        torch.testing.assert_close(
            b @ relaxed[key], (b @ tensor) * factor, rtol=1e-5, atol=1e-6
        )
        scaled += 1
    return scaled


def compare_with_relax(base, original_dir, relaxed_dir, imap, omega, tmp_path):
    """merge_and_unload(relaxed) == relax_checkpoint(merge_and_unload(original)),
    both as ``save_pretrained`` writes them (checkpoint names: a renamed head
    is compared under its name on disk)."""
    merged_dir = tmp_path / "merged"
    merged_and_unloaded(base, original_dir).save_pretrained(merged_dir)
    relax_checkpoint(base, merged_dir, imap, omega, tmp_path / "aim")
    expected = load_dir(tmp_path / "aim")
    merged_and_unloaded(base, relaxed_dir).save_pretrained(tmp_path / "got")
    got = load_dir(tmp_path / "got")
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6)
    return expected


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("combination", COMBINATIONS)
def test_every_weighted_combination_relaxes_exactly(
    tiny, family, combination, tmp_path
):
    base, imap = tiny(family)
    model = lora(base, family, names=("default", "other"))
    density = {} if combination in ("linear", "cat", "svd") else {"density": 0.5}
    model.add_weighted_adapter(
        ["default", "other"], [0.7, 0.5], "mix", combination_type=combination, **density
    )
    source = tmp_path / "adapters"
    model.save_pretrained(source, selected_adapters=["mix"])
    out = tmp_path / "relaxed"
    reports = relax_adapter(base, source, imap, OMEGA, out)
    assert list(reports) == ["mix"] and reports["mix"]["relaxed"] > 0

    original = load_file(source / "mix" / "adapter_model.safetensors")
    relaxed = load_file(out / "mix" / "adapter_model.safetensors")
    assert check_relaxed(original, relaxed, imap, OMEGA) == reports["mix"]["relaxed"]
    config = json.loads((source / "mix" / "adapter_config.json").read_text())
    assert json.loads((out / "mix" / "adapter_config.json").read_text()) == config
    compare_with_relax(base, source / "mix", out / "mix", imap, OMEGA, tmp_path)


def test_named_adapters_keep_their_layout_and_the_report(tiny, tmp_path):
    base, imap = tiny("llama")
    model = lora(base, "llama", names=("default", "second"))
    source = tmp_path / "adapters"
    model.save_pretrained(source)
    out = tmp_path / "relaxed"
    reports = relax_adapter(base, source, imap, [0.2, 0.6], out, exclude=["v_proj"])
    assert sorted(reports) == [".", "second"]
    for sub in (out, out / "second"):
        assert (sub / "adapter_config.json").exists()
        report = json.loads((sub / "aim_relax.json").read_text())
        assert report["omega"] == [0.2, 0.6] and report["exclude"] == ["v_proj"]
        assert report["coverage"]["left_alone"]["excluded by aim.exclude"] == 2
    original = load_file(source / "adapter_model.safetensors")
    relaxed = load_file(out / "adapter_model.safetensors")
    for key, tensor in original.items():
        if "v_proj" in key or ".lora_B." in key:
            assert torch.equal(relaxed[key], tensor)
        else:
            # layer 0 of 2 reads the gradient at t = 0, layer 1 at t = 1
            omega = 0.2 if ".layers.0." in key else 0.6
            factor = aim_factors(statistic_for(imap, key), omega, dtype=torch.float32)
            torch.testing.assert_close(relaxed[key], tensor * factor)


def test_modules_to_save_rslora_patterns_and_embedding_loras(tiny, tmp_path):
    """modules_to_save copies are relaxed like dense weights (lm_head) or kept
    (a saved embedding layer); embedding LoRAs stay; rslora and per-module
    ranks/alphas only change scalars; layers_to_transform only which keys exist."""
    base, imap = tiny("llama")
    model = lora(
        base,
        "llama",
        target_modules=["q_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
        use_rslora=True,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"q_proj": 3},
    )
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.05)
    source = tmp_path / "adapter"
    model.save_pretrained(source)
    out = tmp_path / "relaxed"
    relax_adapter(base, source, imap, OMEGA, out)
    original = load_file(source / "adapter_model.safetensors")
    relaxed = load_file(out / "adapter_model.safetensors")
    assert (
        relaxed["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape[0]
        == 2
    )
    for key in original:
        if "embed_tokens" in key:
            assert torch.equal(relaxed[key], original[key]), key
    head = "base_model.model.lm_head.weight"
    assert not torch.equal(relaxed[head], original[head])
    check_relaxed(original, relaxed, imap, OMEGA)
    expected = compare_with_relax(base, source, out, imap, OMEGA, tmp_path)
    assert not torch.equal(expected["lm_head.weight"], load_dir(base)["lm_head.weight"])

    only = lora(base, "llama", layers_to_transform=[1])
    only.save_pretrained(tmp_path / "layer1")
    relax_adapter(base, tmp_path / "layer1", imap, [0.0, 0.5], tmp_path / "layer1-out")
    got = load_file(tmp_path / "layer1-out" / "adapter_model.safetensors")
    assert all(".layers.1." in k for k in got)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    before = load_file(tmp_path / "layer1" / "adapter_model.safetensors")[key]
    factor = aim_factors(statistic_for(imap, key), 0.5, dtype=torch.float32)
    torch.testing.assert_close(got[key], before * factor)  # t = 1 in the base


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_loaded_models_relax_in_place_as_files_do(tiny, family, tmp_path):
    base, imap = tiny(family)
    model = lora(base, family)
    model.save_pretrained(tmp_path / "adapter")
    relax_adapter(base, tmp_path / "adapter", imap, OMEGA, tmp_path / "relaxed")
    coverage = relax_adapter_(model, imap, OMEGA)
    assert coverage.summary()["relaxed"] > 0
    model.save_pretrained(tmp_path / "in-memory")
    files = load_file(tmp_path / "relaxed" / "adapter_model.safetensors")
    memory = load_file(tmp_path / "in-memory" / "adapter_model.safetensors")
    for key, tensor in files.items():
        torch.testing.assert_close(memory[key], tensor, rtol=0, atol=0)

    plain = merged_and_unloaded(base, tmp_path / "adapter")
    merged_sd = {k: v.clone() for k, v in plain.state_dict().items()}
    base_sd = load_base(base).state_dict()
    relax_module_(plain, base_sd, imap, OMEGA)
    expected = apply_aim(base_sd, merged_sd, imap, OMEGA)
    got = plain.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0)


def test_moe_expert_loras_relax_expert_by_expert(tiny_tokenizer, tmp_path):
    """target_parameters on fused experts: lora_A [E·r, in], each expert's
    rows by its own statistic; merged equals apply_aim on the merged model."""
    from fixtures.architectures import moe_config
    from peft import LoraConfig, get_peft_model

    from mergekit_aim.checkpoint import read_checkpoint
    from mergekit_aim.demo.models import init_model, save_checkpoint

    base = save_checkpoint(
        init_model(moe_config("mixtral", len(tiny_tokenizer)), seed=0),
        tiny_tokenizer,
        tmp_path / "base",
    )
    generator = torch.Generator().manual_seed(3)
    checkpoint = read_checkpoint(base)
    sums, counts, axes = {}, {}, {}
    for name, info in checkpoint.tensors.items():
        if "embed" in name or len(info.shape) != 2:
            continue
        sums[name] = torch.rand(info.shape[-1], generator=generator) * 5 + 0.01
        counts[name], axes[name] = 10, -1
    for name in list(sums):  # gate (w1) and up (w3) of one expert share an input
        if ".w3." in name:
            sums[name] = sums[name.replace(".w3.", ".w1.")].clone()
    imap = ImportanceMap(sums, counts, axes, {"base_model": str(base)})
    imap = ImportanceMap.load(imap.save(tmp_path / "imp.safetensors"))

    torch.manual_seed(0)
    config = LoraConfig(
        r=2,
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        init_lora_weights=False,
    )
    get_peft_model(load_base(base), config).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "relaxed"
    report = relax_adapter(base, tmp_path / "adapter", imap, OMEGA, out)["."]
    assert report["relaxed"] == 2 * 3  # per layer: q_proj, gate_up, down
    original = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    relaxed = load_file(out / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.experts.lora_A.weight"  # down_proj
    rows = original[key].shape[0] // 4
    for expert in range(4):
        stat = imap[f"model.layers.0.block_sparse_moe.experts.{expert}.w2.weight"]
        block = slice(expert * rows, (expert + 1) * rows)
        factor = aim_factors(stat, OMEGA, dtype=torch.float32)
        torch.testing.assert_close(relaxed[key][block], original[key][block] * factor)

    plain = merged_and_unloaded(base, tmp_path / "adapter")
    base_model = load_base(base)
    expected = apply_aim(
        base_model.state_dict(), plain.state_dict(), imap, OMEGA, model=base_model
    )
    got = merged_and_unloaded(base, out).state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6)


def head_adapter(base, family, head, path):
    """Save an adapter with LoRAs on attention and MLP and, on the LM head,
    a LoRA (``head="lora"``) or a trained full copy (``"modules_to_save"``);
    returns its tensors."""
    if head == "lora":
        model = lora(base, family, target_modules=[*TARGETS[family], "lm_head"])
    else:
        model = lora(base, family, modules_to_save=["lm_head"])
        with torch.no_grad():
            model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.05)
    model.save_pretrained(path)
    return load_file(path / "adapter_model.safetensors")


@pytest.mark.parametrize("head", ["lora", "modules_to_save"])
def test_a_tied_head_stays_as_a_merge_leaves_it(tiny, head, tmp_path):
    """Qwen2's LM head is its input embedding: calibration gives it no
    statistic, so its LoRA (or saved copy) is kept as it is, like the
    embedding in a merge, while every attention/MLP lora_A is relaxed."""
    base, imap = tiny("qwen2")
    assert "lm_head.weight" not in imap
    source, out = tmp_path / "adapter", tmp_path / "relaxed"
    original = head_adapter(base, "qwen2", head, source)
    report = relax_adapter(base, source, imap, OMEGA, out)["."]
    relaxed = load_file(out / "adapter_model.safetensors")
    assert check_relaxed(original, relaxed, imap, OMEGA) == 2 * 7 == report["relaxed"]
    heads = [key for key in original if ".lm_head." in key]
    assert heads and all(torch.equal(relaxed[key], original[key]) for key in heads)
    assert report["coverage"]["left_alone"]["no input statistic"] >= 1
    if head == "lora":
        compare_with_relax(base, source, out, imap, OMEGA, tmp_path)
        return
    # Merging a saved copy of a tied head unties it (the merge holds an
    # lm_head.weight the base checkpoint has not), so the loaded merge is
    # relaxed through the Python API against the base's own state dict.
    plain = merged_and_unloaded(base, source)
    relax_module_(plain, load_base(base).state_dict(), imap, OMEGA)
    got = merged_and_unloaded(base, out).state_dict()
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6)
    copy = original["base_model.model.lm_head.weight"]
    assert torch.equal(got["lm_head.weight"], copy)


@pytest.mark.parametrize("head", ["lora", "modules_to_save"])
def test_a_renamed_head_is_relaxed_with_its_checkpoint_statistic(tiny, head, tmp_path):
    """Pythia's head is ``lm_head`` to PEFT and ``embed_out`` on disk and in
    the artifact: its LoRA (or saved copy) is relaxed with embed_out's
    statistic, and the merge equals `relax` on the merged original."""
    base, imap = tiny("pythia")
    assert "embed_out.weight" in imap and "lm_head.weight" not in imap
    source, out = tmp_path / "adapter", tmp_path / "relaxed"
    original = head_adapter(base, "pythia", head, source)
    relax_adapter(base, source, imap, OMEGA, out)
    relaxed = load_file(out / "adapter_model.safetensors")
    assert check_relaxed(original, relaxed, imap, OMEGA) == 2 * 4
    statistic = imap["embed_out.weight"]
    if head == "lora":
        key = "base_model.model.lm_head.lora_A.weight"
        b = original[key.replace(".lora_A.", ".lora_B.")]
        factor = aim_factors(statistic, OMEGA, dtype=torch.float32)
        torch.testing.assert_close(
            b @ relaxed[key], (b @ original[key]) * factor, rtol=1e-5, atol=1e-6
        )
        # PEFT also saves the head's base weight: relaxed toward itself, it stays
        kept = "base_model.model.lm_head.base_layer.weight"
        assert torch.equal(relaxed[kept], original[kept])
    else:
        key = "base_model.model.lm_head.weight"
        base_head = load_dir(base)["embed_out.weight"]
        expected = aim_expected(base_head, original[key], statistic, OMEGA)
        torch.testing.assert_close(relaxed[key], expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(relaxed[key], original[key])
    expected = compare_with_relax(base, source, out, imap, OMEGA, tmp_path)
    merged = load_dir(tmp_path / "merged")
    assert not torch.equal(expected["embed_out.weight"], merged["embed_out.weight"])


# --- refusals ---------------------------------------------------------------------


def edited(source, target, **changes):
    """A copy of adapter ``source`` with its config changed."""
    target.mkdir()
    for entry in source.iterdir():
        target.joinpath(entry.name).write_bytes(entry.read_bytes())
    config = json.loads((source / "adapter_config.json").read_text())
    config.update(changes)
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def plain_adapter(tiny, tmp_path_factory):
    base, _ = tiny("llama")
    path = tmp_path_factory.mktemp("plain-adapter") / "adapter"
    lora(base, "llama").save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"init_lora_weights": "pissa_niter_4"}, "PiSSA"),
        ({"init_lora_weights": "olora"}, "OLoRA"),
        ({"peft_type": "IA3"}, "adapter type IA3"),
        ({"use_qalora": True}, "QA-LoRA"),
    ],
)
def test_refusals_name_the_module_and_write_nothing(
    tiny, plain_adapter, tmp_path, change, reason
):
    base, imap = tiny("llama")
    source = edited(plain_adapter, tmp_path / "edited", **change)
    with pytest.raises(AimConfigError) as raised:
        relax_adapter(base, source, imap, OMEGA, tmp_path / "out")
    message = str(raised.value)
    assert reason in message and "module model.layers.0." in message
    assert "\n" not in message and not (tmp_path / "out").exists()


def test_dora_is_refused_before_anything_is_written(tiny, tmp_path):
    base, imap = tiny("llama")
    lora(base, "llama", use_dora=True).save_pretrained(tmp_path / "dora")
    result = subprocess.run(
        [CLI, "relax-adapter", "--base", base, "--adapter", tmp_path / "dora"]
        + ["--importance", imap.provenance["file"], "--omega", "0.4", tmp_path / "out"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert (
        len(lines) == 1 and "DoRA" in lines[0] and "module model.layers.0." in lines[0]
    )
    assert not (tmp_path / "out").exists()


def test_an_adapter_of_another_model_is_a_shape_mismatch(tiny, tmp_path):
    from mergekit_aim.errors import ShapeMismatchError

    base, imap = tiny("llama")
    lora(base, "llama", target_modules=["lm_head"]).save_pretrained(tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = "base_model.model.lm_head.lora_A.weight"
    tensors[key] = torch.zeros(4, tensors[key].shape[1] + 1)
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(ShapeMismatchError, match="lm_head.lora_A.weight"):
        relax_adapter(base, tmp_path / "a", imap, OMEGA, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    other_base, _ = tiny("gpt2")
    with pytest.raises((ImportanceError, AimConfigError)):
        relax_adapter(other_base, tmp_path / "a", imap, OMEGA, tmp_path / "out")


def test_cli_relax_adapter_takes_a_filtered_omega(tiny, plain_adapter, tmp_path):
    base, imap = tiny("llama")
    omega = '[{"filter": "mlp", "value": 0.5}, {"value": 1.0}]'
    result = subprocess.run(
        [CLI, "relax-adapter", "--base", base, "--adapter", plain_adapter]
        + ["--importance", imap.provenance["file"], "--omega", omega, tmp_path / "o"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    original = load_file(plain_adapter / "adapter_model.safetensors")
    relaxed = load_file(tmp_path / "o" / "adapter_model.safetensors")
    for key, tensor in original.items():
        assert torch.equal(relaxed[key], tensor) == (
            ".mlp." not in key or ".lora_B." in key
        ), key


def test_without_peft_the_extra_is_named(monkeypatch):
    from mergekit_aim.adapters import require_peft

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(AimConfigError, match=r"pip install 'mergekit-aim\[peft\]'"):
        require_peft()


def test_tune_adapter_writes_the_pick_relaxed(tiny, plain_adapter, tiny_text, tmp_path):
    from mergekit_aim.tuning.adapter import tune_adapter

    base, imap = tiny("llama")
    evals = tmp_path / "eval.txt"
    evals.write_text("\n\n".join(tiny_text[:40]))
    out = tmp_path / "tuned"
    result = tune_adapter(
        base, plain_adapter, imap, {"held": evals}, out, omegas=[0.0, 0.5], seq_len=32
    )
    assert [row.omega for row in result.rows] == [0.0, 0.5, 1.0]
    assert not (out / ".aim-tune-work").exists()
    report = json.loads((out / "aim_tune.json").read_text())
    assert report["chosen"]["omega_attention"] == result.chosen.omega
    relax_adapter(base, plain_adapter, imap, result.chosen.omega, tmp_path / "again")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    got = load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in again.items())


def run_cli(*args):
    return subprocess.run(
        [CLI, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_cli_tune_adapter_reports_every_candidate_and_writes_the_pick(
    tiny, plain_adapter, tiny_text, tmp_path
):
    from peft import PeftModel

    base, imap = tiny("llama")
    evals = tmp_path / "held.txt"
    evals.write_text("\n\n".join(tiny_text[:12]))
    out = tmp_path / "tuned"
    result = run_cli(
        "tune-adapter", "--base", base, "--adapter", plain_adapter,
        "--importance", imap.provenance["file"], "--eval", f"held={evals}",
        "--omega", "0,0.5", "--seq-len", 32, out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "aim_tune.json").read_text())
    table = (out / "aim_tune.md").read_text()
    chosen = report["chosen"]["omega_attention"]
    assert f"wrote {out} (ω {chosen:g})" in result.stdout
    assert [row["omega_attention"] for row in report["rows"]] == [0.0, 0.5, 1.0]
    for row in report["rows"]:
        loss = row["losses"]["held"]
        assert loss > 0 and f"{loss:.4f}" in table and f"{loss:.4f}" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "aim_relax.json",
        "aim_tune.json",
        "aim_tune.md",
    ]
    PeftModel.from_pretrained(load_base(base), out)  # loads as a PEFT adapter
    again = tmp_path / "again"
    relax_adapter(base, plain_adapter, imap, report["chosen"]["omega_setting"], again)
    got = load_file(out / "adapter_model.safetensors")
    want = load_file(again / "adapter_model.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("refused", ["missing eval file", "DoRA"])
def test_cli_tune_adapter_refusals_write_nothing(
    tiny, plain_adapter, tmp_path, monkeypatch, refused
):
    """Refused in one line before the merge and the scoring: nothing written."""
    base, imap = tiny("llama")
    evals, adapter = tmp_path / "held.txt", plain_adapter
    if refused == "DoRA":
        evals.write_text("a few words of held-out text\n\nand a second document")
        adapter = tmp_path / "dora"
        lora(base, "llama", use_dora=True).save_pretrained(adapter)
    out = tmp_path / "tuned"
    result = run_cli(
        "tune-adapter", "--base", base, "--adapter", adapter,
        "--importance", imap.provenance["file"], "--eval", f"held={evals}",
        "--omega", "0.5", "--seq-len", 32, out,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1, result.stderr[-3000:]
    named = str(evals) if refused != "DoRA" else "module model.layers.0."
    assert named in lines[0] and refused.split()[-1] in lines[0]
    assert not out.exists()
    if refused == "DoRA":  # before any work: the merge is never reached
        from mergekit_aim.tuning import adapter as tuning

        def merge(*_):
            raise AssertionError("merged before refusing")

        monkeypatch.setattr(tuning, "_merge_and_unload", merge)
        with pytest.raises(AimConfigError, match="DoRA"):
            tuning.tune_adapter(base, adapter, imap, {"held": evals}, out)
        assert not out.exists()
