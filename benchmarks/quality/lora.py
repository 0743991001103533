"""The quality benchmark on LoRA experts merged by PEFT
(``python -m benchmarks.quality.lora --model smollm2-135m --out DIR``).

The full fine-tune run's protocol with low-rank experts: the same base, data,
training steps and schedule, seeds, artifact, scorer, controls and tuning
rule, so its rows sit in the same report tables. What changes:

* each expert is a LoRA adapter (:data:`LORA`) trained with a learning rate
  :data:`LR_FACTOR` times the full fine-tune's (a LoRA update needs a larger
  step to move as far);
* merges are PEFT's ``add_weighted_adapter`` with the non-SVD combination
  types (:data:`COMBINATIONS`): they merge the ``lora_A`` and the ``lora_B``
  matrices separately and keep the rank, so the merged adapter is a plain
  LoRA whose delta is ``B_m A_m`` and AIM folds exactly into ``A_m``'s
  columns (the SVD types would refactor ``B A`` at another rank; ``cat``
  stacks the ranks);
* AIM is :func:`mergekit_aim.adapters.relax_adapter_` on the merged adapter,
  and the controls scale the same ``lora_A`` columns by the uniform and the
  permuted factors of :mod:`benchmarks.quality.merging`. Only the adapted
  linears move: norms and the LM head are the base's in every variant.

Variants are scored with the adapter unmerged (PEFT's forward, the base in
the run's eval dtype), as LoRA adapters are served. ``tuned`` runs ``tune``'s
search on the merged adapter folded into a float32 checkpoint (what
``mergekit-aim tune-adapter`` does), then scores the adapter relaxed at the
pick: relaxing the adapter equals relaxing its merged weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from benchmarks.quality import merging, report, scoring, tasks, training
from benchmarks.quality.__main__ import (
    Evaluator,
    Tuner,
    _machine,
    _row,
    _settings_digest,
)
from benchmarks.quality.merging import MergeSpec

LOG = logging.getLogger("benchmarks.quality.lora")

LORA = {
    "r": 16,
    "lora_alpha": 32,
    "target_modules": [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ],
    "lora_dropout": 0.0,
}
LR_FACTOR = 10.0
# Benchmark method name -> PEFT combination type (both keep the rank).
COMBINATIONS = {"lora_ties": "ties", "lora_dare_ties": "dare_ties"}
SEEDED = ("lora_dare_ties",)
# Bump when adapter training changes: cached adapters are then retrained.
_CACHE_VERSION = 1


def lora_settings(settings: training.Settings, reduced: bool) -> training.Settings:
    """The full run's settings with LoRA learning rates and PEFT's methods;
    no attention/MLP split (its tuned-split rows are not repeated here).
    ``reduced`` (the 2-core budget): no ω sweep beyond the fixed ω."""
    return dataclasses.replace(
        settings,
        code_lr=settings.code_lr * LR_FACTOR,
        item_lr=settings.item_lr * LR_FACTOR,
        methods=tuple(COMBINATIONS),
        split_omegas=(),
        sweep_omegas=(settings.omega,) if reduced else settings.sweep_omegas,
    )


def lora_grid(settings: training.Settings, reduced: bool) -> list[MergeSpec]:
    """Every expert set (the pairs, then the triple) × weighting × method;
    DARE once per seed. ``reduced``: weights 1 only, and the first seed's
    merges first, so that a run cut short still covers both methods and
    both sets."""
    sets = [*(settings.pairs or ()), tuple(tasks.EXPERT_TASKS)]
    grid = [
        MergeSpec(method, experts, weights, seed)
        for experts in sets
        for weights in (("1",) if reduced else merging.WEIGHTINGS)
        for method in settings.methods
        for seed in (settings.dare_seeds if method in SEEDED else (0,))
    ]
    return sorted(grid, key=lambda spec: spec.seed) if reduced else grid


# --- experts -------------------------------------------------------------------------


def _adapters_key(settings: training.Settings) -> str:
    blob = json.dumps(
        {"training": settings.training_key(), "lora": LORA, "v": _CACHE_VERSION},
        sort_keys=True,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def train_adapters(
    settings: training.Settings,
    data: training.TaskData,
    base: Path,
    tokenizer: Any,
    root: Path,
    autocast: torch.dtype | None,
) -> tuple[dict[str, Path], dict[str, Any]]:
    """One LoRA adapter per expert task under ``root`` (each saved whole and
    marked done before the next starts, so a rerun trains only what is
    missing); returns their paths and each one's first and last loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths, log = {}, {}
    for i, task in enumerate(tasks.EXPERT_TASKS):
        path = paths[task] = root / f"lora_{task}"
        done = path / ".done"
        if done.exists():
            log[task] = json.loads(done.read_text())
            LOG.info("lora: %s adapter found in %s", task, path)
            continue
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        # lora_A's random initialisation draws from the global generator.
        torch.manual_seed(settings.seed + 1 + i)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
        losses = training.train_expert(
            model, task, i, settings, data, tokenizer, autocast
        )
        model.save_pretrained(path)
        log[task] = {
            "loss": [losses[0], losses[-1]],
            "seconds": round(time.perf_counter() - start, 1),
        }
        LOG.info("lora: %s adapter loss %.3f -> %.3f", task, losses[0], losses[-1])
        done.write_text(json.dumps(log[task]))
        del model
    return paths, log


