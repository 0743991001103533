"""`mergekit-aim calibrate`, `inspect` and `relax`, run as subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures.checkpoint_files import load_dir

from mergekit_aim.importance import ImportanceMap

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).with_name("mergekit-aim"))


def run(*args, check=True):
    result = subprocess.run(
        [CLI, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if check and result.returncode != 0:
        raise AssertionError(result.stderr[-4000:])
    return result


@pytest.fixture(scope="module")
def artifact(tiny_family, tiny_text_file, tmp_path_factory):
    family = tiny_family("llama")
    out = tmp_path_factory.mktemp("cli-artifact") / "imp.safetensors"
    return calibrate_tiny(family, tiny_text_file, out)


def calibrate_tiny(family, text_file, out, *options):
    """``mergekit-aim calibrate`` on the tiny family's base with small settings."""
    run(
        "calibrate",
        family.base,
        "-o",
        out,
        "--dataset",
        text_file,
        "--num-samples",
        48,
        "--seq-len",
        32,
        "--batch-size",
        4,
        *options,
        "--quiet",
    )
    return out


def test_calibrate_writes_an_artifact_with_provenance(artifact, tiny_family):
    imap = ImportanceMap.load(artifact)
    family = tiny_family("llama")
    assert imap.provenance["base_model"] == str(family.base)
    assert imap.provenance["calibration"]["seq_len"] == 32
    assert len(imap.provenance["data_fingerprint"]) == 64
    assert len(imap.base_fingerprint) == 64
    assert "lm_head.weight" in imap


def test_calibrate_bos_per_block(artifact, tiny_family, tiny_text_file, tmp_path):
    """The tiny tokenizer prepends <s> to every text, as Gemma's does: by
    default every block starts with it; --bos-per-block false is the paper's
    packing, recorded as such and measured on other blocks."""
    family = tiny_family("llama")
    default = ImportanceMap.load(artifact)
    assert default.provenance["calibration"]["bos_per_block"] == "auto"
    assert default.provenance["calibration"]["bos_per_block_resolved"] is True
    out = calibrate_tiny(
        family,
        tiny_text_file,
        tmp_path / "paper.safetensors",
        "--bos-per-block",
        "false",
    )
    summary = json.loads(run("inspect", out, "--json").stdout)
    calibration = summary["provenance"]["calibration"]
    assert calibration["bos_per_block"] is False
    assert calibration["bos_per_block_resolved"] is False
    paper = ImportanceMap.load(out)
    assert (
        paper.provenance["data_fingerprint"] != default.provenance["data_fingerprint"]
    )
    name = "model.layers.0.self_attn.o_proj.weight"
    assert not torch.allclose(paper[name], default[name])


def test_calibrate_refuses_a_bad_bos_per_block(tiny_family, tmp_path):
    out = tmp_path / "x.safetensors"
    result = run(
        "calibrate",
        tiny_family("llama").base,
        "-o",
        out,
        "--bos-per-block",
        "maybe",
        check=False,
    )
    assert result.returncode == 2
    assert "--bos-per-block" in result.stderr and "'maybe'" in result.stderr
    assert "auto" in result.stderr and not out.exists()


def test_inspect_json_is_the_machine_summary(artifact):
    summary = json.loads(run("inspect", artifact, "--json", "--tensors").stdout)
    assert set(summary) == {"tensors", "tokens", "provenance", "tensor_list"}
    assert summary == json.loads(
        json.dumps(ImportanceMap.load(artifact).summary(), default=str)
    ) | {"tensor_list": summary["tensor_list"]}
    assert summary["tensors"] == len(summary["tensor_list"])
    assert summary["provenance"]["calibration"]["num_samples"] == 48


def test_inspect_summarises_for_people(artifact, tiny_family):
    text = run("inspect", artifact).stdout
    imap = ImportanceMap.load(artifact)
    for expected in (
        f"model        {tiny_family('llama').base}",
        "dataset      ",
        "dtype        ",
        "when         ",
        f"tokens       {imap.count('lm_head.weight'):,} per tensor",
        "mean s",
        "max/median",
        "outliers",
        "verdict: statistic is",
    ):
        assert expected in text, expected
    rows = [line.split()[0] for line in text.splitlines() if line[:1].isdigit()]
    assert rows == ["0", "1"]  # the tiny Llama's two layers
    assert "model.layers.0.mlp.down_proj.weight" not in text
    assert (
        "model.layers.0.mlp.down_proj.weight"
        in run("inspect", artifact, "--tensors").stdout
    )


def test_inspect_model_coverage(artifact, tiny_family):
    text = run("inspect", artifact, "--model", tiny_family("llama").base).stdout
    assert "(100.0%)" in text and "every weight with an input is covered" in text
    covered = json.loads(
        run("inspect", artifact, "--json", "--model", tiny_family("llama").base).stdout
    )["coverage"]
    assert covered["mismatch"] is None
    assert covered["summary"]["elements"] == covered["summary"]["elements_relaxed"]
    other = run("inspect", artifact, "--model", tiny_family("qwen2").base).stdout
    assert "does not match this model" in other


