"""The ``builtin`` calibration corpus: task-agnostic text made on this machine.

AIM needs a calibration set that exercises the base model broadly (prose, code,
math/reasoning) without being any expert's task. ``builtin`` provides one that
works offline and ships no text with this package: every document is
assembled or generated at run time.

* ``prose``: docstrings (module, class, function) of the running Python
  installation's standard-library sources, read with :mod:`ast`; doctest
  examples are dropped so that the prose stays prose.
* ``code``: function and small-class sources from the same files, docstrings
  removed (they are prose, and keeping the two domains apart lets callers
  train or evaluate on one domain without leaking the other).
* ``math``: arithmetic chains, equations, word problems, sequences, number
  facts and comparisons with worked, exact answers, produced by a seeded
  :class:`random.Random` from templates written for this module.

The repository therefore contains only code and templates, never corpus text:
the prose and code are whatever the user's own Python ships, and the math is
computed. Units of one domain are packed in order into documents of roughly
600–1800 characters (code and math slightly shorter, as they tokenize more
densely), so that most documents fit in 512 tokens of common tokenizers.

The corpus is deterministic for a given Python installation (a sorted file
walk, a fixed seed), built once per process (about 1–2 s) and identified by
:func:`builtin_fingerprint`.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import logging
import math
import os
import random
import sysconfig
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from mergekit_aim.errors import CalibrationDataError

LOG = logging.getLogger(__name__)

BUILTIN_DOMAINS = ("prose", "code", "math")
BUILTIN_SPLITS = ("all", "train", "heldout")

# Bump whenever the extraction, generation or packing rules change, so that
# fingerprints (and every cache keyed on them) change with the corpus.
_FORMAT_VERSION = 1

# One in ten documents (by a hash of its text) is held out.
_HELDOUT_MODULUS = 10

# Standard-library directories that hold tests, test data, generated tables,
# vendored wheels or GUI demos rather than representative library code.
_SKIPPED_DIRS = frozenset(
    {
        "test",
        "tests",
        "site-packages",
        "dist-packages",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "ensurepip",
        "pydoc_data",
        "encodings",
        "lib-dynload",
        "__pycache__",
        "__phello__",
    }
)
_SKIPPED_FILES = frozenset({"this.py", "antigravity.py", "__hello__.py"})


@dataclass(frozen=True)
class BuiltinDocument:
    """One calibration document of the builtin corpus."""

    domain: str  # one of BUILTIN_DOMAINS
    text: str


@dataclass(frozen=True)
class _Packing:
    """How units of one domain are packed: a document is closed once it holds
    ``target`` characters and never grows beyond ``limit``; a unit longer
    than ``limit`` is not used."""

    target: int
    limit: int


_PACKING = {
    "prose": _Packing(target=1000, limit=1800),
    "code": _Packing(target=800, limit=1500),
    "math": _Packing(target=800, limit=1400),
}

# Enough generated documents that math is as well represented as the other
# domains; generation is cheap.
_MATH_DOCUMENTS = 1500
_MATH_SEED = 250202421


def builtin_documents(
    domains: Sequence[str] | None = None, split: str = "all"
) -> list[BuiltinDocument]:
    """Documents of the builtin corpus.

    ``domains`` selects any of :data:`BUILTIN_DOMAINS` (``None``: all; a plain
    string names one domain); documents come grouped in the order of
    :data:`BUILTIN_DOMAINS`, each domain in its fixed corpus order. ``split``
    is ``"all"``, ``"train"`` or ``"heldout"``: the held-out part is the ~10%
    of documents whose text hashes to 0 modulo 10, so it is stable across
    runs and machines with the same Python, and train and heldout partition
    the corpus.

    Raises CalibrationDataError for an unknown domain or split, or when the
    standard-library sources needed for ``prose``/``code`` cannot be found.
    """
    chosen = _check_domains(domains)
    if split not in BUILTIN_SPLITS:
        raise CalibrationDataError(
            f"unknown builtin corpus split {split!r}; choose one of "
            f"{', '.join(BUILTIN_SPLITS)}"
        )
    documents: list[BuiltinDocument] = []
    for domain in BUILTIN_DOMAINS:
        if domain not in chosen:
            continue
        for text in _domain_texts(domain):
            if split == "all" or (split == "heldout") == _is_heldout(text):
                documents.append(BuiltinDocument(domain=domain, text=text))
    return documents


@functools.lru_cache(maxsize=1)
def builtin_fingerprint() -> str:
    """sha256 hex digest of the whole corpus (all domains, in order) and its
    format version: equal fingerprints mean identical documents."""
    digest = hashlib.sha256(f"mergekit-aim builtin v{_FORMAT_VERSION}\n".encode())
    for domain in BUILTIN_DOMAINS:
        for text in _domain_texts(domain):
            data = text.encode("utf-8")
            digest.update(f"{domain}\0{len(data)}\0".encode())
            digest.update(data)
    return digest.hexdigest()


def _check_domains(domains: Sequence[str] | None) -> set[str]:
    if domains is None:
        return set(BUILTIN_DOMAINS)
    if isinstance(domains, str):
        domains = (domains,)
    if len(domains) == 0:
        raise CalibrationDataError(
            f"no builtin corpus domain selected; choose from "
            f"{', '.join(BUILTIN_DOMAINS)}"
        )
    for domain in domains:
        if domain not in BUILTIN_DOMAINS:
            raise CalibrationDataError(
                f"unknown builtin corpus domain {domain!r}; choose from "
                f"{', '.join(BUILTIN_DOMAINS)}"
            )
    return set(domains)


def _is_heldout(text: str) -> bool:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % _HELDOUT_MODULUS == 0


@functools.lru_cache(maxsize=len(BUILTIN_DOMAINS))
def _domain_texts(domain: str) -> tuple[str, ...]:
    """The packed documents of one domain (cached: built once per process)."""
    start = time.perf_counter()
    if domain == "math":
        units: Iterable[str] = _math_units(random.Random(_MATH_SEED))
        texts = _pack(units, _PACKING[domain], max_documents=_MATH_DOCUMENTS)
    else:
        prose, code = _stdlib_units()
        texts = _pack(prose if domain == "prose" else code, _PACKING[domain])
    LOG.debug(
        "builtin corpus: %d %s documents built in %.2f s",
        len(texts),
        domain,
        time.perf_counter() - start,
    )
    return tuple(texts)


def _pack(
    units: Iterable[str], packing: _Packing, max_documents: int | None = None
) -> list[str]:
    """Greedily join consecutive units (blank-line separated) into documents."""
    documents: list[str] = []
    current: list[str] = []
    size = 0
    for unit in units:
        if len(unit) > packing.limit:
            continue
        if current and size + 2 + len(unit) > packing.limit:
            documents.append("\n\n".join(current))
            current, size = [], 0
        current.append(unit)
        size += len(unit) + (2 if size else 0)
        if size >= packing.target:
            documents.append("\n\n".join(current))
            current, size = [], 0
        if max_documents is not None and len(documents) >= max_documents:
            return documents
    if current:
        documents.append("\n\n".join(current))
    return documents


# --------------------------------------------------------------------------
# prose and code: the standard library's own sources


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(root: Path) -> list[Path]:
    """Library ``.py`` files under ``root`` in a sorted, platform-stable order."""
    found: list[Path] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(
            name
            for name in subdirs
            if name not in _SKIPPED_DIRS and not name.startswith("config-")
        )
        for name in sorted(files):
            if (
                name.endswith(".py")
                and name not in _SKIPPED_FILES
                and not name.startswith("_sysconfigdata")
            ):
                found.append(Path(directory, name))
    return found


@functools.lru_cache(maxsize=1)
def _stdlib_units() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(prose units, code units) of this interpreter's standard library,
    parsed once for both domains since parsing dominates the cost."""
    return _source_units(_stdlib_root())


