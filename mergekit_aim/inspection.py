"""What an importance artifact says, for people: ``mergekit-aim inspect``.

Three views of the statistic ``a`` (per-token mean |input| per channel) and of
``s = a / max(a)``, the per-tensor factor AIM scales each input channel's pull
toward the base by:

* :func:`describe`: provenance, a per-layer summary (tokens seen, mean ``s``,
  max/median of ``a``, outlier channels) and a verdict on what AIM will do
  with this statistic;
* :func:`model_coverage`: which weights of a model the artifact covers, by the
  same rule a merge uses (:mod:`mergekit_aim.selection`);
* :func:`compare`: two artifacts of one model side by side (Spearman rank
  correlation and top-1% channel overlap per tensor), to see whether another
  calibration set changes anything.

Definitions (also in ``mergekit-aim inspect --help``):

* an **outlier channel** is one whose ``a`` exceeds :data:`OUTLIER_FACTOR`
  times the median ``a`` of its tensor;
* a tensor is **flat** when its largest ``a`` is less than :data:`FLAT_RATIO`
  times its median: every channel then gets a similar ``s``, and AIM scales
  the tensor's merge delta almost uniformly;
* the **top 1%** of a tensor are its ``ceil(channels / 100)`` channels with the
  largest ``a`` (at least one).

Where the thresholds come from: a randomly initialised Llama calibrated on
``builtin`` has max/median 1.2–4.1 per tensor (median 1.4–1.7) and no channel
above 8× its median; SmolLM2-135M has max/median 3.6–144 (median 28), and its
median tensor has 3 channels above 8× its median. 3 separates the two for
almost every tensor; 8 counts the few channels that carry most of |x| in a
trained model and none in a random one.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mergekit_aim.errors import ImportanceError
from mergekit_aim.importance import ImportanceMap

OUTLIER_FACTOR = 8.0
FLAT_RATIO = 3.0
TOP_SHARE = 0.01
# Fewer calibration tokens than this per tensor make the verdict tentative:
# eight blocks of 512 tokens (the paper uses 256).
FEW_TOKENS = 4096
# Comparison verdicts: "about the same" needs both, "different" either below
# the lower pair.
SAME_RANK, SAME_OVERLAP = 0.9, 0.8
DIFFERENT_RANK, DIFFERENT_OVERLAP = 0.6, 0.5

# The first numeric name component is the layer index, as mergekit's gradients
# read it (``model.layers.3.mlp.experts.5.w1.weight`` is in layer 3).
_LAYER = re.compile(r"\.(\d+)\.")
OTHER = "other"


def load_artifact(spec: str) -> ImportanceMap:
    """Load an artifact (path or Hub spec) and name it by where it was read
    from (a copy saved from a loaded map still records its original file)."""
    from mergekit_aim.importance import resolve_artifact

    path = resolve_artifact(spec)
    imap = ImportanceMap.load(path)
    imap.provenance["file"] = os.path.abspath(path)
    return imap


def layer_of(name: str) -> int | None:
    """The layer index in a tensor name, or ``None`` outside the layers."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


# --- one artifact ------------------------------------------------------------


@dataclass(frozen=True)
class TensorStats:
    """Figures of one tensor's statistic (see the module docstring)."""

    name: str
    layer: int | None
    channels: int
    tokens: int
    mean_s: float
    max_over_median: float
    outliers: int

    @property
    def flat(self) -> bool:
        return self.max_over_median < FLAT_RATIO


def tensor_stats(imap: ImportanceMap) -> list[TensorStats]:
    """:class:`TensorStats` of every tensor of ``imap``, in name order."""
    found = []
    for name in sorted(imap):
        a = imap.mean(name).double()
        top = float(a.max()) if a.numel() else 0.0
        median = float(a.median()) if a.numel() else 0.0
        found.append(
            TensorStats(
                name=name,
                layer=layer_of(name),
                channels=a.numel(),
                tokens=imap.count(name),
                mean_s=float((a / top).mean()) if top > 0 else 0.0,
                max_over_median=top / median if median > 0 else math.inf,
                outliers=int((a > OUTLIER_FACTOR * median).sum()),
            )
        )
    return found