def test_inspect_compares_two_artifacts(
    artifact, tiny_family, tiny_text_file, tmp_path
):
    again = calibrate_tiny(
        tiny_family("llama"), tiny_text_file, tmp_path / "b.safetensors", "--seed", 7
    )
    text = run("inspect", artifact, again).stdout
    assert "rank corr" in text and "top-1% overlap" in text
    assert str(again) in text and "verdict: " in text
    result = json.loads(run("inspect", artifact, again, "--json").stdout)
    assert set(result["tensors"]) == set(ImportanceMap.load(artifact))
    same = json.loads(run("inspect", artifact, artifact, "--json").stdout)
    assert all(
        t["rank_correlation"] == pytest.approx(1) for t in same["tensors"].values()
    )
    assert all(t["top1_overlap"] == 1 for t in same["tensors"].values())


def test_inspect_refuses_to_compare_different_models(artifact, tmp_path):
    imap = ImportanceMap.load(artifact)
    provenance = dict(imap.provenance, base_fingerprint="0" * 64)
    other = ImportanceMap(
        {n: imap[n] for n in imap},
        {n: imap.count(n) for n in imap},
        {n: imap.input_axis(n) for n in imap},
        provenance,
    ).save(tmp_path / "other.safetensors")
    result = run("inspect", artifact, other, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "different models" in result.stderr
    assert str(other) in result.stderr
    three = run("inspect", artifact, artifact, artifact, check=False)
    assert three.returncode == 2 and "one artifact, or two" in three.stderr


def test_relax_equals_apply_aim(artifact, tiny_family, tmp_path):
    from mergekit_aim import apply_aim

    family = tiny_family("llama")
    merged = family.finetunes[0]
    out = tmp_path / "relaxed"
    result = run(
        "relax",
        "--base",
        family.base,
        "--merged",
        merged,
        "--importance",
        artifact,
        "--omega",
        0.3,
        out,
    )
    assert "relaxed" in result.stdout
    expected = apply_aim(
        load_dir(family.base), load_dir(merged), ImportanceMap.load(artifact), 0.3
    )
    got = load_dir(out)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor)
    assert (out / "config.json").exists()
    assert any(out.glob("tokenizer*"))
    assert "Activation-Informed Merging" in (out / "README.md").read_text()


def test_relax_refuses_shape_mismatch_before_writing(artifact, tiny_family, tmp_path):
    llama = tiny_family("llama")
    gpt2 = tiny_family("gpt2")
    out = tmp_path / "never"
    result = run(
        "relax",
        "--base",
        llama.base,
        "--merged",
        gpt2.base,
        "--importance",
        artifact,
        out,
        check=False,
    )
    assert result.returncode == 2
    assert "error:" in result.stderr
    assert not out.exists()


def test_relax_refuses_bad_omega(artifact, tiny_family, tmp_path):
    family = tiny_family("llama")
    result = run(
        "relax",
        "--base",
        family.base,
        "--merged",
        family.finetunes[0],
        "--importance",
        artifact,
        "--omega",
        1.5,
        tmp_path / "x",
        check=False,
    )
    assert result.returncode == 2
    assert "--omega" in result.stderr


def test_unreachable_hub_dataset_is_an_error(tiny_family, tmp_path):
    family = tiny_family("llama")
    result = run(
        "calibrate",
        family.base,
        "-o",
        tmp_path / "x.safetensors",
        "--dataset",
        "pile-val",
        "--quiet",
        check=False,
    )
    assert result.returncode == 2
    assert "builtin" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_yaml_subcommand_runs_mergekit(artifact, tiny_family, tmp_path):
    import yaml

    family = tiny_family("llama")
    config = tmp_path / "c.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(family.base),
                "models": [
                    {"model": str(m), "parameters": {"weight": 0.5}}
                    for m in family.finetunes
                ],
                "aim": {"omega": 0.4, "importance": str(artifact)},
            }
        )
    )
    result = run("yaml", config, tmp_path / "out")
    assert "AIM coverage" in result.stderr
    assert "- aim" in (tmp_path / "out" / "README.md").read_text()


def test_torchrun_data_parallel_equals_single_process(
    artifact, tiny_family, tiny_text_file, tmp_path
):
    family = tiny_family("llama")
    out = tmp_path / "ddp.safetensors"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    result = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "mergekit_aim",
            "calibrate",
            str(family.base),
            "-o",
            str(out),
            "--dataset",
            str(tiny_text_file),
            "--num-samples",
            "48",
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    single = ImportanceMap.load(artifact)
    sharded = ImportanceMap.load(out)
    assert set(single) == set(sharded)
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=1e-5, atol=1e-4)
        assert sharded.count(name) == single.count(name)
    assert (
        sharded.provenance["data_fingerprint"] == single.provenance["data_fingerprint"]
    )
    # Both ran with a BOS at every block's start (the tiny tokenizer prepends
    # one), so the ranks shard the same BOS-led blocks.
    assert sharded.provenance["calibration"]["bos_per_block_resolved"] is True
    assert sharded.provenance["data"] == single.provenance["data"]
