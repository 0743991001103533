"""Fixtures of the reliability tests: a tiny family with its artifact, and
helpers that run the CLI in-process and look for anything left behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mergekit_aim.output import PARTIAL


def calibrate_to(base: Path, text_file: Path, out: Path) -> Path:
    """A small calibration of ``base``, saved to ``out``."""
    from mergekit_aim import calibrate

    imap = calibrate(
        str(base),
        dataset=str(text_file),
        num_samples=48,
        seq_len=32,
        batch_size=4,
        quiet=True,
    )
    imap.save(out)
    return out


@pytest.fixture(scope="session")
def family(tiny_family) -> Any:
    return tiny_family("llama")


@pytest.fixture(scope="session")
def artifact(family, tiny_text_file, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability-artifact")
    return calibrate_to(family.base, tiny_text_file, root / "imp.safetensors")


def leftovers(directory: Path) -> list[str]:
    """Temporaries of ours anywhere under ``directory``."""
    return sorted(str(p) for p in Path(directory).rglob(f"*{PARTIAL}*"))


def invoke(*args: Any) -> Any:
    """``mergekit-aim ARGS`` in this process (click's runner): exit code,
    stdout and stderr apart."""
    from click.testing import CliRunner

    from mergekit_aim.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result: Any, *fragments: str) -> str:
    """The run failed with status 2 and exactly one line on stderr, an
    ``error:`` line holding every fragment; returns it."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def usage_error(result: Any, *fragments: str) -> str:
    """click refused an argument: status 2, its usage lines and one ``Error:``
    line holding every fragment; returns that line."""
    last = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 2 and last.startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in last, last
    return last