@dataclass(frozen=True)
class LayerStats:
    """One layer's tensors summarised: tokens (min, max), mean ``s`` over its
    tensors, max/median range over its tensors, outlier channels in all."""

    layer: str
    tensors: int
    tokens_min: int
    tokens_max: int
    mean_s: float
    ratio_min: float
    ratio_max: float
    outliers: int
    flat: int


def layer_stats(stats: Sequence[TensorStats]) -> list[LayerStats]:
    """One row per layer index (ascending), then one for tensors outside the
    layers (``"other"``: final norm, LM head)."""
    groups: dict[int | None, list[TensorStats]] = {}
    for item in stats:
        groups.setdefault(item.layer, []).append(item)
    order = sorted(k for k in groups if k is not None)
    if None in groups:
        order.append(None)
    rows = []
    for key in order:
        items = groups[key]
        rows.append(
            LayerStats(
                layer=OTHER if key is None else str(key),
                tensors=len(items),
                tokens_min=min(i.tokens for i in items),
                tokens_max=max(i.tokens for i in items),
                mean_s=statistics.fmean(i.mean_s for i in items),
                ratio_min=min(i.max_over_median for i in items),
                ratio_max=max(i.max_over_median for i in items),
                outliers=sum(i.outliers for i in items),
                flat=sum(i.flat for i in items),
            )
        )
    return rows


def verdict(stats: Sequence[TensorStats]) -> str:
    """One sentence on what AIM will do with this statistic."""
    if not stats:
        return "the artifact holds no tensors: AIM will relax nothing"
    n = len(stats)
    flat = sum(s.flat for s in stats)
    peaked = sum(s.outliers > 0 for s in stats)
    ratio = statistics.median(s.max_over_median for s in stats)
    mean_s = statistics.median(s.mean_s for s in stats)
    figures = (
        f"median tensor: max/median {ratio:.1f}, mean s {mean_s:.2f}; "
        f"{flat} of {n} tensors flat, {peaked} with outlier channels"
    )
    if flat >= 0.75 * n:
        text = (
            "statistic is nearly flat: AIM will act like a uniform scaling of "
            "each tensor's merge delta, as on a random or barely trained model "
            f"({figures})"
        )
    elif peaked >= 0.5 * n:
        text = (
            "statistic is peaked: a few outlier channels per tensor carry most "
            "of the input, so AIM pulls those channels back toward the base and "
            f"leaves the others close to the merge ({figures})"
        )
    else:
        text = (
            "statistic is mixed: some tensors have outlier channels, others are "
            f"nearly flat ({figures})"
        )
    fewest = min(s.tokens for s in stats)
    if fewest < FEW_TOKENS:
        text += (
            f". Only {fewest:,} calibration tokens reached some tensor: the "
            "statistic is noisy; calibrate on more text"
        )
    return text


def _short(digest: Any, n: int = 12) -> str:
    return f"{str(digest)[:n]}…" if digest else "unknown"


def when_made(imap: ImportanceMap) -> str:
    """When the artifact was calibrated (recorded by calibrate), else the
    file's modification time, saying which."""
    created = imap.provenance.get("created")
    if created:
        return str(created)
    path = imap.provenance.get("file")
    if path and os.path.exists(path):
        stamp = datetime.datetime.fromtimestamp(
            os.path.getmtime(path), tz=datetime.timezone.utc
        )
        return f"{stamp:%Y-%m-%d %H:%M} UTC (file modified; no time recorded)"
    return "unknown"


