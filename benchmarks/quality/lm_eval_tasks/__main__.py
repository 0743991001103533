"""``python -m benchmarks.quality.lm_eval_tasks [--model NAME | --quick | --smoke]
[--out DIR]``: write the four tasks' data for the lm-eval task YAMLs here."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.quality import tasks, training
from benchmarks.quality.lm_eval_tasks.loader import DATA_DIR, SPLITS, file_name

# Held-out texts are scored as documents of at most this many characters:
# the benchmark's paired statistics resample documents, so a few long texts
# would leave them a handful of units (16k characters: ~14 texts, ~30 documents).
DOCUMENT_CHARS = 600


def rows(data: training.TaskData, task: str, split: str) -> list[dict[str, str]]:
    """One JSON row per item (``prompt``, ``answer`` without its leading
    space) or per held-out document (``text``, see :func:`documents`)."""
    if task in tasks.EM_TASKS:
        items = getattr(data.items[task], split)
        return [{"prompt": i.prompt, "answer": i.answer.strip()} for i in items]
    texts = data.validation_texts if split == "validation" else data.test_texts
    return [{"text": doc} for text in texts[task] for doc in documents(text)]


def documents(text: str, limit: int = DOCUMENT_CHARS) -> list[str]:
    """``text`` cut into documents of at most ``limit`` characters: whole
    paragraphs packed together where they fit, a longer paragraph cut at line
    breaks, a longer line cut anywhere."""
    units: list[str] = []
    for paragraph in text.split("\n\n"):
        if len(paragraph) <= limit:
            units.append(paragraph)
            continue
        for line in _pack(paragraph.split("\n"), "\n", limit):
            units.extend(line[i : i + limit] for i in range(0, len(line), limit))
    return [doc for doc in _pack(units, "\n\n", limit) if doc.strip()]


def _pack(units: list[str], separator: str, limit: int) -> list[str]:
    packed: list[str] = []
    for unit in units:
        if packed and len(packed[-1]) + len(separator) + len(unit) <= limit:
            packed[-1] += separator + unit
        else:
            packed.append(unit)
    return packed


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
