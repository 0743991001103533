"""Calibration of Gemma-3-270M from the CLI: capped memory with disk offload,
and activations that overflow float16.

Deselected from `make test` (marker ``real_large``); run by `make test-real`.
"""

from __future__ import annotations

import re

import pytest
import torch
from real_checkpoints import run_command
from safetensors import safe_open

from mergekit_aim.importance import ImportanceMap

pytestmark = [pytest.mark.slow, pytest.mark.real_large]

SETTINGS = ("--dataset", "builtin", "--num-samples", 8, "--seq-len", 64)
# Far below the model (1.07 GB in float32, 0.67 GB of it the embedding), so
# most of it is placed on disk and streamed in.
CAP = "150MiB"


def checkpoint_tensors(path) -> set[str]:
    names = set()
    for shard in path.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            names.update(handle.keys())
    return names


def calibrate(base, out, *extra, check=True):
    return run_command(
        "mergekit-aim", "calibrate", base, "-o", out, *SETTINGS, "--quiet", *extra,
        check=check,
    )  # fmt: skip


@pytest.fixture(scope="module")
def uncapped(gemma3, tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma3") / "uncapped.safetensors"
    calibrate(gemma3, out)
    return ImportanceMap.load(out)


def test_uncapped_calibration_measures_every_weight_but_the_embedding(uncapped, gemma3):
    expected = checkpoint_tensors(gemma3) - {"model.embed_tokens.weight"}
    assert set(uncapped) == expected and len(expected) == 235
    for name in uncapped:
        assert torch.isfinite(uncapped[name]).all(), name
    assert uncapped.provenance["skipped"] == {
        "lm_head.weight": "tied to the input embedding (not relaxed)"
    }


def test_capped_calibration_with_disk_offload_equals_uncapped(
    uncapped, gemma3, tmp_path
):
    from mergekit_aim.calibration.loading import load_base_model

    # The cap really sends weights to disk (what the CLI run below loads).
    model = load_base_model(
        str(gemma3), max_memory=CAP, offload_dir=str(tmp_path / "probe")
    )
    placement = set(model.hf_device_map.values())
    del model
    assert "disk" in placement, placement

    out = tmp_path / "capped.safetensors"
    calibrate(gemma3, out, "--max-memory", CAP, "--offload-dir", tmp_path / "offload")
    capped = ImportanceMap.load(out)
    assert set(capped) == set(uncapped)
    for name in uncapped:
        assert torch.equal(capped[name], uncapped[name]), name
        assert capped.count(name) == uncapped.count(name)
    for key in ("data_fingerprint", "base_fingerprint", "calibration"):
        assert capped.provenance[key] == uncapped.provenance[key], key


def test_float16_overflow_is_an_error_naming_the_module(gemma3, tmp_path):
    """Gemma-3's activations exceed float16's range: calibrating in float16
    must fail, name where, suggest a wider dtype, and write nothing."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "fp16.safetensors"
    result = calibrate(gemma3, out, "--dtype", "float16", check=False)
    assert result.returncode != 0
    message = result.stderr
    assert "error:" in message, message[-2000:]
    named = re.search(r"module (model\.layers\.\d+\.[\w.]+)", message)
    assert named, message[-2000:]
    assert f"{named.group(1)}.weight" in checkpoint_tensors(gemma3)
    assert "bfloat16" in message and "float32" in message
    assert not out.exists() and list(out_dir.iterdir()) == []


def test_bfloat16_the_suggested_dtype_calibrates_gemma3(gemma3, uncapped, tmp_path):
    out = tmp_path / "bf16.safetensors"
    calibrate(gemma3, out, "--dtype", "bfloat16")
    bf16 = ImportanceMap.load(out)
    assert set(bf16) == set(uncapped)
    assert (
        bf16.provenance["data_fingerprint"] == uncapped.provenance["data_fingerprint"]
    )
    for name in bf16:
        assert torch.isfinite(bf16[name]).all(), name
        # Same statistic as float32's up to bfloat16's precision along the way.
        torch.testing.assert_close(
            bf16.mean(name), uncapped.mean(name), rtol=0.1, atol=1e-3
        )