def provenance_lines(imap: ImportanceMap) -> list[tuple[str, str]]:
    """(label, value) pairs: file, model, dataset, dtype, when, tokens."""
    p = imap.provenance
    calibration = p.get("calibration", {}) or {}
    data = p.get("data", {}) or {}
    file_hash, model_hash = (
        _short(p.get("file_sha256")),
        _short(p.get("base_fingerprint")),
    )
    lines = [
        ("artifact", f"{p.get('file', '?')} (sha256 {file_hash})"),
        ("model", f"{p.get('base_model', '?')} (fingerprint {model_hash})"),
    ]
    if calibration:
        dataset = str(calibration.get("dataset", "?"))
        if calibration.get("split"):
            dataset += f" ({calibration['split']})"
        parts = [dataset]
        if calibration.get("num_texts") is not None:
            parts.append(
                f"{calibration['num_texts']} texts in {calibration.get('num_blocks')} "
                f"blocks of {calibration.get('seq_len')} tokens"
            )
        if calibration.get("seed") is not None:
            parts.append(f"seed {calibration['seed']}")
        parts.append(f"data fingerprint {_short(p.get('data_fingerprint'))}")
        if data.get("chat"):
            parts.append("chat template")
        lines.append(("dataset", ", ".join(parts)))
        dtype = str(calibration.get("dtype", "?"))
        if p.get("model_dtype") and p["model_dtype"] != dtype:
            dtype += f" (ran in {p['model_dtype']})"
        lines.append(("dtype", dtype))
    else:
        lines.append(("dataset", "not recorded"))
    lines.append(("when", when_made(imap)))
    if p.get("mergekit_aim_version"):
        lines.append(("made by", f"mergekit-aim {p['mergekit_aim_version']}"))
    if p.get("combined"):
        lines.append(("combined", f"{p['combined']} runs added"))
    counts = sorted({imap.count(n) for n in imap})
    if counts:
        tokens = (
            f"{counts[0]:,} per tensor"
            if len(counts) == 1
            else f"{counts[0]:,}–{counts[-1]:,} per tensor (routed experts see fewer)"
        )
        lines.append(("tokens", tokens))
    skipped = p.get("skipped") or {}
    if skipped:
        shown = "; ".join(f"{k} ({v})" for k, v in list(sorted(skipped.items()))[:3])
        more = f"; … {len(skipped) - 3} more" if len(skipped) > 3 else ""
        lines.append(("not measured", shown + more))
    return lines


