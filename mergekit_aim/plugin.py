"""The one place where mergekit-aim extends mergekit 0.1.5.

mergekit has no plugin entry points, so three of its objects are extended right
after their module executes (see ``_mergekit_aim_autoload``), each minimally and
only for configs that carry an ``aim:`` block:

* ``mergekit.config.MergeConfiguration`` gains the optional ``aim`` field (the
  original ignores unknown keys, which would drop the block silently);
* ``mergekit.plan.MergePlanner._plan`` resolves the importance artifact (load,
  or calibrate through the cache) before any tensor task exists, and logs the
  coverage report after planning; ``MergePlanner.plan_tensor`` routes each
  relaxable tensor's task to the registered AIM wrapper method;
* ``mergekit.card.generate_card`` adds the ``aim`` tag, the paper's link, ω and
  the artifact's provenance to the merged model's card.

Without an ``aim:`` block every patched function runs mergekit's own code path.
``tests/test_plugin_contract.py`` fails if the mergekit internals relied on here
change.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

LOG = logging.getLogger(__name__)

_PATCHED = "__mergekit_aim_patched__"


def on_module_executed(module: ModuleType) -> None:
    """Extend one of the watched mergekit modules (idempotent)."""
    handler = _HANDLERS.get(module.__name__)
    if handler is not None and not getattr(module, _PATCHED, False):
        handler(module)
        setattr(module, _PATCHED, True)


def activate() -> None:
    """Activate the plugin in this process, whatever was imported before.

    The start-up hook normally does this; call it where site-packages ``.pth``
    files are not processed (``python -S``, embedded interpreters).
    """
    import importlib

    import _mergekit_aim_autoload

    _mergekit_aim_autoload.install()
    for name in _mergekit_aim_autoload.WATCHED:
        on_module_executed(importlib.import_module(name))


def is_active() -> bool:
    config = sys.modules.get("mergekit.config")
    return bool(config is not None and getattr(config, _PATCHED, False))


def run_yaml_merge(config_text: str, out: str | os.PathLike, *, seed: int = 0) -> Path:
    """Merge in-process as ``mergekit-yaml CONFIG OUT`` would, plugin active.

    ``config_text`` is the YAML of a mergekit config (with or without an
    ``aim:`` block); the tokenizer is copied and mergekit's own progress output
    is quiet. ``seed`` is mergekit's ``--random-seed`` (DARE's drop masks).
    Returns ``out`` as a Path.
    """
    import yaml

    activate()
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(config_text))
    options = MergeOptions(copy_tokenizer=True, quiet=True, random_seed=seed)
    run_merge(config, str(out), options=options, config_source=config_text)
    return Path(out)


# --- mergekit.config ---------------------------------------------------------


def _extend_config(module: ModuleType) -> None:
    from pydantic import PrivateAttr, field_validator, model_validator

    original = module.MergeConfiguration

    class MergeConfiguration(original):
        __doc__ = original.__doc__
        # Typed by the validator below: mergekit_aim.config itself imports
        # mergekit.config, so AimConfig may not exist yet when this class does.
        aim: Any | None = None
        # Filled while planning; read by the model card.
        _aim_report: dict | None = PrivateAttr(default=None)

        @field_validator("aim", mode="before")
        @classmethod
        def _parse_aim(cls, value: Any):
            from mergekit_aim.config import AimConfig

            if value is None or isinstance(value, AimConfig):
                return value
            return AimConfig.model_validate(value)

        @model_validator(mode="after")
        def _aim_needs_base(self):
            if self.aim is not None and self.base_model is None:
                raise ValueError(
                    "aim: needs base_model: AIM pulls the merge back toward the "
                    "base model's weights and calibrates on the base model"
                )
            return self

    MergeConfiguration.__module__ = original.__module__
    MergeConfiguration.__qualname__ = original.__qualname__
    module.MergeConfiguration = MergeConfiguration
    # Modules that bound the name before this ran (only when activated late).
    for name, loaded in list(sys.modules.items()):
        if (
            name.startswith("mergekit.")
            and loaded is not module
            and getattr(loaded, "MergeConfiguration", None) is original
        ):
            loaded.MergeConfiguration = MergeConfiguration


# --- mergekit.plan -----------------------------------------------------------


def _extend_planner(module: ModuleType) -> None:
    planner = module.MergePlanner
    original_plan = planner._plan
    original_plan_tensor = planner.plan_tensor

    @functools.wraps(original_plan)
    def _plan(self, *args: Any, **kwargs: Any):
        aim = getattr(self.config, "aim", None)
        if aim is None:
            return original_plan(self, *args, **kwargs)
        from mergekit_aim.planning import AimMergeSession

        self._aim_session = AimMergeSession.prepare(self.config, self.options)
        try:
            result = original_plan(self, *args, **kwargs)
            self.config._aim_report = self._aim_session.finish(quiet=self.options.quiet)
        finally:
            self._aim_session = None
        return result

    @functools.wraps(original_plan_tensor)
    def plan_tensor(self, weight, weights_in, models, cfg_reader, *args, **kwargs):
        session = getattr(self, "_aim_session", None)
        planned = len(self._tensors)
        result = original_plan_tensor(
            self, weight, weights_in, models, cfg_reader, *args, **kwargs
        )
        if session is not None and len(self._tensors) > planned:
            out_weight, task = self._tensors[-1]
            self._tensors[-1] = (
                out_weight,
                session.route(task, weight, weights_in, models, cfg_reader),
            )
        return result

    planner._plan = _plan
    planner.plan_tensor = plan_tensor


# --- mergekit.card -----------------------------------------------------------


def _extend_card(module: ModuleType) -> None:
    original = module.generate_card

    @functools.wraps(original)
    def generate_card(config, config_yaml, name=None, *args, **kwargs):
        card = original(config, config_yaml, name, *args, **kwargs)
        report = getattr(config, "_aim_report", None)
        if getattr(config, "aim", None) is None or report is None:
            return card
        from mergekit_aim.card import add_aim_to_card

        return add_aim_to_card(card, config.aim, report)

    module.generate_card = generate_card


_HANDLERS = {
    "mergekit.config": _extend_config,
    "mergekit.plan": _extend_planner,
    "mergekit.card": _extend_card,
}
