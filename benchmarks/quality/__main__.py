"""``python -m benchmarks.quality [--quick | --model NAME] --out DIR``.

Trains (or reuses from the cache) a base and three experts, merges expert
sets with several methods through mergekit, applies AIM and its two controls
to each merge, chooses ω on a validation split with
:func:`mergekit_aim.tuning.tune_merged`, scores everything on the test split,
and writes ``quality.json``, ``quality.md`` and ``quality.png`` to ``--out``.

``--model smollm2-135m`` runs the protocol on a real pretrained base (see
:mod:`benchmarks.real_models`): only the experts are trained. Every score
keeps its per-block detail (the NLL of each evaluation block, the verdict on
each item), so the report can give paired differences with their spread.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import platform
import time
from collections.abc import Mapping
from dataclasses import asdict, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from benchmarks.quality import merging, report, scoring, tasks, training
from benchmarks.quality.metrics import (
    ExactMatchSet,
    exact_match_flags,
    greedy_exact_match,
)

LOG = logging.getLogger("benchmarks.quality")

EVAL_BATCH = 32


class Evaluator:
    """Scores a model on the test split of every task, block by block.

    Loss tasks: the task's texts packed into ``seq_len`` blocks (remainder
    dropped, so every block weighs the same), each block's mean next-token
    NLL; with ``bos`` every block starts with that token (Gemma-3 needs it).
    Exact-match tasks: each item's verdict. A task's metric is the mean over
    its blocks.
    """

    def __init__(
        self,
        tokenizer: Any,
        data: training.TaskData,
        seq_len: int,
        bos: int | None = None,
    ):
        from mergekit_aim.demo.models import token_blocks
        from mergekit_aim.tuning.evaluation import pad_token_id

        self.sets = {
            t: ExactMatchSet.build(tokenizer, data.test_items(t))
            for t in tasks.EM_TASKS
        }
        # Calibration's packer: with a BOS it starts every block with exactly one.
        self.windows = {
            task: token_blocks(
                tokenizer, data.test_texts[task], seq_len, bos_token_id=bos
            ).tolist()
            for task in tasks.LOSS_TASKS
        }
        self.pad_id = pad_token_id(tokenizer)

    def blocks(self, model: Any) -> tuple[dict[str, float], dict[str, list[float]]]:
        """``(metrics, per_block)``: each task's mean and its blocks' values."""
        from mergekit_aim.tuning.evaluation import window_nll

        detail: dict[str, list[float]] = {
            t: [float(f) for f in exact_match_flags(model, s)]
            for t, s in self.sets.items()
        }
        for task, windows in self.windows.items():
            per_window = window_nll(model, windows, EVAL_BATCH, self.pad_id)
            detail[task] = [total / count for total, count in per_window]
        blocks = {t: detail[t] for t in tasks.TASKS}
        return summarize(blocks), blocks


def _greedy_check(
    expert: Any,
    tokenizer: Any,
    task: str,
    data: training.TaskData,
    evaluate: Evaluator,
    settings: training.Settings,
) -> dict[str, list[int]]:
    """How often real greedy decoding agrees with the one-pass verdict."""
    checks = {}
    for em_task in tasks.EM_TASKS:
        items = data.test_items(em_task)[: settings.greedy_check_items]
        greedy = greedy_exact_match(expert, tokenizer, items)
        forced = exact_match_flags(expert, evaluate.sets[em_task])
        agree = sum(a == b for a, b in zip(greedy, forced, strict=False))
        checks[f"{task} expert on {em_task}"] = [agree, len(greedy)]
    return checks


class Variants:
    """One merge's variants scored on the test split, each relaxed state once."""

    def __init__(self, model, evaluate, base_state, merged, importance):
        self.model, self.evaluate = model, evaluate
        self.base_state, self.merged, self.importance = base_state, merged, importance
        self.scored: dict[tuple[float, float], tuple] = {}

    def score(self, state: Mapping[str, torch.Tensor]) -> tuple:
        load_merged(self.model, state)
        return self.evaluate.blocks(self.model)

    def aim(self, omega: float, omega_mlp: float | None = None) -> tuple:
        """AIM at ``omega`` (MLP tensors at ``omega_mlp``); ω = 1 is the plain merge."""
        key = (omega, omega if omega_mlp is None else omega_mlp)
        if key not in self.scored:
            state = self.merged
            if key != (1.0, 1.0):
                state = merging.aim_state(
                    self.base_state, self.merged, self.importance, *key
                )
            self.scored[key] = self.score(state)
        return self.scored[key]


