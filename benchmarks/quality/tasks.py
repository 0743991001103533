"""The benchmark's tasks: generated items with exact answers, and text splits.

Two tasks are scored by exact match of a greedy answer after a prompt:

* ``math``: a two-digit number plus or minus a one-digit one (results never
  negative), asked bare (``What is 47 + 8?``) or as a one-step word problem.
* ``instructions``: templated instructions over short sequences of single
  letters or digits, each with one checkable answer: reverse the letters,
  uppercase them, sort the numbers, count the letters, name the largest
  number. Items are spaced characters, so each is one token and the task is
  an operation on tokens rather than a spelling lookup.

Two are scored by held-out loss on ``builtin`` text (see
:mod:`mergekit_aim.calibration.builtin`): ``code`` (the code expert's domain)
and ``general`` (prose, which only the base was trained on: what the base
knew).

Every item is rendered as ``prompt + answer``; the prompt ends just before the
space that starts the answer, so that the prompt's tokens are a prefix of the
whole text's tokens. Splits are disjoint by prompt: validation and test items
are drawn first and training items never repeat one of their prompts.

The items, math and the split rules live in :mod:`mergekit_aim.demo.tasks`
(the real-model demo trains on them too); instructions are the benchmark's own.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from mergekit_aim.demo.tasks import (
    Item,
    ItemSplits,
    is_correct,
    item_splits,
    math_item,
    normalize_answer,
    text_splits,
)

EM_TASKS = ("math", "instructions")
LOSS_TASKS = ("code", "general")
TASKS = ("code", "math", "instructions", "general")
EXPERT_TASKS = ("code", "math", "instructions")

__all__ = [
    "EM_TASKS",
    "EXPERT_TASKS",
    "INSTRUCTIONS",
    "LOSS_TASKS",
    "TASKS",
    "Item",
    "ItemSplits",
    "instruction_item",
    "is_correct",
    "item_splits",
    "math_item",
    "normalize_answer",
    "text_splits",
]


# --- instructions ---------------------------------------------------------------


def _letters(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(string.ascii_lowercase) for _ in range(n)]


def _digits(rng: random.Random, n: int) -> list[str]:
    return [str(rng.randrange(10)) for _ in range(n)]


def _reverse(rng: random.Random, n: int) -> tuple[str, str]:
    items = _letters(rng, n)
    return f"Reverse the letters: {' '.join(items)}", " ".join(items[::-1])


def _uppercase(rng: random.Random, n: int) -> tuple[str, str]:
    items = _letters(rng, n)
    return f"Uppercase: {' '.join(items)}", " ".join(items).upper()


def _sort(rng: random.Random, n: int) -> tuple[str, str]:
    items = _digits(rng, n)
    return f"Sort these numbers: {' '.join(items)}", " ".join(sorted(items))


def _count(rng: random.Random, n: int) -> tuple[str, str]:
    items = _letters(rng, n)
    return f"Count the letters: {' '.join(items)}", str(len(items))


def _largest(rng: random.Random, n: int) -> tuple[str, str]:
    items = _digits(rng, n)
    return f"Largest number: {' '.join(items)}", max(items)


INSTRUCTIONS: dict[str, Callable[[random.Random, int], tuple[str, str]]] = {
    "reverse": _reverse,
    "uppercase": _uppercase,
    "sort": _sort,
    "count": _count,
    "largest": _largest,
}


def instruction_item(
    rng: random.Random, min_len: int = 3, max_len: int = 5, kind: str | None = None
) -> Item:
    """A random templated instruction over ``min_len``–``max_len`` characters."""
    kind = kind or rng.choice(sorted(INSTRUCTIONS))
    instruction, answer = INSTRUCTIONS[kind](rng, rng.randint(min_len, max_len))
    return Item(f"Instruction: {instruction}\nResponse:", f" {answer}")