def base_and_importance(
    settings: training.Settings,
    data: training.TaskData,
    cache: Path,
    importance: Path | None,
) -> tuple[Path, Any, Path]:
    """(base path, tokenizer, artifact path). A real base is provisioned and
    calibrated as the full run calibrates it (or ``importance`` is that
    run's artifact); the toy scale takes the full run's toy base and
    artifact, whose experts cost seconds there."""
    from transformers import AutoTokenizer

    if not settings.model:
        models = training.build_models(settings, data, cache)
        return models.base, models.tokenizer, importance or models.importance
    from benchmarks import real_models

    base = real_models.ensure(settings.model)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if importance is None:
        importance = cache / f"importance-{settings.training_key()}.safetensors"
        if not importance.exists():
            training.calibrate_base(settings, base, tokenizer).save(importance)
    return base, tokenizer, importance


# --- merges and their variants -------------------------------------------------------


def add_merge(model: Any, spec: MergeSpec, density: float) -> None:
    """``spec``'s merge of the loaded expert adapters as adapter ``spec.name``,
    made active. DARE's drops come from the global generator: seeded."""
    torch.manual_seed(spec.seed)
    model.add_weighted_adapter(
        list(spec.experts),
        [spec.weight()] * len(spec.experts),
        spec.name,
        combination_type=COMBINATIONS[spec.method],
        density=density,
    )
    model.set_adapter(spec.name)


def lora_a(model: Any, adapter: str) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``(checkpoint name of the adapted weight, lora_A weight)`` of every
    module ``adapter`` adapts."""
    for key, module in lora_layers(model):
        if adapter in module.lora_A:
            yield key, module.lora_A[adapter].weight


class Folded:
    """Scores an adapter of a float32 PEFT model as the full run scores a
    merge: the adapter's delta added to the base's float32 weights, loaded
    into a plain model of the eval dtype (the same rounding as a float32
    merge loaded in bf16, and no unmerged-adapter overhead per forward)."""

    def __init__(self, peft_model: Any, plain: Any, evaluate: Any):
        self.peft_model, self.plain, self.evaluate = peft_model, plain, evaluate
        self.base = {
            key: module.get_base_layer().weight.detach().clone()
            for key, module in lora_layers(peft_model)
        }

    def blocks(self, adapter: str | None) -> tuple:
        """``evaluate.blocks`` of the base plus ``adapter`` (None: the base)."""
        with torch.no_grad():
            for key, module in lora_layers(self.peft_model):
                weight = self.base[key]
                if adapter is not None:
                    weight = weight + module.get_delta_weight(adapter)
                self.plain.get_parameter(key).copy_(weight)
        return self.evaluate.blocks(self.plain)


def lora_layers(model: Any) -> Iterator[tuple[str, Any]]:
    """``(checkpoint name of the adapted weight, LoRA layer)`` of a PEFT model."""
    from mergekit_aim.names import PEFT_PREFIX

    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "get_delta_weight"):
            yield f"{name.removeprefix(PEFT_PREFIX)}.weight", module


class AdapterVariants:
    """One merged adapter's variants, each made from its plain ``lora_A``
    (kept aside) and scored by ``scorer.blocks(adapter)``; AIM at each ω
    scored once."""

    def __init__(self, model: Any, adapter: str, scorer: Any, importance: Any):
        self.model, self.adapter = model, adapter
        self.scorer, self.importance = scorer, importance
        self.plain = {k: p.detach().clone() for k, p in lora_a(model, adapter)}
        missing = [k for k in self.plain if k not in importance]
        if missing:
            # The controls must move exactly the tensors AIM moves.
            raise RuntimeError(f"no statistic for adapted weights {missing[:3]}")
        self.scored: dict[float, tuple] = {}

    def restore(self) -> None:
        with torch.no_grad():
            for key, parameter in lora_a(self.model, self.adapter):
                parameter.copy_(self.plain[key])

    def aim(self, omega: float) -> tuple:
        if omega not in self.scored:
            self.restore()
            if omega != 1.0:
                from mergekit_aim.adapters import relax_adapter_

                relax_adapter_(
                    self.model, self.importance, omega, adapter_name=self.adapter
                )
            self.scored[omega] = self.scorer.blocks(self.adapter)
        return self.scored[omega]

    def scaled(self, factors: Callable[[str], torch.Tensor]) -> tuple:
        """Scored with each ``lora_A``'s input columns times ``factors(key)``."""
        self.restore()
        with torch.no_grad():
            for key, parameter in lora_a(self.model, self.adapter):
                parameter.mul_(factors(key).to(parameter.dtype))
        scored = self.scorer.blocks(self.adapter)
        self.restore()
        return scored


