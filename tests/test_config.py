"""The `aim:` block as mergekit parses it, with the plugin active."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from mergekit_aim.config import AimConfig, CalibrationConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "example_configs"


def _config(**aim):
    from mergekit.config import MergeConfiguration

    data = {
        "merge_method": "ties",
        "base_model": "org/base",
        "models": [{"model": "org/a", "parameters": {"weight": 1.0, "density": 0.5}}],
        "aim": aim,
    }
    return MergeConfiguration.model_validate(data)


def test_block_is_kept_and_typed():
    config = _config(omega=0.3, importance="imp.safetensors")
    assert isinstance(config.aim, AimConfig)
    assert config.aim.omega == 0.3
    assert config.aim.importance == "imp.safetensors"
    assert "aim" in config.to_yaml()


def test_calibration_defaults_follow_the_paper():
    config = _config(calibration={})
    calibration = config.aim.calibration
    assert isinstance(calibration, CalibrationConfig)
    assert (calibration.dataset, calibration.num_samples, calibration.seq_len) == (
        "pile-val",
        256,
        512,
    )
    assert calibration.seed == 42
    assert config.aim.omega == 0.4


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", "auto"), ("bos_per_block: auto", "auto"), ("bos_per_block: true", True)]
    + [("bos_per_block: false", False), ("bos_per_block: 'False'", False)],
)
def test_bos_per_block_from_yaml(text, expected):
    calibration = _config(calibration=yaml.safe_load(text) or {}).aim.calibration
    assert calibration.bos_per_block == expected
    # Part of the cache key: artifacts of the two packings are never confused.
    assert calibration.cache_settings()["bos_per_block"] == expected


def test_bos_per_block_default_is_the_one_default():
    from mergekit_aim.calibration import data
    from mergekit_aim.cli import calibrate as calibrate_command

    assert data.DEFAULT_BOS_PER_BLOCK == "auto"
    assert CalibrationConfig().bos_per_block == data.DEFAULT_BOS_PER_BLOCK
    option = next(o for o in calibrate_command.params if o.name == "bos_per_block")
    assert option.default == "auto"
    assert CalibrationConfig(bos_per_block=False).cache_settings() != (
        CalibrationConfig().cache_settings()
    )


def test_config_without_aim_is_unchanged():
    from mergekit.config import MergeConfiguration

    config = MergeConfiguration.model_validate(
        {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]}
    )
    assert config.aim is None
    assert "aim" not in config.to_yaml()


@pytest.mark.parametrize(
    "aim, field, message",
    [
        ({"omega": 1.5, "importance": "x"}, "omega", "within [0, 1]"),
        ({"omega": -0.1, "importance": "x"}, "omega", "within [0, 1]"),
        ({"omega": [0.2, 1.2], "importance": "x"}, "omega", "within [0, 1]"),
        (
            {"omega": [{"filter": "mlp", "value": 2}], "importance": "x"},
            "omega",
            "within [0, 1]",
        ),
        ({"omega": True, "importance": "x"}, "omega", "not a boolean"),
        ({"omega": "high", "importance": "x"}, "omega", "number in [0, 1]"),
        ({"omega": [], "importance": "x"}, "omega", "empty"),
        ({"importance": "x", "calibration": {}}, "aim", "not both"),
        ({"omega": 0.4}, "aim", "aim.importance"),
        ({"importance": "x", "omgea": 0.4}, "omgea", "Extra inputs"),
        ({"calibration": {"datset": "builtin"}}, "datset", "Extra inputs"),
        ({"calibration": {"num_samples": 0}}, "num_samples", "greater than"),
        ({"calibration": {"seq_len": -1}}, "seq_len", "greater than"),
        ({"calibration": {"dtype": "int8"}}, "dtype", "float32"),
        (
            {"calibration": {"bos_per_block": "sometimes"}},
            "bos_per_block",
            "auto, true or false",
        ),
        ({"calibration": {"bos_per_block": 1}}, "bos_per_block", "auto, true or"),
        ({"calibration": {"bos_per_block": None}}, "bos_per_block", "got None"),
        ({"importance": "x", "exclude": ["("]}, "exclude", "regular expression"),
        ({"importance": "  "}, "importance", "name a file"),
    ],
)
def test_bad_blocks_name_the_field(aim, field, message):
    with pytest.raises(ValidationError) as info:
        _config(**aim)
    text = str(info.value)
    assert field in text
    assert message in text


def test_aim_requires_base_model():
    from mergekit.config import MergeConfiguration

    with pytest.raises(ValidationError, match="aim: needs base_model"):
        MergeConfiguration.model_validate(
            {
                "merge_method": "ties",
                "models": [{"model": "a"}],
                "aim": {"importance": "x"},
            }
        )


def test_omega_accepts_mergekit_parameter_syntax():
    assert _config(omega=[0.2, 0.6], importance="x").aim.omega == [0.2, 0.6]
    filtered = _config(
        omega=[{"filter": "self_attn", "value": 0.2}, {"value": 0.6}],
        importance="x",
    ).aim.omega
    assert [c.filter for c in filtered] == ["self_attn", None]
    assert _config(omega="4e-1", importance="x").aim.omega == "4e-1"


def test_exclude_matches_any_name():
    aim = AimConfig(importance="x", exclude=["lm_head", r"layers\.0\."])
    assert aim.selection().excluded_by("lm_head.weight") == "lm_head"
    assert aim.selection().excluded_by(
        "model.layers.1.mlp.up_proj.weight", "model.layers.0.x"
    )
    assert aim.selection().excluded_by("model.layers.1.mlp.up_proj.weight") is None


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yml")), ids=lambda p: p.name)
def test_example_configs_parse(path):
    from mergekit.config import MergeConfiguration

    config = MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
    assert config.aim is not None
    assert config.base_model is not None


def test_there_are_example_configs():
    names = {p.name for p in EXAMPLES.glob("*.yml")}
    assert len(names) >= 5
