"""Tables, hypervolumes and the Pareto plot of one benchmark run.

Everything here works on the ``results`` rows the runner writes (plain
dicts, as in ``results.json``), so a report can be rebuilt from the JSON.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.quality.metrics import (
    hypervolume,
    mean,
    normalized_scores,
    pareto_front,
    reference_point,
    relative_change,
)
from benchmarks.quality.tasks import EXPERT_TASKS, TASKS

HIGHER_IS_BETTER = {"code": False, "math": True, "instructions": True, "general": False}
LABELS = {
    "code": "code loss",
    "math": "math EM",
    "instructions": "instr. EM",
    "general": "general loss",
}
# The report's target for the tuned rows (exact-match points; share of damage).
TARGET_POINTS = 2.0
TARGET_RECOVERY = 0.30
# Variants whose ω was chosen per merge (scalar, and attention/MLP split).
TUNED = ("tuned", "tuned-split")
CONTROLS = ("aim", "uniform", "permuted", *TUNED)
# Variants compared at the report's fixed ω (the others: at their own).
FIXED_OMEGA = ("aim", "uniform", "permuted")
SPECIAL = ("base", "expert")
SHORT = {
    "task_arithmetic": "TA",
    "ties": "TIES",
    "dare_ties": "DARE-TIES",
    "dare_linear": "DARE-linear",
    "lora_ties": "TIES (PEFT)",
    "lora_dare_ties": "DARE-TIES (PEFT)",
}


def set_name(experts: Sequence[str]) -> str:
    return "+".join(experts)


def objectives(experts: Sequence[str]) -> tuple[str, ...]:
    """The normalized-score axes of an expert set: its tasks, then general."""
    return (*experts, "general")


def references(rows: Sequence[Mapping[str, Any]]) -> tuple[dict, dict]:
    """(base metrics, {task: that task's expert's metrics}) from the rows; with
    experts of several training seeds, each metric is their mean."""
    base = next(r["metrics"] for r in rows if r["variant"] == "base")
    seeds = defaultdict(list)
    for r in rows:
        if r["variant"] == "expert":
            seeds[r["experts"][0]].append(r["metrics"])
    experts = {
        task: {m: mean([one[m] for one in found]) for m in found[0]}
        for task, found in seeds.items()
    }
    return base, experts


def with_scores(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows with ``scores``: normalized task scores (see
    :func:`~benchmarks.quality.metrics.normalized_scores`)."""
    base, experts = references(rows)
    out = []
    for row in rows:
        row = dict(row)
        row["scores"] = normalized_scores(row["metrics"], base, experts, TASKS)
        out.append(row)
    return out


def merge_key(row: Mapping[str, Any]) -> tuple:
    return (set_name(row["experts"]), row["method"], row["weights"], row["seed"])


def paired(
    rows: Sequence[Mapping[str, Any]], variant: str, omega: float | None = None
) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """(plain row, ``variant`` row) pairs of the same merge."""
    plain = {merge_key(r): r for r in rows if r["variant"] == "plain"}
    pairs = []
    for row in rows:
        if row["variant"] != variant:
            continue
        if omega is not None and not math.isclose(row["omega"], omega):
            continue
        if merge_key(row) in plain:
            pairs.append((plain[merge_key(row)], row))
    return pairs


def _fmt_pct(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{100 * value:+.1f}%"


def _fmt_metric(task: str, value: float) -> str:
    return f"{100 * value:.1f}" if task in ("math", "instructions") else f"{value:.3f}"


def _table(header: Sequence[str], body: Iterable[Sequence[str]], right: int) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * (len(header) - right) + ["---:"] * right) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def _grouped(pairs, *, by_seed: bool = False):
    """Pairs grouped by (set, method, weights), seeds (DARE or training) pooled."""
    groups = defaultdict(list)
    for plain, other in pairs:
        key = (set_name(plain["experts"]), plain["method"], plain["weights"])
        groups[key].append((plain, other))
    return dict(sorted(groups.items(), key=lambda kv: _order(kv[0])))


def _order(key):
    experts, method, weights = key
    return (experts.count("+"), experts, list(SHORT).index(method), weights)


def relative_change_table(
    rows: Sequence[Mapping[str, Any]], omega: float, variant: str = "aim"
) -> str:
    """The paper's table: % change of each task metric, ``variant`` vs plain,
    per expert set × method × weighting (seeds averaged first).
    Positive means better (higher accuracy, lower loss)."""
    body = []
    pairs = paired(rows, variant, omega if variant in FIXED_OMEGA else None)
    for (experts, method, weights), group in _grouped(pairs).items():
        cells = [experts, SHORT[method], weights]
        for task in TASKS:
            plain = mean([p["metrics"][task] for p, _ in group])
            other = mean([o["metrics"][task] for _, o in group])
            cells.append(
                _fmt_pct(
                    relative_change(
                        other, plain, higher_is_better=HIGHER_IS_BETTER[task]
                    )
                )
            )
        body.append(cells)
    header = ["experts", "method", "weights", *(LABELS[t] for t in TASKS)]
    return _table(header, body, len(TASKS))