def _source_units(root: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(prose units, code units) extracted from the library sources under
    ``root``, in walk order."""
    files = _stdlib_files(root) if root.is_dir() else []
    if not files:
        raise CalibrationDataError(
            f"the builtin corpus reads its prose and code from the Python "
            f"standard library's sources, but no .py files were found under "
            f"{root}; use domains=('math',), or calibrate on another dataset "
            f"(pile-val or a local .txt/.jsonl/.parquet file)"
        )
    prose: list[str] = []
    code: list[str] = []
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            source = source.replace("\r\n", "\n").replace("\r", "\n")
            tree = ast.parse(source)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as error:
            # A file this interpreter cannot parse is not library text for
            # it; skipping keeps the corpus a function of the installation.
            LOG.debug("builtin corpus: skipping %s (%s)", path, error)
            continue
        lines = source.split("\n")
        prose.extend(_prose_units(tree))
        code.extend(_code_units(tree, lines))
    return tuple(prose), tuple(code)


_Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def _definitions(body: list[ast.stmt]) -> Iterator[_Definition]:
    """Functions and classes of a module or class body, classes followed by
    their members (functions' nested definitions belong to the function)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node
            if isinstance(node, ast.ClassDef):
                yield from _definitions(node.body)


def _prose_units(tree: ast.Module) -> Iterator[str]:
    limit = _PACKING["prose"].limit
    nodes: list[ast.Module | _Definition] = [tree, *_definitions(tree.body)]
    for node in nodes:
        docstring = ast.get_docstring(node, clean=True)
        if not docstring:
            continue
        paragraphs = [
            paragraph.strip()
            for paragraph in docstring.split("\n\n")
            if paragraph.strip() and not paragraph.lstrip().startswith(">>>")
        ]
        text = "\n\n".join(paragraphs)
        # One-liners such as "Return x." carry little prose; skip them.
        if len(text) < 40:
            continue
        if len(text) <= limit:
            yield text
        else:
            yield from paragraphs


def _docstring_node(node: ast.Module | _Definition) -> ast.Expr | None:
    body = node.body
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        return body[0]
    return None


def _code_units(tree: ast.Module, lines: list[str]) -> Iterator[str]:
    """Sources of module-level functions and of classes (whole when short,
    else each method), with docstrings removed."""
    limit = _PACKING["code"].limit

    def visit(body: list[ast.stmt]) -> Iterator[str]:
        for node in body:
            if not isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
            ):
                continue
            # Spans several times the limit cannot shrink enough by losing
            # docstrings and indentation; skip the costly rendering.
            span = (node.end_lineno or node.lineno) - node.lineno + 1
            small = span <= limit // 8
            text = _definition_source(node, lines) if small else None
            if text is not None and len(text) <= limit:
                yield text
            elif isinstance(node, ast.ClassDef):
                yield from visit(node.body)

    yield from visit(tree.body)


def _nested_definitions(body: list[ast.stmt]) -> Iterator[_Definition]:
    """Every definition within ``body``, however deeply nested in other
    definitions or compound statements (expressions are not searched)."""
    for statement in body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield statement
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            inner = getattr(statement, field, None)
            if isinstance(inner, list):
                yield from _nested_definitions(inner)


def _definition_source(node: _Definition, lines: list[str]) -> str | None:
    """Dedented source of a definition (decorators included) without any
    docstring of it or of the definitions inside it; None where a docstring
    shares a line with other code (removing it would break the source) or
    the source cannot be dedented to column 0."""
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    last = node.end_lineno or node.lineno
    kept = dict(enumerate(lines[first - 1 : last], start=first))
    for current in (node, *_nested_definitions(node.body)):
        docstring = _docstring_node(current)
        if docstring is None:
            continue
        start, end = docstring.lineno, docstring.end_lineno or docstring.lineno
        if (
            lines[start - 1][: docstring.col_offset].strip()
            or lines[end - 1][docstring.end_col_offset or 0 :].strip()
        ):
            return None
        for number in range(start, end + 1):
            kept.pop(number, None)
        if len(current.body) == 1:
            # A body that was only a docstring needs a statement.
            kept[start] = lines[start - 1][: docstring.col_offset] + "..."
    text = textwrap.dedent("\n".join(kept[n] for n in sorted(kept)))
    text = text.strip("\n").rstrip()
    # A multi-line string indented less than the definition keeps dedent
    # from reaching column 0; such a unit would not be valid Python.
    if not text or text[0].isspace():
        return None
    return text


# --------------------------------------------------------------------------
# math: generated problems with worked, exact answers

_NAMES = (
    "Ada", "Bruno", "Chen", "Dalia", "Emil", "Farah", "Gus", "Hana", "Ivo",
    "Jun", "Kira", "Lars", "Mina", "Nils", "Omar", "Pia", "Quinn", "Rosa",
    "Sami", "Tess", "Umar", "Vera", "Wen", "Yara", "Zoe",
)  # fmt: skip
_ITEMS = (
    "apples", "pencils", "marbles", "stickers", "books", "cookies", "stamps",
    "shells", "cards", "buttons", "plums", "bottles", "tiles", "seeds",
)  # fmt: skip
_SHOP_ITEMS = (
    "notebooks", "pens", "mugs", "tickets", "plants", "lamps", "scarves",
    "puzzles", "candles", "maps",
)  # fmt: skip


def _math_units(rng: random.Random) -> Iterator[str]:
    """An endless stream of worked problems, each in one of a few layouts."""
    generators: tuple[Callable[[random.Random], tuple[str, str]], ...] = (
        _arithmetic_chain,
        _expression,
        _linear_equation,
        _shopping,
        _sharing,
        _travel,
        _discount,
        _ages,
        _rectangle,
        _clock,
        _sequence,
        _fraction_comparison,
        _ordering,
        _gcd_lcm,
        _primality,
        _remainder,
    )
    layouts = (
        "Problem: {q}\nSolution: {a}",
        "Question: {q}\nAnswer: {a}",
        "Q: {q}\nA: {a}",
        "Exercise. {q}\n\nWorked solution. {a}",
    )
    while True:
        layout = rng.choice(layouts)
        question, answer = rng.choice(generators)(rng)
        yield layout.format(q=question, a=answer)


def _arithmetic_chain(rng: random.Random) -> tuple[str, str]:
    start = value = rng.randint(2, 60)
    words, steps = [], []
    for _ in range(rng.randint(3, 5)):
        divisors = [d for d in range(2, 10) if value % d == 0 and value > d]
        operations = ["add", "subtract", "multiply"] + ["divide"] * bool(divisors)
        operation = rng.choice(operations)
        if operation == "add":
            operand = rng.randint(3, 90)
            result, sign, word = value + operand, "+", f"add {operand}"
        elif operation == "subtract":
            operand = rng.randint(1, max(1, value - 1))
            result, sign, word = value - operand, "-", f"subtract {operand}"
        elif operation == "multiply":
            operand = rng.randint(2, 9)
            result, sign, word = value * operand, "*", f"multiply by {operand}"
        else:
            operand = rng.choice(divisors)
            result, sign, word = value // operand, "/", f"divide by {operand}"
        words.append(word)
        steps.append(f"{value} {sign} {operand} = {result}.")
        value = result
    question = (
        f"Start with {start}, then {', '.join(words[:-1])} and finally "
        f"{words[-1]}. What number do you end with?"
    )
    answer = " ".join(steps) + f" The final number is {value}."
    return question, answer


def _expression(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 12)
    e = rng.randint(2, 9)
    d = e * rng.randint(1, 20)
    total = (a + b) * c - d // e
    question = f"Evaluate ({a} + {b}) * {c} - {d} / {e}."
    answer = (
        f"Parentheses first: {a} + {b} = {a + b}. Multiplication and division "
        f"come before subtraction: {a + b} * {c} = {(a + b) * c} and "
        f"{d} / {e} = {d // e}. Then {(a + b) * c} - {d // e} = {total}. "
        f"The value is {total}."
    )
    return question, answer


def _linear_equation(rng: random.Random) -> tuple[str, str]:
    x = rng.randint(-12, 25)
    a = rng.choice([n for n in range(-9, 13) if n not in (0, 1)])
    b = rng.randint(-50, 50)
    c = a * x + b
    sign, magnitude = ("+", b) if b >= 0 else ("-", -b)
    undo = f"Subtract {b}" if b >= 0 else f"Add {-b}"
    shown_x = f"({x})" if x < 0 else str(x)
    question = f"Solve for x: {a}x {sign} {magnitude} = {c}."
    answer = (
        f"{undo} on both sides: {a}x = {c - b}. Divide both sides by {a}: "
        f"x = {x}. Check: {a} * {shown_x} {sign} {magnitude} = {c}. So x = {x}."
    )
    return question, answer


def _shopping(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_SHOP_ITEMS)
    count, price = rng.randint(2, 9), rng.randint(2, 30)
    total = count * price
    bill = next(b for b in (10, 20, 50, 100, 200, 500) if b >= total)
    question = (
        f"{name} buys {count} {item} at ${price} each and pays with a ${bill} "
        f"bill. How much change does {name} get back?"
    )
    answer = (
        f"The {item} cost {count} * ${price} = ${total}. The change is "
        f"${bill} - ${total} = ${bill - total}."
    )
    return question, answer


def _sharing(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(2, 15)
    left = rng.randint(0, friends - 1)
    total = friends * each + left
    question = (
        f"{name} has {total} {item} and shares them equally among {friends} "
        f"friends, keeping whatever cannot be shared evenly. How many {item} "
        f"does each friend get, and how many does {name} keep?"
    )
    answer = (
        f"{total} divided by {friends} is {each} with remainder {left}, since "
        f"{friends} * {each} = {friends * each} and {total} - {friends * each} "
        f"= {left}. Each friend gets {each} {item} and {name} keeps {left}."
    )
    return question, answer


def _travel(rng: random.Random) -> tuple[str, str]:
    first_speed, first_hours = rng.randint(3, 12) * 10, rng.randint(1, 5)
    second_speed, second_hours = rng.randint(3, 12) * 10, rng.randint(1, 4)
    first, second = first_speed * first_hours, second_speed * second_hours
    vehicle = rng.choice(["train", "bus", "ferry", "truck"])
    question = (
        f"A {vehicle} travels at {first_speed} km/h for {first_hours} hours and "
        f"then at {second_speed} km/h for {second_hours} hours. How far does it "
        f"travel, and what is its average speed?"
    )
    distance, hours = first + second, first_hours + second_hours
    average = Fraction(distance, hours)
    shown = (
        str(average.numerator)
        if average.denominator == 1
        else f"{distance}/{hours} = {float(average):.2f}"
    )
    answer = (
        f"Distance is speed times time: {first_speed} * {first_hours} = {first} "
        f"km and {second_speed} * {second_hours} = {second} km, so {distance} km "
        f"in total. It took {hours} hours, so the average speed is {shown} km/h."
    )
    return question, answer


def _discount(rng: random.Random) -> tuple[str, str]:
    percent = rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 75])
    price = rng.randint(2, 40) * 20
    off = price * percent // 100
    item = rng.choice(["jacket", "bicycle", "chair", "radio", "tent", "kettle"])
    question = (
        f"A {item} costs ${price}. It is on sale for {percent}% off. What is "
        f"the sale price?"
    )
    answer = (
        f"{percent}% of ${price} is {price} * {percent} / 100 = ${off}. The "
        f"sale price is ${price} - ${off} = ${price - off}."
    )
    return question, answer


