"""Choosing ω: relax one plain merge at several ω and keep the best on held-out text.

AIM's ω trades what the merge gained for what the base knew, and the best
value depends on the models and on what the merged model is for. Relaxation
is cheap next to merging, so ``mergekit-aim tune`` merges once without AIM,
relaxes that plain output in memory for every candidate ω (the same kernel and
the same cast as ``mergekit-aim relax``, so a candidate is exactly
``relax(plain merge, ω)``), scores each on the user's held-out text and writes
the winner.

**Loss.** Mean next-token negative log-likelihood (nats) over every predicted
token of every text: see :func:`evaluate_loss`.

**Objective** (lower is better): the mean over eval sets of the relative loss
change against the base model, ``(L(ω) − L_base) / L_base``. Relative changes
keep an eval set with a large loss from outweighing the others. The lowest
objective wins; an exact tie goes to the candidate closer to the plain merge
(larger ω). ω = 1, the plain merge, is always a candidate, so the choice is
never worse than the plain merge on the eval data (which is also why the eval
data must be held out from anything the choice is later judged on).

**Split ω** (``split_attention_mlp``): one ω for the MLP (feed-forward)
weights, tensors whose name has an ``mlp``, ``feed_forward``, ``ffn`` or
``block_sparse_moe`` component, and a second ω for every other relaxed tensor
(attention projections, norms, the LM head). The grid is every pair of
candidate values.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_aim.config import PAPER_URL, omega_value
from mergekit_aim.errors import AimConfigError
from mergekit_aim.importance import ImportanceMap
from mergekit_aim.tuning.evaluation import (
    DTYPES,
    check_eval_settings,
    evaluate_loss,
    load_model,
    load_tokenizer,
    pad_token_id,
    read_eval_texts,
    sum_nll,
    token_windows,
)

__all__ = [
    "TuneResult",
    "TuneRow",
    "candidate_tensors",
    "evaluate_loss",  # the measure tune scores by, re-exported for its callers
    "is_mlp",
    "omega_grid",
    "parse_omegas",
    "tune",
    "tune_merged",
]

LOG = logging.getLogger(__name__)

DEFAULT_OMEGAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
OBJECTIVE = (
    "mean over eval sets of (L(ω) − L_base) / L_base, L = mean token NLL; "
    "lowest wins, an exact tie goes to the larger ω"
)

_MLP_MARKER = r"(?:^|\.)(?:mlp|feed_forward|ffn|block_sparse_moe)\."
MLP_PATTERN = re.compile(_MLP_MARKER)
# Regexes for relax_checkpoint's ``exclude``: leave the MLP alone / leave
# everything but the MLP alone / leave everything alone.
_EXCLUDE_MLP = _MLP_MARKER
_EXCLUDE_NON_MLP = rf"^(?!.*{_MLP_MARKER})"
_EXCLUDE_ALL = ""
_WORK_DIR = ".aim-tune-work"


# --------------------------------------------------------------------------
# Candidates


def omega_grid(
    omegas: Iterable[float], split_attention_mlp: bool = False
) -> list[tuple[float, float]]:
    """Candidate ``(ω_attention, ω_mlp)`` pairs in grid order.

    The values are validated, deduplicated and sorted ascending; 1 (the plain
    merge) is added when missing. Without a split each pair repeats one value;
    with it the grid is every pair, ω_attention varying slowest.
    """
    if isinstance(omegas, (str, bytes)) or not isinstance(omegas, Iterable):
        raise AimConfigError(f"omegas must be a list of numbers; got {omegas!r}")
    values = set()
    for value in omegas:
        try:
            values.add(omega_value(value))
        except ValueError as error:
            raise AimConfigError(f"omegas: {error}") from None
    values.add(1.0)
    ordered = sorted(values)
    if split_attention_mlp:
        return list(itertools.product(ordered, ordered))
    return [(value, value) for value in ordered]


def parse_omegas(text: str) -> list[float]:
    """``"0,0.2,0.4"`` → ``[0.0, 0.2, 0.4]``, each checked to lie in [0, 1]."""
    values = []
    for item in text.split(","):
        if not item.strip():
            raise AimConfigError(
                f"--omega {text!r}: expected comma-separated numbers, e.g. 0,0.4,1"
            )
        try:
            values.append(omega_value(item.strip()))
        except ValueError as error:
            raise AimConfigError(f"--omega: {error}") from None
    return values


def is_mlp(name: str) -> bool:
    """Whether ``name`` is an MLP (feed-forward) tensor for the split ω."""
    return MLP_PATTERN.search(name) is not None


def candidate_tensors(
    base_tensors: Mapping[str, torch.Tensor],
    merged_tensors: Mapping[str, torch.Tensor],
    importance: ImportanceMap,
    omega_attention: float,
    omega_mlp: float | None = None,
) -> dict[str, torch.Tensor]:
    """One candidate's value of every tensor in ``merged_tensors``.

    Each is ``relax(base, merged, statistic, ω)`` cast to the merged dtype,
    exactly what ``mergekit-aim relax`` writes, with ω = ``omega_mlp`` for MLP
    tensors (when given) and ``omega_attention`` for the others; at ω = 1 the
    merged tensor itself (the plain merge, bit for bit). Every name needs a
    statistic in ``importance`` and a tensor in ``base_tensors``.
    """
    from mergekit_aim.offline import relax

    omega_mlp = omega_attention if omega_mlp is None else omega_mlp
    result = {}
    for name, merged in merged_tensors.items():
        omega = omega_mlp if is_mlp(name) else omega_attention
        if omega >= 1.0:
            result[name] = merged
            continue
        result[name] = relax(
            base_tensors[name],
            merged,
            importance[name],
            omega,
            importance.input_axis(name),
        ).to(merged.dtype)
    return result


# --------------------------------------------------------------------------
# Results


@dataclass
class TuneRow:
    """One candidate: its ω, its loss per eval set and its objective."""

    omega_attention: float
    omega_mlp: float
    losses: dict[str, float]
    objective: float
    split: bool = False

    @property
    def omega(self) -> float | tuple[float, float]:
        """ω, or ``(ω_attention, ω_mlp)`` when the grid splits them."""
        if self.split:
            return (self.omega_attention, self.omega_mlp)
        return self.omega_attention

    @property
    def is_plain(self) -> bool:
        return self.omega_attention >= 1.0 and self.omega_mlp >= 1.0

    def label(self) -> str:
        if self.split:
            return f"{self.omega_attention:g} / {self.omega_mlp:g}"
        return f"{self.omega_attention:g}"

    def to_json(self) -> dict[str, Any]:
        return {
            "omega_attention": self.omega_attention,
            "omega_mlp": self.omega_mlp,
            "losses": self.losses,
            "objective": self.objective,
        }


@dataclass
class TuneResult:
    """The table of one tuning run; ``chosen`` is one of ``rows``."""

    rows: list[TuneRow]
    base_losses: dict[str, float]
    chosen: TuneRow
    split_attention_mlp: bool = False
    tokens: dict[str, int] = field(default_factory=dict)
    model_dir: Path | None = None

    def to_markdown(self) -> str:
        """The table as GitHub markdown: losses in nats, objective in percent."""
        names = list(self.base_losses)
        omega = "ω (other / MLP)" if self.split_attention_mlp else "ω"
        header = [omega, *names, "objective", ""]
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(names) + 1) + ["---"]) + "|",
            "| "
            + " | ".join(
                ["base", *(f"{self.base_losses[n]:.4f}" for n in names), "", ""]
            )
            + " |",
        ]
        for row in self.rows:
            label = row.label() + (" (plain)" if row.is_plain else "")
            mark = "**chosen**" if row is self.chosen else ""
            cells = [f"{row.losses[n]:.4f}" for n in names]
            lines.append(
                "| "
                + " | ".join([label, *cells, f"{100 * row.objective:+.3f}%", mark])
                + " |"
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "objective": OBJECTIVE,
            "split_attention_mlp": self.split_attention_mlp,
            "base_losses": self.base_losses,
            "tokens": self.tokens,
            "rows": [row.to_json() for row in self.rows],
            "chosen": self.chosen.to_json(),
            "model": None if self.model_dir is None else str(self.model_dir),
        }


def _objective(losses: Mapping[str, float], base_losses: Mapping[str, float]) -> float:
    changes = [(losses[n] - base_losses[n]) / base_losses[n] for n in base_losses]
    return sum(changes) / len(changes)


def _choose(rows: Sequence[TuneRow]) -> TuneRow:
    # A non-finite objective (a candidate that diverged) never wins; among
    # equal objectives the candidate closest to the plain merge does.
    def key(row: TuneRow) -> tuple[float, float, float]:
        objective = row.objective if math.isfinite(row.objective) else math.inf
        return (objective, -(row.omega_attention + row.omega_mlp), -row.omega_attention)

    return min(rows, key=key)


# --------------------------------------------------------------------------
# Tuning an existing merge


def tune_merged(
    base: str | os.PathLike,
    merged: str | os.PathLike,
    importance: ImportanceMap | str | os.PathLike,
    evals: Mapping[str, Sequence[str]],
    omegas: Sequence[float] = DEFAULT_OMEGAS,
    *,
    split_attention_mlp: bool = False,
    seq_len: int = 512,
    batch_size: int = 4,
    device: str = "cpu",
    base_losses: Mapping[str, float] | None = None,
    dtype: str = "auto",
    exclude: Iterable[str] = (),
) -> TuneResult:
    """Score ``relax(merged, ω)`` for every candidate ω on every eval set.

    ``base`` and ``merged`` are safetensors checkpoint directories (``merged``
    a merge of ``base``); ``importance`` an artifact of ``base`` (a map, or a
    path or Hub repo). ``evals`` maps a name to its texts. The merged model is
    loaded once; each candidate's relaxed tensors are written into it in
    memory (nothing is written to disk). ``base_losses`` (per eval name)
    skips evaluating the base model. ``exclude``: regexes of tensor names to
    leave at the merged value, like ``aim.exclude``. Memory: the model plus
    CPU copies (storage dtype) of the base and merged relaxable tensors;
    candidates are relaxed on the CPU, as ``relax_checkpoint`` does, so that
    the written pick is bit for bit the candidate that was scored.
    """
    from mergekit_aim.checkpoint import read_checkpoint

    grid = omega_grid(omegas, split_attention_mlp)
    check_eval_settings(seq_len, batch_size)
    evals = _check_evals(evals)
    imap = _importance_map(importance)
    base, merged = str(base), str(merged)
    base_ckpt, merged_ckpt = read_checkpoint(base), read_checkpoint(merged)
    imap.check_against(base_ckpt, source=str(importance))
    patterns = [re.compile(p) for p in exclude]
    names = [
        n
        for n in sorted(merged_ckpt.tensors)
        if n in imap and not any(p.search(n) for p in patterns)
    ]
    for name in names:
        if base_ckpt.shape(name) != merged_ckpt.shape(name):
            raise AimConfigError(
                f"tensor {name}: merged shape {merged_ckpt.shape(name)} differs "
                f"from the base's {base_ckpt.shape(name)}; is {merged} a merge "
                f"of {base}?"
            )
    if split_attention_mlp and not any(is_mlp(n) for n in names):
        raise AimConfigError(
            "split_attention_mlp (--split-attention-mlp): no relaxed tensor of "
            f"{merged} is an MLP tensor (name matching {MLP_PATTERN.pattern!r})"
        )
    if base_losses is not None and set(base_losses) != set(evals):
        raise AimConfigError(
            f"base_losses names {sorted(base_losses)}, but the eval sets are "
            f"{sorted(evals)}"
        )

    tokenizer = load_tokenizer(merged if _has_tokenizer(merged) else base)
    windows = {
        n: token_windows(tokenizer, texts, seq_len) for n, texts in evals.items()
    }
    tokens = {n: sum(len(w) - 1 for w in ws) for n, ws in windows.items()}
    pad_id = pad_token_id(tokenizer)

    def score(model: Any) -> dict[str, float]:
        losses = {}
        for name, ws in windows.items():
            total, count = sum_nll(model, ws, batch_size, pad_id)
            losses[name] = total / count
        return losses

    if base_losses is None:
        base_model = load_model(base, device=device, dtype=dtype)
        base_losses = score(base_model)
        del base_model
        LOG.info("tune: base losses %s", _rounded(base_losses))
    base_losses = {n: float(base_losses[n]) for n in evals}
    for name, value in base_losses.items():
        if not math.isfinite(value) or value <= 0:
            raise AimConfigError(
                f"the base model's loss on eval set {name!r} is {value}; the "
                f"objective divides by it"
            )

    model = load_model(merged, device=device, dtype=dtype)
    params = _parameters(model, names)
    base_tensors = _read_tensors(base_ckpt, names)
    merged_tensors = _read_tensors(merged_ckpt, names)
    rows = []
    for omega_attention, omega_mlp in grid:
        tensors = candidate_tensors(
            base_tensors, merged_tensors, imap, omega_attention, omega_mlp
        )
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor)
        losses = score(model)
        row = TuneRow(
            omega_attention,
            omega_mlp,
            losses,
            _objective(losses, base_losses),
            split=split_attention_mlp,
        )
        rows.append(row)
        LOG.info(
            "tune: ω %s: losses %s, objective %+.3f%%",
            row.label(),
            _rounded(losses),
            100 * row.objective,
        )
    chosen = _choose(rows)
    LOG.info("tune: chose ω %s", chosen.label())
    return TuneResult(
        rows,
        base_losses,
        chosen,
        split_attention_mlp=split_attention_mlp,
        tokens=tokens,
    )


def _check_evals(evals: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    if not isinstance(evals, Mapping) or not evals:
        raise AimConfigError("evals must map at least one eval-set name to its texts")
    checked = {}
    for name, texts in evals.items():
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise AimConfigError(f"eval set {name!r} must be a sequence of strings")
        if not texts:
            raise AimConfigError(f"eval set {name!r} has no text")
        checked[str(name)] = list(texts)
    return checked


def _importance_map(importance: ImportanceMap | str | os.PathLike) -> ImportanceMap:
    if isinstance(importance, ImportanceMap):
        return importance
    from mergekit_aim.importance import load_cached, resolve_artifact

    return load_cached(resolve_artifact(str(importance)))


def _has_tokenizer(path: str) -> bool:
    return any(
        os.path.exists(os.path.join(path, f))
        for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )


def _parameters(model: Any, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The model tensor behind each checkpoint name (written in place)."""
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "")
    found = {}
    for name in names:
        for candidate in (name, f"{prefix}.{name}"):
            if candidate in state:
                found[name] = state[candidate]
                break
        else:
            raise AimConfigError(
                f"tensor {name} of the checkpoint is not a parameter of the loaded "
                f"{type(model).__name__} (transformers renamed or fused it); tune "
                f"relaxes in memory and needs matching names: use `mergekit-aim "
                f"relax` per ω instead"
            )
    return found


