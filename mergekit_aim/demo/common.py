"""What both demos share: the results table, the merge configs, thread count.

Each demo scores a base, two experts fine-tuned from it, their TIES merge and
the same merge with AIM by held-out loss on a few domains, and reports them in
one table (:class:`DemoResult`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OMEGA = 0.4
TIES, TIES_AIM = "TIES", f"TIES + AIM (ω={OMEGA})"


@dataclass
class DemoResult:
    """What a demo run measured and wrote.

    ``losses[row][column]`` is the held-out mean token NLL (nats) of model
    ``row`` (one of ``rows``) on ``column`` (one of ``domains``, or ``"mean"``
    over them). ``relative_change[column]`` is ``(TIES+AIM − TIES) / TIES``:
    negative means AIM lowered the loss.
    """

    out_dir: Path
    settings: Any
    losses: dict[str, dict[str, float]]
    relative_change: dict[str, float]
    models: dict[str, Path]
    importance: Path
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    rows: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.domains, "mean")

    def to_markdown(self) -> str:
        """The comparison table as GitHub markdown (losses in nats, lower is better)."""
        header = ["model", *self.columns]
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["---:"] * len(self.columns)) + "|",
        ]
        for row in self.rows:
            cells = [f"{self.losses[row][c]:.4f}" for c in self.columns]
            lines.append("| " + " | ".join([row, *cells]) + " |")
        cells = [f"{100 * self.relative_change[c]:+.2f}%" for c in self.columns]
        lines.append("| " + " | ".join(["TIES+AIM vs TIES", *cells]) + " |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "omega": OMEGA,
            "domains": list(self.domains),
            "losses": self.losses,
            "relative_change_aim_vs_ties": self.relative_change,
            "settings": asdict(self.settings),
            "models": {k: str(v) for k, v in self.models.items()},
            "importance": str(self.importance),
            "seconds": self.seconds,
            "timings": self.timings,
            **self.notes,
        }


def score_table(
    scores: dict[str, dict[str, float]], domains: Sequence[str]
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Add each row's mean over ``domains``; return it and AIM's relative change."""
    table = {
        row: {**values, "mean": sum(values[d] for d in domains) / len(domains)}
        for row, values in scores.items()
    }
    change = {
        c: (table[TIES_AIM][c] - table[TIES][c]) / table[TIES][c] for c in table[TIES]
    }
    return table, change


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` inside (``None``: as is)."""
    import torch

    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def merge_config(
    base: Path, experts: list[Path], density: float, importance: Path | None
) -> str:
    """The TIES merge of ``experts`` onto ``base`` as mergekit YAML; with
    ``importance``, an ``aim:`` block at ω = :data:`OMEGA` using that artifact."""
    import yaml

    config: dict[str, Any] = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(p), "parameters": {"weight": 1.0, "density": density}}
            for p in experts
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
    }
    if importance is not None:
        config["aim"] = {"omega": OMEGA, "importance": str(importance)}
    return yaml.safe_dump(config, sort_keys=False)