def _ages(rng: random.Random) -> tuple[str, str]:
    older, younger = rng.sample(_NAMES, 2)
    young_age, gap, years = rng.randint(3, 40), rng.randint(1, 30), rng.randint(1, 10)
    total = 2 * young_age + gap + 2 * years
    question = (
        f"{older} is {gap} years older than {younger}. In {years} years the "
        f"sum of their ages will be {total}. How old is {younger} now?"
    )
    answer = (
        f"Let {younger} be y years old now, so {older} is y + {gap}. In "
        f"{years} years the sum is (y + {years}) + (y + {gap} + {years}) = "
        f"2y + {gap + 2 * years}. So 2y + {gap + 2 * years} = {total}, "
        f"2y = {total - gap - 2 * years} and y = {young_age}. {younger} is "
        f"{young_age} and {older} is {young_age + gap}."
    )
    return question, answer


def _rectangle(rng: random.Random) -> tuple[str, str]:
    width = rng.randint(2, 30)
    length = width + rng.randint(1, 25)
    thing = rng.choice(["garden", "room", "field", "poster", "table top"])
    question = (
        f"A rectangular {thing} is {length} m long and {width} m wide. What are "
        f"its perimeter and its area?"
    )
    answer = (
        f"The perimeter is 2 * ({length} + {width}) = {2 * (length + width)} m. "
        f"The area is {length} * {width} = {length * width} square metres."
    )
    return question, answer


