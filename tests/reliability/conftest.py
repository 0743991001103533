"""Fixtures of the reliability tests: a tiny family and its artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fixtures.reliability import calibrate_to


@pytest.fixture(scope="session")
def family(tiny_family) -> Any:
    return tiny_family("llama")


@pytest.fixture(scope="session")
def artifact(family, tiny_text_file, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability-artifact")
    return calibrate_to(family.base, tiny_text_file, root / "imp.safetensors")
