"""The calibration cache: one entry per base model, settings and exact blocks."""

from __future__ import annotations

import pytest

from mergekit_aim.calibration.cache import calibrated_artifact
from mergekit_aim.checkpoint import read_checkpoint
from mergekit_aim.config import CalibrationConfig


def test_bos_packings_are_separate_entries(
    tiny_family, tiny_text_file, tmp_path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("MERGEKIT_AIM_CACHE", str(tmp_path))
    base = tiny_family("llama").base
    checkpoint = read_checkpoint(base)
    common = dict(dataset=str(tiny_text_file), num_samples=16, seq_len=32)

    def artifact(**settings):
        config = CalibrationConfig(**common, **settings)
        return calibrated_artifact(
            str(base), checkpoint, config, device="cpu", quiet=True
        )

    auto_path, auto = artifact()
    paper_path, paper = artifact(bos_per_block=False)
    assert auto_path != paper_path
    assert auto.provenance["cache_key"] != paper.provenance["cache_key"]
    assert auto.provenance["calibration"]["bos_per_block"] == "auto"
    assert auto.provenance["calibration"]["bos_per_block_resolved"] is True
    assert paper.provenance["calibration"]["bos_per_block"] is False
    assert paper.provenance["calibration"]["bos_per_block_resolved"] is False
    # Each packing finds its own entry again; true packs like auto here but is
    # another setting, so another entry.
    assert artifact()[0] == auto_path
    assert artifact(bos_per_block="false")[0] == paper_path
    true_path, forced = artifact(bos_per_block=True)
    assert true_path not in (auto_path, paper_path)
    assert forced.provenance["data_fingerprint"] == auto.provenance["data_fingerprint"]
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