def absolute_table(rows: Sequence[Mapping[str, Any]], omega: float) -> str:
    """Test metrics of plain / AIM / uniform / permuted / tuned, per merge group.

    Accuracies in %, losses in nats; seeds averaged."""
    groups = defaultdict(dict)
    for row in rows:
        if row["variant"] in ("base", "expert"):
            continue
        if row["variant"] in ("aim", "uniform", "permuted") and not math.isclose(
            row["omega"], omega
        ):
            continue
        key = (set_name(row["experts"]), row["method"], row["weights"])
        groups[key].setdefault(row["variant"], []).append(row)
    body = []
    variants = ("plain", *CONTROLS)
    for key in sorted(groups, key=_order):
        experts, method, weights = key
        for variant in variants:
            members = groups[key].get(variant)
            if not members:
                continue
            cells = [experts, SHORT[method], weights, variant]
            omegas = sorted({omega_label(m) for m in members})
            cells.append(", ".join(omegas))
            for task in TASKS:
                cells.append(
                    _fmt_metric(task, mean([m["metrics"][task] for m in members]))
                )
            body.append(cells)
    header = [
        "experts",
        "method",
        "weights",
        "variant",
        "ω",
        *(LABELS[t] for t in TASKS),
    ]
    return _table(header, body, len(TASKS) + 1)


def controls_summary(rows: Sequence[Mapping[str, Any]], omega: float) -> str:
    """Per variant: mean change of normalized task scores over all merges, and
    how often the variant beats plain / AIM on the merge's mean score."""
    scored = with_scores(rows)
    aim = {merge_key(o): o for _, o in paired(scored, "aim", omega)}
    body = []
    for variant in CONTROLS:
        pairs = paired(scored, variant, omega if variant in FIXED_OMEGA else None)
        if not pairs:
            continue
        cells = [variant, str(len(pairs))]
        for task in TASKS:
            deltas = [
                o["scores"][task] - p["scores"][task]
                for p, o in pairs
                if task in objectives(p["experts"])
            ]
            cells.append(f"{mean(deltas):+.3f}")
        overall = [
            mean([o["scores"][t] for t in objectives(p["experts"])])
            - mean([p["scores"][t] for t in objectives(p["experts"])])
            for p, o in pairs
        ]
        cells.append(f"{mean(overall):+.3f}")
        cells.append(f"{sum(d > 0 for d in overall)}/{len(overall)}")
        if variant == "aim":
            cells.append("—")
        else:
            wins = [
                mean([o["scores"][t] for t in objectives(p["experts"])])
                > mean(
                    [aim[merge_key(o)]["scores"][t] for t in objectives(p["experts"])]
                )
                for p, o in pairs
                if merge_key(o) in aim
            ]
            cells.append(f"{sum(wins)}/{len(wins)}")
        body.append(cells)
    header = [
        "variant",
        "merges",
        *(f"Δ {t}" for t in TASKS),
        "Δ mean",
        "beats plain",
        "beats AIM",
    ]
    return _table(header, body, len(header) - 1)


def hypervolumes(
    rows: Sequence[Mapping[str, Any]], omega: float
) -> dict[str, dict[str, Any]]:
    """Per expert set: the hypervolume of each variant's merges (all methods,
    weightings and seeds) in the normalized space of the set's objectives.

    The reference point is shared by the variants of a set: the worst
    normalized score on each axis over every merge of the set (all variants,
    the ω sweep included), minus 10% of that axis' range (at least 0.05).
    """
    scored = with_scores(rows)
    out: dict[str, dict[str, Any]] = {}
    sets = sorted(
        {tuple(r["experts"]) for r in scored if r["variant"] == "plain"},
        key=lambda e: (len(e), e),
    )
    for experts in sets:
        axes = objectives(experts)
        members = [
            r
            for r in scored
            if tuple(r["experts"]) == experts and r["variant"] not in SPECIAL
        ]
        reference = reference_point([[r["scores"][t] for t in axes] for r in members])
        volumes: dict[str, Any] = {"reference": dict(zip(axes, reference))}
        for variant in ("plain", *CONTROLS):
            points = [
                [r["scores"][t] for t in axes]
                for r in members
                if r["variant"] == variant
                and (variant not in FIXED_OMEGA or math.isclose(r["omega"], omega))
            ]
            if points:
                volumes[variant] = hypervolume(points, reference)
        out[set_name(experts)] = volumes
    return out


def hypervolume_table(volumes: Mapping[str, Mapping[str, Any]]) -> str:
    body = []
    for experts, values in volumes.items():
        plain = values["plain"]
        reference = ", ".join(f"{k} {v:+.2f}" for k, v in values["reference"].items())
        cells = [experts, reference, f"{plain:.4g}"]
        for variant in CONTROLS:
            value = values.get(variant)
            if value is None:
                cells.append("—")
                continue
            gain = (value - plain) / plain if plain else float("nan")
            cells.append(f"{value:.4g} ({_fmt_pct(gain)})")
        body.append(cells)
    header = ["experts", "reference point", "plain", *(f"{v} (gain)" for v in CONTROLS)]
    return _table(header, body, len(header) - 2)


def sweep_table(rows: Sequence[Mapping[str, Any]], experts: Sequence[str]) -> str:
    """Mean normalized score per task over every merge of ``experts`` at each ω
    (ω = 1 is the plain merge)."""
    scored = with_scores(rows)
    by_omega = defaultdict(list)
    for row in scored:
        if tuple(row["experts"]) != tuple(experts):
            continue
        if row["variant"] == "plain":
            by_omega[1.0].append(row)
        elif row["variant"] == "aim":
            by_omega[row["omega"]].append(row)
    axes = objectives(experts)
    body = []
    for omega in sorted(by_omega):
        group = by_omega[omega]
        cells = [f"{omega:g}", str(len(group))]
        for task in axes:
            cells.append(f"{mean([r['scores'][task] for r in group]):.3f}")
        cells.append(
            f"{mean([mean([r['scores'][t] for t in axes]) for r in group]):.3f}"
        )
        for task in TASKS:
            cells.append(_fmt_metric(task, mean([r["metrics"][task] for r in group])))
        body.append(cells)
    header = [
        "ω",
        "merges",
        *(f"score {t}" for t in axes),
        "score mean",
        *(LABELS[t] for t in TASKS),
    ]
    return _table(header, body, len(header) - 1)


