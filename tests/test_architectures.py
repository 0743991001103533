"""Families whose tensor names differ between checkpoint and memory, end to end
as a user runs them: `mergekit-aim calibrate`, then plain `mergekit-yaml` with
and without an `aim:` block.

- Pythia (GPT-NeoX): the untied head is ``embed_out.weight`` on disk and
  ``lm_head`` in memory; it must be measured and relaxed like every Linear.
- Mixtral and Qwen2-MoE: experts are stored one by one on disk, fused in
  memory and in mergekit's output; every expert slice is relaxed with its own
  calibrated statistic, the router with its own.
- Qwen2-VL: the language tower is ``model.layers.*`` on disk and
  ``model.language_model.layers.*`` in memory; it is calibrated with text, and
  the vision tower (``visual.*``) is reported as not measured and kept as merged.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures.architectures import MOE_LAYOUTS, moe_merged_sources, write_family
from fixtures.checkpoint_files import load_dir
from fixtures.reference import aim_expected

from mergekit_aim.importance import ImportanceMap

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
OMEGA = 0.4


def _run(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _config(paths: dict[str, Path], aim: str) -> str:
    return (
        "merge_method: ties\n"
        f"base_model: {paths['base']}\n"
        "models:\n"
        + "".join(
            f"  - model: {paths[n]}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
            for n in ("ft_a", "ft_b")
        )
        + "dtype: float32\n"
        + aim
    )


@pytest.fixture(scope="module", params=["pythia", "qwen2_vl", "mixtral", "qwen2_moe"])
def merged(request, tmp_path_factory, tiny_tokenizer, tiny_text_file):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    paths = write_family(kind, root, tiny_tokenizer)
    artifact = root / "importance.safetensors"
    _run(
        BIN / "mergekit-aim", "calibrate", paths["base"], "-o", artifact,
        "--dataset", tiny_text_file, "--num-samples", 16, "--seq-len", 32, "-q",
    )  # fmt: skip
    plain_yml = root / "plain.yml"
    plain_yml.write_text(_config(paths, ""))
    aim_yml = root / "aim.yml"
    aim_yml.write_text(
        _config(paths, f"aim: {{omega: {OMEGA}, importance: {artifact}}}\n")
    )
    _run(BIN / "mergekit-yaml", plain_yml, root / "plain")
    result = _run(BIN / "mergekit-yaml", aim_yml, root / "aim")
    return kind, paths, ImportanceMap.load(str(artifact)), root, result.stderr


def test_every_measured_weight_is_relaxed_exactly(merged):
    kind, paths, imap, root, stderr = merged
    base, plain, aim = (
        load_dir(p) for p in (paths["base"], root / "plain", root / "aim")
    )
    assert set(aim) == set(plain)
    relaxed = 0
    for name, tensor in aim.items():
        fused = moe_merged_sources(kind, base, name) if kind in MOE_LAYOUTS else None
        if fused is not None:
            # An expert stack (slice e with expert e's statistic) or a router.
            source, slices = fused
            whole = len(slices) == 1 and source.ndim == 2
            for index, names in enumerate(slices):
                got = tensor if whole else tensor[index]
                was = plain[name] if whole else plain[name][index]
                if names[0] not in imap:  # an expert no token reached
                    assert torch.equal(got, was) and names[0] in stderr, names
                    continue
                want = source if whole else source[index]
                expected = aim_expected(want, was, imap[names[0]], OMEGA, -1)
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
                relaxed += not torch.equal(got, was)
            continue
        if name in imap:
            expected = aim_expected(
                base[name], plain[name], imap[name], OMEGA, imap.input_axis(name)
            )
            torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6)
            relaxed += not torch.equal(tensor, plain[name])
        else:
            assert torch.equal(tensor, plain[name]), name
    assert relaxed > 10
    if kind == "pythia":
        # the head is measured under its checkpoint name and relaxed
        assert "embed_out.weight" in imap
        assert not torch.equal(aim["embed_out.weight"], plain["embed_out.weight"])


def test_language_tower_measured_and_vision_tower_named(merged):
    kind, paths, imap, _, stderr = merged
    base = load_dir(paths["base"])
    linear = [
        n
        for n, t in base.items()
        if n.endswith(".weight") and t.ndim == 2 and "embed_" not in n
    ]
    text = [n for n in linear if not n.startswith("visual.")]
    assert text and all(n in imap for n in text)
    if kind != "qwen2_vl":
        return
    assert not any(n.startswith("visual.") for n in imap)
    skipped = imap.provenance["skipped"]
    vision = [n for n in skipped if n.startswith("visual.")]
    assert vision and all("vision" in str(skipped[n]) for n in vision)
    assert "visual." in stderr  # the merge names the uncovered group
