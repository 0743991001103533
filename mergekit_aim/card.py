"""The AIM section of a merged model's card (README.md)."""

from __future__ import annotations

import json
from typing import Any

import yaml

from mergekit_aim.config import PAPER_URL, AimConfig

_FRONT_MATTER = "---\n"


def add_aim_to_card(card: str, aim: AimConfig, report: dict[str, Any]) -> str:
    """Add the ``aim`` tag to the front matter and an AIM section at the end."""
    card = _add_tag(card, "aim")
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
    return card.rstrip("\n") + "\n" + "\n".join(lines) + "\n"


def _add_tag(card: str, tag: str) -> str:
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