def references_table(rows: Sequence[Mapping[str, Any]]) -> str:
    body = []
    for row in rows:
        if row["variant"] not in ("base", "expert"):
            continue
        name = "base" if row["variant"] == "base" else f"expert: {row['experts'][0]}"
        if row.get("seed") is not None:
            name += f" (seed {row['seed']})"
        body.append([name, *(_fmt_metric(t, row["metrics"][t]) for t in TASKS)])
    return _table(["model", *(LABELS[t] for t in TASKS)], body, len(TASKS))


def tuned_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for variant in TUNED:
        counts: dict[str, int] = defaultdict(int)
        for row in rows:
            if row["variant"] == variant:
                counts[omega_label(row)] += 1
        if counts:
            parts = [f"ω={k}: {v}" for k, v in sorted(counts.items())]
            lines.append(
                f"{variant}: ω chosen on the validation split: "
                + ", ".join(parts)
                + "."
            )
    return "\n\n".join(lines) or "No tuned rows."


def omega_label(row: Mapping[str, Any]) -> str:
    """``0.4``, or ``0/0.4`` (attention and other tensors / MLP) for a split ω."""
    if row.get("omega_mlp") is None:
        return f"{row['omega']:g}"
    return f"{row['omega']:g}/{row['omega_mlp']:g}"


def target_table(
    rows: Sequence[Mapping[str, Any]], variant: str, points: float, recovery: float
) -> tuple[str, str]:
    """(summary, per-merge table) of ``variant`` against the target: every
    merged expert's exact match within ``points`` of the plain merge on the
    test split, and ``recovery`` of the general damage (plain − base, where
    positive) won back on average."""
    base = next(r["metrics"] for r in rows if r["variant"] == "base")
    body, kept, recovered = [], [], []
    for plain, tuned in sorted(
        paired(rows, variant),
        key=lambda pr: (_order(merge_key(pr[0])[:3]), pr[0]["seed"]),
    ):
        em = [t for t in plain["experts"] if t in ("math", "instructions")]
        diffs = {t: 100 * (tuned["metrics"][t] - plain["metrics"][t]) for t in em}
        validation = _validation_diffs(tuned, em)
        damage = plain["metrics"]["general"] - base["general"]
        gain = plain["metrics"]["general"] - tuned["metrics"]["general"]
        share = gain / damage if damage > 0 else math.nan
        ok = all(d >= -points for d in diffs.values())
        kept.append(ok)
        if damage > 0:
            recovered.append(share)
        cells = [
            set_name(plain["experts"]),
            SHORT[plain["method"]],
            plain["weights"],
            "" if plain["seed"] is None else str(plain["seed"]),
            omega_label(tuned),
            ", ".join(
                f"{t} {diffs[t]:+.1f} (val {validation.get(t, math.nan):+.1f})"
                for t in em
            ),
            f"{damage:+.4f}",
            "n/a" if not math.isfinite(share) else f"{100 * share:.0f}%",
            "yes" if ok else "**no**",
        ]
        body.append(cells)
    if not body:
        return f"No {variant} rows.", ""
    summary = (
        f"**{variant}**: {sum(kept)}/{len(kept)} merges keep every merged expert's "
        f"exact match within {points:g} points of the plain merge on the test split; "
        f"the general damage is {100 * mean(recovered):.0f}% recovered on average over "
        f"the {len(recovered)} merges with damage (target: ≥ {100 * recovery:.0f}%)."
        if recovered
        else f"**{variant}**: {sum(kept)}/{len(kept)} merges keep every skill; no "
        "merge damages general ability."
    )
    header = [
        "experts",
        "method",
        "weights",
        "seed",
        "ω",
        "EM − plain, test (validation), points",
        "general damage",
        "recovered",
        f"within {points:g}",
    ]
    return summary, _table(header, body, right=4)


def _validation_diffs(row: Mapping[str, Any], em: Sequence[str]) -> dict[str, float]:
    """The chosen candidate's exact match minus the plain merge's on the
    validation split, in points (from the tuning record on the row)."""
    tuning = row.get("tuning")
    if not tuning:
        return {}
    plain = next(
        r
        for r in tuning["rows"]
        if r["omega_attention"] == 1.0 and r["omega_mlp"] == 1.0
    )
    out = {}
    for task in em:
        name = next((m for m in plain["metrics"] if m.startswith(f"aim_{task}_")), None)
        if name is not None and name.endswith("/exact_match"):
            chosen = tuning["chosen"]["metrics"][name]["value"]
            out[task] = 100 * (chosen - plain["metrics"][name]["value"])
    return out


# --- plot --------------------------------------------------------------------------

_STYLE = {
    "plain": dict(marker="o", color="tab:gray"),
    "aim": dict(marker="^", color="tab:red"),
    "uniform": dict(marker="s", color="tab:blue"),
    "permuted": dict(marker="x", color="tab:green"),
    "tuned": dict(marker="*", color="tab:purple"),
    "tuned-split": dict(marker="P", color="tab:orange"),
}


