"""The scale benchmarks run end to end on tiny settings (seconds, not minutes)."""

from __future__ import annotations

import json

import pytest

from benchmarks import calibration, common, memory, merge_overhead

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


@pytest.mark.parametrize(
    ("text", "size"), [("150MiB", 150 * 2**20), ("2GiB", 2 * 2**30), ("10", 10)]
)
def test_memory_sizes(text, size):
    assert memory.parse_size(text) == size