def _read_tensors(checkpoint: Any, names: Sequence[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(checkpoint.tensors[name].file, []).append(name)
    tensors = {}
    for file, members in by_file.items():
        if not file.endswith(".safetensors"):
            raise AimConfigError(
                f"{checkpoint.path}/{file}: tune reads safetensors checkpoints "
                f"(re-save with safe_serialization=True)"
            )
        with safe_open(os.path.join(checkpoint.path, file), framework="pt") as handle:
            for name in members:
                tensors[name] = handle.get_tensor(name)
    return tensors


def _rounded(losses: Mapping[str, float]) -> dict[str, float]:
    return {name: round(value, 4) for name, value in losses.items()}


# --------------------------------------------------------------------------
# The `mergekit-aim tune` command


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
) -> TuneResult:
    """Merge ``config_path`` without AIM, choose ω on ``evals``, write the winner.

    ``evals`` maps eval-set names to ``.txt``/``.jsonl`` files (see
    :func:`read_eval_texts`). The config needs an ``aim:`` block (its
    ``importance`` or ``calibration`` and ``exclude`` are used; its ``omega``
    is ignored) unless ``importance`` names an artifact, which then wins over
    the block's source. Everything is checked before ``out`` is created; it
    must not exist or be empty. Writes to ``out``: the chosen model (a full
    checkpoint with config, tokenizer and a card naming ω), ``aim_tune.json``
    and ``aim_tune.md``. The plain merge is made in a work directory under
    ``out`` and removed at the end.
    """
    grid = omega_grid(omegas, split_attention_mlp)
    check_eval_settings(seq_len, batch_size)
    if dtype not in DTYPES:
        raise AimConfigError(f"dtype (--dtype) must be one of {DTYPES}; got {dtype!r}")
    if not evals:
        raise AimConfigError("give at least one eval set (--eval NAME=FILE)")
    texts = {str(name): read_eval_texts(path) for name, path in evals.items()}
    config_path = Path(config_path)
    raw, plain_config = _read_config(config_path)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AimConfigError(f"output directory {out} exists and is not empty")
    session, options = _prepare_importance(
        config_path, raw, importance, device=device, quiet=quiet, seed=random_seed
    )
    exclude = list(session.aim.exclude)

    created = not out.exists()
    work = out / _WORK_DIR
    bars = _quiet_progress_bars() if quiet else contextlib.nullcontext()
    try:
        with bars:
            # Named like ``out``: mergekit titles the model card after the directory.
            plain = _plain_merge(plain_config, raw, work / out.resolve().name, options)
            result = tune_merged(
                session.checkpoint.path,
                plain,
                session.importance,
                texts,
                sorted({omega for pair in grid for omega in pair}),
                split_attention_mlp=split_attention_mlp,
                seq_len=seq_len,
                batch_size=batch_size,
                device=device,
                dtype=dtype,
                exclude=exclude,
            )
            relaxed = _write_chosen(
                session, plain, result.chosen, out, work, exclude, split_attention_mlp
            )
            result.model_dir = out
            _write_reports(out, plain, result, relaxed, session, config_path, evals)
    except BaseException:
        shutil.rmtree(out if created else work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    LOG.info("tune: wrote %s (ω %s)", out, result.chosen.label())
    return result


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
) -> tuple[Any, Any]:
    """The planning session's artifact (loaded, or calibrated through the
    cache) and the merge options, before anything is written."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_aim.planning import AimMergeSession

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
    return AimMergeSession.prepare(config, options), options


def _plain_merge(config: Any, raw: Mapping[str, Any], out: Path, options: Any) -> str:
    import yaml
    from mergekit.merge import run_merge

    text = yaml.safe_dump({k: v for k, v in raw.items() if k != "aim"}, sort_keys=False)
    LOG.info("tune: plain merge (%s) into %s", config.merge_method, out)
    run_merge(config, str(out), options=options, config_source=text)
    return str(out)


def _write_chosen(
    session: Any,
    plain: str,
    chosen: TuneRow,
    out: Path,
    work: Path,
    exclude: Sequence[str],
    split: bool,
) -> int:
    """Write ``relax(plain, chosen ω)`` to ``out`` with ``relax_checkpoint``;
    returns how many tensors were relaxed.

    A split ω takes two passes, each leaving the other group's tensors byte
    for byte as they are; at ω = 1 a group is left alone entirely, so the
    output equals the in-memory candidate exactly.
    """
    from mergekit_aim.offline import relax_checkpoint

    if split and chosen.omega_attention != chosen.omega_mlp:
        groups = [
            (chosen.omega_attention, [_EXCLUDE_MLP]),
            (chosen.omega_mlp, [_EXCLUDE_NON_MLP]),
        ]
    else:
        groups = [(chosen.omega_attention, [])]
    groups = [(omega, patterns) for omega, patterns in groups if omega < 1.0]
    if not groups:
        groups = [(1.0, [_EXCLUDE_ALL])]
    source, relaxed = plain, 0
    for index, (omega, patterns) in enumerate(groups):
        target = out if index == len(groups) - 1 else work / f"pass-{index}"
        report = relax_checkpoint(
            session.checkpoint.path,
            source,
            session.importance,
            omega,
            target,
            exclude=[*exclude, *patterns],
            source=session.source,
        )
        relaxed += int(report["relaxed"])
        source = str(target)
    (out / "aim_relax.json").unlink(missing_ok=True)
    return relaxed


def _write_reports(
    out: Path,
    plain: str,
    result: TuneResult,
    relaxed: int,
    session: Any,
    config_path: Path,
    evals: Mapping[str, str | os.PathLike],
) -> None:
    from mergekit_aim.card import _add_tag

    chosen = result.chosen
    if result.split_attention_mlp:
        omega_text = (
            f"ω = {chosen.omega_attention:g} (attention, norms, LM head) and "
            f"{chosen.omega_mlp:g} (MLP)"
        )
    else:
        omega_text = f"ω = {chosen.omega_attention:g}"
    if chosen.is_plain:
        what = (
            f"No candidate relaxed with [AIM]({PAPER_URL}) beat the plain merge on "
            f"the eval data, so this is the plain merge ({omega_text})"
        )
    else:
        what = (
            f"The merge above, relaxed toward base model `{session.base_model}` "
            f"with [AIM]({PAPER_URL}) at {omega_text} ({relaxed} tensors)"
        )
    table = result.to_markdown()
    section = (
        "\n## Activation-Informed Merging: ω chosen by `mergekit-aim tune`\n\n"
        f"{what}. ω was chosen among {len(result.rows)} candidates by held-out loss "
        f"(mean token NLL, nats) on {', '.join(result.base_losses)}; objective: "
        f"{OBJECTIVE}. Importance: {session.source}.\n\n{table}\n"
    )
    previous = Path(plain) / "README.md"
    card = previous.read_text(encoding="utf-8") if previous.exists() else ""
    card = _add_tag(card, "aim")
    (out / "README.md").write_text(card.rstrip("\n") + "\n" + section, "utf-8")

    report = result.to_json()
    report.update(
        config=str(config_path),
        eval_files={name: str(path) for name, path in evals.items()},
        importance={"artifact": session.artifact_path, "source": session.source},
        base_model=str(session.base_model),
        relaxed_tensors=relaxed,
        paper=PAPER_URL,
    )
    (out / "aim_tune.json").write_text(
        json.dumps(report, indent=2, default=str) + "\n", "utf-8"
    )
    (out / "aim_tune.md").write_text(
        f"# mergekit-aim tune\n\nConfig `{config_path}`; chosen {omega_text}.\n\n"
        f"Held-out loss (mean token NLL, nats; lower is better). Objective: "
        f"{OBJECTIVE}.\n\n{table}\n",
        "utf-8",
    )
