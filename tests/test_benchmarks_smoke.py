"""The scale benchmarks run end to end on tiny settings (seconds, not minutes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import adapters, calibration, common, gpu_check, memory, merge_overhead
from mergekit_aim.demo.models import BOS_ID

TINY = common.LlamaShape(64, 128, 2, 4, 2, 256)


def test_round_robin_rotates_and_records_both_clocks():
    order = []
    cases = {name: (lambda n=name: order.append(n)) for name in "abc"}
    times = common.round_robin(cases, 3)
    assert order == list("abcbcacab")
    assert all(len(t["wall"]) == len(t["cpu"]) == 3 for t in times.values())
    assert common.paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.0


def test_calibration_benchmark_ratios(monkeypatch):
    monkeypatch.setitem(calibration.SIZES, "tiny", calibration.Size("tiny", 64, 2, 128))
    monkeypatch.setattr(calibration, "VOCAB", 256)
    plan = calibration.Plan("tiny", 2, 8, 2, 1, (2,), 2, ("tiny",))
    rows, extra = calibration.head_to_head(plan)
    assert extra["setting"]["max_rel_diff_ours_vs_paper"] < 1e-5
    ratios = calibration.derived(extra["times"], plan.batch)
    assert ratios["speedup_vs_paper"] > 0
    text = calibration.markdown(
        common.machine_info(), extra["setting"], rows, ratios, [], True
    )
    assert "paper-style" in text


def test_merge_overhead_end_to_end(tmp_path, monkeypatch):
    from mergekit_aim.plugin import activate

    activate()
    base, tuned, params = merge_overhead.write_models(TINY, tmp_path / "models")
    artifact = tmp_path / "importance.safetensors"
    tensors = merge_overhead.make_artifact(base, artifact, (2, 8))
    assert tensors == 2 * 9 + 2  # per layer 7 linears + 2 norms; final norm, head
    row = merge_overhead.measure_method(
        "task_arithmetic", base, tuned, artifact, tmp_path, 1, False
    )
    assert row["artifact_loads_per_aim_merge"] == 1
    assert row["aim_own_s"]["relax"] > 0
    json.dumps(row)


def test_adapters_benchmark_quick(tmp_path):
    assert adapters.main(["--quick", "--repeat", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "adapters-quick.json").read_text())
    assert result["adapter_tensors"] == 2 * 2 * 7 and result["ratio_wall"] > 0
    assert "Machine:" in (tmp_path / "adapters-quick.md").read_text()


@pytest.mark.parametrize(
    ("text", "size"), [("150MiB", 150 * 2**20), ("2GiB", 2 * 2**30), ("10", 10)]
)
def test_memory_sizes(text, size):
    assert memory.parse_size(text) == size


# --- real-model paths, on a tiny checkpoint in place of a real one ------------------


def test_calibration_real_path_on_a_checkpoint(tiny_family, tiny_text_file):
    base, text = tiny_family("llama").base, str(tiny_text_file)
    plan = calibration.RealPlan(blocks=2, seq_len=64, batch=2, repeat=1)
    rows, extra = calibration.real_head_to_head(
        base, plan, dtype=torch.float32, bos_every_chunk=True, dataset=text
    )
    setting = {"model": "tiny-llama", **extra["setting"]}
    assert setting["tokens"] == 128 and setting["max_rel_diff_ours_vs_paper"] < 1e-5
    blocks = calibration.real_blocks(base, 2, 64, True, text)
    assert blocks.shape == (2, 64) and (blocks[:, 0] == BOS_ID).all()
    ratios = calibration.derived(extra["times"], plan.batch)
    text = calibration.markdown(common.machine_info(), setting, rows, ratios, [], False)
    assert "tiny-llama (LlamaForCausalLM" in text and "Scaling" not in text


def test_merge_overhead_real_variants_are_cached(tiny_family, tmp_path):
    from mergekit_aim.plugin import activate

    activate()
    real = tmp_path / "real"
    shutil.copytree(tiny_family("llama").base, real)
    (real / ".provisioned.json").write_text(json.dumps({"key": "k1"}))
    cache = tmp_path / "cache"
    first = merge_overhead.real_variants(real, cache)
    assert [p.parent for p in first] == [cache / "real"] * 2
    stamp = [p.joinpath("model.safetensors").stat().st_mtime_ns for p in first]
    again = merge_overhead.real_variants(real, cache)
    assert [p.joinpath("model.safetensors").stat().st_mtime_ns for p in again] == stamp
    (real / ".provisioned.json").write_text(json.dumps({"key": "k2"}))
    merge_overhead.real_variants(real, cache)  # another base: remade
    assert json.loads((first[0] / "variant.json").read_text())["base_key"] == "k2"

    base, tuned = merge_overhead.copy_models(real, first, tmp_path / "work")
    assert {"config.json", "model.safetensors"} <= {p.name for p in base.iterdir()}
    assert not (tuned[0] / "variant.json").exists()
    artifact = tmp_path / "importance.safetensors"
    merge_overhead.make_artifact(base, artifact, (2, 8))
    row = merge_overhead.measure_method(
        "task_arithmetic", base, tuned, artifact, tmp_path, 1, False
    )
    assert row["artifact_loads_per_aim_merge"] == 1
    assert common.checkpoint_shape(base)["architecture"] == "LlamaForCausalLM"
    assert common.checkpoint_parameters(base) > 0


def test_memory_real_baseline_keeps_vocabulary_and_tokenizer(tiny_family, tmp_path):
    from transformers import AutoTokenizer

    base = tiny_family("llama").base
    tiny_dir = memory.write_tiny_like(base, tmp_path / "tiny")
    shape = common.checkpoint_shape(tiny_dir)
    assert (shape["layers"], shape["hidden"]) == (1, 64)
    assert shape["vocab"] == common.checkpoint_shape(base)["vocab"]
    assert len(AutoTokenizer.from_pretrained(tiny_dir)) == len(
        AutoTokenizer.from_pretrained(base)
    )


@pytest.mark.parametrize(
    ("script", "argv"),
    [
        (calibration, ["--blocks", "4"]),
        (merge_overhead, ["--quick", "--model", "nonexistent"]),
        (memory, ["--quick", "--model", "gemma3-270m"]),
    ],
)
def test_real_model_arguments_are_refused_where_they_do_not_apply(script, argv):
    with pytest.raises(SystemExit) as raised:
        script.main(argv)
    assert raised.value.code == 2


# --- make gpu-check -------------------------------------------------------------------


def test_gpu_check_without_cuda_says_so_and_succeeds():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check"],
        cwd=Path(gpu_check.__file__).parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout and "nothing to check" in done.stdout


def test_gpu_check_dry_run_lists_the_steps_and_checks_their_arguments(
    capsys, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for step in gpu_check.plan(Path("OUT")):
        assert f"{step.name} (limit {step.timeout_s} s)" in out
    assert "provision smollm2-135m" in out and "arguments checked" in out
    steps = gpu_check.plan(Path("OUT"))
    assert sum(s.timeout_s for s in steps) <= gpu_check.DEFAULT_BUDGET_S < 8 * 60
    by_name = {step.name: step.argv for step in steps}
    assert "--cuda" in by_name["merge"]
    for model in gpu_check.MODELS:
        assert ("--device", "cuda") == by_name[f"calibration-{model}"][4:6]
    assert "--compare-cpu" in by_name["merge"]
    argv = ("-m", "benchmarks.kernels", "--nope")
    bad = gpu_check.Step("bad", argv, 1, "benchmarks.kernels")
    with pytest.raises(SystemExit):
        gpu_check.check_arguments([bad])


def test_gpu_check_runs_steps_within_their_limits(tmp_path):
    Step = gpu_check.Step
    steps = [
        Step("passes", ("-c", "print('fine')"), 30),
        Step("fails", ("-c", "import sys; sys.exit(3)"), 30),
        Step("hangs", ("-c", "import time; time.sleep(60)"), 1),
    ]
    deadline = time.monotonic() + 60
    results = gpu_check.run_steps(steps, tmp_path, "Fake GPU 9000", deadline)
    assert [r["status"] for r in results] == [
        "ok",
        "failed (exit 3)",
        "timed out after 1 s",
    ]
    log = (tmp_path / "passes.log").read_text()
    assert log.startswith("device: Fake GPU 9000\n") and "fine" in log
    skipped = gpu_check.run_steps(steps[:1], tmp_path, "Fake GPU 9000", deadline - 60)
    assert skipped[0]["status"] == "skipped: budget spent"
    table = gpu_check.summary_markdown("Fake GPU 9000", "Machine: x", results)
    assert table.startswith("# gpu-check on Fake GPU 9000") and "hangs" in table
    assert common.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


# --- every benchmark still runs (a moved name must fail here) -------------------------

BENCHMARKS = Path(common.__file__).parent
BENCHMARK_FILES = sorted(
    p.relative_to(BENCHMARKS.parent).as_posix() for p in BENCHMARKS.rglob("*.py")
)


def _package_names(tree) -> list[tuple[str, str, int]]:
    """(module, attribute, line) for every name the file takes from
    ``mergekit_aim``: ``from mergekit_aim.x import y`` anywhere (functions
    import lazily), and ``alias.attr`` where an alias is bound to one of its
    modules."""
    import ast

    aliases: dict[str, str] = {}
    used = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "mergekit_aim"
        ):
            for alias in node.names:
                used.append((node.module, alias.name, node.lineno))
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mergekit_aim"):
                    aliases[alias.asname or alias.name.split(".")[0]] = (
                        alias.name if alias.asname else "mergekit_aim"
                    )
    # A name the file also assigns (a local ``importance = ...``) is not an alias.
    assigned = {
        node.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)
    }
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.value.id not in assigned
        ):
            used.append((aliases[node.value.id], node.attr, node.lineno))
    return used


@pytest.mark.parametrize("path", BENCHMARK_FILES)
def test_every_package_name_a_benchmark_uses_exists(path):
    import ast
    import importlib

    tree = ast.parse((BENCHMARKS.parent / path).read_text(), path)
    missing = []
    for module, attribute, line in _package_names(tree):
        try:
            target = importlib.import_module(module)
        except ModuleNotFoundError:
            # ``from mergekit_aim import tuning`` then ``tuning.x``: a subpackage.
            parent, _, leaf = module.rpartition(".")
            target = getattr(importlib.import_module(parent), leaf)
        if not hasattr(target, attribute):
            try:
                importlib.import_module(f"{module}.{attribute}")
            except ModuleNotFoundError:
                missing.append(f"{path}:{line}: {module}.{attribute}")
    assert not missing, missing


def _run_benchmark(module: str, *argv: str, timeout: int = 240) -> str:
    done = subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=BENCHMARKS.parent,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_quality_benchmark_smoke_runs_every_stage(tmp_path):
    """Training, merging, AIM and its controls, the ω sweep, ``tune_merged``
    and the report, each at the smallest size."""
    out = _run_benchmark("benchmarks.quality", "--smoke", "--out", str(tmp_path))
    document = json.loads((tmp_path / "quality.json").read_text())
    variants = {row["variant"] for row in document["results"]}
    assert {"plain", "aim", "tuned"} <= variants
    assert "tuned" in out


def test_kernels_benchmark_quick_mode(tmp_path):
    _run_benchmark("benchmarks.kernels", "--quick", "--out", str(tmp_path))
    assert any(tmp_path.iterdir())