def _clock(rng: random.Random) -> tuple[str, str]:
    start = rng.randint(6 * 4, 18 * 4) * 15
    duration = rng.randint(2, 40) * 5
    end = start + duration
    question = (
        f"A meeting starts at {start // 60}:{start % 60:02d} and lasts "
        f"{duration} minutes. At what time does it end?"
    )
    answer = (
        f"{duration} minutes is {duration // 60} hours and {duration % 60} "
        f"minutes. Adding them to {start // 60}:{start % 60:02d} gives "
        f"{end // 60 % 24}:{end % 60:02d}."
    )
    return question, answer


def _sequence(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["arithmetic", "geometric", "squares", "fibonacci"])
    if kind == "arithmetic":
        start, step = rng.randint(-20, 50), rng.choice([n for n in range(-9, 13) if n])
        terms = [start + step * i for i in range(6)]
        reason = f"Each term is {abs(step)} {'more' if step > 0 else 'less'} "
        reason += "than the one before"
    elif kind == "geometric":
        start, ratio = rng.randint(1, 9), rng.randint(2, 4)
        terms = [start * ratio**i for i in range(6)]
        reason = f"Each term is {ratio} times the one before"
    elif kind == "squares":
        offset = rng.randint(1, 12)
        terms = [(offset + i) ** 2 for i in range(6)]
        reason = f"The terms are the squares {offset}^2, {offset + 1}^2, and so on"
    else:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        terms = [a, b]
        while len(terms) < 6:
            terms.append(terms[-1] + terms[-2])
        reason = "Each term is the sum of the two before it"
    shown, following = terms[:5], terms[5]
    question = (
        f"What number comes next in the sequence {', '.join(map(str, shown))}, ...?"
    )
    return question, f"{reason}, so the next term is {following}."