def pareto_plot(rows: Sequence[Mapping[str, Any]], omega: float, path: Path) -> Path:
    """One panel per expert set: x = mean normalized score on the set's tasks,
    y = normalized general score; lines join plain to AIM of the same merge;
    dashed lines are each variant's Pareto front in this 2-D projection. A
    last panel shows the ω sweep of the triple."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = with_scores(rows)
    sets = sorted(
        {tuple(r["experts"]) for r in scored if r["variant"] == "plain"},
        key=lambda e: (len(e), e),
    )
    panels = len(sets) + 1
    cols = 3
    rows_n = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 4.3 * rows_n))
    axes = list(axes.flat)

    def xy(row, experts):
        return (
            mean([row["scores"][t] for t in experts]),
            row["scores"]["general"],
        )

    for ax, experts in zip(axes, sets):
        members = [r for r in scored if tuple(r["experts"]) == experts]
        plain = {merge_key(r): r for r in members if r["variant"] == "plain"}
        for variant, style in _STYLE.items():
            chosen = [
                r
                for r in members
                if r["variant"] == variant
                and (variant not in FIXED_OMEGA or math.isclose(r["omega"], omega))
            ]
            if not chosen:
                continue
            points = [xy(r, experts) for r in chosen]
            ax.scatter(
                [p[0] for p in points],
                [p[1] for p in points],
                label=variant
                if variant not in FIXED_OMEGA
                else f"{variant} ω={omega:g}",
                alpha=0.8,
                s=28,
                **style,
            )
            front = sorted(points[i] for i in pareto_front(points))
            ax.plot(
                [p[0] for p in front],
                [p[1] for p in front],
                linestyle="--",
                color=style["color"],
                linewidth=1,
            )
            if variant == "aim":
                for r in chosen:
                    p = plain.get(merge_key(r))
                    if p is not None:
                        (x0, y0), (x1, y1) = xy(p, experts), xy(r, experts)
                        ax.plot([x0, x1], [y0, y1], color="tab:red", alpha=0.25)
        ax.set_title(set_name(experts))
        ax.set_xlabel("mean normalized task score (0 base, 1 expert)")
        ax.set_ylabel("general score (1 base, 0 worst expert)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)

    ax = axes[len(sets)]
    triple = max(sets, key=len)
    members = [r for r in scored if tuple(r["experts"]) == triple]
    for method in SHORT:
        curve = defaultdict(list)
        for r in members:
            if r["method"] != method:
                continue
            if r["variant"] == "plain":
                curve[1.0].append(xy(r, triple))
            elif r["variant"] == "aim":
                curve[r["omega"]].append(xy(r, triple))
        if not curve:
            continue
        omegas = sorted(curve)
        xs = [mean([p[0] for p in curve[o]]) for o in omegas]
        ys = [mean([p[1] for p in curve[o]]) for o in omegas]
        ax.plot(xs, ys, marker="o", label=SHORT[method])
        ax.annotate(f"ω={omegas[0]:g}", (xs[0], ys[0]), fontsize=7)
        ax.annotate(f"ω={omegas[-1]:g}", (xs[-1], ys[-1]), fontsize=7)
    ax.set_title(f"ω sweep, {set_name(triple)} (mean over weightings, seeds)")
    ax.set_xlabel("mean normalized task score")
    ax.set_ylabel("general score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for ax in axes[panels:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "EXPERT_TASKS",
    "absolute_table",
    "controls_summary",
    "hypervolume_table",
    "hypervolumes",
    "pareto_plot",
    "references_table",
    "relative_change_table",
    "sweep_table",
    "tuned_summary",
    "with_scores",
]


def write(out_dir: Path, document: Mapping[str, Any]) -> None:
    """A run's ``quality.json``, ``quality.png`` (when matplotlib, the bench
    extra, is installed) and ``quality.md`` under ``out_dir``."""
    import json
    import logging

    (out_dir / "quality.json").write_text(json.dumps(document, indent=1))
    try:
        pareto_plot(
            document["results"], document["settings"]["omega"], out_dir / "quality.png"
        )
    except ImportError:
        logging.getLogger(__name__).warning(
            "quality: matplotlib is not installed; no quality.png"
        )
    (out_dir / "quality.md").write_text(markdown(document))


def markdown(document: Mapping[str, Any]) -> str:
    """The whole report of one run (``quality.md``)."""
    rows = document["results"]
    s = document["settings"]
    omega = s["omega"]
    volumes = hypervolumes(rows, omega)
    triple = max((tuple(r["experts"]) for r in rows), key=len)
    checks = document.get("greedy_check", {})
    agree = sum(v[0] for v in checks.values())
    total = sum(v[1] for v in checks.values())
    timings = document.get("timings", {})
    merge_seconds = sum(v for k, v in timings.items() if k.startswith("merge "))
    run = "quick" if document.get("quick") else "full"
    model = document.get("model")
    lora = document.get("lora")
    command = ("python -m benchmarks.quality" + (".lora" if lora else "")) + (
        f" --model {model}" if model else " --quick" if document.get("quick") else ""
    )
    setup = (
        _real_setup(document, agree, total)
        if model
        else _toy_setup(document, agree, total)
    )
    spread = document.get("importance_spread")
    has_blocks = any("blocks" in r for r in rows)
    harness = s.get("scorer") == "lm-eval"
    parts = [
        f"# Quality benchmark ({model or run}{' LoRA' if lora else ''} run)",
        "",
        f"Written by `{command}`. Every number below comes from this one run.",
        "",
        *(
            [
                f"**Partial run**: {sum(r['variant'] == 'plain' for r in rows)} of "
                f"the {document['planned_merges']} planned merges are scored.",
                "",
            ]
            if document.get("complete") is False
            else []
        ),
        "## Setup",
        "",
        *setup,
        "",
    ]
    if spread:
        parts += [
            "## The base's statistic",
            "",
            f"Over the {spread['tensors']} relaxed tensors, quantiles of per-tensor "
            "figures of `s = a / max(a)`, the factor AIM scales each input "
            "channel's pull toward the base by (flat: AIM is uniform shrinkage; "
            "peaked: a targeted edit of a few channels).",
            "",
            importance_table(spread),
            "",
        ]
    if has_blocks:
        parts += [
            "## Effects with their spread",
            "",
            "Paired differences on the same test blocks (losses: "
            + (
                "each document's bits per byte, "
                if harness
                else "each block's mean NLL in nats, "
            )
            + "positive = lower loss; exact match: each item, in "
            "points, positive = more correct). *mean diff* is the mean over "
            "merges of each merge's mean block difference; the 95% interval is a "
            "percentile bootstrap over test blocks (one resample of block indices "
            "shared by all merges, 2000 resamples): an interval that excludes 0 "
            "means the sign does not depend on which test texts were drawn. "
            "*W–T–L*: merges where the variant is better, equal, worse on that "
            "task. Rows per weighting follow each comparison's pooled row.",
            "",
            effect_table(rows, omega),
            "",
        ]
    if any(r["variant"] in TUNED for r in rows) and harness:
        parts += [
            "## The tuned pick against the target",
            "",
            f"Target: the tuned pick keeps every merged expert's exact match within "
            f"{TARGET_POINTS:g} points of the plain merge on the test split, and wins "
            f"back ≥ {100 * TARGET_RECOVERY:.0f}% of the general damage (plain − base "
            "bits per byte, where positive) on average. ω is chosen on the "
            "validation split only (*val*: the chosen candidate's exact match − the "
            "plain merge's there, the skill floor's evidence).",
            "",
        ]
        for variant in TUNED:
            summary, table = target_table(rows, variant, TARGET_POINTS, TARGET_RECOVERY)
            parts += [summary, "", table, ""] if table else [summary, ""]
    parts += [
        "## Reference models",
        "",
        references_table(rows),
        "",
        "## Hypervolume (gain vs plain)",
        "",
        hypervolume_table(volumes),
        "",
        "## AIM and the controls, over all merges",
        "",
        "Mean change of the normalized score (variant − plain) per task, over the "
        "merges whose expert set includes that task (general: all); *Δ mean* is "
        "the change of the mean over the set's objectives; *beats* counts merges "
        "whose mean score is higher.",
        "",
        controls_summary(rows, omega),
        "",
        tuned_summary(rows),
        "",
        f"## Relative change, AIM (ω = {omega:g}) vs plain",
        "",
        "Per task, % change of the metric (seeds averaged first); positive "
        "= AIM better (higher accuracy, lower loss); n/a where the plain merge "
        "scores 0.",
        "",
        relative_change_table(rows, omega),
        "",
        "## Relative change, tuned ω vs plain",
        "",
        relative_change_table(rows, omega, variant="tuned"),
        "",
        *(
            [
                "## Relative change, tuned attention/MLP ω vs plain",
                "",
                relative_change_table(rows, omega, variant="tuned-split"),
                "",
            ]
            if any(r["variant"] == "tuned-split" for r in rows)
            else []
        ),
        f"## ω sweep, {set_name(triple)}",
        "",
        "All merges of the triple (methods, weightings, seeds) at each ω; "
        "ω = 1 is the plain merge.",
        "",
        sweep_table(rows, triple),
        "",
        "## All merges (test metrics)",
        "",
        absolute_table(rows, omega),
        "",
        "![Pareto plot](quality.png)",
        "",
        f"Run time: {document['seconds']:.0f} s ({merge_seconds:.0f} s merging, "
        "relaxing and scoring); "
        f"torch {document['machine']['torch']}, "
        f"{document['machine']['threads']} thread(s).",
        "",
    ]
    return "\n".join(parts)


# --- the statistic, and effects with their spread ----------------------------------


def importance_spread(importance: Any) -> dict[str, Any]:
    """How concentrated the base's statistic is, per relaxed tensor.

    ``s = a / max(a)`` is what AIM scales the delta by: a flat statistic
    (mean s near 1) makes AIM uniform shrinkage; a few outlier channels
    (small mean s, large max/median) make it a targeted edit. Norm weights
    are elementwise and included like the rest.
    """
    import torch

    per_tensor = {}
    for name in importance:
        stat = importance.mean(name).float()
        peak = float(stat.max())
        if peak <= 0:
            continue
        s = stat / peak
        median = float(stat.median())
        per_tensor[name] = {
            "mean_s": float(s.mean()),
            "max_over_median": peak / median if median > 0 else math.inf,
            "share_above_half": float((s > 0.5).float().mean()),
        }
    columns = {
        key: torch.tensor([v[key] for v in per_tensor.values()])
        for key in ("mean_s", "max_over_median", "share_above_half")
    }
    quantiles = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    return {
        "tensors": len(per_tensor),
        "quantiles": [0.0, 0.1, 0.5, 0.9, 1.0],
        **{
            key: [round(float(q), 4) for q in torch.quantile(col, quantiles)]
            for key, col in columns.items()
        },
    }


def importance_table(spread: Mapping[str, Any]) -> str:
    labels = {
        "mean_s": "mean s over the tensor",
        "max_over_median": "max / median of a",
        "share_above_half": "share of channels with s > 0.5",
    }
    header = ["per tensor", "min", "10%", "median", "90%", "max"]
    body = [
        [labels[key], *(f"{v:.3g}" for v in spread[key])]
        for key in ("mean_s", "max_over_median", "share_above_half")
    ]
    return _table(header, body, right=5)


def block_differences(
    rows: Sequence[Mapping[str, Any]], variant: str, against: str, omega: float
) -> dict[str, list[tuple[tuple, list[float]]]]:
    """Per task: for every merge that has both, (merge key, per-block
    ``variant − against`` differences, oriented so positive = ``variant``
    better). ``variant``/``against`` rows are taken at ``omega`` unless they
    are ``plain`` or ``tuned``."""

    def pick(name: str) -> dict[tuple, Mapping[str, Any]]:
        chosen = {}
        for row in rows:
            if row["variant"] != name or "blocks" not in row:
                continue
            if name in FIXED_OMEGA and not math.isclose(row["omega"], omega):
                continue
            chosen[merge_key(row)] = row
        return chosen

    mine, theirs = pick(variant), pick(against)
    out: dict[str, list[tuple[tuple, list[float]]]] = defaultdict(list)
    for key in sorted(set(mine) & set(theirs), key=lambda k: (_order(k[:3]), k[3])):
        for task in TASKS:
            if task != "general" and task not in mine[key]["experts"]:
                continue
            sign = 1.0 if HIGHER_IS_BETTER[task] else -1.0
            a, b = mine[key]["blocks"][task], theirs[key]["blocks"][task]
            out[task].append((key, [sign * (x - y) for x, y in zip(a, b, strict=True)]))
    return dict(out)


def bootstrap_interval(
    differences: Sequence[Sequence[float]],
    *,
    samples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(mean, low, high) of the mean over merges of each merge's mean block
    difference, with a percentile bootstrap over evaluation blocks.

    All merges are scored on the same blocks, so one resample of block
    indices is applied to every merge: the interval reflects how much the
    conclusion depends on which test texts and items were drawn.
    """
    import torch

    table = torch.tensor([list(d) for d in differences], dtype=torch.float64)
    merges, blocks = table.shape
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, blocks, (samples, blocks), generator=generator)
    # [samples, merges]: each merge's mean over the resampled blocks
    means = table[:, index].mean(-1).T.mean(-1)
    low, high = torch.quantile(
        means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    )
    return float(table.mean()), float(low), float(high)


