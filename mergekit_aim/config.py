"""The ``aim:`` block of a mergekit YAML config, as pydantic models.

```yaml
aim:
  omega: 0.4                 # scalar, gradient list or filtered list
  importance: path/or/org/repo[:file.safetensors]
  # or, instead of importance:
  calibration: {dataset: pile-val, num_samples: 256, seq_len: 512,
                bos_per_block: auto}
  exclude: ["lm_head"]       # regular expressions on tensor names
  require_full_coverage: false   # true: a weight with an input (or an expert)
                                 # without a statistic is an error, not a warning
```

Every model forbids unknown keys, so a typo is an error that names the key
instead of a setting that silently does nothing.
"""

from __future__ import annotations

from mergekit.config import ParameterSetting
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

# The calibration: mapping's model lives with calibration (its defaults are
# the CLI's and calibrate()'s too); re-exported here as part of the aim: block.
from mergekit_aim.calibration.settings import (  # noqa: F401
    CalibrationConfig,
    CalibrationDtype,
)
from mergekit_aim.selection import Selection, check_omega_setting, compile_exclude

DEFAULT_OMEGA = 0.4
PAPER_URL = "https://arxiv.org/abs/2502.02421"


class AimConfig(BaseModel):
    """The ``aim:`` block: ω, where the importance comes from, what to leave alone."""

    model_config = ConfigDict(extra="forbid")

    omega: ParameterSetting = DEFAULT_OMEGA
    importance: str | None = None
    calibration: CalibrationConfig | None = None
    exclude: list[str] = Field(default_factory=list)
    # Refuse the merge (before anything is written) when a weight with an
    # input, or an expert of a relaxed stack, has no statistic.
    require_full_coverage: StrictBool = False

    @field_validator("omega")
    @classmethod
    def _omega_in_range(cls, value: ParameterSetting) -> ParameterSetting:
        check_omega_setting(value)
        return value

    @field_validator("exclude")
    @classmethod
    def _exclude_compiles(cls, patterns: list[str]) -> list[str]:
        compile_exclude(patterns)
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

    def selection(self) -> Selection:
        """Which tensors this block relaxes, and with which ω."""
        return Selection(self.omega, self.exclude)
