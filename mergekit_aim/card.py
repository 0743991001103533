"""Every text mergekit-aim writes into a model card (README.md).

Three paths write a card: a merge with an ``aim:`` block (:func:`add_aim_to_card`),
the post-hoc ``mergekit-aim relax`` (:func:`relaxed_card`) and ``mergekit-aim
tune`` (:func:`tuned_card`, and the ``aim_tune.md`` report). Each adds the
``aim`` tag to the front matter and one section at the end.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from mergekit_aim.config import PAPER_URL, AimConfig
from mergekit_aim.relaxation import elements_text

_FRONT_MATTER = "---\n"


def add_aim_to_card(card: str, aim: AimConfig, report: dict[str, Any]) -> str:
    """Add the ``aim`` tag to the front matter and an AIM section at the end."""
    card = add_tag(card, "aim")
    coverage = report["coverage"]
    provenance = report.get("provenance", {})
    calibration = provenance.get("calibration", {})
    left = ", ".join(f"{n} {why}" for why, n in coverage["left_alone"].items())
    lines = [
        "",
        "## Activation-Informed Merging",
        "",
        f"This merge was relaxed toward the base model with [AIM]({PAPER_URL}) "
        "(Nobari et al., *Activation-Informed Merging of Large Language Models*): "
        "on each weight, the input channels the base model uses most are pulled "
        "back toward the base.",
        "",
        f"* ω: `{json.dumps(aim.model_dump(mode='json')['omega'])}`",
        f"* relaxed: {coverage['relaxed']} of {coverage['tensors']} tensors"
        + (f"; left alone: {left}" if left else "")
        + "".join(
            f"; {name} tied to the input embedding, not relaxed"
            for name in coverage.get("tied_heads", ())
        ),
        f"* importance: {report['source']}",
    ]
    if "elements" in coverage:
        lines.insert(-1, f"* {elements_text(coverage)}")
    if provenance.get("base_fingerprint"):
        lines.append(f"* base fingerprint: `{provenance['base_fingerprint'][:16]}`")
    if calibration:
        lines.append(
            "* calibration: "
            + ", ".join(f"{k}={v}" for k, v in calibration.items() if v is not None)
        )
    if provenance.get("file_sha256"):
        lines.append(f"* artifact sha256: `{provenance['file_sha256']}`")
    if aim.exclude:
        lines.append(f"* excluded: {', '.join(f'`{p}`' for p in aim.exclude)}")
    lines.extend(_gap_lines(coverage))
    return card.rstrip("\n") + "\n" + "\n".join(lines) + "\n"


def _gap_lines(coverage: dict[str, Any]) -> list[str]:
    """The weights with an input that kept the merged value for lack of a
    statistic, and the experts without one."""
    lines = []
    if coverage.get("uncovered"):
        names = ", ".join(f"`{n}`" for n in coverage["uncovered"])
        lines.append(f"* no input statistic (merged value kept): {names}")
    if coverage.get("experts_without_statistic"):
        names = ", ".join(f"`{n}`" for n in coverage["experts_without_statistic"])
        lines.append(f"* experts without a statistic (merged value kept): {names}")
    return lines


def add_tag(card: str, tag: str) -> str:
    if not card.startswith(_FRONT_MATTER):
        return card
    end = card.find("\n---", len(_FRONT_MATTER))
    if end < 0:
        return card
    meta = yaml.safe_load(card[len(_FRONT_MATTER) : end]) or {}
    tags = list(meta.get("tags") or [])
    if tag not in tags:
        tags.append(tag)
    meta["tags"] = tags
    return _FRONT_MATTER + yaml.dump(meta) + card[end + 1 :]


def relaxed_card(card: str, report: dict[str, Any]) -> str:
    """The merged model's card with the section ``mergekit-aim relax`` adds."""
    omega = report["omega"]
    omega_text = (
        f"ω = {omega:g}" if isinstance(omega, float) else (f"ω `{json.dumps(omega)}`")
    )
    coverage = report.get("coverage", {})
    elements = f"; {elements_text(coverage)}" if "elements" in coverage else ""
    gaps = "".join(line + "\n" for line in _gap_lines(coverage))
    section = (
        "\n## Activation-Informed Merging\n\n"
        f"Relaxed after merging with [AIM]({PAPER_URL}) at {omega_text}: "
        f"{report['relaxed']} of {report['tensors']} tensors, toward base model "
        f"`{report['base_model']}`{elements}.\n" + ("\n" + gaps if gaps else "")
    )
    return add_tag(card, "aim").rstrip("\n") + "\n" + section


def _tuned_omega_text(result: Any) -> str:
    chosen = result.chosen
    if result.split_attention_mlp:
        return (
            f"ω = {chosen.omega_attention:g} (attention, norms, LM head) and "
            f"{chosen.omega_mlp:g} (MLP)"
        )
    return f"ω = {chosen.omega_attention:g}"


def tuned_card(card: str, result: Any, facts: dict[str, Any]) -> str:
    """The plain merge's card with the section ``mergekit-aim tune`` adds.

    ``result`` is the search's ``TuneResult``; ``facts`` holds ``base_model``,
    ``relaxed`` (tensor count), ``source`` (the importance), ``objective`` and
    ``scored_by`` (what the candidates were scored by).
    """
    chosen = result.chosen
    omega_text = _tuned_omega_text(result)
    if chosen.is_plain:
        what = (
            f"No candidate relaxed with [AIM]({PAPER_URL}) beat the plain merge on "
            f"the eval data, so this is the plain merge ({omega_text})"
        )
    else:
        what = (
            f"The merge above, relaxed toward base model `{facts['base_model']}` "
            f"with [AIM]({PAPER_URL}) at {omega_text} ({facts['relaxed']} tensors)"
        )
    section = (
        "\n## Activation-Informed Merging: ω chosen by `mergekit-aim tune`\n\n"
        f"{what}. ω was chosen among {len(result.rows)} candidates by "
        f"{facts['scored_by']}; objective: "
        f"{facts['objective']}. Importance: {facts['source']}.\n\n"
        f"{_as_aim_block(chosen)}\n\n{result.to_markdown()}\n"
    )
    return add_tag(card, "aim").rstrip("\n") + "\n" + section


def tune_report(result: Any, facts: dict[str, Any]) -> str:
    """``aim_tune.md``: the pick and the whole table."""
    return (
        f"# mergekit-aim tune\n\nConfig `{facts['config']}`; chosen "
        f"{_tuned_omega_text(result)}.\n\n{_as_aim_block(result.chosen)}\n\n"
        f"Scored by {facts['scored_by']} (losses: lower is better). Objective: "
        f"{facts['objective']}.\n\n{result.to_markdown()}\n"
    )


def _as_aim_block(row: Any) -> str:
    from mergekit_aim.selection import setting_json

    return (
        "The same ω in a merge config's `aim:` block: "
        f"`omega: {json.dumps(setting_json(row.setting))}`."
    )
