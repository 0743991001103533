"""Activations that overflow the calibration dtype are an error while measuring.

The model is a tiny Llama whose layer-0 ``up_proj`` weight is scaled so that its
output, a factor of ``down_proj``'s input, exceeds float16's largest finite value
(65504) while every weight still fits float16: in float32 it calibrates normally,
in float16 the first non-finite input must be named, never stored as an inf/NaN
statistic.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures.tiny_models import tiny_model

from mergekit_aim.calibration import calibrate, collect_importance, distributed
from mergekit_aim.calibration.targets import find_targets
from mergekit_aim.demo.models import save_checkpoint
from mergekit_aim.errors import CalibrationError

OVERFLOWING = "model.layers.0.mlp.down_proj"
CLI = str(Path(sys.executable).with_name("mergekit-aim"))


def _overflowing_model(vocab_size: int) -> torch.nn.Module:
    model = tiny_model("llama", vocab_size)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2e5)
    assert model.model.layers[0].mlp.up_proj.weight.abs().max() < 65504
    return model


@pytest.fixture(scope="module")
def overflowing(tiny_tokenizer, tmp_path_factory) -> Path:
    """A float32 checkpoint whose float16 activations overflow in layer 0."""
    root = tmp_path_factory.mktemp("overflow")
    model = _overflowing_model(len(tiny_tokenizer))
    return save_checkpoint(model, tiny_tokenizer, root / "base")


def _settings(dataset: Path) -> dict:
    return dict(dataset=str(dataset), num_samples=8, seq_len=32, batch_size=4)


def _blocks(vocab_size: int, count: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(4, vocab_size, (count, 16), generator=generator)


def _assert_names_overflow(message: str) -> None:
    assert f"module {OVERFLOWING} " in message
    assert f"{OVERFLOWING}.weight" in message
    assert "overflowed float16" in message
    assert "--dtype bfloat16" in message and "--dtype float32" in message
    assert "calibration: {dtype: bfloat16}" in message


def test_float16_overflow_names_the_module(overflowing, tiny_text_file):
    with pytest.raises(CalibrationError) as caught:
        calibrate(
            str(overflowing), dtype="float16", quiet=True, **_settings(tiny_text_file)
        )
    _assert_names_overflow(str(caught.value))


def test_same_model_in_float32_is_finite(overflowing, tiny_text_file):
    imap = calibrate(
        str(overflowing), dtype="float32", quiet=True, **_settings(tiny_text_file)
    )
    assert f"{OVERFLOWING}.weight" in imap
    for name in imap:
        assert torch.isfinite(imap[name]).all(), name


def test_the_fixture_exceeds_float16_range_in_float32(tiny_tokenizer):
    # up_proj's output, one factor of down_proj's input, leaves float16's range.
    model = _overflowing_model(len(tiny_tokenizer))
    seen = []
    module = model.get_submodule("model.layers.0.mlp.up_proj")
    handle = module.register_forward_hook(
        lambda _, args, out: seen.append(out.abs().max())
    )
    with torch.no_grad():
        model(input_ids=_blocks(len(tiny_tokenizer)))
    handle.remove()
    assert 65504 < seen[0] < float("inf")


@pytest.mark.slow
def test_cli_exits_non_zero_and_writes_nothing(overflowing, tiny_text_file, tmp_path):
    out = tmp_path / "imp.safetensors"
    result = subprocess.run(
        [CLI, "calibrate", str(overflowing), "-o", str(out), "--dtype", "float16"]
        + [f"--{k.replace('_', '-')}={v}" for k, v in _settings(tiny_text_file).items()]
        + ["--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode != 0
    assert "error:" in result.stderr
    _assert_names_overflow(result.stderr)
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_measuring_stops_at_the_first_overflowing_batch(tiny_tokenizer):
    model = _overflowing_model(len(tiny_tokenizer)).to(torch.float16)
    batches = iter(_blocks(len(tiny_tokenizer)).split(1))
    hooks_before = sum(len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(CalibrationError, match=OVERFLOWING):
        collect_importance(model, batches)
    # Three of the four batches were never run.
    assert len(list(batches)) == 3
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks_before


def test_non_finite_model_input_names_the_first_module_to_see_it(tiny_tokenizer):
    model = tiny_model("llama", len(tiny_tokenizer))
    with torch.no_grad():
        model.model.embed_tokens.weight[7].fill_(float("nan"))
    blocks = _blocks(len(tiny_tokenizer))
    blocks[2, 5] = 7
    with pytest.raises(CalibrationError) as caught:
        collect_importance(model, blocks, batch_size=1)
    message = str(caught.value)
    # The layer's projections come first in named_modules(); the forward pass
    # reaches its input norm first.
    assert "module model.layers.0.input_layernorm " in message
    assert "weight model.embed_tokens.weight is itself inf or NaN" in message
    assert "calibrating in float32" in message
    assert "no calibration dtype is wider than float32" in message


def test_non_finite_sum_from_another_rank_is_an_error_on_this_one(
    tiny_tokenizer, monkeypatch
):
    """Under torchrun a rank whose own sums are finite still refuses the result."""
    model = tiny_model("llama", len(tiny_tokenizer))
    reduce = distributed.all_reduce

    def other_rank_overflowed(sums, rows, channels):
        reduced, totals = reduce(sums, rows, channels)
        index = [t.module_name for t in find_targets(model)[0]].index(OVERFLOWING)
        reduced = list(reduced)
        reduced[index] = reduced[index] + float("inf")
        return reduced, totals

    monkeypatch.setattr(distributed, "all_reduce", other_rank_overflowed)
    with pytest.raises(CalibrationError, match=f"module {OVERFLOWING} "):
        collect_importance(model, _blocks(len(tiny_tokenizer)))


def test_merge_time_calibration_caches_nothing(
    overflowing, tiny_text_file, tmp_path, monkeypatch
):
    """The aim: block's calibration raises the same error and leaves no entry."""
    from mergekit_aim.calibration import CalibrationConfig
    from mergekit_aim.calibration.cache import calibrated_artifact
    from mergekit_aim.checkpoint import read_checkpoint

    monkeypatch.setenv("MERGEKIT_AIM_CACHE", str(tmp_path))
    settings = CalibrationConfig(dtype="float16", **_settings(tiny_text_file))
    with pytest.raises(CalibrationError) as caught:
        calibrated_artifact(
            str(overflowing), read_checkpoint(overflowing), settings, device="cpu"
        )
    _assert_names_overflow(str(caught.value))
    assert list(tmp_path.glob("*.safetensors")) == []
