"""The product as users run it: `mergekit-yaml` on YAML files with an `aim:` block.

Each test compares the AIM merge with the plain merge of the same config:
relaxed tensors must equal the DESIGN §1 formula applied to the plain output,
everything else must be identical.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from fixtures.checkpoint_files import load_dir
from fixtures.native_compiler import needs_compiler
from fixtures.reference import aim_expected

from mergekit_aim.importance import ImportanceMap

pytestmark = pytest.mark.slow

MERGEKIT_YAML = str(Path(sys.executable).with_name("mergekit-yaml"))


def run_yaml(config, out, *extra, check=True, env=None):
    result = subprocess.run(
        [MERGEKIT_YAML, str(config), str(out), "--random-seed", "1", *extra],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"mergekit-yaml failed:\n{result.stderr[-4000:]}")
    return result


def write_config(path, family, method="ties", aim=None, **extra):
    config = {
        "merge_method": method,
        "base_model": str(family.base),
        "models": [
            {"model": str(m), "parameters": {"weight": 1.0, "density": 0.6}}
            for m in family.finetunes
        ],
        "dtype": "float32",
        **extra,
    }
    if aim is not None:
        config["aim"] = aim
    path.write_text(yaml.safe_dump(config))
    return path


def artifact_for(family, tiny_text_file, directory):
    from mergekit_aim import calibrate

    imap = calibrate(
        str(family.base),
        dataset=str(tiny_text_file),
        num_samples=64,
        seq_len=32,
        batch_size=4,
        quiet=True,
    )
    return imap.save(directory / f"{family.family}-importance.safetensors")


def assert_aim_matches_formula(family, plain_dir, aim_dir, artifact, omega):
    base = load_dir(family.base)
    plain = load_dir(plain_dir)
    relaxed = load_dir(aim_dir)
    imap = ImportanceMap.load(artifact)
    assert set(plain) == set(relaxed)
    changed = 0
    for name, merged in plain.items():
        if name in imap:
            expected = aim_expected(
                base[name], merged, imap[name], omega, imap.input_axis(name)
            )
            torch.testing.assert_close(relaxed[name], expected, rtol=1e-5, atol=1e-6)
            changed += int(not torch.equal(relaxed[name], merged))
        else:
            torch.testing.assert_close(relaxed[name], merged, rtol=0, atol=0)
    assert changed > 0
    return imap


@pytest.mark.parametrize("family_name", ["llama", "qwen2", "gpt2"])
def test_mergekit_yaml_honours_aim_block(
    family_name, tiny_family, tiny_text_file, tmp_path
):
    family = tiny_family(family_name)
    artifact = artifact_for(family, tiny_text_file, tmp_path)
    plain_cfg = write_config(tmp_path / "plain.yml", family)
    aim_cfg = write_config(
        tmp_path / "aim.yml", family, aim={"omega": 0.4, "importance": str(artifact)}
    )
    run_yaml(plain_cfg, tmp_path / "plain")
    result = run_yaml(aim_cfg, tmp_path / "aim")
    imap = assert_aim_matches_formula(
        family, tmp_path / "plain", tmp_path / "aim", artifact, 0.4
    )
    assert "AIM coverage: relaxed" in result.stderr
    card = (tmp_path / "aim" / "README.md").read_text()
    assert "- aim" in card and "2502.02421" in card and "0.4" in card
    # Layout facts per family: what has a statistic, on which axis.
    names = set(imap)
    assert not any("embed" in n or n.endswith(".bias") for n in names)
    if family_name == "gpt2":
        conv = [n for n in names if n.endswith("attn.c_attn.weight")]
        assert conv and all(imap.input_axis(n) == 0 for n in conv)
        assert "lm_head.weight" not in names  # tied to wte
    if family_name == "qwen2":
        assert "lm_head.weight" not in names  # tied embeddings
        assert any("q_proj" in n for n in names)
    tied_line = "lm_head.weight tied to the input embedding, not relaxed"
    if family_name in ("gpt2", "qwen2"):
        assert tied_line in result.stderr and tied_line in card
    else:
        assert tied_line not in result.stderr and tied_line not in card
    if family_name == "llama":
        assert "lm_head.weight" in names and imap.input_axis("lm_head.weight") == -1
        assert any(n.endswith("input_layernorm.weight") for n in names)


@pytest.mark.extended
@needs_compiler
@pytest.mark.parametrize("family_name", ["llama", "gpt2"])
def test_cpu_relaxation_kernel_does_not_change_the_merge(
    family_name, tiny_family, tiny_text_file, tmp_path
):
    """The native loop (default), torch's ops (MERGEKIT_AIM_CPU_KERNEL=torch) and
    the fallback when no compiler exists write bit-identical bf16 merges; only
    the fallback says anything about it."""
    family = tiny_family(family_name)
    artifact = artifact_for(family, tiny_text_file, tmp_path)
    config = write_config(
        tmp_path / "aim.yml",
        family,
        aim={"omega": 0.4, "importance": str(artifact)},
        dtype="bfloat16",
    )
    runs = {
        "native": {"MERGEKIT_AIM_CPU_KERNEL": "native"},
        "torch": {"MERGEKIT_AIM_CPU_KERNEL": "torch"},
        "no compiler": {
            "CC": "/nonexistent/cc",
            "MERGEKIT_AIM_CACHE": str(tmp_path / "empty-cache"),
        },
    }
    outputs, stderr = {}, {}
    for name, env in runs.items():
        result = run_yaml(config, tmp_path / name, env=env)
        outputs[name], stderr[name] = load_dir(tmp_path / name), result.stderr
    assert "native CPU relaxation is unavailable" in stderr["no compiler"]
    assert "CC='/nonexistent/cc'" in stderr["no compiler"]
    for name in ("native", "torch"):
        assert "native CPU relaxation" not in stderr[name]
    reference_run = outputs["torch"]
    assert any(t.dtype == torch.bfloat16 for t in reference_run.values())
    for name in ("native", "no compiler"):
        assert set(outputs[name]) == set(reference_run)
        for tensor_name, tensor in reference_run.items():
            assert torch.equal(outputs[name][tensor_name], tensor), (name, tensor_name)


@pytest.mark.extended
def test_calibration_block_computes_once_then_hits_cache(
    tiny_family, tiny_text_file, tmp_path
):
    family = tiny_family("llama")
    cache = tmp_path / "cache"
    aim = {
        "omega": 0.3,
        "calibration": {
            "dataset": str(tiny_text_file),
            "num_samples": 48,
            "seq_len": 32,
            "batch_size": 4,
        },
    }
    config = write_config(tmp_path / "aim.yml", family, aim=aim)
    env = {"MERGEKIT_AIM_CACHE": str(cache)}
    first = run_yaml(config, tmp_path / "first", "-v", env=env)
    entries = list(cache.glob("*.safetensors"))
    assert len(entries) == 1
    assert "calibrating" in first.stderr
    assert "AIM calibration" in first.stderr  # the progress bar (tokens/s)
    second = run_yaml(config, tmp_path / "second", "-v", env=env)
    assert "using cached importance" in second.stderr
    assert list(cache.glob("*.safetensors")) == entries
    for name, tensor in load_dir(tmp_path / "first").items():
        torch.testing.assert_close(load_dir(tmp_path / "second")[name], tensor)
    # A corrupt entry is detected and recomputed.
    entries[0].write_bytes(entries[0].read_bytes()[:100])
    third = run_yaml(config, tmp_path / "third", "-v", env=env)
    assert "discarding unusable cache entry" in third.stderr
    assert ImportanceMap.load(entries[0])  # rewritten whole


@pytest.mark.extended
def test_bad_inputs_fail_before_writing(tiny_family, tiny_text_file, tmp_path):
    llama = tiny_family("llama")
    gpt2 = tiny_family("gpt2")
    foreign = artifact_for(gpt2, tiny_text_file, tmp_path)
    cases = {
        "foreign": ({"importance": str(foreign)}, "another model"),
        "missing": ({"importance": str(tmp_path / "nope.safetensors")}, "nope"),
        "omega": ({"importance": str(foreign), "omega": 2}, "within [0, 1]"),
        "unknown": ({"importance": str(foreign), "omgea": 0.3}, "omgea"),
        "bos": (
            {"calibration": {"dataset": str(tiny_text_file), "bos_per_block": "x"}},
            "bos_per_block must be auto, true or false",
        ),
    }
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    cases["corrupt"] = ({"importance": str(corrupt)}, "corrupt")
    for label, (aim, message) in cases.items():
        config = write_config(tmp_path / f"{label}.yml", llama, aim=aim)
        out = tmp_path / f"out-{label}"
        result = run_yaml(config, out, check=False)
        assert result.returncode != 0, label
        assert message in result.stderr, (label, result.stderr[-2000:])
        assert not any(out.glob("*.safetensors")), label
    # The CPU kernel choice comes from the environment: checked as early.
    env_cases = {
        "kernel mode": ({"MERGEKIT_AIM_CPU_KERNEL": "fast"}, "MERGEKIT_AIM_CPU_KERNEL"),
        "native without compiler": (
            {
                "MERGEKIT_AIM_CPU_KERNEL": "native",
                "CC": "/nonexistent/cc",
                "MERGEKIT_AIM_CACHE": str(tmp_path / "empty-cache"),
            },
            "CC='/nonexistent/cc' is not an executable",
        ),
    }
    own = artifact_for(llama, tiny_text_file, tmp_path)
    config = write_config(tmp_path / "env.yml", llama, aim={"importance": str(own)})
    for label, (env, message) in env_cases.items():
        out = tmp_path / f"out-{label.replace(' ', '-')}"
        result = run_yaml(config, out, check=False, env=env)
        assert result.returncode != 0, label
        assert message in result.stderr, (label, result.stderr[-2000:])
        # Refused while planning: mergekit's writer never created the output.
        assert not out.exists(), label


def test_slices_use_the_base_layer_statistic(tiny_family, tiny_text_file, tmp_path):
    # Output layer 0 is built from layer 1 of every input: its statistic must be
    # the base's layer-1 statistic, not layer 0's.
    family = tiny_family("llama")
    artifact = artifact_for(family, tiny_text_file, tmp_path)
    sources = [str(family.base), *map(str, family.finetunes)]

    def config(path, aim=None):
        data = {
            "merge_method": "task_arithmetic",
            "base_model": str(family.base),
            "slices": [
                {
                    "sources": [
                        {
                            "model": model,
                            "layer_range": [1, 2],
                            "parameters": {"weight": 0.5},
                        }
                        for model in sources
                    ]
                }
            ],
            "dtype": "float32",
        }
        if aim:
            data["aim"] = aim
        path.write_text(yaml.safe_dump(data))
        return path

    run_yaml(config(tmp_path / "plain.yml"), tmp_path / "plain")
    run_yaml(
        config(tmp_path / "aim.yml", {"omega": 0.0, "importance": str(artifact)}),
        tmp_path / "aim",
    )
    base, plain, relaxed = (
        load_dir(family.base),
        load_dir(tmp_path / "plain"),
        load_dir(tmp_path / "aim"),
    )
    imap = ImportanceMap.load(artifact)
    name = "model.layers.0.mlp.down_proj.weight"
    source = "model.layers.1.mlp.down_proj.weight"
    expected = aim_expected(base[source], plain[name], imap[source], 0.0, -1)
    torch.testing.assert_close(relaxed[name], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(
        relaxed[name], aim_expected(base[source], plain[name], imap[name], 0.0, -1)
    )


def test_slice_without_base_source_is_refused(tiny_family, tiny_text_file, tmp_path):
    family = tiny_family("llama")
    artifact = artifact_for(family, tiny_text_file, tmp_path)
    data = {
        "merge_method": "linear",
        "base_model": str(family.base),
        "slices": [
            {
                "sources": [
                    {
                        "model": str(m),
                        "layer_range": [0, 2],
                        "parameters": {"weight": 1},
                    }
                    for m in family.finetunes
                ]
            }
        ],
        "aim": {"importance": str(artifact)},
    }
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(data))
    result = run_yaml(config, tmp_path / "out", check=False)
    assert result.returncode != 0
    assert "not among this slice's sources" in result.stderr
