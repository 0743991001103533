"""CalibrationConfig is the one source of calibration defaults, and calibrate()
takes its settings as a config, as keywords, or both."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args

import click
import pytest

from mergekit_aim.calibration import CalibrationConfig
from mergekit_aim.calibration.data import setting_text
from mergekit_aim.calibration.settings import FALLBACK_DEVICE, calibration_config
from mergekit_aim.errors import AimConfigError

# CLI option name -> CalibrationConfig field (the same name, dashes for
# underscores), for every option the calibration commands share.
FIELDS = [
    "dataset",
    "split",
    "text_column",
    "num_samples",
    "seq_len",
    "seed",
    "batch_size",
    "device",
    "dtype",
    "bos_per_block",
    "max_memory",
    "offload_dir",
]


@pytest.mark.parametrize("command", ["calibrate", "relax"])
def test_cli_defaults_are_calibration_config_defaults(command):
    from mergekit_aim.cli import main

    params = {p.name: p for p in main.commands[command].params}
    for field in FIELDS:
        expected = CalibrationConfig.model_fields[field].default
        option = params[field]
        if field == "device":
            # None in the config means "unset"; the CLI states the fallback.
            assert expected is None and option.default == FALLBACK_DEVICE
        elif field == "bos_per_block":
            assert option.default == setting_text(expected)
        else:
            assert option.default == expected, field
    dtype = params["dtype"].type
    assert isinstance(dtype, click.Choice)
    assert tuple(dtype.choices) == get_args(
        CalibrationConfig.model_fields["dtype"].annotation
    )
    # The CLI's defaults, validated, are CalibrationConfig's defaults.
    from_cli = calibration_config(**{f: params[f].default for f in FIELDS})
    assert from_cli == CalibrationConfig(device=FALLBACK_DEVICE)


def test_cli_help_shows_the_config_defaults():
    from click.testing import CliRunner

    from mergekit_aim.cli import main

    text = " ".join(CliRunner().invoke(main, ["calibrate", "--help"]).output.split())
    defaults = CalibrationConfig()
    for option, value in [
        ("--dataset", defaults.dataset),
        ("--num-samples", defaults.num_samples),
        ("--seq-len", defaults.seq_len),
        ("--seed", defaults.seed),
        ("--batch-size", defaults.batch_size),
        ("--bos-per-block", setting_text(defaults.bos_per_block)),
    ]:
        assert option in text
        assert f"[default: {value}]" in text.split(option, 1)[1], option


def test_keyword_settings_override_a_config():
    base = CalibrationConfig(dataset="builtin", num_samples=8, seq_len=64)
    config = calibration_config(base, seq_len=32, bos_per_block="false")
    assert (config.dataset, config.num_samples, config.seq_len) == ("builtin", 8, 32)
    assert config.bos_per_block is False
    assert base.seq_len == 64  # the given config is left alone
    assert calibration_config(base) == base
    assert calibration_config(None, seed=1) == CalibrationConfig(seed=1)
    assert calibration_config({"dataset": "builtin"}).dataset == "builtin"


def test_unknown_setting_is_named():
    with pytest.raises(AimConfigError, match="unknown calibration setting 'seqlen'"):
        calibration_config(seqlen=32)
    with pytest.raises(AimConfigError, match="'num_sample'.*the settings are"):
        calibration_config(CalibrationConfig(), num_sample=8)


def test_invalid_setting_is_an_aim_config_error():
    with pytest.raises(AimConfigError, match="num_samples.*greater than or equal"):
        calibration_config(num_samples=0)
    with pytest.raises(AimConfigError, match="dtype"):
        calibration_config(CalibrationConfig(), dtype="float8")
    # A field's own error comes through as it is.
    with pytest.raises(AimConfigError, match="^bos_per_block must be auto, true"):
        calibration_config(bos_per_block="always")


def test_calibrate_refuses_an_unknown_setting_before_loading():
    from mergekit_aim.calibration import calibrate

    with pytest.raises(AimConfigError, match="'numsamples'"):
        calibrate("/no/such/model", numsamples=8)


def test_calibrate_takes_a_config_and_overrides(tiny_family, tiny_text_file):
    from mergekit_aim.calibration import calibrate

    config = CalibrationConfig(dataset=str(tiny_text_file), num_samples=16, seq_len=64)
    imap = calibrate(str(tiny_family("llama").base), config, seq_len=32, quiet=True)
    calibration = imap.provenance["calibration"]
    assert calibration["seq_len"] == 32 and calibration["num_samples"] == 16
    assert calibration["dataset"] == str(tiny_text_file)


def test_importing_calibration_settings_pulls_in_no_torch():
    code = (
        "import sys, mergekit_aim.calibration; "
        "from mergekit_aim.calibration import CalibrationConfig; "
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"