def _fraction_comparison(rng: random.Random) -> tuple[str, str]:
    while True:
        first = Fraction(rng.randint(1, 11), rng.randint(2, 12))
        second = Fraction(rng.randint(1, 11), rng.randint(2, 12))
        if first != second:
            break
    a, b = first.numerator, first.denominator
    c, d = second.numerator, second.denominator
    larger = first if first > second else second
    question = f"Which is larger, {a}/{b} or {c}/{d}?"
    answer = (
        f"Compare the cross products: {a} * {d} = {a * d} and {c} * {b} = "
        f"{c * b}. Since {max(a * d, c * b)} > {min(a * d, c * b)}, "
        f"{larger.numerator}/{larger.denominator} is larger. Their difference "
        f"is {abs(first - second)}."
    )
    return question, answer


def _ordering(rng: random.Random) -> tuple[str, str]:
    people = rng.sample(_NAMES, rng.randint(3, 5))
    quality, opposite = rng.choice(
        [("taller", "shortest"), ("older", "youngest"), ("faster", "slowest")]
    )
    facts = [
        f"{people[i]} is {quality} than {people[i + 1]}" for i in range(len(people) - 1)
    ]
    rng.shuffle(facts)
    question = (
        f"{'. '.join(facts)}. Who is the {opposite}, and how do all of them rank?"
    )
    answer = (
        f"Chaining the comparisons gives the order {' > '.join(people)} "
        f"(each {quality} than the next). So {people[-1]} is the {opposite}."
    )
    return question, answer


