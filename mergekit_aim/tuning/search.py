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
candidate values. A candidate's ω is an ordinary ``aim: {omega: ...}`` setting
(a filtered list for a split pair, see :func:`mergekit_aim.selection.split_omega`),
so the pick can be pasted into a merge config and relaxes the same tensors.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
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
    check_eval_settings,
    load_model,
    load_tokenizer,
    pad_token_id,
    sum_nll,
    token_windows,
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
    def setting(self) -> Any:
        """This candidate's ω as an ``aim: {omega: ...}`` setting."""
        return split_omega(self.omega_attention, self.omega_mlp)

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
            "omega_setting": setting_json(self.setting),
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
    base_tensors = _base_tensors(base_ckpt, [statistics[n] for n in names], base)
    merged_tensors = _read_tensors(merged_ckpt, names)
    rows = []
    for omega_attention, omega_mlp in grid:
        tensors = candidate_tensors(
            base_tensors, merged_tensors, imap, omega_attention, omega_mlp, keys
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
