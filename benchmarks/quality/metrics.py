"""Scoring: exact match, held-out loss, normalized scores and hypervolume.

Exact match is the greedy answer compared with the reference. It is computed
in one teacher-forced pass: greedy decoding emits the reference tokens and
then end-of-text exactly when, at every answer position, the model's argmax
given the reference prefix is the next reference token (and ``</s>`` after
the last). :func:`greedy_exact_match` decodes for real and is used to check
this equivalence on the experts in every run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.quality.tasks import Item, is_correct


@dataclass(frozen=True)
class ExactMatchSet:
    """Items tokenized once: ``ids`` right-padded, answers at ``[start, end)``."""

    items: tuple[Item, ...]
    ids: torch.Tensor
    starts: tuple[int, ...]
    ends: tuple[int, ...]

    @classmethod
    def build(cls, tokenizer: Any, items: Sequence[Item]) -> ExactMatchSet:
        rows, starts = [], []
        for item in items:
            prompt = tokenizer(item.prompt)["input_ids"]
            full = tokenizer(item.text)["input_ids"] + [tokenizer.eos_token_id]
            if full[: len(prompt)] != prompt:
                raise ValueError(
                    f"prompt {item.prompt!r} does not tokenize as a prefix of its "
                    f"item; the answer must start at a token boundary"
                )
            rows.append(full)
            starts.append(len(prompt))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return cls(tuple(items), ids, tuple(starts), tuple(len(r) for r in rows))


@torch.no_grad()
def exact_match_flags(
    model: Any, data: ExactMatchSet, *, batch_size: int = 128
) -> list[bool]:
    """Per item: does greedy decoding produce exactly the answer, then ``</s>``?"""
    flags: list[bool] = []
    model.eval()
    for lo in range(0, len(data.items), batch_size):
        ids = data.ids[lo : lo + batch_size]
        # Right padding never influences earlier positions of a causal model.
        predicted = model(input_ids=ids).logits.argmax(-1)
        for i in range(ids.shape[0]):
            start, end = data.starts[lo + i], data.ends[lo + i]
            flags.append(
                bool(torch.equal(predicted[i, start - 1 : end - 1], ids[i, start:end]))
            )
    return flags


def exact_match(model: Any, data: ExactMatchSet, *, batch_size: int = 128) -> float:
    """Fraction of items answered exactly by greedy decoding."""
    flags = exact_match_flags(model, data, batch_size=batch_size)
    return sum(flags) / len(flags)


@torch.no_grad()
def greedy_exact_match(
    model: Any, tokenizer: Any, items: Sequence[Item], *, max_new_tokens: int = 16
) -> list[bool]:
    """Per item: decode greedily after the prompt and compare the text."""
    flags = []
    model.eval()
    for item in items:
        prompt = torch.tensor([tokenizer(item.prompt)["input_ids"]])
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = out[0, prompt.shape[1] :].tolist()
        ended = tokenizer.eos_token_id in new
        if ended:
            new = new[: new.index(tokenizer.eos_token_id)]
        text = tokenizer.decode(new, skip_special_tokens=True)
        flags.append(ended and is_correct(item, text))
    return flags


# --- normalized scores and hypervolume ------------------------------------------


def normalized_scores(
    metrics: Mapping[str, float],
    base: Mapping[str, float],
    experts: Mapping[str, Mapping[str, float]],
    tasks: Sequence[str],
) -> dict[str, float]:
    """Each task's metric on a common scale where higher is better.

    An expert task (code loss, math/instruction accuracy) maps the base to 0
    and that task's own expert to 1. ``general`` maps the base to 1 and the
    most forgetful single expert (highest general loss) to 0.
    """
    scores = {}
    for task in tasks:
        if task == "general":
            worst = max(e["general"] for e in experts.values())
            span = worst - base["general"]
            scores[task] = (worst - metrics["general"]) / span if span else 0.0
        else:
            span = experts[task][task] - base[task]
            scores[task] = (metrics[task] - base[task]) / span if span else 0.0
    return scores


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Volume dominated by ``points`` (maximization) and bounded below by
    ``reference``; points not above the reference in every coordinate add
    nothing. Exact, by slicing along the last coordinate (fine for the few
    dozen points and ≤ 4 objectives used here)."""
    ref = tuple(float(r) for r in reference)
    kept = [
        tuple(float(x) for x in p)
        for p in points
        if len(p) == len(ref) and all(x > r for x, r in zip(p, ref))
    ]
    if any(len(p) != len(ref) for p in points):
        raise ValueError("every point needs one coordinate per reference coordinate")
    return _hv(kept, ref)


def _hv(points: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    if not points:
        return 0.0
    if len(ref) == 1:
        return max(p[0] for p in points) - ref[0]
    levels = sorted({p[-1] for p in points})
    volume, lower = 0.0, ref[-1]
    for level in levels:
        # Between `lower` and `level`, every point reaching `level` dominates.
        active = [p[:-1] for p in points if p[-1] >= level]
        volume += (level - lower) * _hv(active, ref[:-1])
        lower = level
    return volume


def reference_point(
    points: Sequence[Sequence[float]], margin: float = 0.1, floor: float = 0.05
) -> list[float]:
    """The nadir of ``points`` pushed out by ``margin`` of each axis' range
    (at least ``floor``): every point then adds volume, extreme ones included,
    and an axis on which all points agree is a constant factor, not a zero."""
    columns = list(zip(*points))
    return [min(c) - max(margin * (max(c) - min(c)), floor) for c in columns]


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates (maximization)."""
    front = []
    for i, p in enumerate(points):
        dominated = any(
            all(a >= b for a, b in zip(q, p)) and any(a > b for a, b in zip(q, p))
            for j, q in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def relative_change(aim: float, plain: float, *, higher_is_better: bool) -> float:
    """AIM's relative change over plain, positive when AIM is better
    (``nan`` when the plain value is zero)."""
    if plain == 0:
        return float("nan")
    change = (aim - plain) / abs(plain)
    return change if higher_is_better else -change


def mean(values: Sequence[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


__all__ = [
    "ExactMatchSet",
    "exact_match",
    "exact_match_flags",
    "greedy_exact_match",
    "hypervolume",
    "mean",
    "normalized_scores",
    "pareto_front",
    "reference_point",
    "relative_change",
]