class Tuner:
    """ω chosen per merge by ``tune`` on the validation split (never the test
    split). With lm-eval scoring: skill floors on the merged experts' tasks
    (``Settings.keep``), then the best general bits per byte; with the toy's
    teacher-forced scoring: the held-out loss objective, no floors."""

    def __init__(
        self,
        settings: training.Settings,
        models: training.Models,
        data: training.TaskData,
        tokenizer: Any,
        harness: bool,
    ):
        self.tune = _tuner()
        self.settings, self.models = settings, models
        self.kwargs = dict(
            seq_len=settings.seq_len, batch_size=EVAL_BATCH, dtype=settings.eval_dtype
        )
        self.harness = scoring.harness("validation") if harness else None
        self.evals = {} if harness else {t: data.validation(t) for t in tasks.TASKS}
        self.base_losses = {
            t: self.tune.evaluate_loss(
                models.base, texts, tokenizer=tokenizer, **self.kwargs
            )
            for t, texts in self.evals.items()
        }

    def choice(self, experts: tuple[str, ...]) -> dict[str, Any]:
        if self.harness is None:
            return {}
        return {
            "objective": scoring.metric_name("general", "validation"),
            "keep": {
                scoring.metric_name(t, "validation"): dict(self.settings.keep)[t]
                for t in experts
            },
        }

    def _run(
        self, spec: merging.MergeSpec, path: Path, importance, omegas, split: bool
    ) -> Any:
        """``tune``'s result for ``spec``'s plain merge at ``path``."""
        result = self.tune.tune_merged(
            self.models.base,
            path,
            importance,
            self.evals,
            omegas,
            split_attention_mlp=split,
            base_losses=self.base_losses or None,
            lm_eval=self.harness,
            **self.choice(spec.experts),
            **self.kwargs,
        )
        return result

    def scalar(
        self, spec: merging.MergeSpec, path: Path, importance: Any
    ) -> tuple[float, dict]:
        """(the chosen ω, the tuning record the tuned row keeps)."""
        result = self._run(spec, path, importance, self.settings.tune_omegas, False)
        return float(result.chosen.omega_attention), result.to_json()

    def split(
        self, spec: merging.MergeSpec, path: Path, importance: Any
    ) -> tuple[tuple[float, float], dict]:
        """((attention ω, MLP ω) chosen, the tuning record)."""
        result = self._run(spec, path, importance, self.settings.split_omegas, True)
        omegas = (result.chosen.omega_attention, result.chosen.omega_mlp)
        return (float(omegas[0]), float(omegas[1])), result.to_json()


def summarize(blocks: Mapping[str, list[float]]) -> dict[str, float]:
    return {task: sum(values) / len(values) for task, values in blocks.items()}


def _row(
    variant: str,
    scored: tuple[Mapping[str, float], Mapping[str, list[float]]],
    *,
    spec: merging.MergeSpec | None = None,
    experts: tuple[str, ...] = (),
    omega: float | None = None,
    omega_mlp: float | None = None,
) -> dict[str, Any]:
    metrics, blocks = scored
    mlp = omega if omega_mlp is None else omega_mlp
    relaxed = omega is not None and min(omega, mlp) < 1
    row = {
        "method": spec.method if spec else variant,
        "experts": list(spec.experts if spec else experts),
        "aim": variant in ("aim", "tuned", "tuned-split") and relaxed,
        "omega": omega,
        "seed": spec.seed if spec else None,
        "weights": spec.weights if spec else None,
        "variant": variant,
        "metrics": dict(metrics),
        "blocks": {t: [round(v, 6) for v in values] for t, values in blocks.items()},
    }
    if omega_mlp is not None:
        # tuned-split: ``omega`` is every non-MLP tensor's ω, this the MLP's.
        row["omega_mlp"] = omega_mlp
    return row


def _tuner() -> Any:
    # The package's public names (``tune_merged``, ``evaluate_loss``); no
    # fallback: a moved name must fail here, not drop the tuned rows quietly.
    from mergekit_aim import tuning

    return tuning


def settings_for(
    quick: bool = False, model: str | None = None, smoke: bool = False
) -> training.Settings:
    if smoke:
        if quick or model is not None:
            raise ValueError("--smoke is its own scale; it combines with nothing")
        return training.SMOKE
    if model is not None:
        if quick:
            raise ValueError(
                "--quick is the toy scale; it does not combine with --model"
            )
        if model not in training.REAL:
            raise ValueError(
                f"no real-model settings for {model!r}; expected one of "
                f"{sorted(training.REAL)}"
            )
        return training.REAL[model]
    return training.QUICK if quick else training.FULL


