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
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

EM_TASKS = ("math", "instructions")
LOSS_TASKS = ("code", "general")
TASKS = ("code", "math", "instructions", "general")
EXPERT_TASKS = ("code", "math", "instructions")

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
