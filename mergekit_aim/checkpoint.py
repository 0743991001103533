"""What mergekit-aim needs to know about a checkpoint on disk, without loading it.

Tensor names and shapes come from safetensors headers (or a meta-device load of
``.bin`` shards); the fingerprint hashes names, dtypes, shapes and evenly spaced
samples of every tensor's bytes. Reading a few KiB per tensor keeps it cheap for
a 70B model, and any fine-tune changes the sampled bytes of the weights it
touched; it is an identity check, not a cryptographic digest of every byte.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from mergekit_aim.errors import AimConfigError

LOG = logging.getLogger(__name__)

FINGERPRINT_VERSION = "ckpt-v1"
_SAMPLES_PER_TENSOR = 4
_SAMPLE_BYTES = 4096


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str
    file: str


@dataclass(frozen=True)
class CheckpointIndex:
    """Tensor names, shapes and the fingerprint of one local checkpoint."""

    path: str
    tensors: dict[str, TensorInfo]
    fingerprint: str

    def shape(self, name: str) -> tuple[int, ...] | None:
        info = self.tensors.get(name)
        return None if info is None else info.shape

    def __contains__(self, name: object) -> bool:
        return name in self.tensors


def resolve_local_path(
    model: str, *, revision: str | None = None, cache_dir: str | None = None
) -> str:
    """A local directory for a model path or Hub id (weights, configs, tokenizer)."""
    if os.path.isdir(model):
        return model
    from mergekit.common import ModelPath, ModelReference

    try:
        return ModelReference(
            model=ModelPath(path=model, revision=revision)
        ).local_path(cache_dir=cache_dir)
    except Exception as error:  # the hub client raises many unrelated types
        raise AimConfigError(
            f"base model {model!r} is neither a local directory nor a reachable "
            f"Hugging Face model ({type(error).__name__}: {error})"
        ) from error


def safetensors_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise AimConfigError(f"{path} is not a safetensors file (truncated)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 1024 * 1024:
            raise AimConfigError(f"{path} has an implausible safetensors header")
        header = json.loads(handle.read(length))
    return header, 8 + length


def _hash_safetensors(path: str, digest: hashlib._Hash) -> dict[str, TensorInfo]:
    header, data_start = safetensors_header(path)
    infos = {}
    file_name = os.path.basename(path)
    with open(path, "rb") as handle:
        for name in sorted(k for k in header if k != "__metadata__"):
            entry = header[name]
            start, end = entry["data_offsets"]
            shape = tuple(int(d) for d in entry["shape"])
            infos[name] = TensorInfo(shape=shape, dtype=entry["dtype"], file=file_name)
            digest.update(f"{name}|{entry['dtype']}|{shape}|".encode())
            size = end - start
            if size <= _SAMPLES_PER_TENSOR * _SAMPLE_BYTES:
                offsets = [0] if size else []
                lengths = [size]
            else:
                step = (size - _SAMPLE_BYTES) // (_SAMPLES_PER_TENSOR - 1)
                offsets = [i * step for i in range(_SAMPLES_PER_TENSOR)]
                lengths = [_SAMPLE_BYTES] * _SAMPLES_PER_TENSOR
            for offset, length in zip(offsets, lengths):
                handle.seek(data_start + start + offset)
                digest.update(handle.read(length))
    return infos


def _hash_pickle(path: str, digest: hashlib._Hash) -> dict[str, TensorInfo]:
    import torch

    state = torch.load(path, map_location="meta", weights_only=True)
    if "state_dict" in state:
        state = state["state_dict"]
    file_name = os.path.basename(path)
    infos = {
        name: TensorInfo(tuple(t.shape), str(t.dtype).replace("torch.", ""), file_name)
        for name, t in state.items()
        if hasattr(t, "shape")
    }
    size = os.path.getsize(path)
    digest.update(f"{file_name}|{size}|".encode())
    with open(path, "rb") as handle:
        for i in range(_SAMPLES_PER_TENSOR * 4):
            handle.seek(
                max(0, size - _SAMPLE_BYTES) * i // (_SAMPLES_PER_TENSOR * 4 - 1)
            )
            digest.update(handle.read(_SAMPLE_BYTES))
    return infos


@lru_cache(maxsize=32)
def _read_index(path: str, mtimes: tuple[tuple[str, float], ...]) -> CheckpointIndex:
    from mergekit.io.lazy_tensor_loader import ShardedTensorIndex

    try:
        index = ShardedTensorIndex.from_disk(path)
    except RuntimeError as error:
        raise AimConfigError(f"no model weights found in {path}: {error}") from None
    digest = hashlib.sha256(FINGERPRINT_VERSION.encode())
    tensors: dict[str, TensorInfo] = {}
    for shard in sorted({os.path.join(path, f) for f in index.tensor_paths.values()}):
        if shard.endswith(".safetensors"):
            tensors.update(_hash_safetensors(shard, digest))
        else:
            tensors.update(_hash_pickle(shard, digest))
    return CheckpointIndex(path=path, tensors=tensors, fingerprint=digest.hexdigest())


def read_checkpoint(path: str | Path) -> CheckpointIndex:
    """Index and fingerprint a local checkpoint directory (cached per mtime)."""
    path = os.path.abspath(str(path))
    if not os.path.isdir(path):
        raise AimConfigError(f"{path} is not a model directory")
    check_shards(path)
    mtimes = tuple(
        sorted(
            (entry.name, entry.stat().st_mtime)
            for entry in os.scandir(path)
            if entry.name.endswith((".safetensors", ".bin", ".json"))
        )
    )
    return _read_index(path, mtimes)


def check_shards(path: str) -> None:
    """Refuse a model directory whose index names a shard that is not there
    (an interrupted download or copy)."""
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(path, name)
        if not os.path.exists(index):
            continue
        try:
            with open(index, encoding="utf-8") as handle:
                files = set(json.load(handle)["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as error:
            raise AimConfigError(f"{index} is not a readable index: {error}") from None
        missing = sorted(f for f in files if not os.path.isfile(os.path.join(path, f)))
        if missing:
            raise AimConfigError(
                f"model directory {path} is missing {len(missing)} of the "
                f"{len(files)} shards its {name} names: {', '.join(missing[:3])}"
                f"{' …' if len(missing) > 3 else ''} (interrupted download or copy?)"
            )


_FLOAT_DTYPES = {
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
}


def check_finite(name: str, values, source: str, dtype: str | None = None) -> None:
    """Refuse a tensor holding NaN or Inf: ``values`` is a tensor, or a
    tensor's raw bytes with its safetensors ``dtype`` (non-float dtypes pass).
    ``source`` says where the tensor comes from."""
    import torch

    from mergekit_aim.errors import NonFiniteError

    if dtype is not None:
        if dtype not in _FLOAT_DTYPES or not values:
            return
        values = torch.frombuffer(
            bytearray(values), dtype=getattr(torch, _FLOAT_DTYPES[dtype])
        )
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        raise NonFiniteError(
            f"tensor {name} of {source} holds NaN or Inf values; nothing was written"
        )


def forget_indexes() -> None:
    """Drop every index :func:`read_checkpoint` holds (benchmarks time cold reads)."""
    _read_index.cache_clear()