def _gcd_lcm(rng: random.Random) -> tuple[str, str]:
    factor = rng.randint(2, 15)
    a, b = factor * rng.randint(2, 20), factor * rng.randint(2, 20)
    steps, x, y = [], max(a, b), min(a, b)
    while y:
        steps.append(f"{x} = {x // y} * {y} + {x % y}")
        x, y = y, x % y
    gcd = math.gcd(a, b)
    question = (
        f"Find the greatest common divisor and least common multiple of {a} and {b}."
    )
    answer = (
        f"Euclid's algorithm: {'; '.join(steps)}. The last non-zero remainder "
        f"is {gcd}, so gcd({a}, {b}) = {gcd}. Then lcm = {a} * {b} / {gcd} = "
        f"{a * b // gcd}."
    )
    return question, answer


def _primality(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(20, 400)
    limit = math.isqrt(n)
    divisor = next((p for p in range(2, limit + 1) if n % p == 0), None)
    question = f"Is {n} a prime number?"
    if divisor is None:
        answer = (
            f"It suffices to try divisors up to the square root of {n}, which "
            f"is a little over {limit}. None of 2 to {limit} divides {n}, so "
            f"{n} is prime."
        )
    else:
        answer = f"No: {n} = {divisor} * {n // divisor}, so {n} is not prime."
    return question, answer


def _remainder(rng: random.Random) -> tuple[str, str]:
    divisor = rng.randint(3, 12)
    quotient = rng.randint(5, 120)
    remainder = rng.randint(0, divisor - 1)
    n = divisor * quotient + remainder
    weekday = rng.random() < 0.3
    if weekday:
        days = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
                "Saturday", "Sunday")  # fmt: skip
        today = rng.randrange(7)
        question = f"Today is {days[today]}. What day of the week is it in {n} days?"
        answer = (
            f"A week has 7 days and {n} = 7 * {n // 7} + {n % 7}, so whole weeks "
            f"do not matter and we move {n % 7} days on from {days[today]}: "
            f"{days[(today + n) % 7]}."
        )
        return question, answer
    question = f"What is the remainder when {n} is divided by {divisor}?"
    answer = (
        f"{divisor} * {quotient} = {divisor * quotient} and {n} - "
        f"{divisor * quotient} = {remainder}, which is less than {divisor}. "
        f"The remainder is {remainder}."
    )
    return question, answer