COMPARISONS = (
    ("aim", "plain"),
    ("aim", "uniform"),
    ("aim", "permuted"),
    ("uniform", "plain"),
    ("tuned", "plain"),
    ("tuned-split", "plain"),
    ("tuned-split", "tuned"),
)


def effect_table(rows: Sequence[Mapping[str, Any]], omega: float) -> str:
    """Paired differences per task, pooled over merges and by weighting."""
    header = ["comparison", "task", "merges", "weights", "mean diff", "95% CI", "W–T–L"]
    body = []
    for variant, against in COMPARISONS:
        diffs = block_differences(rows, variant, against, omega)
        for task in TASKS:
            entries = diffs.get(task, [])
            for weights in (None, "1", "1/k"):
                chosen = [d for k, d in entries if weights in (None, k[2])]
                if not chosen:
                    continue
                mean_, low, high = bootstrap_interval(chosen)
                totals = [sum(d) for d in chosen]
                record = "–".join(
                    str(n)
                    for n in (
                        sum(t > 0 for t in totals),
                        sum(t == 0 for t in totals),
                        sum(t < 0 for t in totals),
                    )
                )
                unit = 100 if task in ("math", "instructions") else 1
                fmt = "{:+.1f}" if unit == 100 else "{:+.4f}"
                body.append(
                    [
                        f"{variant} − {against}" if weights is None else "",
                        LABELS[task] if weights is None else "",
                        str(len(chosen)),
                        "all" if weights is None else weights,
                        fmt.format(unit * mean_),
                        f"[{fmt.format(unit * low)}, {fmt.format(unit * high)}]",
                        record,
                    ]
                )
    return _table(header, body, right=4)


