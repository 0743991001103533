"""Shared fixtures: isolated caches, tiny text, a tokenizer, tiny checkpoints.

Everything is built locally; no test reaches the Hugging Face Hub. Heavy
imports (torch, transformers) happen inside fixtures so that the cache
environment below is in place before huggingface_hub reads it at import time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CACHE_ENV = "MERGEKIT_AIM_CACHE"
_ISOLATED_ROOT_KEY = pytest.StashKey[Path]()


def _isolated_environment(root: Path) -> dict[str, str]:
    return {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(root / "hf-home"),
        "HF_HUB_CACHE": str(root / "hf-home" / "hub"),
        "HF_DATASETS_CACHE": str(root / "hf-home" / "datasets"),
        CACHE_ENV: str(root / "mergekit-aim-cache"),
    }


def pytest_configure(config: pytest.Config) -> None:
    # huggingface_hub and datasets read these variables once, when first
    # imported, and test modules import them at collection: a fixture would be
    # too late, so the environment is set before collection starts.
    root = Path(tempfile.mkdtemp(prefix="mergekit-aim-tests-"))
    config.stash[_ISOLATED_ROOT_KEY] = root
    os.environ.update(_isolated_environment(root))


def pytest_unconfigure(config: pytest.Config) -> None:
    root = config.stash.get(_ISOLATED_ROOT_KEY, None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def isolated_caches(pytestconfig: pytest.Config) -> Iterator[dict[str, str]]:
    """The environment every test runs in: offline, with caches in a temp dir.

    Re-applied for the session in case anything changed it after collection;
    subprocesses inherit it. Yields the variables set.
    """
    env = _isolated_environment(pytestconfig.stash[_ISOLATED_ROOT_KEY])
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        yield env


@pytest.fixture(scope="session")
def tiny_text() -> list[str]:
    """400 seeded English-like sentences (≈5,000 tokens with ``tiny_tokenizer``)."""
    from benchmarks.synthetic import generate_sentences

    return generate_sentences(400, seed=0)


@pytest.fixture(scope="session")
def tiny_text_file(
    tmp_path_factory: pytest.TempPathFactory, tiny_text: list[str]
) -> Path:
    """``tiny_text`` as a calibration/eval ``.txt`` file, one sentence a paragraph."""
    path = tmp_path_factory.mktemp("tiny-text") / "tiny.txt"
    path.write_text("\n\n".join(tiny_text))
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_text: list[str]) -> Any:
    """A byte-level BPE tokenizer trained on ``tiny_text`` (BOS-prepending, chat
    template, ids 0–3 = ``<pad> <s> </s> <unk>``)."""
    from fixtures.tiny_models import CHAT_TEMPLATE

    from mergekit_aim.demo.models import train_tokenizer

    return train_tokenizer(tiny_text, vocab_size=1024, chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_family(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any
) -> Callable[[str], Any]:
    """``tiny_family(name) -> TinyFamily`` for ``"llama"``, ``"qwen2"``, ``"gpt2"``.

    Each family is built once per session under its own temp dir: ``base/``
    and two perturbed variants ``ft_a/``, ``ft_b/`` (float32 safetensors with
    config and tokenizer). Treat the directories as read-only.
    """
    from fixtures.tiny_models import FAMILIES, build_family

    built: dict[str, Any] = {}

    def get(family: str) -> Any:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
        if family not in built:
            root = tmp_path_factory.mktemp(f"tiny-{family}")
            built[family] = build_family(family, root, tiny_tokenizer, seed=0)
        return built[family]

    return get


@pytest.fixture(scope="session")
def cuda_device() -> Any:
    """``torch.device("cuda")``; the test is skipped where CUDA is unavailable."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")
