"""``python -m benchmarks.quality [--quick] --out DIR``: the quality benchmark.

Trains (or reuses from the cache) a base and three experts, merges every pair
and the triple with four methods through mergekit, applies AIM and its two
controls to each merge, chooses ω on a validation split with
:func:`mergekit_aim.tune.tune_merged`, scores everything on the test split,
and writes ``quality.json``, ``quality.md`` and ``quality.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import platform
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.quality import merging, report, tasks, training
from benchmarks.quality.metrics import (
    ExactMatchSet,
    exact_match,
    exact_match_flags,
    greedy_exact_match,
)

LOG = logging.getLogger("benchmarks.quality")

EVAL_BATCH = 32


class Evaluator:
    """Scores a model on the test split of every task."""

    def __init__(self, tokenizer: Any, data: training.TaskData, seq_len: int):
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.sets = {
            t: ExactMatchSet.build(tokenizer, data.test_items(t))
            for t in tasks.EM_TASKS
        }
        self.texts = data.test_texts

    def __call__(self, model: Any) -> dict[str, float]:
        from mergekit_aim.tiny import heldout_loss

        scores = {t: exact_match(model, s) for t, s in self.sets.items()}
        for task in tasks.LOSS_TASKS:
            scores[task] = heldout_loss(
                model,
                self.tokenizer,
                self.texts[task],
                seq_len=self.seq_len,
                batch_size=EVAL_BATCH,
            )
        return {t: scores[t] for t in tasks.TASKS}


def _row(
    variant: str,
    metrics: Mapping[str, float],
    *,
    spec: merging.MergeSpec | None = None,
    experts: tuple[str, ...] = (),
    omega: float | None = None,
) -> dict[str, Any]:
    return {
        "method": spec.method if spec else variant,
        "experts": list(spec.experts if spec else experts),
        "aim": variant in ("aim", "tuned") and omega is not None and omega < 1,
        "omega": omega,
        "seed": spec.seed if spec else None,
        "weights": spec.weights if spec else None,
        "variant": variant,
        "metrics": dict(metrics),
    }


def _tuner() -> Any:
    try:
        from mergekit_aim import tune
    except ImportError:
        LOG.warning("quality: mergekit_aim.tune is missing; no tuned rows")
        return None
    return tune


def run(
    out_dir: Path, *, quick: bool = False, cache_dir: Path | None = None
) -> dict[str, Any]:
    """Run the benchmark; returns the JSON document it writes."""
    from transformers import AutoModelForCausalLM

    from mergekit_aim.demo import Stopwatch, quiet_transformers
    from mergekit_aim.importance import ImportanceMap

    settings = training.QUICK if quick else training.FULL
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir else out_dir / "cache"
    watch = Stopwatch("quality")
    start = time.perf_counter()
    tune = _tuner()

    with quiet_transformers():
        with watch("data"):
            data = training.build_data(settings)
        with watch("training and calibration"):
            models = training.build_models(settings, data, cache_dir)
        tokenizer = models.tokenizer
        evaluate = Evaluator(tokenizer, data, settings.seq_len)
        importance = ImportanceMap.load(models.importance)
        base_state = merging.load_state(models.base)
        model = AutoModelForCausalLM.from_pretrained(models.base, dtype=torch.float32)

        rows: list[dict[str, Any]] = []
        checks: dict[str, Any] = {}
        with watch("reference models"):
            rows.append(_row("base", evaluate(model)))
            for task, path in models.experts.items():
                expert = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
                rows.append(_row("expert", evaluate(expert), experts=(task,)))
                for em_task in tasks.EM_TASKS:
                    items = data.test_items(em_task)[: settings.greedy_check_items]
                    greedy = greedy_exact_match(expert, tokenizer, items)
                    forced = exact_match_flags(expert, evaluate.sets[em_task])
                    agree = sum(a == b for a, b in zip(greedy, forced, strict=False))
                    checks[f"{task} expert on {em_task}"] = [agree, len(greedy)]
            LOG.info("quality: references %s", rows)

        validation = {t: data.validation(t) for t in tasks.TASKS}
        tune_kwargs = dict(seq_len=settings.seq_len, batch_size=EVAL_BATCH)
        base_val = None
        if tune is not None:
            base_val = {
                t: tune.evaluate_loss(
                    models.base, texts, tokenizer=tokenizer, **tune_kwargs
                )
                for t, texts in validation.items()
            }

        expert_sets = [
            *itertools.combinations(tasks.EXPERT_TASKS, 2),
            tuple(tasks.EXPERT_TASKS),
        ]
        specs = merging.merge_grid(expert_sets, settings.dare_seeds)
        merges_dir = cache_dir / f"merges-{settings.training_key()}"
        for n, spec in enumerate(specs, 1):
            with watch(f"merge {n}/{len(specs)} {spec.name}"):
                path = merging.run_plain_merge(
                    spec, models.base, models.experts, settings.density, merges_dir
                )
                merged = merging.load_state(path)

                def score(state: Mapping[str, torch.Tensor]) -> dict[str, float]:
                    model.load_state_dict(state, strict=True)
                    return evaluate(model)

                plain = score(merged)
                rows.append(_row("plain", plain, spec=spec, omega=1.0))
                omegas = {settings.omega}
                if len(spec.experts) == len(tasks.EXPERT_TASKS):
                    omegas |= set(settings.sweep_omegas)
                aim_scores = {}
                for omega in sorted(omegas - {1.0}):
                    state = merging.aim_state(base_state, merged, importance, omega)
                    aim_scores[omega] = score(state)
                    rows.append(_row("aim", aim_scores[omega], spec=spec, omega=omega))
                for variant, build in (
                    ("uniform", merging.uniform_state),
                    ("permuted", merging.permuted_state),
                ):
                    state = build(base_state, merged, importance, settings.omega)
                    rows.append(
                        _row(variant, score(state), spec=spec, omega=settings.omega)
                    )
                if tune is not None:
                    result = tune.tune_merged(
                        models.base,
                        path,
                        importance,
                        validation,
                        settings.tune_omegas,
                        base_losses=base_val,
                        **tune_kwargs,
                    )
                    chosen = float(result.chosen.omega_attention)
                    if chosen >= 1.0:
                        metrics = plain
                    elif chosen in aim_scores:
                        metrics = aim_scores[chosen]
                    else:
                        state = merging.aim_state(
                            base_state, merged, importance, chosen
                        )
                        metrics = score(state)
                    rows.append(_row("tuned", metrics, spec=spec, omega=chosen))

    seconds = round(time.perf_counter() - start, 1)
    document = {
        "benchmark": "quality",
        "quick": quick,
        "settings": asdict(settings),
        "tasks": list(tasks.TASKS),
        "higher_is_better": report.HIGHER_IS_BETTER,
        "hypervolume_reference": (
            "per expert set: the worst normalized score on each axis over all its "
            "merges and variants, minus 10% of the axis' range (at least 0.05)"
        ),
        "greedy_check": checks,
        "training": models.log,
        "seconds": seconds,
        "timings": watch.timings,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
        },
        "results": rows,
    }
    (out_dir / "quality.json").write_text(json.dumps(document, indent=1))
    report.pareto_plot(rows, settings.omega, out_dir / "quality.png")
    (out_dir / "quality.md").write_text(report.markdown(document))
    LOG.info("quality: finished in %.0f s; results in %s", seconds, out_dir)
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality")
    parser.add_argument("--quick", action="store_true", help="small settings (~5 min)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--cache", type=Path, default=None, help="model cache (default OUT/cache)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    torch.set_num_threads(args.threads)
    document = run(args.out, quick=args.quick, cache_dir=args.cache)
    print((args.out / "quality.md").read_text())
    return 0 if math.isfinite(document["seconds"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
