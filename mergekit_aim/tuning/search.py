"""The ω search: relax one plain merge at several ω, score each on held-out text.

AIM's ω trades what the merge gained for what the base knew, and the best
value depends on the models and on what the merged model is for. Relaxation
is cheap next to merging, so ``mergekit-aim tune`` merges once without AIM,
relaxes that plain output in memory for every candidate ω (the same kernel and
the same cast as ``mergekit-aim relax``, so a candidate is exactly
``relax(plain merge, ω)``), scores each on the user's held-out text and writes
the winner.

**Loss.** Mean next-token negative log-likelihood (nats) over every predicted
token of every text: see :func:`evaluate_loss`.

**Metrics.** Every scorer gives :class:`~mergekit_aim.tuning.evaluation.Score` s
(value, standard error, direction): the ``--eval`` sets' losses, and with
``lm_eval`` the harness's metrics (:mod:`~mergekit_aim.tuning.harness`).

**The choice** (:func:`choose`, one function over metrics). Skill floors
(``keep``: metric → tolerance) make a candidate ineligible when it is more than
the tolerance worse than the plain merge on a kept metric; the plain merge is
always eligible. Among eligible candidates the best general objective wins;
an exact tie goes to the candidate closer to the plain merge (larger ω). The
default objective (``loss``, lower is better) is the mean over eval sets of
the relative loss change against the base model, ``(L(ω) − L_base) /
L_base``: relative changes keep an eval set with a large loss from outweighing
the others; any one metric can be the objective instead. ω = 1, the plain
merge, is always a candidate, so the choice is never worse than the plain
merge on the tuning data on the objective or a kept skill (which is also why
that data must be held out from anything the choice is later judged on).
:func:`within_stderr` says when the pick's lead over the plain merge is
smaller than their combined standard error.

**Split ω** (``split_attention_mlp``): one ω for the MLP (feed-forward)
weights, tensors whose name has an ``mlp``, ``feed_forward``, ``ffn`` or
``block_sparse_moe`` component, and a second ω for every other relaxed tensor
(attention projections, norms, the LM head). The grid is every pair of
candidate values. A candidate's ω is an ordinary ``aim: {omega: ...}`` setting
(a filtered list for a split pair, see :func:`mergekit_aim.selection.split_omega`),
so the pick can be pasted into a merge config and relaxes the same tensors.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_aim.errors import AimConfigError
from mergekit_aim.importance import ImportanceMap
from mergekit_aim.kernels import omega_value
from mergekit_aim.relaxation import Relaxation
from mergekit_aim.selection import (
    MLP_FILTERS,
    Selection,
    is_mlp,
    setting_json,
    split_omega,
)
from mergekit_aim.tuning.evaluation import (
    LossSets,
    Score,
    check_eval_settings,
    load_model,
    load_tokenizer,
)

LOG = logging.getLogger(__name__)

DEFAULT_OMEGAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
OBJECTIVE = (
    "mean over eval sets of (L(ω) − L_base) / L_base, L = mean token NLL; "
    "lowest wins, an exact tie goes to the larger ω"
)

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


def candidate_tensors(
    base_tensors: Mapping[str, torch.Tensor],
    merged_tensors: Mapping[str, torch.Tensor],
    importance: ImportanceMap,
    omega_attention: float,
    omega_mlp: float | None = None,
    keys: Mapping[str, str | tuple[str | None, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    """One candidate's value of every tensor in ``merged_tensors``.

    Each is ``relax(base, merged, statistic, ω)`` cast to the merged dtype,
    exactly what ``mergekit-aim relax`` writes, with ω = ``omega_mlp`` for MLP
    tensors (when given) and ``omega_attention`` for the others; at ω = 1 the
    merged tensor itself (the plain merge, bit for bit). Every name needs a
    tensor in ``base_tensors`` and a statistic in ``importance``: under the
    name itself, or under ``keys[name]`` (the checkpoint name a renamed
    tensor's statistic has, or one key per expert of a stack of experts).
    """
    omega_mlp = omega_attention if omega_mlp is None else omega_mlp
    selection = Selection(split_omega(omega_attention, omega_mlp))
    keys = {name: (keys or {}).get(name, name) for name in merged_tensors}
    return Relaxation(selection, importance).relax_state(
        base_tensors, merged_tensors, keys=keys
    )


# --------------------------------------------------------------------------
# The choice: skill floors, then the general objective


@dataclass(frozen=True)
class Choice:
    """What the pick is made by: the general ``objective`` (``LOSS`` or a
    metric's name) and the skill floors ``keep`` (metric → tolerance, in the
    metric's units)."""

    objective: str = "loss"
    keep: Mapping[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        what = OBJECTIVE if self.objective == LOSS else self.objective
        if not self.keep:
            return what
        floors = ", ".join(f"{m} within {t:g} of plain" for m, t in self.keep.items())
        return f"{what}; eligible: the plain merge and candidates with {floors}"


LOSS = "loss"


def parse_keep(specs: Iterable[str]) -> dict[str, float]:
    """``["math/acc=0.02", "code"]`` → ``{"math/acc": 0.02, "code": 0.0}``."""
    keep: dict[str, float] = {}
    for spec in specs:
        name, sep, tolerance = spec.partition("=")
        name = name.strip()
        try:
            value = float(tolerance) if sep else 0.0
        except ValueError:
            value = math.nan
        if not name or not math.isfinite(value) or value < 0:
            raise AimConfigError(
                f"--keep {spec!r}: expected METRIC[=TOLERANCE] with a tolerance "
                f">= 0, e.g. --keep math/exact_match=0.02"
            )
        if name in keep:
            raise AimConfigError(f"--keep: {name!r} is given twice")
        keep[name] = value
    return keep


def resolve_choice(
    metrics: Mapping[str, bool],
    loss_sets: Sequence[str],
    objective: str | None = None,
    keep: Mapping[str, float] | None = None,
) -> Choice:
    """Check ``objective`` and ``keep`` against the metrics the scorers give
    (``metrics``: name → higher is better; ``loss_sets``: the ``--eval``
    names) and name them fully; refuses a missing, unknown or ambiguous one.

    A metric is named exactly, or by its lm-eval task alone when the task has
    one metric. The objective defaults to ``loss`` (the ``--eval`` sets'
    relative loss change) when there are eval sets, else to the one metric.
    """
    if objective is None:
        if loss_sets:
            objective = LOSS
        elif len(metrics) == 1:
            objective = next(iter(metrics))
        else:
            raise AimConfigError(
                f"--objective: name the metric to pick ω by, one of "
                f"{', '.join(sorted(metrics))} (or give --eval sets)"
            )
    elif objective == LOSS and not loss_sets:
        raise AimConfigError("--objective loss needs at least one --eval set")
    if objective != LOSS:
        objective = _metric(objective, metrics, "--objective")
    floors = {
        _metric(name, metrics, "--keep"): float(tol)
        for name, tol in (keep or {}).items()
    }
    return Choice(objective, floors)


def _metric(name: str, metrics: Mapping[str, bool], option: str) -> str:
    if name in metrics:
        return name
    of_task = [m for m in metrics if m.split("/", 1)[0] == name and "/" in m]
    if len(of_task) == 1:
        return of_task[0]
    known = ", ".join(sorted(metrics)) or "none"
    if of_task:
        raise AimConfigError(
            f"{option} {name!r}: the task has several metrics; name one of "
            f"{', '.join(sorted(of_task))}"
        )
    raise AimConfigError(
        f"{option} {name!r}: not a metric of this run (the --eval sets and the "
        f"--lm-eval tasks' metrics: {known})"
    )


def choose(rows: Sequence[TuneRow], choice: Choice) -> TuneRow:
    """The pick, marking every row's eligibility.

    Eligible: the plain merge, and every candidate that falls no more than
    its tolerance below the plain merge on each kept metric (direction-aware;
    a candidate whose kept metric is not a number is not eligible). Among
    eligible candidates the best objective wins (a non-finite one never); an
    exact tie goes to the candidate closer to the plain merge (larger ω).
    """
    plain = next(row for row in rows if row.is_plain)
    for row in rows:
        row.excluded_by = (
            []
            if row.is_plain
            else [
                metric
                for metric, tolerance in choice.keep.items()
                if not row.scores[metric].gain(plain.scores[metric]) >= -tolerance
            ]
        )

    def key(row: TuneRow) -> tuple[float, float, float]:
        gain = row.objective_score.gain(plain.objective_score)
        return (
            gain if math.isfinite(gain) else -math.inf,
            row.omega_attention + row.omega_mlp,
            row.omega_attention,
        )

    return max((row for row in rows if row.eligible), key=key)


def within_stderr(chosen: TuneRow, plain: TuneRow) -> bool | None:
    """Whether ``chosen``'s lead over ``plain`` on the objective is smaller
    than their combined standard error (``None``: no error to compare with)."""
    if chosen is plain or chosen.is_plain:
        return False
    a, b = chosen.objective_score.stderr, plain.objective_score.stderr
    if a is None or b is None:
        return None
    return chosen.objective_score.gain(plain.objective_score) < math.hypot(a, b)


# --------------------------------------------------------------------------
# Results


@dataclass
class TuneRow:
    """One candidate: its ω, its loss per eval set, every metric it was
    scored by (``scores``: the eval sets' losses and the lm-eval metrics), its
    objective, whether the skill floors let it be picked, and the seconds
    spent relaxing it in place and scoring it."""

    omega_attention: float
    omega_mlp: float
    losses: dict[str, float]
    objective: float
    split: bool = False
    scores: dict[str, Score] = field(default_factory=dict)
    objective_score: Score | None = None
    excluded_by: list[str] = field(default_factory=list)
    relax_s: float = 0.0
    score_s: float = 0.0

    @property
    def omega(self) -> float | tuple[float, float]:
        """ω, or ``(ω_attention, ω_mlp)`` when the grid splits them."""
        if self.split:
            return (self.omega_attention, self.omega_mlp)
        return self.omega_attention

    @property
    def setting(self) -> Any:
        """This candidate's ω as an ``aim: {omega: ...}`` setting."""
        return split_omega(self.omega_attention, self.omega_mlp)

    @property
    def is_plain(self) -> bool:
        return self.omega_attention >= 1.0 and self.omega_mlp >= 1.0

    @property
    def eligible(self) -> bool:
        return self.is_plain or not self.excluded_by

    def label(self) -> str:
        if self.split:
            return f"{self.omega_attention:g} / {self.omega_mlp:g}"
        return f"{self.omega_attention:g}"

    def to_json(self) -> dict[str, Any]:
        return {
            "omega_attention": self.omega_attention,
            "omega_mlp": self.omega_mlp,
            "omega_setting": setting_json(self.setting),
            "losses": self.losses,
            "objective": self.objective,
            "objective_stderr": (
                None if self.objective_score is None else self.objective_score.stderr
            ),
            "metrics": {name: s.to_json() for name, s in self.scores.items()},
            "eligible": self.eligible,
            "excluded_by": self.excluded_by,
            "relax_s": self.relax_s,
            "score_s": self.score_s,
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
    choice: Choice = field(default_factory=Choice)
    lm_eval_metrics: list[str] = field(default_factory=list)
    within_stderr: bool | None = False

    @property
    def plain(self) -> TuneRow:
        return next(row for row in self.rows if row.is_plain)

    def timing(self) -> dict[str, float]:
        """Mean seconds per candidate relaxing in place and scoring, and
        their ratio."""
        relax = sum(r.relax_s for r in self.rows) / len(self.rows)
        score = sum(r.score_s for r in self.rows) / len(self.rows)
        return {
            "relax_s": relax,
            "score_s": score,
            "relax_over_score": relax / score if score > 0 else math.nan,
        }

    def to_markdown(self) -> str:
        """The table as GitHub markdown: losses in nats, lm-eval metrics with
        their standard error, the objective (percent for ``loss``), and why
        a candidate was not eligible; a note under it when the pick's lead
        lies within the standard error."""
        names = list(self.base_losses)
        metrics = self.lm_eval_metrics
        loss_objective = self.choice.objective == LOSS
        omega = "ω (other / MLP)" if self.split_attention_mlp else "ω"
        header = [omega, *names, *metrics, "objective", ""]
        base = ["base", *(f"{self.base_losses[n]:.4f}" for n in names)]
        lines = [
            "| " + " | ".join(header) + " |",
            "|"
            + "|".join(["---"] + ["---:"] * (len(names) + len(metrics) + 1) + ["---"])
            + "|",
        ]
        if names:  # the base model is scored on the --eval sets only
            lines.append(
                "| " + " | ".join([*base, *([""] * len(metrics)), "", ""]) + " |"
            )
        for row in self.rows:
            label = row.label() + (" (plain)" if row.is_plain else "")
            cells = [f"{row.losses[n]:.4f}" for n in names]
            cells += [_with_stderr(row.scores[m]) for m in metrics]
            objective = (
                f"{100 * row.objective:+.3f}%"
                if loss_objective
                else _with_stderr(row.objective_score)
            )
            lines.append(
                "| " + " | ".join([label, *cells, objective, self._mark(row)]) + " |"
            )
        if self.within_stderr:
            gain = self.chosen.objective_score.gain(self.plain.objective_score)
            lines += [
                "",
                f"The pick's lead over the plain merge on the objective "
                f"({abs(gain):.4g}) is within their combined standard error: "
                f"on this data it is not distinguishable from the plain merge.",
            ]
        return "\n".join(lines)

    def _mark(self, row: TuneRow) -> str:
        if row is self.chosen:
            return "**chosen** (within stderr)" if self.within_stderr else "**chosen**"
        if not row.eligible:
            plain = self.plain
            return "ineligible: " + ", ".join(
                f"{m} {row.scores[m].gain(plain.scores[m]):+.4g}"
                for m in row.excluded_by
            )
        return ""

    def to_json(self) -> dict[str, Any]:
        return {
            "objective": self.choice.describe(),
            "objective_metric": self.choice.objective,
            "keep": dict(self.choice.keep),
            "within_stderr": self.within_stderr,
            "split_attention_mlp": self.split_attention_mlp,
            "base_losses": self.base_losses,
            "tokens": self.tokens,
            "lm_eval_metrics": self.lm_eval_metrics,
            "timing": self.timing(),
            "rows": [row.to_json() for row in self.rows],
            "chosen": self.chosen.to_json(),
            "model": None if self.model_dir is None else str(self.model_dir),
        }


def _with_stderr(score: Score) -> str:
    if score.stderr is None:
        return f"{score.value:.4f}"
    return f"{score.value:.4f} ± {score.stderr:.4f}"


def _loss_objective(
    scores: Mapping[str, Score], base_losses: Mapping[str, float]
) -> Score:
    """The default objective: the mean over eval sets of the relative loss
    change against the base (lower is better), its error propagated from
    each set's (the sets taken as independent)."""
    changes = [(scores[n].value - base_losses[n]) / base_losses[n] for n in base_losses]
    errors = [(scores[n].stderr or 0.0) / base_losses[n] for n in base_losses]
    value = sum(changes) / len(changes)
    stderr = math.sqrt(sum(e * e for e in errors)) / len(errors)
    return Score(LOSS, value, stderr, higher_is_better=False)


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
    lm_eval: Any = None,
    objective: str | None = None,
    keep: Mapping[str, float] | None = None,
) -> TuneResult:
    """Score ``relax(merged, ω)`` for every candidate ω and pick one.

    ``base`` and ``merged`` are safetensors checkpoint directories (``merged``
    a merge of ``base``); ``importance`` an artifact of ``base`` (a map, or a
    path or Hub repo). ``evals`` maps a name to its texts (held-out loss; may
    be empty when ``lm_eval`` is given). ``lm_eval``: an
    :class:`~mergekit_aim.tuning.harness.LmEvalTasks` whose metrics every
    candidate is also scored by. ``objective`` and ``keep`` say how the pick
    is made (see :func:`resolve_choice` and :func:`choose`).

    The merged model is loaded once; each candidate's relaxed tensors are
    computed from the plain merge's and the base's tensors and written into
    it in place, and the model is scored as it is (nothing is written to disk
    or reloaded). ``base_losses`` (per eval name) skips evaluating the base
    model. ``exclude``: regexes of tensor names to leave at the merged value,
    like ``aim.exclude``. Memory: the model plus CPU copies (storage dtype) of
    the base and merged relaxable tensors; candidates are relaxed on the CPU,
    as ``relax_checkpoint`` does, so that the written pick is bit for bit the
    candidate that was scored.
    """
    from mergekit_aim.checkpoint import read_checkpoint

    grid = omega_grid(omegas, split_attention_mlp)
    check_eval_settings(seq_len, batch_size)
    evals = _check_evals(evals, allow_empty=lm_eval is not None)
    metrics = {name: False for name in evals}
    if lm_eval is not None:
        clash = sorted(set(evals) & set(lm_eval.metrics))
        if clash:
            raise AimConfigError(f"--eval names {clash} are also lm-eval metrics")
        metrics.update(lm_eval.metrics)
    choice = resolve_choice(metrics, list(evals), objective, keep)
    imap = _importance_map(importance)
    base, merged = str(base), str(merged)
    base_ckpt, merged_ckpt = read_checkpoint(base), read_checkpoint(merged)
    imap.check_against(base_ckpt, source=str(importance))
    # Every tensor of the merge is checked against the base (by name, or by
    # transformers' conversion of the base's checkpoint tensors, for a merge
    # mergekit wrote under the model's names); those with a statistic that no
    # exclude pattern names are the candidates' relaxed tensors.
    from mergekit_aim.offline import merged_statistics

    statistics = merged_statistics(base_ckpt, merged_ckpt, imap)
    keys = Relaxation(Selection(1.0, exclude), imap).candidates(statistics)
    names = sorted(keys)
    if split_attention_mlp and not any(is_mlp(n) for n in names):
        raise AimConfigError(
            "split_attention_mlp (--split-attention-mlp): no relaxed tensor of "
            f"{merged} is an MLP tensor (a name containing one of {MLP_FILTERS})"
        )
    if base_losses is not None and set(base_losses) != set(evals):
        raise AimConfigError(
            f"base_losses names {sorted(base_losses)}, but the eval sets are "
            f"{sorted(evals)}"
        )

    tokenizer = load_tokenizer(merged if _has_tokenizer(merged) else base)
    losses_of = LossSets(tokenizer, evals, seq_len=seq_len, batch_size=batch_size)

    def score(model: Any) -> dict[str, Score]:
        scores = losses_of.score(model)
        if lm_eval is not None:
            scores.update(lm_eval.score(model, tokenizer))
        return scores

    if base_losses is None and evals:
        base_model = load_model(base, device=device, dtype=dtype)
        base_losses = {n: s.value for n, s in losses_of.score(base_model).items()}
        del base_model
        LOG.info("tune: base losses %s", _rounded(base_losses))
    base_losses = {n: float(base_losses[n]) for n in evals} if evals else {}
    for name, value in base_losses.items():
        if not math.isfinite(value) or value <= 0:
            raise AimConfigError(
                f"the base model's loss on eval set {name!r} is {value}; the "
                f"objective divides by it"
            )

    model = load_model(merged, device=device, dtype=dtype)
    params = _parameters(model, names)
    base_tensors = _base_tensors(base_ckpt, [statistics[n] for n in names], base)
    merged_tensors = _read_tensors(merged_ckpt, names)
    rows = []
    for omega_attention, omega_mlp in grid:
        started = time.perf_counter()
        tensors = candidate_tensors(
            base_tensors, merged_tensors, imap, omega_attention, omega_mlp, keys
        )
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor)
        _synchronize(model)
        relaxed = time.perf_counter()
        scores = score(model)
        _synchronize(model)
        scored = time.perf_counter()
        objective_score = (
            _loss_objective(scores, base_losses)
            if choice.objective == LOSS
            else scores[choice.objective]
        )
        row = TuneRow(
            omega_attention,
            omega_mlp,
            {n: scores[n].value for n in evals},
            objective_score.value,
            split=split_attention_mlp,
            scores=scores,
            objective_score=objective_score,
            relax_s=relaxed - started,
            score_s=scored - relaxed,
        )
        rows.append(row)
        LOG.info(
            "tune: ω %s: %s, objective %.4g (relax %.2f s, score %.2f s)",
            row.label(),
            {n: round(s.value, 4) for n, s in scores.items()},
            row.objective,
            row.relax_s,
            row.score_s,
        )
    chosen = choose(rows, choice)
    result = TuneResult(
        rows,
        base_losses,
        chosen,
        split_attention_mlp=split_attention_mlp,
        tokens=losses_of.tokens,
        choice=choice,
        lm_eval_metrics=[] if lm_eval is None else list(lm_eval.metrics),
    )
    result.within_stderr = within_stderr(chosen, result.plain)
    LOG.info(
        "tune: chose ω %s%s",
        chosen.label(),
        " (its lead over plain is within the stderr)" if result.within_stderr else "",
    )
    return result


def _synchronize(model: Any) -> None:
    # Timings of work queued on a GPU are only true once it has finished.
    device = model.get_input_embeddings().weight.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_evals(
    evals: Mapping[str, Sequence[str]], allow_empty: bool = False
) -> dict[str, list[str]]:
    if allow_empty and isinstance(evals, Mapping) and not evals:
        return {}
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


def _base_tensors(
    checkpoint: Any, statistics: Sequence[Any], base_dir: str
) -> dict[str, torch.Tensor]:
    """The base value of each merged tensor: read, or converted from the base's
    checkpoint tensors as mergekit converts them (shapes checked)."""
    from mergekit_aim.offline import base_tensor, model_type

    wanted = sorted({source for found in statistics for source in found.sources})
    read = _read_tensors(checkpoint, wanted)
    kind = model_type(base_dir)
    return {
        found.name: base_tensor(found, read.__getitem__, kind) for found in statistics
    }


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