def _ratio(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.1f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Plain text columns: the first left-aligned, the others right-aligned."""
    rows = [list(header), *map(list, rows)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    out = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        out.append("  ".join(cells).rstrip())
    return out


def describe(imap: ImportanceMap, *, tensors: bool = False) -> str:
    """The human summary of one artifact (``mergekit-aim inspect ARTIFACT``)."""
    stats = tensor_stats(imap)
    lines = [f"{label:<12} {value}" for label, value in provenance_lines(imap)]
    layers = layer_stats(stats)
    in_layers = sum(row.layer != OTHER for row in layers)
    outside = sum(row.tensors for row in layers if row.layer == OTHER)
    lines.append(
        f"{'tensors':<12} {len(stats)} in {in_layers} layers"
        + (f" + {outside} outside them" if outside else "")
    )
    lines.append("")
    lines += _table(
        ("layer", "tensors", "tokens", "mean s", "max/median", "outliers", "flat"),
        (
            (
                row.layer,
                str(row.tensors),
                f"{row.tokens_min:,}"
                if row.tokens_min == row.tokens_max
                else f"{row.tokens_min:,}–{row.tokens_max:,}",
                f"{row.mean_s:.3f}",
                _ratio(row.ratio_min)
                if row.ratio_min == row.ratio_max
                else f"{_ratio(row.ratio_min)}–{_ratio(row.ratio_max)}",
                str(row.outliers),
                str(row.flat),
            )
            for row in layers
        ),
    )
    if tensors:
        lines.append("")
        lines += _table(
            (
                "tensor",
                "channels",
                "tokens",
                "mean s",
                "max/median",
                "outliers",
                "axis",
            ),
            (
                (
                    s.name,
                    str(s.channels),
                    f"{s.tokens:,}",
                    f"{s.mean_s:.3f}",
                    _ratio(s.max_over_median),
                    str(s.outliers),
                    str(imap.input_axis(s.name)),
                )
                for s in stats
            ),
        )
    lines += [
        "",
        "a: mean |input| per channel; s = a / max(a), per tensor.",
        "mean s: mean over channels (per layer: over its tensors); max/median: of"
        " a (per layer: range over its tensors);",
        f"outliers: channels with a above {OUTLIER_FACTOR:g}x their tensor's "
        f"median; flat: tensors with max/median below {FLAT_RATIO:g}.",
        f"verdict: {verdict(stats)}",
    ]
    return "\n".join(lines)


# --- coverage against a model -------------------------------------------------


@dataclass
class ModelCoverage:
    """How an artifact covers one model's checkpoint: the coverage summary of
    :class:`mergekit_aim.selection.Coverage` (every tensor with a statistic
    counted as relaxed), its gap lines, and the artifact check's refusal."""

    model: str
    summary: dict[str, Any]
    gaps: list[str]
    mismatch: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        from mergekit_aim.selection import NO_STATISTIC

        s = self.summary
        covered, total = s["elements_relaxed"], s["elements"]
        share = f" ({100 * covered / total:.1f}%)" if total else ""
        lines = [
            f"coverage of {self.model}: {s['relaxed']} of {s['tensors']} tensors "
            f"have a statistic; weight elements AIM can relax: {covered:,} of "
            f"{total:,}{share}",
        ]
        left = s.get("left_alone", {}).get(NO_STATISTIC)
        if left:
            lines.append(
                f"  {left} tensor{'s' if left != 1 else ''} without a statistic "
                "(embeddings, tied heads, biases and buffers never have one)"
            )
        lines += [f"  {gap}" for gap in self.gaps]
        if self.mismatch:
            lines.append(f"  does not match this model: {self.mismatch}")
        elif not self.gaps:
            lines.append("  every weight with an input is covered")
        return "\n".join(lines)


def model_coverage(imap: ImportanceMap, model: str) -> ModelCoverage:
    """Which tensors of ``model`` (a directory or Hub id) ``imap`` covers.

    Uses the merge's own rule (:func:`~mergekit_aim.relaxation.find_statistic`,
    :func:`~mergekit_aim.relaxation.has_input`, :class:`Coverage`) and the
    artifact's own check against a base model, whose refusal is reported in
    ``mismatch`` rather than raised.
    """
    from mergekit_aim.checkpoint import read_checkpoint, resolve_local_path
    from mergekit_aim.names import lazy_name_map
    from mergekit_aim.offline import vocabulary_names
    from mergekit_aim.relaxation import (
        Coverage,
        find_statistic,
        has_input,
        skipped_reason,
    )
    from mergekit_aim.selection import NO_STATISTIC, RELAXED, Decision

    path = resolve_local_path(model)
    checkpoint = read_checkpoint(path)
    mismatch = None
    try:
        imap.check_against(checkpoint, source=model)
    except ImportanceError as error:
        mismatch = str(error)
    vocabulary = vocabulary_names(path)
    name_map = lazy_name_map(checkpoint)
    coverage = Coverage()
    for name in sorted(checkpoint.tensors):
        found = find_statistic((name,), checkpoint, imap, name_map)
        covered = found is not None and found.importance_key is not None
        coverage.add(
            name,
            Decision(RELAXED if covered else NO_STATISTIC),
            found,
            has_input=has_input(found, vocabulary=name in vocabulary),
            why=skipped_reason(imap, found),
        )
    return ModelCoverage(model, coverage.summary(), coverage.gaps(), mismatch)


# --- two artifacts ------------------------------------------------------------


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n−1 of ``values`` (float64); tied values share their mean rank."""
    values = values.double().flatten()
    order = torch.argsort(values, stable=True)
    ordered = values[order]
    _, inverse, counts = torch.unique_consecutive(
        ordered, return_inverse=True, return_counts=True
    )
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() + 1) / 2
    ranks = torch.empty_like(values)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation (Pearson's of average ranks); NaN when either
    side is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    norm = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / norm if norm > 0 else math.nan


def top_overlap(x: torch.Tensor, y: torch.Tensor, share: float = TOP_SHARE) -> float:
    """Share of ``x``'s top ``ceil(share·n)`` channels (at least one) that are
    also among ``y``'s (ties at the cut: torch.topk's pick)."""
    k = max(1, math.ceil(share * x.numel()))
    a = set(torch.topk(x.double(), k).indices.tolist())
    b = set(torch.topk(y.double(), k).indices.tolist())
    return len(a & b) / k


@dataclass(frozen=True)
class TensorComparison:
    name: str
    layer: int | None
    channels: int
    rank_correlation: float
    top_overlap: float
    max_abs_ds: float


@dataclass
class Comparison:
    """Two artifacts of one model, tensor by tensor."""

    first: dict[str, Any]
    second: dict[str, Any]
    tensors: list[TensorComparison]
    only_first: list[str]
    only_second: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "first": self.first,
            "second": self.second,
            "only_first": self.only_first,
            "only_second": self.only_second,
            "tensors": {
                t.name: {
                    "rank_correlation": t.rank_correlation,
                    "top1_overlap": t.top_overlap,
                    "max_abs_ds": t.max_abs_ds,
                }
                for t in self.tensors
            },
            "summary": _comparison_summary(self.tensors),
            "verdict": self.verdict(),
        }

    def verdict(self) -> str:
        if not self.tensors:
            return "the artifacts share no tensor"
        summary = _comparison_summary(self.tensors)
        rho = summary["rank_correlation_median"]
        overlap = summary["top1_overlap_median"]
        figures = (
            f"median rank correlation {rho:.2f}, median top-1% overlap "
            f"{100 * overlap:.0f}%, median max |Δs| {summary['max_abs_ds_median']:.3f}"
        )
        if rho >= SAME_RANK and overlap >= SAME_OVERLAP:
            return (
                "about the same statistic: the second calibration set changes "
                f"little of what AIM does ({figures})"
            )
        if rho < DIFFERENT_RANK or overlap < DIFFERENT_OVERLAP:
            return (
                "different statistics: the calibration sets disagree on which "
                f"channels matter, so AIM relaxes different channels ({figures})"
            )
        return (
            "similar statistics with differences: the channel ranking mostly "
            f"agrees, but some salient channels differ ({figures})"
        )

    def text(self) -> str:
        only = "".join(
            f", {len(names)} only in the {which}"
            for names, which in (
                (self.only_first, "first"),
                (self.only_second, "second"),
            )
            if names
        )
        lines = [
            f"first   {self.first['file']}: {self.first['dataset']}",
            f"second  {self.second['file']}: {self.second['dataset']}",
            f"model   {self.first['model']} (fingerprint "
            f"{_short(self.first['fingerprint'])}, both)",
            f"tensors {len(self.tensors)} in both{only}",
            "",
        ]
        groups: dict[int | None, list[TensorComparison]] = {}
        for item in self.tensors:
            groups.setdefault(item.layer, []).append(item)
        order = sorted(k for k in groups if k is not None)
        if None in groups:
            order.append(None)
        rows = []
        for key in [*order, "all"]:
            items = self.tensors if key == "all" else groups[key]
            s = _comparison_summary(items)
            rows.append(
                (
                    "all" if key == "all" else OTHER if key is None else str(key),
                    str(len(items)),
                    f"{s['rank_correlation_median']:.3f}",
                    f"{s['rank_correlation_min']:.3f}",
                    f"{100 * s['top1_overlap_median']:.0f}%",
                    f"{100 * s['top1_overlap_min']:.0f}%",
                    f"{s['max_abs_ds_median']:.3f}",
                )
            )
        lines += _table(
            (
                "layer",
                "tensors",
                "rank corr",
                "(min)",
                "top-1% overlap",
                "(min)",
                "max |Δs|",
            ),
            rows,
        )
        worst = sorted(self.tensors, key=lambda t: _nan_low(t.rank_correlation))[:5]
        if worst:
            lines += ["", "least alike (rank correlation, top-1% overlap):"]
            lines += [
                f"  {t.name}: {t.rank_correlation:.3f}, {100 * t.top_overlap:.0f}%"
                for t in worst
            ]
        lines += [
            "",
            "rank corr: Spearman's over a tensor's channels (ties share their mean"
            " rank);",
            "top-1% overlap: share of the first's ceil(channels/100) largest "
            "channels that are also the second's;",
            "max |Δs|: largest change of s = a / max(a) (AIM's factor changes by "
            "(1 − ω) times that);",
            "per layer: median (and minimum) over its tensors.",
            f"verdict: {self.verdict()}",
        ]
        return "\n".join(lines)


def _nan_low(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def _median(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def _comparison_summary(items: Sequence[TensorComparison]) -> dict[str, float]:
    rho = [t.rank_correlation for t in items]
    overlap = [t.top_overlap for t in items]
    finite_rho = [v for v in rho if not math.isnan(v)]
    return {
        "rank_correlation_median": _median(rho),
        "rank_correlation_min": min(finite_rho) if finite_rho else math.nan,
        "top1_overlap_median": _median(overlap),
        "top1_overlap_min": min(overlap) if overlap else math.nan,
        "max_abs_ds_median": _median(t.max_abs_ds for t in items),
    }


def _identity(imap: ImportanceMap) -> dict[str, Any]:
    p = imap.provenance
    calibration = p.get("calibration", {}) or {}
    dataset = ", ".join(
        str(part)
        for part in (
            calibration.get("dataset", "dataset not recorded"),
            f"{calibration['num_texts']} texts" if "num_texts" in calibration else None,
            f"seed {calibration['seed']}" if "seed" in calibration else None,
            f"{min(imap.count(n) for n in imap):,} tokens" if len(imap) else None,
        )
        if part is not None
    )
    return {
        "file": p.get("file", "?"),
        "model": p.get("base_model", "?"),
        "fingerprint": imap.base_fingerprint,
        "dataset": dataset,
    }


def compare(first: ImportanceMap, second: ImportanceMap) -> Comparison:
    """Per-tensor rank correlation, top-1% overlap and max |Δs| of two
    artifacts of one model; refuses artifacts of different models."""
    one, two = _identity(first), _identity(second)
    if first.base_fingerprint != second.base_fingerprint or (
        first.base_fingerprint is None and one["model"] != two["model"]
    ):
        raise ImportanceError(
            f"{one['file']} and {two['file']} are artifacts of different models "
            f"({one['model']}, fingerprint {_short(first.base_fingerprint)}; "
            f"{two['model']}, fingerprint {_short(second.base_fingerprint)}): "
            "compare artifacts calibrated on one model"
        )
    tensors = []
    for name in sorted(set(first) & set(second)):
        x, y = first.mean(name), second.mean(name)
        if x.shape != y.shape:
            raise ImportanceError(
                f"tensor {name} has {x.numel()} channels in {one['file']} and "
                f"{y.numel()} in {two['file']}: not artifacts of one model"
            )
        sx = x.double() / x.max() if x.max() > 0 else x.double()
        sy = y.double() / y.max() if y.max() > 0 else y.double()
        tensors.append(
            TensorComparison(
                name=name,
                layer=layer_of(name),
                channels=x.numel(),
                rank_correlation=spearman(x, y),
                top_overlap=top_overlap(x, y),
                max_abs_ds=float((sx - sy).abs().max()) if x.numel() else 0.0,
            )
        )
    return Comparison(
        one,
        two,
        tensors,
        sorted(set(first) - set(second)),
        sorted(set(second) - set(first)),
    )
