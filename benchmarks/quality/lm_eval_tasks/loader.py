"""The tasks' ``custom_dataset``: the generated JSON lines of one task.

Read from ``$MERGEKIT_AIM_LM_EVAL_DATA`` or ``data/`` beside this file;
``python -m benchmarks.quality.lm_eval_tasks`` writes them. lm-eval imports
this file by path (``!function loader.load``), so it imports nothing of the
benchmark.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS = ("validation", "test")
ENV = "MERGEKIT_AIM_LM_EVAL_DATA"


def file_name(task: str, split: str) -> str:
    return f"{task}-{split}.jsonl"


def load(task: str, **_: Any) -> Any:
    """``{"validation": Dataset, "test": Dataset}`` of ``task``."""
    import datasets

    root = Path(os.environ.get(ENV) or DATA_DIR)
    files = {split: root / file_name(task, split) for split in SPLITS}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{missing[0]} is missing: generate the data with python -m "
            f"benchmarks.quality.lm_eval_tasks [--model NAME] (and set {ENV} "
            f"when it was written elsewhere)"
        )
    return datasets.load_dataset(
        "json", data_files={split: str(path) for split, path in files.items()}
    )
