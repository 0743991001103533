"""Activation-Informed Merging (AIM) for mergekit.

AIM (Nobari et al., arXiv 2502.02421) pulls a merged model back toward its base
on the input channels the base uses most. The public API is imported lazily so
that `import mergekit_aim` stays cheap and does not pull torch in by itself.

Every public name is a function or class; no submodule shares a public name
(the post-hoc path lives in :mod:`mergekit_aim.offline`, so
``mergekit_aim.relax`` is always the function).
"""

__version__ = "0.1.0"

_LAZY = {
    # the artifact
    "ImportanceMap": "mergekit_aim.importance",
    # measuring the base model
    "CalibrationConfig": "mergekit_aim.calibration",
    "calibrate": "mergekit_aim.calibration",
    "collect_importance": "mergekit_aim.calibration",
    # relaxing outside a merge
    "relax": "mergekit_aim.offline",
    "apply_aim": "mergekit_aim.offline",
    "relax_checkpoint": "mergekit_aim.offline",
    # mergekit integration
    "AimConfig": "mergekit_aim.config",
    "aim_method": "mergekit_aim.method",
    "activate": "mergekit_aim.plugin",
    # choosing ω
    "tune": "mergekit_aim.tuning",
    "tune_merged": "mergekit_aim.tuning",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mergekit_aim' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
