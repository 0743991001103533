"""lm-evaluation-harness tasks as a ``tune`` scorer (``--lm-eval``).

:class:`LmEvalTasks` loads the tasks once (lm-eval's own ones and the user's
YAMLs under ``include_path``) and scores a model that is already in memory:
lm-eval's ``HFLM`` wraps it, so a candidate relaxed in place is scored as it
is, never written or reloaded. Each leaf task's metrics become
:class:`~mergekit_aim.tuning.evaluation.Score` s named ``TASK/METRIC`` (with
``,FILTER`` appended for a filter other than lm-eval's ``none``), with the
harness's standard error and direction.

Offline: tasks read their data through ``datasets``; a local file
(``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``) needs no
network, and ``HF_DATASETS_OFFLINE=1`` makes a missing one fail at once.
lm-eval is the optional extra ``eval``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

from mergekit_aim.errors import AimConfigError
from mergekit_aim.tuning.evaluation import Score

LOG = logging.getLogger(__name__)

INSTALL_HINT = (
    "--lm-eval needs lm-evaluation-harness 0.4: pip install 'mergekit-aim[eval]'"
)
# Fixed, so that every candidate sees the same few-shot examples.
FEWSHOT_SEED = 1234
# lm-eval bootstraps the stderr of metrics that are not means (perplexities);
# means (accuracy, exact match) get theirs in closed form whatever this is.
BOOTSTRAP_ITERS = 1000


def require_lm_eval() -> None:
    """Refuse in one line when lm-eval (the ``eval`` extra) is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise AimConfigError(INSTALL_HINT) from None


def parse_tasks(text: str) -> list[str]:
    """``"a,b"`` → ``["a", "b"]`` (each named once)."""
    names = [item.strip() for item in text.split(",")]
    if not all(names):
        raise AimConfigError(
            f"--lm-eval {text!r}: expected comma-separated task names, e.g. "
            f"--lm-eval arc_easy,my_task"
        )
    if len(set(names)) != len(names):
        raise AimConfigError(f"--lm-eval {text!r}: a task is named twice")
    return names


def metric_name(task: str, metric: str, filter_name: str = "none") -> str:
    return (
        f"{task}/{metric}"
        if filter_name == "none"
        else f"{task}/{metric},{filter_name}"
    )


class LmEvalTasks:
    """lm-eval tasks, loaded once; :meth:`score` runs them on a loaded model.

    ``limit``: at most that many documents per task (lm-eval's ``--limit``).
    ``batch_size``: HFLM's. ``metrics`` (name → higher is better) is known
    once the tasks are loaded, before any model is scored.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        include_path: str | os.PathLike | None = None,
        limit: int | None = None,
        batch_size: int = 4,
    ):
        require_lm_eval()
        from lm_eval.tasks import TaskManager

        if limit is not None and (isinstance(limit, bool) or limit < 1):
            raise AimConfigError(
                f"--lm-eval-limit must be an integer >= 1; got {limit!r}"
            )
        if include_path is not None and not os.path.isdir(include_path):
            raise AimConfigError(
                f"--lm-eval-include-path {str(include_path)!r} is not a directory"
            )
        tasks = list(tasks)
        if not tasks:
            raise AimConfigError("--lm-eval: name at least one task")
        manager = _manager(TaskManager, tasks, include_path)
        known = set(manager.all_tasks)
        unknown = [name for name in tasks if name not in known]
        if unknown:
            where = f" or under {include_path}" if include_path else ""
            raise AimConfigError(
                f"--lm-eval: no task {', '.join(map(repr, unknown))} in lm-eval{where}"
                f" (task YAMLs of your own: --lm-eval-include-path DIR)"
            )
        try:
            self.loaded = manager.load(tasks)
        except Exception as error:  # the task's data: missing files, offline
            raise AimConfigError(
                f"--lm-eval: could not load {', '.join(tasks)} "
                f"({type(error).__name__}: {error}); with HF_DATASETS_OFFLINE=1 "
                f"a task's data must be local (dataset_path: json, data_files)"
            ) from None
        self.tasks = tasks
        self.limit = limit
        self.batch_size = batch_size
        self.metrics: dict[str, bool] = {}
        for name, task in self.loaded["tasks"].items():
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            for metric, higher in task.higher_is_better().items():
                for filter_name in _filter_names(task):
                    self.metrics[metric_name(name, metric, filter_name)] = bool(higher)
        self._lm: Any = None
        self._model: Any = None

    def score(self, model: Any, tokenizer: Any = None) -> dict[str, Score]:
        """Every metric of every task on ``model`` as it is now."""
        return _scores(
            self.results(model, tokenizer), self.loaded["tasks"], self.metrics
        )

    def results(self, model: Any, tokenizer: Any = None, *, samples: bool = False):
        """lm-eval's own results document for ``model`` as it is now; with
        ``samples``, each document's metric values too (``results["samples"]``,
        what paired comparisons between two models need)."""
        from lm_eval.evaluator import evaluate

        lm = self._wrap(model, tokenizer)
        for task in self.loaded["tasks"].values():
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
        was_training = model.training
        try:
            return evaluate(
                lm=lm,
                task_dict=self.loaded,
                limit=self.limit,
                bootstrap_iters=BOOTSTRAP_ITERS,
                log_samples=samples,
            )
        finally:
            model.train(was_training)

    def _wrap(self, model: Any, tokenizer: Any) -> Any:
        # One HFLM per model object: a candidate relaxed in place is the same
        # object, so the wrapper (and its tokenizer set-up) is made once.
        if self._model is not model:
            from lm_eval.models.huggingface import HFLM

            self._lm = HFLM(
                pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size
            )
            self._model = model
        return self._lm


def _manager(cls: Any, tasks: Sequence[str], include_path: Any) -> Any:
    # Indexing lm-eval's own task tree takes seconds; skip it when the user's
    # directory holds every task named.
    if include_path is not None:
        own = cls(include_path=str(include_path), include_defaults=False)
        if set(tasks) <= set(own.all_tasks):
            return own
        return cls(include_path=str(include_path))
    return cls()


def _filter_names(task: Any) -> list[str]:
    filters = task.get_config("filter_list") or []
    names = [f.get("name") if isinstance(f, dict) else None for f in filters]
    return [n for n in names if n] or ["none"]


def _scores(
    results: dict[str, Any], tasks: dict[str, Any], expected: dict[str, bool]
) -> dict[str, Score]:
    scores = {}
    for task in tasks:
        for key, value in results["results"].get(task, {}).items():
            metric, sep, filter_name = key.partition(",")
            if not sep or metric.endswith("_stderr"):
                continue
            name = metric_name(task, metric, filter_name)
            stderr = results["results"][task].get(f"{metric}_stderr,{filter_name}")
            higher = expected.get(
                name,
                results.get("higher_is_better", {}).get(task, {}).get(metric, True),
            )
            scores[name] = Score(
                name, float(value), _number(stderr), higher_is_better=bool(higher)
            )
    return scores


def _number(value: Any) -> float | None:
    # lm-eval writes "N/A" where it has no standard error.
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
