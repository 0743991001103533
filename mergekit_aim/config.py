"""The ``aim:`` block of a mergekit YAML config, as pydantic models.

```yaml
aim:
  omega: 0.4                 # scalar, gradient list or filtered list
  importance: path/or/org/repo[:file.safetensors]
  # or, instead of importance:
  calibration: {dataset: pile-val, num_samples: 256, seq_len: 512,
                bos_per_block: auto}
  exclude: ["lm_head"]       # regular expressions on tensor names
```

Every model forbids unknown keys, so a typo is an error that names the key
instead of a setting that silently does nothing.
"""

from __future__ import annotations

import re
from typing import Any

from mergekit.config import ConditionalParameter, ParameterSetting
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The calibration: mapping's model lives with calibration (its defaults are
# the CLI's and calibrate()'s too); re-exported here as part of the aim: block.
from mergekit_aim.calibration.settings import (  # noqa: F401
    CalibrationConfig,
    CalibrationDtype,
)

DEFAULT_OMEGA = 0.4
PAPER_URL = "https://arxiv.org/abs/2502.02421"


def omega_value(value: Any) -> float:
    """Validate one scalar ω: a number in [0, 1] (YAML strings like "4e-1" too)."""
    if isinstance(value, bool):
        raise ValueError(f"omega must be a number in [0, 1], not a boolean ({value})")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"omega must be a number in [0, 1]; got {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise ValueError(
            f"omega must be within [0, 1] (1 = plain merge, 0 = the most used "
            f"channel fully back to the base); got {number}"
        )
    return number


def _check_omega_setting(setting: Any) -> None:
    if isinstance(setting, ConditionalParameter):
        _check_omega_setting(setting.value)
    elif isinstance(setting, list):
        if not setting:
            raise ValueError("omega must not be an empty list")
        for item in setting:
            _check_omega_setting(item)
    else:
        omega_value(setting)


class AimConfig(BaseModel):
    """The ``aim:`` block: ω, where the importance comes from, what to leave alone."""

    model_config = ConfigDict(extra="forbid")

    omega: ParameterSetting = DEFAULT_OMEGA
    importance: str | None = None
    calibration: CalibrationConfig | None = None
    exclude: list[str] = Field(default_factory=list)

    @field_validator("omega")
    @classmethod
    def _omega_in_range(cls, value: ParameterSetting) -> ParameterSetting:
        _check_omega_setting(value)
        return value

    @field_validator("exclude")
    @classmethod
    def _exclude_compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(
                    f"exclude pattern {pattern!r} is not a valid regular "
                    f"expression: {error}"
                ) from None
        return patterns

    @field_validator("importance")
    @classmethod
    def _importance_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("importance must name a file or a Hub repository")
        return value

    @model_validator(mode="after")
    def _one_importance_source(self) -> AimConfig:
        if self.importance is not None and self.calibration is not None:
            raise ValueError(
                "give exactly one of aim.importance (a precomputed artifact) and "
                "aim.calibration (compute it before merging), not both"
            )
        if self.importance is None and self.calibration is None:
            raise ValueError(
                "aim needs one of aim.importance (path or Hub repo of an "
                "importance artifact, see `mergekit-aim calibrate`) or "
                "aim.calibration (e.g. `calibration: {dataset: pile-val}`)"
            )
        return self

    def excluded_by(self, *names: str | None) -> str | None:
        """The first exclude pattern matching any of the names, if one does."""
        for pattern in self.exclude:
            if any(name and re.search(pattern, name) for name in names):
                return pattern
        return None
