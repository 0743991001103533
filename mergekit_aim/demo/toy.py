"""``mergekit-aim demo --toy``: TIES with and without AIM on tiny models, offline.

Everything is built on the spot from the ``builtin`` corpus: a tokenizer, a
small Llama base trained from scratch on mixed text (prose, code, math), and
two experts fine-tuned from it, one on prose and one on code (the builders
are in :mod:`mergekit_aim.demo.models`). The base is calibrated on
``builtin``, the experts are merged with TIES through mergekit's own pipeline
twice (plain, and with an ``aim:`` block;
:func:`mergekit_aim.plugin.run_yaml_merge`), and every model is scored by
held-out loss on each domain (mean token NLL, as ``mergekit-aim tune`` scores
it: :func:`mergekit_aim.tuning.evaluation.evaluate_loss`). Math is in no
expert's fine-tuning data: its column shows how much of what only the base was
taught survives.

The numbers are whatever this run produces; nothing is tuned for AIM. The
models are tiny and briefly trained, so differences are small and the table is
an illustration of the pipeline, not evidence about large models.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

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

LOG = logging.getLogger(__name__)

DOMAINS = ("prose", "code", "math")
EXPERT_DOMAINS = ("prose", "code")
CALIBRATION_SEED = 42


@dataclass(frozen=True)
class DemoSettings:
    """Model size and training budget of one demo run."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    seq_len: int
    batch_size: int
    base_steps: int
    base_lr: float
    expert_steps: int
    expert_lr: float
    train_chars: int
    heldout_chars: int
    calibration_samples: int
    calibration_seq_len: int
    density: float


FULL = DemoSettings(
    vocab_size=1024,
    hidden_size=128,
    num_layers=4,
    seq_len=128,
    batch_size=8,
    base_steps=300,
    base_lr=3e-3,
    expert_steps=100,
    expert_lr=1e-3,
    train_chars=400_000,
    heldout_chars=40_000,
    calibration_samples=256,
    calibration_seq_len=512,
    density=0.5,
)
QUICK = DemoSettings(
    vocab_size=512,
    hidden_size=64,
    num_layers=2,
    seq_len=64,
    batch_size=8,
    base_steps=80,
    base_lr=3e-3,
    expert_steps=40,
    expert_lr=2e-3,
    train_chars=100_000,
    heldout_chars=20_000,
    calibration_samples=64,
    calibration_seq_len=512,
    density=0.5,
)

# Row labels of the table, in order; keys of DemoResult.losses.
BASE, EXPERT_PROSE, EXPERT_CODE = "base", "expert: prose", "expert: code"
ROWS = (BASE, EXPERT_PROSE, EXPERT_CODE, TIES, TIES_AIM)


