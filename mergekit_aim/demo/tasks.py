"""The demo's generated data: arithmetic items with exact answers, and splits.

``math`` items are a two-digit number plus or minus a one-digit one (results
never negative), asked bare (``What is 47 + 8?``) or as a one-step word
problem. Every item is rendered as ``prompt + answer``; the prompt ends just
before the space that starts the answer, so that the prompt's tokens are a
prefix of the whole text's tokens. Splits are disjoint by prompt: validation
and test items are drawn first and training items never repeat one of their
prompts. Text splits sample held-out documents (e.g. of ``builtin``) by size.

The real-model demo trains its math expert on these items, and the quality
benchmark (``benchmarks/quality``) builds its tasks from them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_NAMES = ("Ada", "Ben", "Cleo", "Dev", "Eli", "Faye", "Gus", "Hana", "Ivo", "Jun")
_THINGS = ("apples", "books", "coins", "shells", "stamps", "pencils", "cards")


@dataclass(frozen=True)
class Item:
    """One exact-answer example: the model sees ``prompt`` and must produce
    ``answer`` (which starts with a space) and then end the text."""

    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def normalize_answer(text: str) -> str:
    """The comparison form of an answer: surrounding and repeated spaces dropped."""
    return " ".join(text.split())


def is_correct(item: Item, generated: str) -> bool:
    """Whether a generated continuation is exactly ``item``'s answer."""
    return normalize_answer(generated) == normalize_answer(item.answer)


# --- math ---------------------------------------------------------------------


def _qa(question: str, answer: int) -> Item:
    return Item(f"Question: {question}\nAnswer:", f" {answer}")


def math_item(
    rng: random.Random,
    first: tuple[int, int] = (10, 99),
    second: tuple[int, int] = (1, 9),
) -> Item:
    """A random addition or subtraction of a number in ``first`` and one in
    ``second`` (inclusive ranges; either may come first, and subtraction
    always takes the smaller from the larger)."""
    a, b = rng.randint(*first), rng.randint(*second)
    if rng.random() < 0.5:
        a, b = b, a
    kind = rng.randrange(4)
    if kind in (1, 3) and a < b:
        a, b = b, a
    if kind == 0:
        return _qa(f"What is {a} + {b}?", a + b)
    if kind == 1:
        return _qa(f"What is {a} - {b}?", a - b)
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    if kind == 2:
        question = f"{name} has {a} {thing} and gets {b} more. How many now?"
        return _qa(question, a + b)
    question = f"{name} has {a} {thing} and gives away {b}. How many are left?"
    return _qa(question, a - b)


# --- splits ---------------------------------------------------------------------


@dataclass(frozen=True)
class ItemSplits:
    train: tuple[Item, ...]
    validation: tuple[Item, ...]
    test: tuple[Item, ...]


def item_splits(
    make: Callable[[random.Random], Item],
    *,
    train: int,
    validation: int,
    test: int,
    seed: int,
) -> ItemSplits:
    """Disjoint (by prompt) seeded train/validation/test items from ``make``.

    Test and validation items are distinct; training items may repeat each
    other (as any sampled training set does) but never an evaluation prompt.
    """
    rng = random.Random(seed)
    held: dict[str, Item] = {}
    limit = 100 * (validation + test + 1)
    for _ in range(limit):
        if len(held) == validation + test:
            break
        item = make(rng)
        held.setdefault(item.prompt, item)
    if len(held) < validation + test:
        raise ValueError("the task has too few distinct prompts for its splits")
    evaluation = list(held.values())
    training: list[Item] = []
    for _ in range(100 * (train + 1)):
        if len(training) == train:
            break
        item = make(rng)
        if item.prompt not in held:
            training.append(item)
    return ItemSplits(
        tuple(training), tuple(evaluation[:validation]), tuple(evaluation[validation:])
    )


def text_splits(
    texts: Sequence[str], *, validation: int, test: int, seed: int
) -> tuple[list[str], list[str]]:
    """Two disjoint seeded samples of ``texts``: about ``validation`` and
    ``test`` characters."""
    order = list(texts)
    random.Random(seed).shuffle(order)
    parts: list[list[str]] = [[], []]
    budgets, size, side = (validation, test), 0, 0
    for text in order:
        if size >= budgets[side]:
            side, size = side + 1, 0
            if side == len(budgets):
                break
        parts[side].append(text)
        size += len(text)
    return parts[0], parts[1]
