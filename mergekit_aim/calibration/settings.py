"""Calibration settings: :class:`CalibrationConfig`, the one place their
defaults are stated.

The ``aim:`` block's ``calibration:`` mapping, the ``mergekit-aim`` options
and :func:`mergekit_aim.calibration.calibrate`'s keyword settings are all this
model: the CLI reads its option defaults and choices from
``CalibrationConfig.model_fields`` and ``calibrate()`` validates its keywords
with it, so a default changed here changes everywhere. This module stays
light (pydantic and the stdlib), as the CLI builds its option table from it
at import time; :mod:`~mergekit_aim.calibration.data` imports it, never the
other way round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergekit_aim.errors import AimConfigError, AimError

# The paper's calibration corpus, the default dataset
# (:mod:`~mergekit_aim.calibration.data` resolves it).
PILE_VAL = "pile-val"

# ``bos_per_block``: "auto", or a boolean (see calibration/data.py's packing).
BosPerBlock = Literal["auto"] | bool
DEFAULT_BOS_PER_BLOCK: BosPerBlock = "auto"
BOS_PER_BLOCK_CHOICES = ("auto", "true", "false")

# Where calibration runs when nothing chose a device: CalibrationConfig's
# device is None ("unset") so that a merge can fill it from mergekit's own
# --device/--cuda; calibrate(), load_base_model() and the CLI, which have no
# such second source, fall back to this.
FALLBACK_DEVICE = "cpu"

CalibrationDtype = Literal["auto", "float32", "bfloat16", "float16"]
CALIBRATION_DTYPES: tuple[str, ...] = get_args(CalibrationDtype)


def bos_per_block_value(value: object) -> BosPerBlock:
    """Validate a ``bos_per_block`` setting: ``"auto"``, True or False.

    The strings ``auto``, ``true`` and ``false`` (any case, as the CLI and
    YAML may give them) are accepted; anything else raises AimConfigError
    naming the field.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word == "auto":
            return "auto"
        if word in ("true", "false"):
            return word == "true"
    raise AimConfigError(
        f"bos_per_block must be auto, true or false; got {value!r}. auto starts "
        f"every calibration block with BOS when the tokenizer adds one to every "
        f"text; false is the paper's packing"
    )


class CalibrationConfig(BaseModel):
    """How to measure the base model's input activations before merging."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(
        PILE_VAL,
        description="pile-val | builtin | a local .txt/.jsonl/.parquet | an HF id",
    )
    split: str | None = None
    text_column: str | None = None
    num_samples: int = Field(256, ge=1)
    seq_len: int = Field(512, ge=1)
    seed: int = 42
    batch_size: int = Field(4, ge=1)
    # None: whoever runs the calibration decides (see FALLBACK_DEVICE).
    device: str | None = None
    dtype: CalibrationDtype = "auto"
    max_memory: str | None = Field(
        None, description="cap on weight memory per device and CPU, e.g. 8GiB"
    )
    offload_dir: str | None = None
    bos_per_block: BosPerBlock = Field(
        DEFAULT_BOS_PER_BLOCK,
        description="start every block with BOS: auto (when the tokenizer adds "
        "one to every text) | true | false (the paper's packing)",
    )

    @field_validator("bos_per_block", mode="before")
    @classmethod
    def _bos_per_block_choice(cls, value: Any) -> BosPerBlock:
        # The one rule (data.py), so that YAML, CLI and API accept the same
        # spellings; pydantic alone would also take 1, "yes" or "on".
        return bos_per_block_value(value)

    def cache_settings(self) -> dict[str, Any]:
        """Settings that change the statistic (device and batch size do not)."""
        return {
            "dataset": self.dataset,
            "split": self.split,
            "text_column": self.text_column,
            "num_samples": self.num_samples,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "dtype": self.dtype,
            "bos_per_block": self.bos_per_block,
        }


def calibration_config(
    config: CalibrationConfig | Mapping[str, Any] | None = None,
    /,
    **settings: Any,
) -> CalibrationConfig:
    """``config`` (default: all defaults) with ``settings`` applied on top.

    Every keyword must name a :class:`CalibrationConfig` field. The keywords
    are validated on their own first, then replace those fields of
    ``config``. Any invalid or unknown setting raises :class:`AimConfigError`
    naming it (the field's own error where the field raises one, e.g.
    ``bos_per_block``).
    """
    unknown = sorted(set(settings) - set(CalibrationConfig.model_fields))
    if unknown:
        raise AimConfigError(
            f"unknown calibration setting {unknown[0]!r}"
            + (f" (and {', '.join(map(repr, unknown[1:]))})" if unknown[1:] else "")
            + f"; the settings are {', '.join(CalibrationConfig.model_fields)}"
        )
    try:
        overrides = CalibrationConfig(**settings)
        if config is None:
            return overrides
        if isinstance(config, Mapping):
            config = CalibrationConfig.model_validate(dict(config))
    except ValidationError as error:
        raise _config_error(error) from None
    if not isinstance(config, CalibrationConfig):
        raise AimConfigError(
            f"config must be a CalibrationConfig or a mapping of its settings; "
            f"got {type(config).__name__}"
        )
    return config.model_copy(
        update={name: getattr(overrides, name) for name in settings}
    )


def _config_error(error: ValidationError) -> AimError:
    first = error.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, AimError):
        return cause
    field = ".".join(str(part) for part in first["loc"]) or "calibration"
    return AimConfigError(
        f"calibration setting {field}: {first['msg']}; got {first.get('input')!r}"
    )
