"""The quality benchmark's lm-eval task YAMLs load offline on generated data
and score a model through ``tune``'s lm-eval scorer."""

from pathlib import Path

import pytest
import torch

from benchmarks.quality import tasks
from benchmarks.quality.lm_eval_tasks import __main__ as generate
from benchmarks.quality.lm_eval_tasks.loader import ENV, SPLITS, file_name

TASK_DIR = Path(generate.__file__).parent


def test_the_data_is_generated_from_the_benchmarks_splits(tmp_path):
    from benchmarks.quality import training

    generate.main(["--smoke", "--out", str(tmp_path)])
    data = training.build_data(training.SMOKE)
    for task in tasks.TASKS:
        for split in SPLITS:
            assert (tmp_path / file_name(task, split)).stat().st_size > 0
    first = generate.rows(data, "math", "test")[0]
    item = data.items["math"].test[0]
    assert first == {"prompt": item.prompt, "answer": item.answer.strip()}


def test_tasks_load_offline_and_score_a_model(tmp_path, monkeypatch, tiny_family):
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM

    from mergekit_aim.tuning.harness import LmEvalTasks

    generate.main(["--smoke", "--out", str(tmp_path)])
    monkeypatch.setenv(ENV, str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    names = [f"aim_{t}" for t in tasks.TASKS]
    names += [f"aim_{t}_validation" for t in tasks.TASKS]
    harness = LmEvalTasks(names, include_path=TASK_DIR, limit=2)
    assert harness.metrics["aim_math/exact_match"] is True
    assert harness.metrics["aim_code_validation/bits_per_byte"] is False
    splits = {n: len(list(t.eval_docs)) for n, t in harness.loaded["tasks"].items()}
    assert splits["aim_math"] == 6 and splits["aim_math_validation"] == 4
    family = tiny_family("llama")
    model = AutoModelForCausalLM.from_pretrained(family.base, dtype=torch.float32)
    few = LmEvalTasks(["aim_math", "aim_code"], include_path=TASK_DIR, limit=2)
    scores = few.score(model, family.tokenizer)
    assert set(scores) == set(few.metrics)
    assert scores["aim_code/bits_per_byte"].value > 0
    assert 0 <= scores["aim_math/exact_match"].value <= 1


def test_missing_data_says_how_to_make_it(tmp_path, monkeypatch):
    from benchmarks.quality.lm_eval_tasks.loader import load

    monkeypatch.setenv(ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m benchmarks.quality"):
        load("math")


def test_held_out_texts_become_bounded_documents_without_losing_text():
    text = "x" * 1500 + "\n\npara two\n\nline a\nline b\n" + "y" * 700
    docs = generate.documents(text, limit=600)
    assert all(0 < len(d) <= 600 for d in docs)
    # every character but the separators survives, in order
    assert "".join(docs).replace("\n", "") == text.replace("\n", "")
    assert generate.documents("short", limit=600) == ["short"]


def test_per_document_values_add_up_to_lm_evals_aggregate(
    tmp_path, monkeypatch, tiny_family
):
    """The report's paired statistics resample the per-document values; they
    must be the very numbers lm-eval aggregates."""
    pytest.importorskip("lm_eval")
    import math

    from transformers import AutoModelForCausalLM

    from benchmarks.quality import scoring, training

    monkeypatch.setenv(ENV, str(tmp_path))
    scoring.write_data(training.SMOKE, tmp_path)
    family = tiny_family("llama")
    model = AutoModelForCausalLM.from_pretrained(family.base, dtype=torch.float32)
    harness = scoring.HarnessTasks(family.tokenizer)
    results = harness.tasks.results(model, family.tokenizer, samples=True)
    metrics, per_doc = harness.blocks(model)
    data = training.build_data(training.SMOKE)
    for task in tasks.TASKS:
        assert len(per_doc[task]) == len(generate.rows(data, task, "test"))
    samples = results["samples"]["aim_general"]
    pairs = [s["bits_per_byte"] for s in samples]
    pooled = -sum(ll for ll, _ in pairs) / (sum(n for _, n in pairs) * math.log(2))
    assert metrics["general"] == pytest.approx(pooled, rel=1e-9)
    per_byte = [scoring.document_value(s, "bits_per_byte") for s in samples]
    assert sorted(per_doc["general"]) == pytest.approx(sorted(per_byte))
    assert metrics["math"] == pytest.approx(sum(per_doc["math"]) / len(per_doc["math"]))
