"""Activation-Informed Merging (AIM) for mergekit.

AIM (Nobari et al., arXiv 2502.02421) pulls a merged model back toward its base
on the input channels the base uses most. The public API is imported lazily so
that `import mergekit_aim` stays cheap and does not pull torch in by itself.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ImportanceMap": "mergekit_aim.importance",
    "calibrate": "mergekit_aim.calibration",
    "collect_importance": "mergekit_aim.calibration",
    "CalibrationConfig": "mergekit_aim.calibration",
    "relax": "mergekit_aim.offline",
    "apply_aim": "mergekit_aim.offline",
    "relax_checkpoint": "mergekit_aim.offline",
    "aim_method": "mergekit_aim.method",
    "AimConfig": "mergekit_aim.config",
    "activate": "mergekit_aim.plugin",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mergekit_aim' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