def run(
    out_dir: Path,
    *,
    quick: bool = False,
    cache_dir: Path | None = None,
    model_name: str | None = None,
    smoke: bool = False,
) -> dict[str, Any]:
    """Run the benchmark; returns the JSON document it writes."""
    from transformers import AutoModelForCausalLM

    from mergekit_aim.console import Stopwatch, quiet_transformers
    from mergekit_aim.importance import ImportanceMap

    settings = settings_for(quick, model_name, smoke)
    eval_dtype = getattr(torch, settings.eval_dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir else out_dir / "cache"
    watch = Stopwatch("quality")
    start = time.perf_counter()
    _tuner()  # fail before training when the tuner's names moved

    with quiet_transformers():
        with watch("data"):
            data = training.build_data(settings)
        with watch("training and calibration"):
            trained = {
                seed: training.build_models(settings.for_seed(seed), data, cache_dir)
                for seed in settings.training_seeds()
            }
        models = trained[settings.training_seeds()[0]]
        tokenizer = models.tokenizer
        harness = settings.scorer == "lm-eval"
        if harness:
            scoring.write_data(settings, out_dir / "lm_eval_data")
            evaluate: Any = scoring.HarnessTasks(tokenizer)
        else:
            evaluate = Evaluator(
                tokenizer,
                data,
                settings.seq_len,
                training.block_bos(settings, tokenizer),
            )
        base_state = merging.load_state(models.base)
        model = AutoModelForCausalLM.from_pretrained(models.base, dtype=eval_dtype)

        rows: list[dict[str, Any]] = []
        checks: dict[str, Any] = {}
        with watch("reference models"):
            rows.append(_row("base", evaluate.blocks(model)))
            for seed, seed_models in trained.items():
                for task, path in seed_models.experts.items():
                    expert = AutoModelForCausalLM.from_pretrained(
                        path, dtype=eval_dtype
                    )
                    rows.append(
                        _row("expert", evaluate.blocks(expert), experts=(task,))
                    )
                    if settings.expert_seeds:
                        rows[-1]["seed"] = seed
                    if not harness:  # lm-eval decodes greedily itself
                        checks.update(
                            _greedy_check(
                                expert, tokenizer, task, data, evaluate, settings
                            )
                        )
                    del expert
            LOG.info(
                "quality: references %s",
                [(r["variant"], r["experts"], r["metrics"]) for r in rows],
            )

        pairs = settings.pairs
        if pairs is None:
            pairs = tuple(itertools.combinations(tasks.EXPERT_TASKS, 2))
        expert_sets = [*pairs, tuple(tasks.EXPERT_TASKS)]
        # Each merge's rows are cached beside it, keyed by every setting, so an
        # interrupted run resumes at the first unscored merge.
        rows_name = f"rows-{_settings_digest(settings)}.json"
        grid = merging.merge_grid(expert_sets, settings.dare_seeds, settings.methods)
        # With expert seeds a row's seed is the experts' (no DARE: Settings
        # refuses the mix); each seed's merges sit beside its own models.
        jobs = [
            (seed, replace(spec, seed=seed) if settings.expert_seeds else spec)
            for seed in trained
            for spec in grid
        ]
        importances = {
            seed: ImportanceMap.load(m.importance) for seed, m in trained.items()
        }
        tuner = Tuner(settings, models, data, tokenizer, harness)
        for n, (seed, spec) in enumerate(jobs, 1):
            seed_models, importance = trained[seed], importances[seed]
            merges_dir = cache_dir / f"merges-{settings.for_seed(seed).training_key()}"
            done = merges_dir / spec.name / rows_name
            if done.exists():
                rows.extend(json.loads(done.read_text()))
                continue
            first_row = len(rows)
            with watch(f"merge {n}/{len(jobs)} {spec.name}"):
                path = merging.run_plain_merge(
                    spec,
                    seed_models.base,
                    seed_models.experts,
                    settings.density,
                    merges_dir,
                )
                merged = merging.load_state(path)
                variants = Variants(model, evaluate, base_state, merged, importance)
                score, score_aim = variants.score, variants.aim
                rows.append(_row("plain", score_aim(1.0), spec=spec, omega=1.0))
                omegas = {settings.omega}
                if len(spec.experts) == len(tasks.EXPERT_TASKS):
                    omegas |= set(settings.sweep_omegas)
                for omega in sorted(omegas - {1.0}):
                    rows.append(_row("aim", score_aim(omega), spec=spec, omega=omega))
                for variant, build in (
                    ("uniform", merging.uniform_state),
                    ("permuted", merging.permuted_state),
                ):
                    state = build(base_state, merged, importance, settings.omega)
                    rows.append(
                        _row(variant, score(state), spec=spec, omega=settings.omega)
                    )
                    del state
                chosen, record = tuner.scalar(spec, path, importance)
                rows.append(_row("tuned", score_aim(chosen), spec=spec, omega=chosen))
                rows[-1]["tuning"] = record
                if settings.split_omegas:
                    (attention, mlp), record = tuner.split(spec, path, importance)
                    rows.append(
                        _row(
                            "tuned-split",
                            score_aim(attention, mlp),
                            spec=spec,
                            omega=attention,
                            omega_mlp=mlp,
                        )
                    )
                    rows[-1]["tuning"] = record
            done.write_text(json.dumps(rows[first_row:]))
            LOG.info(
                "quality: %s plain %s aim %s",
                spec.name,
                rows[first_row]["metrics"],
                score_aim(settings.omega)[0],
            )

    seconds = round(time.perf_counter() - start, 1)
    document = {
        "benchmark": "quality",
        "quick": quick,
        "smoke": smoke,
        "model": settings.model,
        "settings": asdict(settings),
        "tasks": list(tasks.TASKS),
        "higher_is_better": report.HIGHER_IS_BETTER,
        "hypervolume_reference": (
            "per expert set: the worst normalized score on each axis over all its "
            "merges and variants, minus 10% of the axis' range (at least 0.05)"
        ),
        "greedy_check": checks,
        "lm_eval_version": version("lm_eval") if settings.scorer == "lm-eval" else None,
        "training": (
            {str(seed): m.log for seed, m in trained.items()}
            if settings.expert_seeds
            else models.log
        ),
        "importance_spread": report.importance_spread(
            importances[settings.training_seeds()[0]]
        ),
        "seconds": seconds,
        "timings": watch.timings,
        "machine": _machine(),
        "results": rows,
    }
    report.write(out_dir, document)
    LOG.info("quality: finished in %.0f s; results in %s", seconds, out_dir)
    return document


def build_experts(
    out_dir: Path,
    *,
    quick: bool = False,
    cache_dir: Path | None = None,
    model_name: str | None = None,
    smoke: bool = False,
) -> dict[str, Path]:
    """Only the first stage: the base, the three experts and the base's
    artifact (cached like a full run), linked as ``OUT/models/<name>``; with
    several training seeds, each seed's experts as ``expert_<task>_s<seed>``."""
    from mergekit_aim.console import quiet_transformers

    settings = settings_for(quick, model_name, smoke)
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir else out_dir / "cache"
    data = training.build_data(settings)
    targets: dict[str, Path] = {}
    with quiet_transformers():
        for seed in settings.training_seeds():
            models = training.build_models(settings.for_seed(seed), data, cache_dir)
            suffix = f"_s{seed}" if settings.expert_seeds else ""
            targets.update(
                {f"expert_{t}{suffix}": path for t, path in models.experts.items()}
            )
    targets.update(base=models.base, **{"importance.safetensors": models.importance})
    links = out_dir / "models"
    links.mkdir(parents=True, exist_ok=True)
    for name, target in targets.items():
        link = links / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(target).resolve())
    return {name: links / name for name in targets}


