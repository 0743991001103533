"""Mixture-of-experts merges: mergekit writes experts fused, the artifact has
them one by one.

mergekit 0.1.5 reads a Mixtral/Qwen-MoE checkpoint through transformers'
conversion and writes ``mlp.experts.gate_up_proj`` ``[E, 2I, H]``,
``mlp.experts.down_proj`` ``[E, H, I]`` and the router ``mlp.gate.weight``; the
importance artifact is keyed by the checkpoint's own per-expert names. Each
expert slice must be relaxed with its own expert's statistic along its input
axis, an expert without a statistic keeps the merged value and is named, and
``mergekit-aim relax``/``tune`` accept such merges.

The artifact is written by hand (random positive statistics), independent of
calibration; the expected values are built here from the checkpoint tensors
with ``torch.cat``/``torch.stack``, not with the package's name mapping.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from fixtures.architectures import MOE_EXPERTS, moe_config, moe_merged_sources
from fixtures.checkpoint_files import load_dir
from fixtures.reference import aim_expected
from safetensors.torch import load_file, save_file

from mergekit_aim.importance import ImportanceMap

pytestmark = pytest.mark.slow

MERGEKIT_YAML = str(Path(sys.executable).with_name("mergekit-yaml"))
OMEGA = 0.4
LEFT_OUT = (1, 2)  # (layer, expert) with no statistic


def perturbed_copy(base, out, seed):
    """``base`` with every tensor of its safetensors moved by seeded noise."""
    shutil.copytree(base, out)
    path = out / "model.safetensors"
    tensors = load_file(str(path))
    generator = torch.Generator().manual_seed(seed)
    moved = {}
    for name in sorted(tensors):
        tensor = tensors[name]
        scale = 0.1 * max(tensor.float().pow(2).mean().sqrt().item(), 0.02)
        noise = torch.randn(tensor.shape, generator=generator)
        moved[name] = tensor + scale * noise
    save_file(moved, str(path), metadata={"format": "pt"})
    return out


def write_artifact(base, path, *, drop=()):
    """Random positive statistics for every checkpoint weight with an input
    (and the norms); gate/up of one expert share one; the left-out expert
    (and any name containing one of ``drop``) has none."""
    tensors = load_file(str(base / "model.safetensors"))
    generator = torch.Generator().manual_seed(7)
    sums, counts, axes, skipped = {}, {}, {}, {}
    left_layer, left_expert = LEFT_OUT
    for name in sorted(tensors):
        shape = tensors[name].shape
        if "embed" in name or name.endswith(".bias") or any(d in name for d in drop):
            continue
        if f"layers.{left_layer}." in name and f"experts.{left_expert}." in name:
            skipped[name] = "no calibration token was routed to this expert"
            continue
        length = shape[-1]
        sums[name] = torch.rand(length, generator=generator) * 5 + 0.01
        counts[name] = 100
        axes[name] = -1 if len(shape) == 2 else 0
    # Gate and up projections of one expert read the same input.
    for name in list(sums):
        for gate, up in (("w1", "w3"), ("gate_proj", "up_proj")):
            twin = name.replace(f".{gate}.", f".{up}.")
            if twin != name and twin in sums:
                sums[twin] = sums[name].clone()
    provenance = {"base_model": str(base), "skipped": skipped}
    return ImportanceMap(sums, counts, axes, provenance).save(path)


@pytest.fixture(scope="module")
def moe_families(tmp_path_factory, tiny_tokenizer):
    from mergekit_aim.demo.models import init_model, save_checkpoint

    built = {}

    def get(family):
        if family not in built:
            root = tmp_path_factory.mktemp(f"moe-{family}")
            model = init_model(moe_config(family, len(tiny_tokenizer)), seed=0)
            base = save_checkpoint(model, tiny_tokenizer, root / "base")
            variants = [perturbed_copy(base, root / f"ft_{i}", i + 1) for i in (0, 1)]
            artifact = write_artifact(base, root / "importance.safetensors")
            built[family] = (base, variants, artifact)
        return built[family]

    return get


def run_yaml(config, out, check=True):
    result = subprocess.run(
        [MERGEKIT_YAML, str(config), str(out), "--random-seed", "1"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"mergekit-yaml failed:\n{result.stderr[-4000:]}")
    return result


def write_config(path, base, variants, aim=None):
    config = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(m), "parameters": {"weight": 1.0, "density": 0.6}}
            for m in variants
        ],
        "dtype": "float32",
    }
    if aim is not None:
        config["aim"] = aim
    path.write_text(yaml.safe_dump(config))
    return path


def expected_sources(family, base_tensors, imap, name):
    """(base tensor, statistic per expert slice, or the router's statistic) of
    a merged tensor; None for a tensor kept under its checkpoint name."""
    found = moe_merged_sources(family, base_tensors, name)
    if found is None:
        return None
    source, slices = found
    stats = [imap[names[0]] if names[0] in imap else None for names in slices]
    if name.endswith(".mlp.gate.weight"):
        return source, stats[0]
    return source, stats


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_merge_relaxes_every_expert_and_router(family, moe_families, tmp_path):
    from mergekit_aim.cli import main

    base, variants, artifact = moe_families(family)
    imap = ImportanceMap.load(artifact)
    plain_cfg = write_config(tmp_path / "plain.yml", base, variants)
    aim_cfg = write_config(
        tmp_path / "aim.yml",
        base,
        variants,
        aim={"omega": OMEGA, "importance": str(artifact)},
    )
    run_yaml(plain_cfg, tmp_path / "plain")
    result = run_yaml(aim_cfg, tmp_path / "aim")
    base_tensors = load_dir(base)
    plain, relaxed = load_dir(tmp_path / "plain"), load_dir(tmp_path / "aim")
    assert set(plain) == set(relaxed)
    assert "model.layers.0.mlp.experts.gate_up_proj" in plain  # mergekit's names

    def close(got, want):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    checked_experts = 0
    for name, merged in plain.items():
        found = expected_sources(family, base_tensors, imap, name)
        if found is None:
            if name in imap:
                axis = imap.input_axis(name)
                close(
                    relaxed[name],
                    aim_expected(base_tensors[name], merged, imap[name], OMEGA, axis),
                )
                assert not torch.equal(relaxed[name], merged), name
            else:
                assert torch.equal(relaxed[name], merged), name
                # Only embeddings, biases and the like lack a statistic.
                assert "embed" in name or merged.ndim == 1, name
            continue
        source, stats = found
        assert source.shape == merged.shape, name
        if not isinstance(stats, list):  # the router: a renamed matrix
            assert stats is not None and merged.ndim == 2
            close(relaxed[name], aim_expected(source, merged, stats, OMEGA, -1))
            assert not torch.equal(relaxed[name], merged), name
            continue
        for expert, stat in enumerate(stats):
            got, was = relaxed[name][expert], merged[expert]
            if stat is None:
                assert (int(name.split(".")[2]), expert) == LEFT_OUT
                assert torch.equal(got, was), (name, expert)
                continue
            close(got, aim_expected(source[expert], was, stat, OMEGA, -1))
            assert not torch.equal(got, was), (name, expert)
            checked_experts += 1
    assert checked_experts == 2 * 2 * MOE_EXPERTS - 2

    stderr = result.stderr
    layer, expert = LEFT_OUT
    for fused in ("gate_up_proj", "down_proj"):
        assert f"model.layers.{layer}.mlp.experts.{fused}[{expert}]" in stderr
    assert "no input statistic for" not in stderr
    assert "weight elements relaxed:" in stderr
    card = (tmp_path / "aim" / "README.md").read_text()
    assert "weight elements relaxed:" in card
    assert f"model.layers.{layer}.mlp.experts.down_proj[{expert}]" in card

    # Post-hoc relax of the plain merge is the aim: merge, bit for bit.
    out = tmp_path / "relaxed"
    cli = CliRunner().invoke(
        main,
        [
            "relax",
            "--base",
            str(base),
            "--merged",
            str(tmp_path / "plain"),
            "--importance",
            str(artifact),
            "--omega",
            str(OMEGA),
            "--quiet",
            str(out),
        ],
    )
    assert cli.exit_code == 0, cli.output
    posthoc = load_dir(out)
    assert set(posthoc) == set(relaxed)
    for name, tensor in relaxed.items():
        assert torch.equal(posthoc[name], tensor), name
    report = json.loads((out / "aim_relax.json").read_text())
    assert report["coverage"]["elements_relaxed"] > 0
    assert len(report["coverage"]["experts_without_statistic"]) == 2


def test_tune_runs_on_a_moe_merge(moe_families, tmp_path, tiny_text, monkeypatch):
    """tune relaxes the loaded merged model's fused experts in memory (their
    parameter names are mergekit's) and writes the pick (forced to ω = 0
    here) as ``relax`` would."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_aim.offline import relax_checkpoint
    from mergekit_aim.tuning import search, tune
    from mergekit_aim.tuning.evaluation import evaluate_loss

    monkeypatch.setattr(search, "choose", lambda rows, choice: rows[0])
    base, variants, artifact = moe_families("mixtral")
    config = write_config(
        tmp_path / "merge.yml", base, variants, aim={"importance": str(artifact)}
    )
    texts = tiny_text[:20]
    evals = tmp_path / "eval.txt"
    evals.write_text("\n\n".join(texts))
    out = tmp_path / "tuned"
    result = tune(config, {"stories": evals}, out, omegas=[0.0], seq_len=32, quiet=True)
    assert [row.omega_attention for row in result.rows] == [0.0, 1.0]
    assert result.chosen.omega_attention == 0.0
    # ω = 0 moves the merge: the candidate was written into the loaded model.
    losses = [row.losses["stories"] for row in result.rows]
    assert losses[0] != losses[1]
    report = json.loads((out / "aim_tune.json").read_text())
    # 8 attention + 5 norm tensors, the LM head, 2 routers, 4 expert stacks.
    assert report["relaxed_tensors"] == 20
    model = AutoModelForCausalLM.from_pretrained(out)
    loss = evaluate_loss(
        model, texts, tokenizer=AutoTokenizer.from_pretrained(out), seq_len=32
    )
    assert loss == pytest.approx(losses[0], rel=1e-6)
    plain_cfg = write_config(tmp_path / "plain.yml", base, variants)
    run_yaml(plain_cfg, tmp_path / "plain")
    imap = ImportanceMap.load(artifact)
    relax_checkpoint(base, tmp_path / "plain", imap, 0.0, tmp_path / "relaxed")
    expected, written = load_dir(tmp_path / "relaxed"), load_dir(out)
    assert set(expected) == set(written)
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name


