"""``mergekit-aim tune``: merge once without AIM, choose ω, write the winner.

The plain merge is made in a work directory inside the output directory; the
ω search (:mod:`mergekit_aim.tuning.search`) scores every candidate in memory;
the chosen candidate is written in one streaming pass over the plain merge
(:func:`mergekit_aim.offline.write_relaxed`, the writer ``mergekit-aim relax``
uses, with the pick's ω setting), so the written model is bit for bit the
candidate that was scored. The work directory is removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergekit_aim.config import PAPER_URL
from mergekit_aim.errors import AimConfigError
from mergekit_aim.output import check_space, check_target, staged_directory
from mergekit_aim.selection import Selection
from mergekit_aim.tuning.evaluation import (
    check_dtype,
    check_eval_settings,
    read_eval_texts,
)
from mergekit_aim.tuning.search import (
    DEFAULT_OMEGAS,
    TuneResult,
    omega_grid,
    resolve_choice,
    tune_merged,
)

LOG = logging.getLogger(__name__)

_WORK_DIR = ".aim-tune-work"


def tune(
    config_path: str | os.PathLike,
    evals: Mapping[str, str | os.PathLike],
    out: str | os.PathLike,
    *,
    omegas: Sequence[float] = DEFAULT_OMEGAS,
    split_attention_mlp: bool = False,
    importance: str | None = None,
    seq_len: int = 512,
    batch_size: int = 4,
    device: str = "cpu",
    dtype: str = "auto",
    random_seed: int | None = None,
    quiet: bool = False,
    lm_eval_tasks: Sequence[str] = (),
    lm_eval_include_path: str | os.PathLike | None = None,
    lm_eval_limit: int | None = None,
    objective: str | None = None,
    keep: Mapping[str, float] | None = None,
) -> TuneResult:
    """Merge ``config_path`` without AIM, choose ω on ``evals``, write the winner.

    ``evals`` maps eval-set names to ``.txt``/``.jsonl`` files (see
    :func:`read_eval_texts`). The config needs an ``aim:`` block (its
    ``importance`` or ``calibration`` and ``exclude`` are used; its ``omega``
    is ignored) unless ``importance`` names an artifact, which then wins over
    the block's source. Everything is checked before ``out`` is created; it
    must not exist or be empty. Writes to ``out``: the chosen model (a full
    checkpoint with config, tokenizer and a card naming ω), ``aim_tune.json``
    and ``aim_tune.md``. The plain merge is made in a work directory beside
    ``out`` and removed at the end; a filesystem without room for it and the
    chosen model (about twice the base model) is refused first.

    ``lm_eval_tasks``: lm-evaluation-harness tasks (lm-eval's, or YAMLs under
    ``lm_eval_include_path``; at most ``lm_eval_limit`` documents each) that
    every candidate is also scored by, on the model in memory. ``objective``
    names the metric the pick is made by and ``keep`` the skill floors
    (metric → tolerance): see :func:`~mergekit_aim.tuning.search.choose`.
    The tasks are loaded and both settings checked before anything is merged.
    """
    grid = omega_grid(omegas, split_attention_mlp)
    check_eval_settings(seq_len, batch_size)
    check_dtype(dtype)
    if not evals and not lm_eval_tasks:
        raise AimConfigError(
            "give at least one eval set (--eval NAME=FILE) or lm-eval task (--lm-eval)"
        )
    texts = {str(name): read_eval_texts(path) for name, path in evals.items()}
    harness = None
    if lm_eval_tasks:
        from mergekit_aim.tuning.harness import LmEvalTasks

        harness = LmEvalTasks(
            lm_eval_tasks,
            include_path=lm_eval_include_path,
            limit=lm_eval_limit,
            batch_size=batch_size,
        )
    elif lm_eval_include_path is not None or lm_eval_limit is not None:
        raise AimConfigError(
            "--lm-eval-include-path and --lm-eval-limit go with --lm-eval TASKS"
        )
    metrics = {name: False for name in texts}
    metrics.update(harness.metrics if harness is not None else {})
    resolve_choice(metrics, list(texts), objective, keep)
    config_path = Path(config_path)
    raw, plain_config = _read_config(config_path)
    out = Path(out)
    check_target(out, directory=True)
    if out.exists() and any(out.iterdir()):
        raise AimConfigError(f"output directory {out} exists and is not empty")
    found, aim, options = _prepare_importance(
        config_path, raw, importance, device=device, quiet=quiet, seed=random_seed
    )
    exclude = list(aim.exclude)

    bars = _quiet_progress_bars() if quiet else contextlib.nullcontext()
    # Everything, the plain merge included, is written in a directory beside
    # ``out`` that becomes ``out`` only when complete (mergekit_aim.output).
    needed = 2 * _model_bytes(found.checkpoint, plain_config.dtype)
    with bars, staged_directory(out, needed) as stage:
        work = stage / _WORK_DIR
        # Named like ``out``: mergekit titles the model card after the directory.
        plain = _plain_merge(plain_config, raw, work / out.resolve().name, options)
        result = tune_merged(
            found.checkpoint.path,
            plain,
            found.importance,
            texts,
            sorted({omega for pair in grid for omega in pair}),
            split_attention_mlp=split_attention_mlp,
            seq_len=seq_len,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            exclude=exclude,
            lm_eval=harness,
            objective=objective,
            keep=keep,
        )
        from mergekit_aim.offline import output_bytes

        check_space(out, output_bytes(plain))
        relaxed = _write_chosen(found, plain, result.chosen.setting, stage, exclude)
        result.model_dir = out
        lm_eval = {
            "tasks": list(lm_eval_tasks),
            "include_path": lm_eval_include_path and str(lm_eval_include_path),
            "limit": lm_eval_limit,
        }
        _write_reports(
            stage, plain, result, relaxed, found, config_path, evals, lm_eval
        )
        shutil.rmtree(work)
    LOG.info("tune: wrote %s (ω %s)", out, result.chosen.label())
    return result


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2}


def _model_bytes(checkpoint: Any, dtype: str | None) -> int:
    """About what a merge of ``checkpoint``'s shape takes on disk in
    ``dtype`` (the config's; else each tensor's own), with room for its
    config, tokenizer and card."""
    import torch

    size = torch.empty(0, dtype=getattr(torch, dtype)).element_size() if dtype else 0
    total = sum(
        math.prod(info.shape) * (size or _DTYPE_BYTES.get(info.dtype.upper(), 4))
        for info in checkpoint.tensors.values()
    )
    others = sum(
        entry.stat().st_size
        for entry in os.scandir(checkpoint.path)
        if entry.is_file() and not entry.name.endswith((".safetensors", ".bin"))
    )
    return total + others + (1 << 20)


def _quiet_progress_bars() -> contextlib.AbstractContextManager:
    from mergekit_aim.console import quiet_transformers

    return quiet_transformers()


def _read_config(path: Path) -> tuple[dict[str, Any], Any]:
    """The YAML as a dict, and the validated config of the plain merge."""
    import yaml

    from mergekit_aim.plugin import activate

    activate()
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    if not path.is_file():
        raise AimConfigError(f"merge config {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise AimConfigError(f"merge config {path}: not valid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise AimConfigError(f"merge config {path}: expected a mapping at top level")
    try:
        MergeConfiguration.model_validate(raw)
        plain = MergeConfiguration.model_validate(
            {k: v for k, v in raw.items() if k != "aim"}
        )
    except ValidationError as error:
        raise AimConfigError(f"merge config {path}: {error}") from None
    if plain.base_model is None:
        raise AimConfigError(
            f"merge config {path}: tune needs base_model (AIM relaxes toward it)"
        )
    if plain.slices is not None:
        raise AimConfigError(
            f"merge config {path}: tune relaxes the plain merge's tensors toward "
            f"the base tensors of the same name, which slices: may not preserve; "
            f"use a models: config, or mergekit-aim yaml with a fixed omega"
        )
    return raw, plain


def _prepare_importance(
    config_path: Path,
    raw: Mapping[str, Any],
    importance: str | None,
    *,
    device: str,
    quiet: bool,
    seed: int | None,
) -> tuple[Any, Any, Any]:
    """The artifact (loaded, or calibrated through the cache), the validated
    aim: block and the merge options, before anything is written."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_aim.planning import resolve_importance

    aim = raw.get("aim")
    if importance is None and aim is None:
        raise AimConfigError(
            f"merge config {config_path} has no aim: block: add one with "
            f"importance: or calibration: (its omega is ignored by tune), or "
            f"pass --importance FILE"
        )
    if importance is not None:
        if aim is not None:
            LOG.info(
                "tune: --importance %s replaces the aim: block's source", importance
            )
        kept = {k: v for k, v in (aim or {}).items() if k == "exclude"}
        aim = {**kept, "importance": importance}
    config = MergeConfiguration.model_validate({**raw, "aim": aim})
    options = MergeOptions(
        copy_tokenizer=True, quiet=quiet, random_seed=seed, device=device
    )
    return resolve_importance(config, options), config.aim, options