def _toy_setup(document: Mapping[str, Any], agree: int, total: int) -> list[str]:
    s = document["settings"]
    omega = s["omega"]
    return [
        f"* Base: Llama, {s['num_layers']} layers, hidden {s['hidden_size']}, "
        f"vocabulary {s['vocab_size']} (byte-level BPE, digits split), trained from "
        f"scratch for {s['base_steps']} steps (batch {s['batch_size']} × "
        f"{s['seq_len']} tokens) on `builtin`'s mixed prose/code/math training split.",
        "* Experts, each fine-tuned from the base on one task: **code** "
        f"(`builtin` code, language-model loss, {s['code_steps']} steps, lr "
        f"{s['code_lr']:g}); **math** (a two-digit number plus or minus a one-digit "
        "number, bare or as a word problem) and **instructions** (reverse / "
        "uppercase / sort / count / largest over 3–5 spaced characters), each "
        f"{s['train_items']} generated items, loss on the answer only, "
        f"{s['item_steps']} steps of {s['item_batch_size']} items, lr "
        f"{s['item_lr']:g}, each step plus the language-model loss on "
        f"{s['replay_batch_size']} replayed blocks of the base's training text.",
        f"* Metrics on the test split: exact match (%) of the greedy answer on "
        f"{s['test_items']} math and {s['test_items']} instruction items; held-out "
        f"loss (nats/token) on ~{s['heldout_chars'] // 1000}k characters of `builtin` "
        "code and of prose (*general*: only the base was trained on prose).",
        "  Exact match is computed in one teacher-forced pass, which equals greedy "
        f"decoding's verdict; real greedy decoding agreed on {agree}/{total} "
        "checked items.",
        f"* AIM: the base calibrated on `builtin` ({s['calibration_samples']} texts "
        f"× 512 tokens, task-agnostic), ω = {omega:g}. Controls at the same ω: "
        "**uniform** (each tensor's delta scaled by the mean of AIM's factors "
        "over that tensor) and **permuted** (AIM with each tensor's importance "
        "vector randomly permuted). **tuned**: ω chosen per merge by "
        "`mergekit_aim.tuning.search.tune_merged` (validation split: held-out items "
        "and "
        "texts disjoint from the test split) from "
        f"{{{', '.join(f'{o:g}' for o in s['tune_omegas'])}}}.",
        "* Merges: every pair and the triple, with task_arithmetic, TIES, "
        f"DARE-TIES and DARE-linear (density {s['density']:g}; DARE over seeds "
        f"{', '.join(str(x) for x in s['dare_seeds'])}), expert weights 1 each and "
        "1/k each, through mergekit's `run_merge`; TIES normalizes by the weights, "
        "so it is merged with weights 1 only (its 1/k merge is the same up to float "
        "rounding).",
        "* Normalized scores: on an expert task 0 = base, 1 = that task's expert; "
        "on general 1 = base, 0 = the most forgetful expert. Hypervolume is taken "
        "over all merges of an expert set (methods, weightings, seeds) in the "
        "space of its tasks and general. **Reference point**: per expert set, the "
        "worst normalized score on each axis over all its merges and variants "
        "(ω sweep included) minus 10% of the axis' range, at least 0.05 (listed "
        "in the table); "
        "one reference per set, shared by all variants.",
    ]


