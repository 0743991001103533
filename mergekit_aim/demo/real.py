"""``mergekit-aim demo``: TIES with and without AIM on a real pretrained model.

The base is SmolLM2-135M (Llama, 30 layers; :func:`find_base` finds the copy
``make real-models`` or ``make demo`` provisions, offline). Two experts are the
whole base briefly fine-tuned on the CPU, each on one skill, as the quality
benchmark's real-model run trains them (AdamW, bf16 autocast, float32
weights): **code** on ``builtin`` code and **math** on generated arithmetic
items (:mod:`mergekit_aim.demo.tasks`), both with the language-model loss and
no replay of general text, so each forgets a little of what the base knew.
The base is calibrated on ``builtin``'s train split (the calibration cache of
every merge), the experts are merged with TIES through mergekit's own
pipeline twice (plain, and with an ``aim:`` block;
:func:`mergekit_aim.plugin.run_yaml_merge`), and every model is scored by
held-out loss (mean token NLL, in bfloat16) on ``code``, ``math`` and
``general`` (held-out prose: what the base knew, which neither expert trained
on). No evaluation text is trained or calibrated on.

The experts are cached under ``$MERGEKIT_AIM_CACHE/demo/`` by a key of the
base's fingerprint, the training settings and the corpus, so a second run only
calibrates (cached too), merges and scores. The numbers are whatever the run
produces; nothing is tuned for AIM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from mergekit_aim.console import Stopwatch, quiet_transformers
from mergekit_aim.demo.common import (
    OMEGA,
    TIES,
    TIES_AIM,
    DemoResult,
    merge_config,
    score_table,
    torch_threads,
)
from mergekit_aim.errors import AimConfigError

LOG = logging.getLogger(__name__)

MODEL = "smollm2-135m"
# Where `make real-models` (benchmarks.real_models) puts the converted
# checkpoints: $MERGEKIT_AIM_REAL_MODELS, else .real-models in the working
# directory (the repository root for `make demo`). A finished conversion
# carries this marker file.
REAL_MODELS_ENV = "MERGEKIT_AIM_REAL_MODELS"
REAL_MODELS_DIR = ".real-models"
PROVISIONED_MARKER = ".provisioned.json"

DOMAINS = ("code", "math", "general")
EXPERT_DOMAINS = ("code", "math")
BASE, EXPERT_CODE, EXPERT_MATH = "base", "expert: code", "expert: math"
ROWS = (BASE, EXPERT_CODE, EXPERT_MATH, TIES, TIES_AIM)
CALIBRATION_SEED = 42
# Bump when training or data rules change: cached experts are then rebuilt.
_CACHE_VERSION = 1


@dataclass(frozen=True)
class RealSettings:
    """Training budget, data sizes and evaluation sizes of one real demo run."""

    steps: int = 24
    lr: float = 1e-4
    batch_size: int = 16
    seq_len: int = 64
    code_chars: int = 120_000
    math_items: int = 2_000
    eval_chars: int = 6_000
    eval_items: int = 80
    eval_seq_len: int = 256
    calibration_samples: int = 64
    calibration_seq_len: int = 512
    density: float = 0.5
    seed: int = 0

    def training_key(self, base_fingerprint: str) -> str:
        """Hash of everything that determines the experts."""
        from mergekit_aim.calibration.builtin import builtin_fingerprint

        training = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name in _TRAINING_FIELDS
        }
        blob = json.dumps(
            {
                "training": training,
                "base": base_fingerprint,
                "corpus": builtin_fingerprint(),
                "version": _CACHE_VERSION,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_TRAINING_FIELDS = ("steps", "lr", "batch_size", "seq_len", "code_chars")
_TRAINING_FIELDS += ("math_items", "seed")
_EVAL_FIELDS = ("eval_chars", "eval_items", "eval_seq_len", "seed")
DEFAULT = RealSettings()


def find_base(base: str | os.PathLike | None = None) -> Path:
    """The SmolLM2-135M checkpoint: ``base`` when given, else the provisioned
    copy in ``$MERGEKIT_AIM_REAL_MODELS`` or ``./.real-models``."""
    if base is not None:
        path = Path(base)
        if not (path / "config.json").is_file():
            raise AimConfigError(
                f"--base {path}: not a model directory (no config.json)"
            )
        return path
    root = Path(os.environ.get(REAL_MODELS_ENV) or REAL_MODELS_DIR)
    path = root / MODEL
    if not (path / PROVISIONED_MARKER).is_file():
        raise AimConfigError(
            f"the demo's base model is not in {path}: provision it with `make "
            f"real-models` (or `python -m benchmarks.real_models --model {MODEL} "
            f"{root}`), set ${REAL_MODELS_ENV} to the directory holding "
            f"{MODEL}/, pass --base DIR, or run `mergekit-aim demo --toy`"
        )
    return path


@dataclass
class DemoData:
    """Training and held-out texts of one run (deterministic for the settings)."""

    train: dict[str, list[str]]
    heldout: dict[str, list[str]]


def demo_data(settings: RealSettings) -> DemoData:
    """Code from ``builtin``'s train split, arithmetic items (train and test
    disjoint by prompt), held-out code and prose from ``builtin``'s heldout
    split."""
    from mergekit_aim.demo import tasks
    from mergekit_aim.demo.models import builtin_sample

    seed = settings.seed
    items = tasks.item_splits(
        tasks.math_item,
        train=settings.math_items,
        validation=0,
        test=settings.eval_items,
        seed=seed + 101,
    )
    return DemoData(
        train={
            "code": builtin_sample("code", "train", settings.code_chars, seed + 1),
            "math": [item.text for item in items.train],
        },
        heldout={
            "code": builtin_sample("code", "heldout", settings.eval_chars, seed),
            "math": [item.text for item in items.test],
            "general": builtin_sample("prose", "heldout", settings.eval_chars, seed),
        },
    )


def trained_experts(
    base: Path, tokenizer: Any, data: DemoData, settings: RealSettings, root: Path
) -> dict[str, Path]:
    """One expert per domain of :data:`EXPERT_DOMAINS` under ``root``, trained
    unless a finished one is there (each is written whole, then renamed)."""
    import torch
    from transformers import AutoModelForCausalLM

    from mergekit_aim.demo import models

    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, domain in enumerate(EXPERT_DOMAINS):
        path = root / f"expert_{domain}"
        paths[domain] = path
        if (path / "training.json").is_file():
            LOG.info("demo: %s expert found in %s", domain, path)
            continue
        partial = root / f".expert_{domain}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        losses = models.train_causal_lm(
            model,
            tokenizer,
            data.train[domain],
            steps=settings.steps,
            lr=settings.lr,
            seq_len=settings.seq_len,
            batch_size=settings.batch_size,
            seed=settings.seed + 1 + i,
            autocast=torch.bfloat16,
        )
        LOG.info("demo: %s expert loss %.3f -> %.3f", domain, losses[0], losses[-1])
        # float32, so that small task vectors survive.
        models.save_checkpoint(model, tokenizer, partial, dtype=torch.float32)
        del model
        record = {
            "settings": asdict(settings),
            "base": str(base),
            "losses": [losses[0], losses[-1]],
            "seconds": round(time.perf_counter() - start, 1),
        }
        (partial / "training.json").write_text(json.dumps(record, indent=1))
        shutil.rmtree(path, ignore_errors=True)
        partial.rename(path)
    return paths


def _scores_file(root: Path, settings: RealSettings) -> Path:
    evaluation = {f: getattr(settings, f) for f in _EVAL_FIELDS}
    key = hashlib.sha256(json.dumps(evaluation, sort_keys=True).encode()).hexdigest()
    return root / f"scores-{key[:12]}.json"


def _cached_scores(root: Path, settings: RealSettings) -> dict[str, dict[str, float]]:
    """Held-out scores of the base and the experts from an earlier run with
    the same evaluation settings (``{}`` when there is none)."""
    try:
        found = json.loads(_scores_file(root, settings).read_text())
    except (OSError, ValueError):
        return {}
    return {row: found[row] for row in (BASE, EXPERT_CODE, EXPERT_MATH) if row in found}


def _keep_scores(
    root: Path, settings: RealSettings, scores: dict[str, dict[str, float]]
) -> None:
    kept = {row: scores[row] for row in (BASE, EXPERT_CODE, EXPERT_MATH)}
    _scores_file(root, settings).write_text(json.dumps(kept, indent=1))


def calibrated_importance(base: Path, settings: RealSettings) -> Path:
    """The base's artifact on ``builtin``'s train split, from the calibration
    cache every merge uses (computed on a miss)."""
    from mergekit_aim.calibration.cache import calibrated_artifact
    from mergekit_aim.calibration.settings import calibration_config
    from mergekit_aim.checkpoint import read_checkpoint

    config = calibration_config(
        dataset="builtin",
        split="train",
        num_samples=settings.calibration_samples,
        seq_len=settings.calibration_seq_len,
        seed=CALIBRATION_SEED,
        batch_size=8,
    )
    path, _ = calibrated_artifact(
        str(base), read_checkpoint(str(base)), config, device="cpu", quiet=True
    )
    return Path(path)


def run_real_demo(
    out_dir: Path,
    *,
    base: str | os.PathLike | None = None,
    settings: RealSettings = DEFAULT,
    threads: int | None = None,
) -> DemoResult:
    """Fine-tune (or find cached), calibrate, merge and evaluate; write
    ``configs/{ties,ties_aim}.yml``, ``models/{ties,ties_aim}/``,
    ``results.json`` and ``results.md`` under ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_aim.cache_location import cache_dir
    from mergekit_aim.checkpoint import read_checkpoint
    from mergekit_aim.plugin import run_yaml_merge
    from mergekit_aim.tuning.evaluation import evaluate_loss

    base_path = find_base(base)
    out_dir = Path(out_dir)
    models_dir, configs_dir = out_dir / "models", out_dir / "configs"
    configs_dir.mkdir(parents=True, exist_ok=True)
    watch = Stopwatch()
    start = time.perf_counter()
    key = settings.training_key(read_checkpoint(str(base_path)).fingerprint)
    experts_root = cache_dir() / "demo" / f"{MODEL}-{key}"

    with quiet_transformers(), torch_threads(threads):
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        data = demo_data(settings)
        with watch("expert training"):
            experts = trained_experts(
                base_path, tokenizer, data, settings, experts_root
            )
        with watch("calibration"):
            importance = calibrated_importance(base_path, settings)

        paths = {
            BASE: base_path,
            EXPERT_CODE: experts["code"],
            EXPERT_MATH: experts["math"],
        }
        expert_paths = [experts[d] for d in EXPERT_DOMAINS]
        for row, name, artifact in (
            (TIES, "ties", None),
            (TIES_AIM, "ties_aim", importance),
        ):
            with watch(f"{name} merge"):
                text = merge_config(base_path, expert_paths, settings.density, artifact)
                (configs_dir / f"{name}.yml").write_text(text)
                paths[row] = run_yaml_merge(text, models_dir / name)

        # The base's and the experts' scores depend only on the cached models
        # and the evaluation settings: kept with the experts, so a warm run
        # scores only the two merges.
        known = _cached_scores(experts_root, settings)
        scores: dict[str, dict[str, float]] = {}
        with watch("evaluation"):
            for row in ROWS:
                if row in known:
                    scores[row] = known[row]
                    continue
                model = AutoModelForCausalLM.from_pretrained(
                    paths[row], dtype=torch.bfloat16
                )
                scores[row] = {
                    d: evaluate_loss(
                        model,
                        data.heldout[d],
                        tokenizer=tokenizer,
                        seq_len=settings.eval_seq_len,
                        batch_size=8,
                    )
                    for d in DOMAINS
                }
                del model
                LOG.info(
                    "demo: %s %s", row, {k: round(v, 4) for k, v in scores[row].items()}
                )
            _keep_scores(experts_root, settings, scores)

    table, change = score_table(scores, DOMAINS)
    result = DemoResult(
        rows=ROWS,
        domains=DOMAINS,
        out_dir=out_dir,
        settings=settings,
        losses=table,
        relative_change=change,
        models=paths,
        importance=importance,
        seconds=round(time.perf_counter() - start, 2),
        timings=watch.timings,
        notes={"base_model": MODEL, "experts_cache": str(experts_root)},
    )
    (out_dir / "results.json").write_text(json.dumps(result.to_json(), indent=2))
    (out_dir / "results.md").write_text(report(result))
    LOG.info("demo: finished in %.1f s; results in %s", result.seconds, out_dir)
    return result


def report(result: DemoResult) -> str:
    s = result.settings
    return (
        "# mergekit-aim demo\n\n"
        f"Held-out loss (mean token NLL, nats; lower is better) of SmolLM2-135M, "
        f"two experts fully fine-tuned from it for {s.steps} steps of "
        f"{s.batch_size} × {s.seq_len} tokens (code: `builtin` code; math: "
        f"generated arithmetic), their TIES merge (density {s.density}) and the "
        f"same merge with AIM (ω={OMEGA}, calibrated on `builtin`'s train "
        f"split). *general* is held-out prose neither expert trained on: what "
        f"the base knew.\n\n"
        f"{result.to_markdown()}\n\n"
        f"Run time: {result.seconds:.0f} s. Inspect the statistic AIM used: "
        f"`mergekit-aim inspect {result.importance}`.\n"
    )