def _plain_merge(config: Any, raw: Mapping[str, Any], out: Path, options: Any) -> str:
    import yaml
    from mergekit.merge import run_merge

    text = yaml.safe_dump({k: v for k, v in raw.items() if k != "aim"}, sort_keys=False)
    LOG.info("tune: plain merge (%s) into %s", config.merge_method, out)
    run_merge(config, str(out), options=options, config_source=text)
    return str(out)


def _write_chosen(
    found: Any, plain: str, setting: Any, out: Path, exclude: Sequence[str]
) -> int:
    """Write ``relax(plain, chosen ω)`` to ``out`` in one streaming pass;
    returns how many tensors were relaxed."""
    from mergekit_aim.offline import check_pair, write_relaxed

    pair = check_pair(
        found.checkpoint.path, plain, found.importance, out, source=found.source
    )
    coverage = write_relaxed(pair, found.importance, Selection(setting, exclude), out)
    return int(coverage.summary()["relaxed"])


def _write_reports(
    out: Path,
    plain: str,
    result: TuneResult,
    relaxed: int,
    found: Any,
    config_path: Path,
    evals: Mapping[str, str | os.PathLike],
    lm_eval: Mapping[str, Any],
) -> None:
    from mergekit_aim.card import tune_report, tuned_card

    previous = Path(plain) / "README.md"
    card = previous.read_text(encoding="utf-8") if previous.exists() else ""
    facts = {
        "base_model": str(found.base_model),
        "relaxed": relaxed,
        "source": found.source,
        "config": str(config_path),
        "objective": result.choice.describe(),
        "scored_by": _scored_by(result),
    }
    (out / "README.md").write_text(tuned_card(card, result, facts), "utf-8")
    report = result.to_json()
    report.update(
        config=str(config_path),
        eval_files={name: str(path) for name, path in evals.items()},
        lm_eval=lm_eval if lm_eval["tasks"] else None,
        importance={"artifact": found.artifact_path, "source": found.source},
        base_model=str(found.base_model),
        relaxed_tensors=relaxed,
        paper=PAPER_URL,
    )
    (out / "aim_tune.json").write_text(
        json.dumps(report, indent=2, default=str) + "\n", "utf-8"
    )
    (out / "aim_tune.md").write_text(tune_report(result, facts), "utf-8")


def _scored_by(result: TuneResult) -> str:
    parts = []
    if result.base_losses:
        parts.append(
            f"held-out loss (mean token NLL, nats) on {', '.join(result.base_losses)}"
        )
    if result.lm_eval_metrics:
        parts.append(f"lm-evaluation-harness {', '.join(result.lm_eval_metrics)}")
    return " and ".join(parts)