def _real_setup(document: Mapping[str, Any], agree: int, total: int) -> list[str]:
    from benchmarks.real_models import model_spec

    s = document["settings"]
    lora = document.get("lora")
    spec = model_spec(document["model"])
    sets = [set_name(p) for p in s["pairs"] or ()] + [set_name(EXPERT_TASKS)]
    methods = ", ".join(SHORT[m] for m in s["methods"])
    return [
        f"* Base: **{spec.description}** ({spec.license}), provisioned offline by "
        "`benchmarks.real_models` (4-bit weights dequantised to bf16): a real "
        "pretrained model, not trained here.",
        (
            _lora_experts(s, lora)
            if lora
            else "* Experts, each the whole base fully fine-tuned on one task on the "
            "CPU (AdamW, warm-up and cosine decay, bf16 autocast, float32 weights "
            "and task vectors), with no replay of general text: " + _real_tasks(s)
        ),
        (
            _harness_metrics(document)
            if s.get("scorer") == "lm-eval"
            else _teacher_forced_metrics(s, agree, total)
        ),
        f"* AIM: the base calibrated on `builtin`'s {s['calibration_split']} split "
        f"({s['calibration_samples']} texts × 512 tokens; task-agnostic, disjoint "
        f"from every test text), ω = {s['omega']:g}. Controls at the same ω: "
        "**uniform** (each tensor's delta scaled by the mean of AIM's factors over "
        "that tensor: the same shrinkage, no activation information) and "
        "**permuted** (AIM with each tensor's statistic randomly permuted: the "
        "same factors on the wrong channels). "
        + (_LORA_AIM if lora else "")
        + _tuned_setup(s),
        (
            _lora_merges(s, lora, sets)
            if lora
            else f"* Merges through mergekit's `run_merge` ({methods}; density "
            f"{s['density']:g}; {_seeds(s)}) of {', '.join(sets)}, "
            "expert weights 1 each and 1/k each, in float32; TIES normalizes by "
            "the weights, so it is merged with weights 1 only (its 1/k merge is the "
            "same up to float rounding)."
            + (
                " The ω sweep runs on every merge of the triple."
                if s["sweep_omegas"]
                else ""
            )
        ),
        "* Normalized scores: on an expert task 0 = base, 1 = that task's expert; "
        "on general 1 = base, 0 = the most forgetful expert. Hypervolume is taken "
        "over all merges of an expert set in the space of its tasks and general; "
        "reference point per set: the worst normalized score on each axis over "
        "all its merges and variants minus 10% of the axis' range (at least 0.05).",
    ]


def _seeds(s: Mapping[str, Any]) -> str:
    seeds = s.get("expert_seeds") or ()
    if not seeds:
        return f"DARE over seeds {', '.join(str(x) for x in s['dare_seeds'])}"
    return (
        f"every expert trained once per training seed ({', '.join(map(str, seeds))}: "
        "same data and steps, its own batch order), each seed's experts merged "
        "with each other; a row's *seed* is its experts' training seed, and the "
        "normalized scores' expert reference is the mean over seeds"
    )


def _real_tasks(s: Mapping[str, Any]) -> str:
    return (
        f"**code** (`builtin` code, language-model loss, {s['code_steps']} steps "
        f"of {s['batch_size']} × {s['seq_len']} tokens, lr {s['code_lr']:g}); "
        "**math** (a two-digit number plus or minus a one-digit number, bare or "
        "as a word problem; the base answers none exactly) and **instructions** "
        "(reverse / uppercase / sort / count / largest over 3–5 spaced "
        f"characters), each from {s['train_items']} generated items, loss on the "
        f"answer and end-of-text only, {s['item_steps']} steps of "
        f"{s['item_batch_size']} items, lr {s['item_lr']:g}."
    )


