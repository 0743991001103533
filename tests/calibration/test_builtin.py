"""The builtin corpus: determinism, domains, sizes, splits, and that its prose
and code are extracted from library sources at run time."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from mergekit_aim.calibration import builtin
from mergekit_aim.calibration.builtin import (
    BUILTIN_DOMAINS,
    BuiltinDocument,
    builtin_documents,
    builtin_fingerprint,
)
from mergekit_aim.errors import CalibrationDataError


def test_documents_are_deterministic_and_fingerprinted() -> None:
    first = builtin_documents()
    assert first == builtin_documents()
    assert all(isinstance(document, BuiltinDocument) for document in first)
    fingerprint = builtin_fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint)
    assert fingerprint == builtin_fingerprint()


def test_fingerprint_is_stable_across_processes() -> None:
    script = (
        "from mergekit_aim.calibration.builtin import builtin_fingerprint; "
        "print(builtin_fingerprint())"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == builtin_fingerprint()


def test_domains_sizes_and_document_lengths() -> None:
    documents = builtin_documents()
    counts = Counter(document.domain for document in documents)
    assert tuple(counts) == BUILTIN_DOMAINS  # grouped in the canonical order
    assert all(counts[domain] >= 600 for domain in BUILTIN_DOMAINS), counts
    assert len(documents) >= 3000
    lengths = [len(document.text) for document in documents]
    assert max(lengths) <= 1800
    in_range = sum(600 <= length <= 1800 for length in lengths)
    assert in_range / len(lengths) >= 0.85
    # Well over the paper's 256 x 512 calibration tokens, even at a generous
    # 4 characters per token.
    assert sum(lengths) / 4 >= 4 * 256 * 512


@pytest.mark.parametrize("domain", BUILTIN_DOMAINS)
def test_domain_selection(domain: str) -> None:
    selected = builtin_documents([domain])
    assert selected and {document.domain for document in selected} == {domain}
    assert builtin_documents(domain) == selected
    everything = builtin_documents()
    assert selected == [d for d in everything if d.domain == domain]


def test_heldout_and_train_partition_the_corpus() -> None:
    everything = builtin_documents(split="all")
    train = builtin_documents(split="train")
    heldout = builtin_documents(split="heldout")
    assert not {d.text for d in train} & {d.text for d in heldout}
    assert Counter(train) + Counter(heldout) == Counter(everything)
    assert 0.06 <= len(heldout) / len(everything) <= 0.14
    for domain in BUILTIN_DOMAINS:
        assert builtin_documents([domain], split="heldout")


def test_unknown_domain_and_split_are_refused() -> None:
    with pytest.raises(CalibrationDataError, match=r"'poetry'.*prose, code, math"):
        builtin_documents(["prose", "poetry"])
    with pytest.raises(CalibrationDataError, match=r"'validation'.*all, train"):
        builtin_documents(split="validation")
    with pytest.raises(CalibrationDataError, match="no builtin corpus domain"):
        builtin_documents([])


def test_code_documents_are_python_without_docstrings() -> None:
    for document in builtin_documents(["code"]):
        tree = ast.parse(document.text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                assert ast.get_docstring(node) is None, document.text


def test_math_answers_are_exact() -> None:
    # Every "a op b = c" written as a step (not the tail of a longer
    # expression) must be true.
    step = re.compile(r"(?<![-+*/(] )(?<![-\d.])(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)\b")
    checked = 0
    for document in builtin_documents(["math"]):
        for left, op, right, result in step.findall(document.text):
            a, b, c = int(left), int(right), int(result)
            expected = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
            assert expected == c, (left, op, right, result)
            checked += 1
    assert checked > 1000


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def test_prose_and_code_come_from_library_sources(tmp_path: Path) -> None:
    _write(
        tmp_path / "shapes.py",
        '''
        """Shapes on a plane, measured in whole units of length."""


        class Square:
            """A square described by the length of one of its sides."""

            def area(self):
                """The number of unit squares that cover this square."""
                return self.side * self.side

            def grow(self):
                """Make the square bigger."""


        def perimeter(side):
            # Four equal sides.
            return 4 * side
        ''',
    )
    _write(tmp_path / "test" / "test_shapes.py", '"""A test module never read."""\n')
    _write(tmp_path / "broken.py", "def broken(:\n")
    prose, code = builtin._source_units(tmp_path)
    assert prose == (
        "Shapes on a plane, measured in whole units of length.",
        "A square described by the length of one of its sides.",
        "The number of unit squares that cover this square.",
    )
    assert code == (
        "class Square:\n\n    def area(self):\n        return self.side * self.side\n"
        "\n    def grow(self):\n        ...",
        "def perimeter(side):\n    # Four equal sides.\n    return 4 * side",
    )


def test_missing_library_sources_are_reported(tmp_path: Path) -> None:
    with pytest.raises(CalibrationDataError, match=r"no \.py files.*math"):
        builtin._source_units(tmp_path / "nowhere")