def load_merged(model: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Load a merged state dict into ``model``; only a tied LM head may be
    missing (mergekit does not write it: it is the embedding)."""
    result = model.load_state_dict(state, strict=False)
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        output = model.get_output_embeddings()
        if output is not None and output.weight is model.get_input_embeddings().weight:
            tied = {
                n
                for n, p in model.named_parameters(remove_duplicate=False)
                if p is output.weight
            } - set(state)
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"merged state does not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}"
        )


def _settings_digest(settings: training.Settings) -> str:
    blob = json.dumps(asdict(settings), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _machine() -> dict[str, Any]:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line for line in handle if line.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "processor": cpu,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality")
    parser.add_argument("--quick", action="store_true", help="small settings (~5 min)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="every stage at the smallest size (seconds; numbers meaningless): "
        "checks the benchmark still runs",
    )
    parser.add_argument(
        "--model",
        default=None,
        choices=sorted(training.REAL),
        help="a real pretrained base (provisioned by benchmarks.real_models) "
        "instead of the toy trained from scratch",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--experts-only",
        action="store_true",
        help="only train (or find) the experts and calibrate the base; link them "
        "as OUT/models/<name> and print their paths",
    )
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
    if args.quick and args.model:
        parser.error("--quick is the toy scale; it does not combine with --model")
    if args.smoke and (args.quick or args.model):
        parser.error(
            "--smoke is its own scale; it does not combine with --quick/--model"
        )
    where = dict(
        quick=args.quick,
        cache_dir=args.cache,
        model_name=args.model,
        smoke=args.smoke,
    )
    if args.experts_only:
        for name, path in build_experts(args.out, **where).items():
            print(f"{name}: {path}")
        return 0
    document = run(args.out, **where)
    print((args.out / "quality.md").read_text())
    return 0 if math.isfinite(document["seconds"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
