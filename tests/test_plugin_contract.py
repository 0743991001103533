"""What the plugin relies on in mergekit 0.1.5, and the start-up hook.

If one of these fails after a mergekit upgrade, plugin.py needs revisiting.
"""

import inspect
import os
import re
import subprocess
import sys

import pytest


def test_mergekit_internals_the_plugin_extends():
    from mergekit import merge_methods
    from mergekit.card import generate_card
    from mergekit.merge_methods.base import MergeMethod
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
    from mergekit.plan import MergePlanner

    assert list(inspect.signature(MergePlanner.plan_tensor).parameters) == [
        "self",
        "weight",
        "weights_in",
        "models",
        "cfg_reader",
    ]
    assert list(inspect.signature(MergePlanner._plan).parameters) == ["self"]
    source = inspect.getsource(inspect.unwrap(MergePlanner.plan_tensor))
    assert "self._tensors.append((weight, tensor_task))" in source
    assert {"method_name", "parameters"} <= set(ExecuteMergeMethodTask.model_fields)
    assert list(inspect.signature(inspect.unwrap(generate_card)).parameters)[:3] == [
        "config",
        "config_yaml",
        "name",
    ]
    assert callable(merge_methods.register) and callable(merge_methods.get)
    assert {"_execute", "_execute_resolved"} <= set(vars(MergeMethod))


def test_original_config_drops_unknown_blocks():
    # The reason the plugin must extend the config: without it `aim:` vanishes.
    from mergekit.config import MergeConfiguration

    original = MergeConfiguration.__mro__[1]
    assert original.__name__ == "MergeConfiguration"
    parsed = original.model_validate(
        {"merge_method": "linear", "models": [{"model": "a"}], "aim": {"omega": 1}}
    )
    assert not hasattr(parsed, "aim")


def test_plugin_is_active_after_plain_import():
    import mergekit.config  # noqa: F401

    from mergekit_aim.plugin import is_active

    assert is_active()


def _run(code, **env):
    environment = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=environment,
        check=True,
    ).stdout.strip()


def test_startup_hook_imports_nothing_heavy():
    out = _run(
        "import sys; print(sorted(m for m in ('torch', 'mergekit', 'pydantic', "
        "'mergekit_aim') if m in sys.modules), '_mergekit_aim_autoload' in "
        "sys.modules)"
    )
    assert out == "[] True"


def test_startup_hook_costs_under_2ms():
    # pip compiles installed modules; measure with bytecode allowed, after a
    # warm-up run, the best of three (the machine may be busy with other tests).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    times = []
    for _ in range(4):
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "pass"],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        match = re.search(
            r"import time:\s+\d+ \|\s+(\d+) \|\s+_mergekit_aim_autoload",
            result.stderr,
        )
        assert match, "the start-up hook did not run"
        times.append(int(match.group(1)))
    assert min(times[1:]) < 2000, f"{times} µs"


def test_plain_mergekit_config_parses_aim_in_a_fresh_process():
    out = _run(
        "from mergekit.config import MergeConfiguration as M; "
        "c = M.model_validate({'merge_method': 'ties', 'base_model': 'b', "
        "'models': [{'model': 'a'}], 'aim': {'importance': 'x', 'omega': 0.3}}); "
        "print(type(c.aim).__name__, c.aim.omega)"
    )
    assert out == "AimConfig 0.3"


def test_hook_can_be_disabled():
    out = _run(
        "import sys; import mergekit.config as c; "
        "print('aim' in c.MergeConfiguration.model_fields)",
        MERGEKIT_AIM_DISABLE="1",
    )
    assert out == "False"


def test_late_activation_patches_already_imported_modules():
    out = _run(
        "import mergekit.config, mergekit.plan, mergekit.card, mergekit.merge; "
        "import mergekit_aim; mergekit_aim.activate(); "
        "from mergekit.merge import generate_card; "
        "print('aim' in mergekit.config.MergeConfiguration.model_fields, "
        "generate_card.__module__)",
        MERGEKIT_AIM_DISABLE="1",
    )
    # With the hook disabled at start-up, activate() still extends the config;
    # names bound earlier (mergekit.merge.generate_card) stay mergekit's own.
    assert out.split()[0] == "True"


@pytest.mark.parametrize(
    "module", ["mergekit.config", "mergekit.plan", "mergekit.card"]
)
def test_watched_modules_are_marked(module):
    import importlib

    from mergekit_aim.plugin import _PATCHED

    assert getattr(importlib.import_module(module), _PATCHED, False)
