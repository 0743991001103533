"""``python -m benchmarks.quality.lm_eval_tasks [--model NAME | --quick | --smoke]
[--out DIR]``: write the four tasks' data for the lm-eval task YAMLs here."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.quality import tasks, training
from benchmarks.quality.lm_eval_tasks.loader import DATA_DIR, SPLITS, file_name


def rows(data: training.TaskData, task: str, split: str) -> list[dict[str, str]]:
    """One JSON row per item (``prompt``, ``answer`` without its leading
    space) or per held-out text (``text``)."""
    if task in tasks.EM_TASKS:
        items = getattr(data.items[task], split)
        return [{"prompt": i.prompt, "answer": i.answer.strip()} for i in items]
    texts = data.validation_texts if split == "validation" else data.test_texts
    return [{"text": text} for text in texts[task]]


def write(settings: training.Settings, out: Path) -> list[Path]:
    data = training.build_data(settings)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task in tasks.TASKS:
        for split in SPLITS:
            path = out / file_name(task, split)
            lines = (json.dumps(row) + "\n" for row in rows(data, task, split))
            path.write_text("".join(lines), encoding="utf-8")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    from benchmarks.quality.__main__ import settings_for

    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.lm_eval_tasks")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--model", default=None, choices=sorted(training.REAL))
    scale.add_argument("--quick", action="store_true")
    scale.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)
    settings = settings_for(args.quick, args.model, args.smoke)
    for path in write(settings, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
