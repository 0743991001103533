"""The benchmark's tasks scored through lm-evaluation-harness.

The real-model report is judged the way its users judge merges: each task is
an lm-eval task from the YAMLs in :mod:`benchmarks.quality.lm_eval_tasks`
(``aim_math`` and ``aim_instructions``: greedy generation, exact match;
``aim_code`` and ``aim_general``: rolling log-likelihood, bits per byte), run
on the model in memory. Anyone with lm-eval reproduces a number with
``lm_eval --include_path benchmarks/quality/lm_eval_tasks --tasks aim_math``
on the same data (``python -m benchmarks.quality.lm_eval_tasks --model NAME``).

:class:`HarnessTasks` gives, besides lm-eval's aggregate of each task, every
document's value (an item's exact-match verdict, a document's bits per byte),
which the report's paired statistics resample.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.quality import tasks, training

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
# The metric each benchmark task is judged by (its direction: report.HIGHER_IS_BETTER).
METRIC = {
    "code": "bits_per_byte",
    "math": "exact_match",
    "instructions": "exact_match",
    "general": "bits_per_byte",
}
BATCH = 32


def task_name(task: str, split: str = "test") -> str:
    return f"aim_{task}" if split == "test" else f"aim_{task}_{split}"


def metric_name(task: str, split: str = "test") -> str:
    """``tune``'s name of a task's metric, e.g. ``aim_math_validation/exact_match``."""
    return f"{task_name(task, split)}/{METRIC[task]}"


def write_data(settings: training.Settings, out: Path) -> Path:
    """The task files of ``settings``' splits under ``out``, pointed at by the
    loader's environment variable (lm-eval reads them offline)."""
    from benchmarks.quality.lm_eval_tasks import __main__ as generate
    from benchmarks.quality.lm_eval_tasks.loader import ENV

    generate.write(settings, out)
    os.environ[ENV] = str(out)
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    return out


def harness(split: str, task_names: Sequence[str] = tasks.TASKS) -> Any:
    """lm-eval tasks of one split, loaded once (``tune``'s scorer)."""
    from mergekit_aim.tuning.harness import LmEvalTasks

    return LmEvalTasks(
        [task_name(t, split) for t in task_names],
        include_path=TASK_DIR,
        batch_size=BATCH,
    )


class HarnessTasks:
    """The test split of every task, scored through lm-eval.

    :meth:`blocks` returns ``(metrics, per_document)``: lm-eval's aggregate
    per task (exact match as a fraction, bits per byte), and each document's
    value in document order.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.tasks = harness("test")

    def blocks(self, model: Any) -> tuple[dict[str, float], dict[str, list[float]]]:
        results = self.tasks.results(model, self.tokenizer, samples=True)
        metrics, detail = {}, {}
        for task in tasks.TASKS:
            name, metric = task_name(task), METRIC[task]
            metrics[task] = float(results["results"][name][f"{metric},none"])
            samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
            detail[task] = [document_value(s, metric) for s in samples]
        return metrics, detail


def document_value(sample: Mapping[str, Any], metric: str) -> float:
    """One document's value of ``metric`` from lm-eval's logged sample:
    exact match as it is; bits per byte from the ``(log-likelihood, bytes)``
    pair lm-eval aggregates."""
    value = sample[metric]
    if metric == "bits_per_byte":
        loglikelihood, n_bytes = value
        return -float(loglikelihood) / (float(n_bytes) * math.log(2))
    return float(value)