def fold(base: Path, adapter: Path, to: Path) -> Path:
    """The base with ``adapter`` merged in, float32, saved to ``to`` (the
    checkpoint ``tune``'s search relaxes)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(to)
    return to


# --- the run -------------------------------------------------------------------------


def run(
    out_dir: Path,
    *,
    model_name: str | None = None,
    smoke: bool = False,
    cache_dir: Path | None = None,
    importance_path: Path | None = None,
    reduced: bool = False,
) -> dict[str, Any]:
    """Run the LoRA benchmark; returns the JSON document it writes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from benchmarks.quality.__main__ import settings_for
    from mergekit_aim.console import Stopwatch, quiet_transformers
    from mergekit_aim.importance import ImportanceMap

    full = settings_for(model=model_name, smoke=smoke)
    settings = lora_settings(full, reduced)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir else out_dir / "cache"
    root = cache_dir / f"lora-{_adapters_key(settings)}"
    root.mkdir(parents=True, exist_ok=True)
    watch = Stopwatch("lora")
    start = time.perf_counter()
    eval_dtype = getattr(torch, settings.eval_dtype)
    autocast = torch.bfloat16 if settings.model else None

    with quiet_transformers():
        with watch("data"):
            data = training.build_data(settings)
        with watch("base and calibration"):
            # The full run's base and artifact (its settings name their cache).
            base, tokenizer, importance_file = base_and_importance(
                full, data, cache_dir, importance_path
            )
        with watch("LoRA experts"):
            adapters, train_log = train_adapters(
                settings, data, base, tokenizer, root, autocast
            )
        harness = settings.scorer == "lm-eval"
        if harness:
            scoring.write_data(settings, out_dir / "lm_eval_data")
            evaluate: Any = scoring.HarnessTasks(tokenizer)
        else:
            evaluate = Evaluator(tokenizer, data, settings.seq_len)
        importance = ImportanceMap.load(importance_file)
        # Adapters merge and relax in float32; variants are scored folded.
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        first, *others = tasks.EXPERT_TASKS
        model = PeftModel.from_pretrained(model, adapters[first], adapter_name=first)
        for task in others:
            model.load_adapter(adapters[task], adapter_name=task)
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=eval_dtype).eval()
        scorer = Folded(model, plain, evaluate)

        rows: list[dict[str, Any]] = []
        with watch("reference models"):
            rows.append(_row("base", scorer.blocks(None)))
            for task in tasks.EXPERT_TASKS:
                rows.append(_row("expert", scorer.blocks(task), experts=(task,)))
        LOG.info(
            "lora: references %s",
            [(r["variant"], r["experts"], r["metrics"]) for r in rows],
        )

        models = training.Models(
            root, base, adapters, importance_file, tokenizer, train_log
        )
        tuner = Tuner(settings, models, data, tokenizer, harness)
        specs = lora_grid(settings, reduced)

        def watch_seconds() -> float:
            return round(time.perf_counter() - start, 1)

        def document(rows: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
            return {
                "benchmark": "quality",
                "quick": False,
                "smoke": smoke,
                # False while merges remain: the report says how many ran.
                "complete": complete,
                "planned_merges": len(specs),
                "model": settings.model,
                "lora": {
                    **LORA,
                    "lr_factor": LR_FACTOR,
                    "combinations": COMBINATIONS,
                    "weightings": sorted({s.weights for s in specs}),
                    "peft_version": version("peft"),
                },
                "settings": asdict(settings),
                "tasks": list(tasks.TASKS),
                "higher_is_better": report.HIGHER_IS_BETTER,
                "greedy_check": {},
                "lm_eval_version": version("lm_eval") if harness else None,
                "training": train_log,
                "importance": str(importance_file),
                "importance_spread": report.importance_spread(importance),
                "seconds": watch_seconds(),
                "timings": dict(watch.timings),
                "machine": _machine(),
                "results": rows,
            }

        rows_name = f"rows-{_settings_digest(settings)}-{_digest(importance_file)}.json"
        for n, spec in enumerate(specs, 1):
            merge_dir = root / "merges" / spec.name
            done = merge_dir / rows_name
            if done.exists():
                rows.extend(json.loads(done.read_text()))
                continue
            first_row = len(rows)
            with watch(f"merge {n}/{len(specs)} {spec.name}"):
                add_merge(model, spec, settings.density)
                variants = AdapterVariants(model, spec.name, scorer, importance)
                rows.extend(_fixed_rows(spec, variants, settings))
                chosen, record = _tune(spec, variants, base, merge_dir, tuner)
                rows.append(
                    _row("tuned", variants.aim(chosen), spec=spec, omega=chosen)
                )
                rows[-1]["tuning"] = record
                model.delete_adapter(spec.name)
            done.write_text(json.dumps(rows[first_row:]))
            # Written after every merge: a run cut short leaves its report.
            report.write(out_dir, document(rows, False))
        final = document(rows, True)
        report.write(out_dir, final)
    LOG.info("lora: finished in %.0f s; results in %s", final["seconds"], out_dir)
    return final


def _fixed_rows(spec: MergeSpec, variants: AdapterVariants, settings) -> list[dict]:
    """plain, AIM (the fixed ω, and the sweep on the triple), uniform and
    permuted rows of one merge."""
    omega = settings.omega
    rows = [_row("plain", variants.aim(1.0), spec=spec, omega=1.0)]
    omegas = {omega}
    if len(spec.experts) == len(tasks.EXPERT_TASKS):
        omegas |= set(settings.sweep_omegas)
    for value in sorted(omegas - {1.0}):
        rows.append(_row("aim", variants.aim(value), spec=spec, omega=value))
    for control in ("uniform", "permuted"):
        scored = variants.scaled(
            lambda key, c=control: merging.control_factors(
                variants.importance, key, omega, c
            )
        )
        rows.append(_row(control, scored, spec=spec, omega=omega))
    LOG.info(
        "lora: %s plain %s aim %s",
        spec.name,
        rows[0]["metrics"],
        variants.aim(omega)[0],
    )
    return rows


def _tune(
    spec: MergeSpec, variants: AdapterVariants, base: Path, merge_dir: Path, tuner
) -> tuple[float, dict]:
    """(ω chosen by ``tune`` on the validation split from the plain merged
    adapter folded into the base, the tuning record)."""
    variants.restore()
    saved = merge_dir / "adapter"
    variants.model.save_pretrained(saved, selected_adapters=[spec.name])
    folded = fold(base, saved / spec.name, merge_dir / "folded")
    try:
        return tuner.scalar(spec, folded, variants.importance)
    finally:
        shutil.rmtree(folded, ignore_errors=True)  # a float32 copy of the model


def _digest(path: Path) -> str:
    # Rows scored against one artifact are not reused with another.
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.lora")
    scale = parser.add_mutually_exclusive_group(required=True)
    scale.add_argument("--model", choices=sorted(training.REAL))
    scale.add_argument(
        "--smoke",
        action="store_true",
        help="every stage on the toy model at the smallest size (numbers "
        "meaningless): checks the benchmark still runs",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--cache", type=Path, default=None, help="adapter cache (default OUT/cache)"
    )
    parser.add_argument(
        "--importance",
        type=Path,
        default=None,
        help="the base's artifact from the full fine-tune run (default: "
        "calibrate the base as that run does)",
    )
    parser.add_argument(
        "--reduced",
        action="store_true",
        help="expert weights 1 only, no ω sweep, first seeds first (for a 2-core "
        "time budget)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    torch.set_num_threads(args.threads)
    document = run(
        args.out,
        model_name=args.model,
        smoke=args.smoke,
        cache_dir=args.cache,
        importance_path=args.importance,
        reduced=args.reduced,
    )
    print((args.out / "quality.md").read_text())
    return 0 if math.isfinite(document["seconds"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
