"""The package's shape: imports run one way, and the public API is unambiguous.

Imports run from the command line down to the artifact and the kernels:
cli → demo → tuning, inspection → plugin → planning/offline/adapters → card/method →
config → relaxation (the one relaxation core) → selection and calibration →
importance → kernels, checkpoint, names, output → errors.
A module may import its own component or any component on a lower layer,
never one above it; function-level imports count too (they are still arrows).
"""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mergekit_aim"

# Higher imports lower. Components on one layer do not import each other
# unless listed in ALLOWED_SIDEWAYS.
LAYERS = [
    {"errors", "cache_location", "console"},
    {"kernels", "checkpoint", "names", "output"},
    {"importance"},
    {"selection", "calibration"},
    {"relaxation"},
    {"config"},
    {"card", "method"},
    {"planning", "offline", "adapters"},
    {"plugin"},
    {"tuning", "inspection"},
    {"demo"},
    {"cli"},
    {"__main__"},
]
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}


def _component(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "mergekit_aim":
        return None
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "mergekit_aim":
                found += [(node.lineno, f"mergekit_aim.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_component_has_a_layer():
    components = {
        path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for path in _modules()
        if path.name != "__init__.py" or path.parent != PACKAGE
    }
    assert components - set(RANK) == set(), "add new modules to LAYERS"


def test_imports_run_one_way():
    wrong = []
    for path in _modules():
        rel = path.relative_to(PACKAGE)
        if rel == Path("__init__.py"):
            continue  # the lazy public API re-exports from every layer
        own = rel.parts[0].removesuffix(".py")
        for line, module in _imports(path):
            target = _component(module)
            if target is None or target == own:
                continue
            if target == "__version__":
                continue  # the version string, from the package root
            if target == "":
                # The lazy public API reaches every layer: only its clients
                # at the top may go through it.
                if own not in ("demo", "cli", "__main__"):
                    wrong.append(f"{rel}:{line} ({own}) imports the package root")
                continue
            if target not in RANK:
                wrong.append(f"{rel}:{line} imports unknown {module}")
            elif RANK[target] >= RANK[own]:
                wrong.append(f"{rel}:{line} ({own}) imports {module} ({target})")
    assert wrong == []


def test_only_the_cli_imports_the_demo():
    importers = [
        str(path.relative_to(PACKAGE))
        for path in _modules()
        if path.relative_to(PACKAGE).parts[0] not in ("demo", "demo.py")
        and any(_component(m) == "demo" for _, m in _imports(path))
    ]
    assert importers == ["cli.py"]


def test_no_test_or_benchmark_scaffolding_ships():
    assert not (PACKAGE / "tiny.py").exists()
    for path in _modules():
        imported = {m.split(".")[0] for _, m in _imports(path)}
        assert not imported & {"tests", "benchmarks", "fixtures"}, path


def test_public_api_is_unambiguous():
    import mergekit_aim

    assert dir(mergekit_aim) == sorted(mergekit_aim.__all__)
    for name in mergekit_aim.__all__:
        assert not (PACKAGE / f"{name}.py").exists(), name
        assert not (PACKAGE / name).is_dir(), name
    importlib.import_module("mergekit_aim.offline")
    importlib.import_module("mergekit_aim.tuning")
    assert callable(mergekit_aim.relax) and callable(mergekit_aim.tune)
    assert mergekit_aim.calibrate.__module__ == "mergekit_aim.calibration"


@pytest.mark.parametrize("module", ["mergekit_aim", "mergekit_aim.calibration"])
def test_light_imports_do_not_load_transformers(module):
    code = f"import sys, {module}; print('transformers' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"


def _module_name(path: Path) -> str:
    parts = ["mergekit_aim", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles_between_modules():
    """Module by module, function-level imports included (a package's
    ``__init__`` re-exporting its own modules aside): e.g. calibration's data
    reads its defaults from settings, and settings never imports data."""
    modules = {_module_name(path): path for path in _modules()}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for _, module in _imports(path):
            while module and module not in modules:
                module = module.rpartition(".")[0]
            if module and module != name and not name.startswith(module + "."):
                targets.add(module)
        graph[name] = targets

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = {tuple(c) for c in map(cycle_from, graph) if c}
    assert cycles == set()


def test_one_relaxation_core():
    """Only relaxation.py applies the ω rule and calls the relaxation kernels;
    nothing outside kernels/ imports the kernels' private modules."""
    offenders = []
    for path in _modules():
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "kernels":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                private = node.module.startswith("mergekit_aim.kernels._") or (
                    node.module == "mergekit_aim.kernels"
                    and any(a.name.startswith("_") for a in node.names)
                )
                relaxes = node.module.startswith("mergekit_aim.kernels") and any(
                    a.name in ("aim_relax", "aim_relax_", "relax_factor")
                    for a in node.names
                )
                if private or (relaxes and rel.name != "relaxation.py"):
                    offenders.append(f"{rel}:{node.lineno} imports {node.module}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "decide"
                and rel.name not in ("relaxation.py", "selection.py")
                and "selection" in ast.unparse(node.func.value)
            ):
                offenders.append(f"{rel}:{node.lineno} decides outside the core")
    assert offenders == []