def _lora_experts(s: Mapping[str, Any], lora: Mapping[str, Any]) -> str:
    return (
        f"* Experts, each a **LoRA adapter** (PEFT {lora['peft_version']}; rank "
        f"{lora['r']}, alpha {lora['lora_alpha']}, dropout {lora['lora_dropout']:g}, "
        f"on every attention and MLP linear: {', '.join(lora['target_modules'])}; "
        "the base frozen) trained on one task on the CPU with the full fine-tune "
        "run's data, steps, batches, schedule and seeds (AdamW, warm-up and "
        "cosine decay, bf16 autocast, float32 adapter weights) and a learning "
        f"rate {lora['lr_factor']:g}× the full fine-tune's: " + _real_tasks(s)
    )


def _lora_merges(
    s: Mapping[str, Any], lora: Mapping[str, Any], sets: Sequence[str]
) -> str:
    weightings = " and ".join(lora["weightings"])
    return (
        "* Merges through PEFT's `add_weighted_adapter` with the combination "
        f"types {', '.join(f'`{c}`' for c in lora['combinations'].values())} "
        f"(density {s['density']:g}; DARE over torch seeds "
        f"{', '.join(str(x) for x in s['dare_seeds'])}) of {', '.join(sets)} "
        f"(expert weights {weightings} each). These types merge the experts' "
        "`lora_A` matrices and their `lora_B` matrices separately, each scaled "
        "by the square root of its weight times its scaling, and keep the "
        f"rank: the merged adapter is a plain rank-{lora['r']} LoRA, not the "
        "TIES merge of the experts' `B A` products. "
        "PEFT's TIES divides by the number of agreeing experts, not by their "
        "weights, so weights 1/k scale the merge by 1/k. Every variant is scored "
        "as the full merges are: the adapter's delta added to the base's float32 "
        f"weights, the model then loaded in {s['eval_dtype']}."
        + (
            " The ω sweep runs on every merge of the triple."
            if len(s["sweep_omegas"]) > 1
            else ""
        )
    )


_LORA_AIM = (
    "On an adapter AIM is `relax_adapter_`: each `lora_A`'s input columns "
    "times AIM's factors, exactly AIM on the merged adapter's delta; the "
    "controls scale the same columns by their factors. Only the adapted "
    "linears move: norms and the LM head stay the base's in every variant "
    "(a full merge relaxes them too). "
)


def _omegas(values: Sequence[float]) -> str:
    return "{" + ", ".join(f"{o:g}" for o in values) + "}"


def _tuned_setup(s: Mapping[str, Any]) -> str:
    if s.get("scorer") != "lm-eval":
        return (
            "**tuned**: ω chosen per merge by `mergekit_aim.tuning.search."
            "tune_merged` on a validation split disjoint from the test split, "
            f"from {_omegas(s['tune_omegas'])}."
        )
    keep = dict(s["keep"])
    text = (
        "**tuned**: ω chosen per merge from "
        f"{_omegas(s['tune_omegas'])} by `mergekit_aim.tuning.tune_merged` "
        "(what `mergekit-aim tune --lm-eval` runs) on the validation split's "
        "lm-eval tasks (`aim_<task>_validation`: "
        f"{s['validation_items']} items per exact-match task, "
        f"~{s['validation_chars'] // 1000}k characters per loss task; disjoint "
        "from the test split) with **skill floors**: a candidate is eligible when "
        "each merged expert's validation metric is no worse than the plain "
        f"merge's by more than its tolerance (exact match {keep['math']:g}, code "
        f"{keep['code']:g} bits per byte); among eligible candidates (the plain "
        "merge always is) the lowest general bits per byte wins."
    )
    if s.get("split_omegas"):
        text += (
            " **tuned-split**: the same rule over a separate ω for MLP tensors and "
            f"for all others (attention), each from {_omegas(s['split_omegas'])}."
        )
    return text


def _harness_metrics(document: Mapping[str, Any]) -> str:
    s = document["settings"]
    return (
        "* Metrics on the test split through **lm-evaluation-harness** "
        f"{document.get('lm_eval_version', '')} (task YAMLs in "
        "`benchmarks/quality/lm_eval_tasks`, their data written by `python -m "
        f"benchmarks.quality.lm_eval_tasks --model {document['model']}`), the "
        f"model in {s['eval_dtype']}: exact match (%) of the greedy answer "
        "(`generate_until`, stop at a newline, whitespace stripped) on "
        f"{s['test_items']} math and {s['test_items']} instruction items "
        "(`aim_math`, `aim_instructions`); bits per byte of held-out text "
        "(`aim_code`, `aim_general`: lm-eval's rolling log-likelihood) on "
        f"~{s['heldout_chars'] // 1000}k characters of `builtin` code and of prose "
        "(*general*: held-out prose no expert saw, what the base knew), cut into "
        "documents of ≤ 600 characters (the paired statistics resample them)."
    )


def _teacher_forced_metrics(s: Mapping[str, Any], agree: int, total: int) -> str:
    return (
        f"* Metrics on the test split, scored in {s['eval_dtype']}: exact match (%) "
        f"of the greedy answer (answer then end-of-text) on {s['test_items']} math "
        f"and {s['test_items']} instruction items; held-out loss (nats/token, "
        f"blocks of {s['seq_len']} tokens) on ~{s['heldout_chars'] // 1000}k "
        "characters of `builtin` code and of prose (*general*: held-out prose "
        "no expert saw, what the base knew). Exact match is computed in one "
        "teacher-forced pass, which equals greedy decoding's verdict; real greedy "
        f"decoding agreed on {agree}/{total} checked expert items."
    )