def test_uncovered_weights_warn_or_refuse(moe_families, tmp_path):
    base, variants, _ = moe_families("mixtral")
    artifact = write_artifact(
        base, tmp_path / "no-router.safetensors", drop=("block_sparse_moe.gate.",)
    )
    aim = {"omega": OMEGA, "importance": str(artifact)}
    config = write_config(tmp_path / "aim.yml", base, variants, aim=aim)
    result = run_yaml(config, tmp_path / "aim")
    warning = (
        "AIM: no input statistic for model.layers.*.mlp.gate.weight (2 tensors): "
        "the merged value is kept"
    )
    assert warning in result.stderr
    plain = load_dir(tmp_path / "aim")
    assert "model.layers.0.mlp.gate.weight" in plain

    strict = write_config(
        tmp_path / "strict.yml",
        base,
        variants,
        aim={**aim, "require_full_coverage": True},
    )
    out = tmp_path / "strict-out"
    refused = run_yaml(strict, out, check=False)
    assert refused.returncode != 0
    assert "aim.require_full_coverage" in refused.stderr
    assert "model.layers.*.mlp.gate.weight" in refused.stderr
    assert "model.layers.1.mlp.experts.gate_up_proj[2]" in refused.stderr
    assert not out.exists()  # refused while planning: nothing written


def test_require_full_coverage_is_validated():
    from mergekit_aim.config import AimConfig

    assert AimConfig(importance="x").require_full_coverage is False
    assert AimConfig(importance="x", require_full_coverage=True).require_full_coverage
    with pytest.raises(ValueError, match="require_full_coverage"):
        AimConfig(importance="x", require_full_coverage="sometimes")
