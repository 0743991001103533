"""Real pretrained checkpoints, provisioned once per machine (see
``real_checkpoints.provision``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from real_checkpoints import provision


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct: Llama, 30 layers, hidden 576, tied embeddings,
    chat template; bf16 safetensors."""
    return provision("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3() -> Path:
    """Gemma-3-270M: 18 layers, hidden 640, vocabulary 262144, tied
    embeddings; bf16 safetensors."""
    return provision("gemma3-270m")