def run_demo(
    out_dir: Path, *, quick: bool = False, seed: int = 0, threads: int | None = 1
) -> DemoResult:
    """Build, train, calibrate, merge and evaluate; write results under ``out_dir``.

    Writes ``models/{base,expert_prose,expert_code,ties,ties_aim}/`` (HF
    checkpoints), ``configs/{ties,ties_aim}.yml`` (runnable with
    ``mergekit-yaml``), ``importance.safetensors``, ``results.json`` and
    ``results.md``. ``seed`` fixes model initialisation and data order; the
    same seed and settings give the same table on the same machine.
    ``quick`` uses :data:`QUICK` (for tests) instead of :data:`FULL`.
    ``threads`` is torch's intra-op thread count for the run (restored
    afterwards; ``None`` keeps the current one): the demo's matrices are too
    small to gain much from a second thread, and on a machine whose cores are
    busy OpenMP threads spin-waiting on each other made every step ~20x slower.
    """
    import torch
    from transformers import AutoModelForCausalLM

    import mergekit_aim
    from mergekit_aim.demo import models
    from mergekit_aim.plugin import run_yaml_merge
    from mergekit_aim.tuning.evaluation import evaluate_loss

    settings = QUICK if quick else FULL
    out_dir = Path(out_dir)
    models_dir, configs_dir = out_dir / "models", out_dir / "configs"
    configs_dir.mkdir(parents=True, exist_ok=True)
    watch = Stopwatch()
    start = time.perf_counter()
    paths: dict[str, Path] = {}

    with quiet_transformers(), torch_threads(threads):
        with watch("tokenizer"):
            train_text = {
                d: models.builtin_sample(d, "train", settings.train_chars, seed)
                for d in DOMAINS
            }
            heldout_text = {
                d: models.builtin_sample(d, "heldout", settings.heldout_chars, seed)
                for d in DOMAINS
            }
            # Interleave domains so the mixed base sees all three from the start.
            mixed = [
                text
                for group in itertools.zip_longest(*train_text.values())
                for text in group
                if text is not None
            ]
            tokenizer = models.train_tokenizer(mixed, vocab_size=settings.vocab_size)

        train = dict(seq_len=settings.seq_len, batch_size=settings.batch_size)
        with watch("base training"):
            base = models.tiny_llama(
                len(tokenizer),
                hidden_size=settings.hidden_size,
                num_layers=settings.num_layers,
                seed=seed,
            )
            losses = models.train_causal_lm(
                base,
                tokenizer,
                mixed,
                steps=settings.base_steps,
                lr=settings.base_lr,
                seed=seed,
                **train,
            )
            LOG.info("demo: base loss %.3f -> %.3f", losses[0], losses[-1])
            paths[BASE] = models.save_checkpoint(base, tokenizer, models_dir / "base")

        for domain, row in zip(
            EXPERT_DOMAINS, (EXPERT_PROSE, EXPERT_CODE), strict=True
        ):
            with watch(f"{domain} expert training"):
                expert = copy.deepcopy(base)
                losses = models.train_causal_lm(
                    expert,
                    tokenizer,
                    train_text[domain],
                    steps=settings.expert_steps,
                    lr=settings.expert_lr,
                    seed=seed + 1 + EXPERT_DOMAINS.index(domain),
                    **train,
                )
                LOG.info(
                    "demo: %s expert loss %.3f -> %.3f", domain, losses[0], losses[-1]
                )
                paths[row] = models.save_checkpoint(
                    expert, tokenizer, models_dir / f"expert_{domain}"
                )
        del base, expert

        with watch("calibration"):
            imap = mergekit_aim.calibrate(
                str(paths[BASE]),
                dataset="builtin",
                num_samples=settings.calibration_samples,
                seq_len=settings.calibration_seq_len,
                seed=CALIBRATION_SEED,
                batch_size=8,
                quiet=True,
            )
            importance = imap.save(out_dir / "importance.safetensors")

        experts = [paths[EXPERT_PROSE], paths[EXPERT_CODE]]
        for row, name, artifact in (
            (TIES, "ties", None),
            (TIES_AIM, "ties_aim", importance),
        ):
            with watch(f"{name} merge"):
                text = merge_config(paths[BASE], experts, settings.density, artifact)
                (configs_dir / f"{name}.yml").write_text(text)
                paths[row] = run_yaml_merge(text, models_dir / name)

        scored: dict[str, dict[str, float]] = {}
        with watch("evaluation"):
            for row in ROWS:
                model = AutoModelForCausalLM.from_pretrained(
                    paths[row], dtype=torch.float32
                )
                scores = {
                    d: evaluate_loss(
                        model, heldout_text[d], tokenizer=tokenizer, **train
                    )
                    for d in DOMAINS
                }
                scored[row] = scores
                LOG.info(
                    "demo: %s %s", row, {k: round(v, 4) for k, v in scores.items()}
                )

    table, change = score_table(scored, DOMAINS)
    if not all(math.isfinite(v) for row in table.values() for v in row.values()):
        LOG.warning("demo: some held-out losses are not finite")
    result = DemoResult(
        rows=ROWS,
        domains=DOMAINS,
        out_dir=out_dir,
        settings=settings,
        losses=table,
        relative_change=change,
        models=paths,
        importance=Path(importance),
        seconds=round(time.perf_counter() - start, 2),
        timings=watch.timings,
    )
    (out_dir / "results.json").write_text(json.dumps(result.to_json(), indent=2))
    (out_dir / "results.md").write_text(report(result))
    LOG.info("demo: finished in %.1f s; results in %s", result.seconds, out_dir)
    return result


def report(result: DemoResult) -> str:
    """The table and its explanation, as results.md holds it and the command
    prints it."""
    s = result.settings
    return (
        "# mergekit-aim demo\n\n"
        f"Held-out loss (mean token NLL, nats; lower is better) of a "
        f"{s.num_layers}-layer, {s.hidden_size}-wide Llama base, two experts "
        f"fine-tuned from it on prose and on code, their TIES merge "
        f"(density {s.density}) and the same merge with AIM (ω={OMEGA}, "
        f"calibrated on `builtin`). Math is in no expert's data.\n\n"
        f"{result.to_markdown()}\n\n"
        f"Run time: {result.seconds:.0f} s.\n"
    )
