"""ImportanceMap: the calibration artifact, and the only code that reads or writes it.

File format (safetensors):

* one 1-D float32 tensor per relaxable weight, keyed by that weight's checkpoint
  tensor name, holding the **sum** of |input| per input channel over every
  calibration token the module saw;
* header metadata (all strings): ``format``, ``format_version``, ``statistic``
  (what the sums are of: one of :data:`STATISTICS`; loading refuses others),
  ``counts`` (JSON: tensor name -> tokens summed), ``input_axes`` (JSON: tensor
  name -> the weight axis the channels run along: -1 for Linear ``[out, in]``,
  0 for GPT-2 Conv1D ``[in, out]`` and 1-D norm weights) and ``provenance``
  (JSON: base model id and fingerprint, calibration settings, data fingerprint).

Sums and counts (not means) make artifacts additive: runs, ranks and shards
combine by adding, as llama.cpp's imatrix and llm-compressor's observers do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from mergekit_aim.errors import ImportanceError

LOG = logging.getLogger(__name__)

FORMAT = "mergekit-aim.importance"
FORMAT_VERSION = 1
# The statistics this version can store and read. Calibration's observer
# names the one it measures from here; an artifact of any other statistic is
# refused on load rather than misread as this one.
STATISTIC = "sum_abs_input_per_channel"
STATISTICS: tuple[str, ...] = (STATISTIC,)


class ImportanceMap(Mapping[str, torch.Tensor]):
    """Per-channel activation sums of a base model, keyed by checkpoint tensor name.

    Maps name -> float32 sum vector. ``mean(name)`` divides by the token count.
    ``statistic`` names what the vectors sum (one of :data:`STATISTICS`).
    Instances are immutable by convention; ``combine`` returns a new map.
    """

    def __init__(
        self,
        sums: Mapping[str, torch.Tensor],
        counts: Mapping[str, int],
        input_axes: Mapping[str, int],
        provenance: Mapping[str, Any] | None = None,
        *,
        statistic: str = STATISTIC,
    ):
        if statistic not in STATISTICS:
            raise ImportanceError(
                f"unknown statistic {statistic!r}; this mergekit-aim supports "
                f"{', '.join(STATISTICS)}"
            )
        self.statistic = statistic
        missing = sorted(set(sums) ^ set(counts)) or sorted(set(sums) ^ set(input_axes))
        if missing:
            raise ImportanceError(
                f"sums, counts and input axes must name the same tensors; "
                f"mismatched: {missing[:5]}"
            )
        self._sums = {
            name: t.detach().to(device="cpu", dtype=torch.float32).contiguous()
            for name, t in sums.items()
        }
        self._counts = {name: int(c) for name, c in counts.items()}
        self._axes = {name: int(a) for name, a in input_axes.items()}
        self.provenance: dict[str, Any] = dict(provenance or {})
        self._on_device: dict[torch.device, dict[str, torch.Tensor]] = {}
        for name, vector in self._sums.items():
            if vector.ndim != 1:
                raise ImportanceError(
                    f"importance for {name} must be 1-D; got shape "
                    f"{tuple(vector.shape)}"
                )

    # Mapping protocol: name -> sum vector
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._sums[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sums)

    def __len__(self) -> int:
        return len(self._sums)

    def __repr__(self) -> str:
        base = self.provenance.get("base_model", "?")
        return f"ImportanceMap({len(self)} tensors, base={base!r})"

    def on_device(self, name: str, device: torch.device) -> torch.Tensor:
        """``self[name]`` on ``device``.

        The first call for a device other than the CPU copies every vector
        there at once, in one transfer: a merge relaxing on a GPU would
        otherwise copy one small vector per tensor from pageable memory, and
        each such copy makes the host wait for the GPU.
        """
        if device.type == "cpu":
            return self._sums[name]
        vectors = self._on_device.get(device)
        if vectors is None:
            names = list(self._sums)
            flat = torch.cat([self._sums[n] for n in names]).to(device)
            sizes = [self._sums[n].numel() for n in names]
            vectors = dict(zip(names, flat.split(sizes), strict=True))
            self._on_device[device] = vectors
        return vectors[name]

    def count(self, name: str) -> int:
        return self._counts[name]

    def input_axis(self, name: str) -> int:
        return self._axes[name]

    def mean(self, name: str) -> torch.Tensor:
        """Per-token mean |input| per channel (the paper's statistic)."""
        return self._sums[name] / max(self._counts[name], 1)

    @property
    def base_fingerprint(self) -> str | None:
        return self.provenance.get("base_fingerprint")

    def combine(self, other: ImportanceMap) -> ImportanceMap:
        """Add two artifacts of the same base model (runs, ranks, shards)."""
        if set(self) != set(other):
            diff = sorted(set(self) ^ set(other))
            raise ImportanceError(f"cannot combine: tensors differ, e.g. {diff[:5]}")
        if self.base_fingerprint != other.base_fingerprint:
            raise ImportanceError("cannot combine artifacts of different base models")
        if self.statistic != other.statistic:
            raise ImportanceError(
                f"cannot combine artifacts of different statistics "
                f"({self.statistic} and {other.statistic})"
            )
        for name in self:
            if self._axes[name] != other._axes[name]:
                raise ImportanceError(f"cannot combine: input axis differs for {name}")
            if self._sums[name].shape != other._sums[name].shape:
                raise ImportanceError(f"cannot combine: length differs for {name}")
        provenance = dict(self.provenance)
        provenance["combined"] = int(provenance.get("combined", 1)) + int(
            other.provenance.get("combined", 1)
        )
        return ImportanceMap(
            {n: self._sums[n] + other._sums[n] for n in self},
            {n: self._counts[n] + other._counts[n] for n in self},
            self._axes,
            provenance,
            statistic=self.statistic,
        )

    # --- file format -------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a reader sees the old file or the whole new one.

        The file is serialised first, so that a filesystem without room for
        it is refused before anything is written (see :mod:`mergekit_aim.output`).
        """
        from safetensors.torch import save

        from mergekit_aim.output import staged_file

        path = Path(path)
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "statistic": self.statistic,
            "counts": json.dumps(self._counts, sort_keys=True),
            "input_axes": json.dumps(self._axes, sort_keys=True),
            "provenance": json.dumps(self.provenance, sort_keys=True, default=str),
        }
        data = save(dict(self._sums), metadata=metadata)
        with staged_file(path, len(data)) as partial:
            partial.write_bytes(data)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ImportanceMap:
        """Read and validate an artifact; every defect names the file and tensor."""
        from safetensors import safe_open

        path = str(path)
        if not os.path.isfile(path):
            raise ImportanceError(f"importance file not found: {path}")
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                sums = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:
            raise ImportanceError(
                f"{path} is not a readable safetensors importance file "
                f"(corrupt or truncated?): {error}"
            ) from None
        if metadata.get("format") != FORMAT:
            raise ImportanceError(
                f"{path} is not a mergekit-aim importance file (metadata format is "
                f"{metadata.get('format')!r}, expected {FORMAT!r})"
            )
        version = metadata.get("format_version")
        if version != str(FORMAT_VERSION):
            raise ImportanceError(
                f"{path} has format version {version}; this mergekit-aim reads "
                f"version {FORMAT_VERSION}"
            )
        statistic = metadata.get("statistic")
        if statistic not in STATISTICS:
            raise ImportanceError(
                f"{path} holds the statistic {statistic!r}, which this "
                f"mergekit-aim does not know (it supports "
                f"{', '.join(STATISTICS)}): refusing to use it as one of those"
            )
        try:
            counts = json.loads(metadata["counts"])
            axes = json.loads(metadata["input_axes"])
            provenance = json.loads(metadata.get("provenance", "{}"))
        except (KeyError, json.JSONDecodeError) as error:
            raise ImportanceError(f"{path} has corrupt metadata: {error}") from None
        for name, vector in sums.items():
            if vector.dtype != torch.float32 or vector.ndim != 1:
                raise ImportanceError(
                    f"{path}: tensor {name} must be 1-D float32; got "
                    f"{vector.dtype} {tuple(vector.shape)}"
                )
            if not bool(torch.isfinite(vector).all()) or bool((vector < 0).any()):
                raise ImportanceError(
                    f"{path}: tensor {name} holds negative or non-finite sums"
                )
            if name not in counts or name not in axes:
                raise ImportanceError(f"{path}: no token count or axis for {name}")
            if int(counts[name]) <= 0:
                raise ImportanceError(f"{path}: token count of {name} is not positive")
        # This file, even where the map was saved from one loaded elsewhere:
        # refusals name the file the user gave.
        provenance["file"] = os.path.abspath(path)
        provenance["file_sha256"] = file_sha256(path)
        return cls(sums, counts, axes, provenance, statistic=statistic)

    # --- checks against a base checkpoint -----------------------------------

    def check_against(self, checkpoint, *, source: str = "importance") -> None:
        """Refuse an artifact that does not belong to ``checkpoint``.

        ``checkpoint`` is a :class:`mergekit_aim.checkpoint.CheckpointIndex`.
        """
        where = self.provenance.get("file", source)
        for name, vector in self._sums.items():
            shape = checkpoint.shape(name)
            if shape is None:
                raise ImportanceError(
                    f"{where} has a statistic for tensor {name}, which the base "
                    f"model {checkpoint.path} does not have: the artifact was made "
                    f"for another model"
                )
            axis = self._axes[name]
            if not shape or not -len(shape) <= axis < len(shape):
                raise ImportanceError(
                    f"{where}: input axis {axis} is invalid for tensor {name} of "
                    f"shape {shape}"
                )
            if shape[axis] != vector.numel():
                raise ImportanceError(
                    f"{where}: tensor {name} has {vector.numel()} channels, but "
                    f"the base model's {name} has shape {shape} "
                    f"({shape[axis]} along axis {axis}): artifact for another model"
                )
        skipped = set(self.provenance.get("skipped", {}))
        _check_layer_coverage(set(self._sums), skipped, checkpoint, where)
        expected = self.base_fingerprint
        if expected and expected != checkpoint.fingerprint:
            raise ImportanceError(
                f"{where} was computed for a base model with fingerprint "
                f"{expected[:16]}…, but {checkpoint.path} has fingerprint "
                f"{checkpoint.fingerprint[:16]}…: recalibrate on this base model"
            )

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description for logs, cards and `mergekit-aim inspect`."""
        tokens = sorted(set(self._counts.values()))
        return {
            "tensors": len(self),
            "tokens": tokens[0] if len(tokens) == 1 else tokens,
            "provenance": self.provenance,
        }


def _check_layer_coverage(names: set, skipped: set, checkpoint, where: str) -> None:
    """A base tensor whose layer-less name the artifact covers must be covered.

    Catches artifacts of a shallower model of the same family, whose names are
    all valid in the base but which lack the deeper layers. Tensors calibration
    saw but could not measure (listed in provenance["skipped"], e.g. an MoE
    expert no token was routed to) are exempt.
    """
    patterns = {_layerless(name) for name in names}
    for name in checkpoint.tensors:
        if name not in names and name not in skipped and _layerless(name) in patterns:
            raise ImportanceError(
                f"{where} has no statistic for base tensor {name}, although it "
                f"covers the same weight in other layers: the artifact was made "
                f"for another model"
            )


_DIGITS = re.compile(r"\.\d+\.")


def _layerless(name: str) -> str:
    return _DIGITS.sub(".#.", name)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_LOADED: dict[tuple, ImportanceMap] = {}
_LOADED_LOCK = threading.Lock()


def load_cached(path: str) -> ImportanceMap:
    """Load once per process (per path and modification time).

    Merge workers look the same artifact up for every tensor; reading it once
    keeps AIM's per-tensor cost at one elementwise pass.
    """
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    with _LOADED_LOCK:
        found = _LOADED.get(key)
        if found is None:
            found = ImportanceMap.load(path)
            _LOADED[key] = found
        return found


def forget_loaded() -> None:
    """Drop every map :func:`load_cached` holds (benchmarks time cold loads)."""
    with _LOADED_LOCK:
        _LOADED.clear()


def resolve_artifact(spec: str, *, cache_dir: str | None = None) -> str:
    """A local path for ``path``, ``org/repo`` or ``org/repo:file.safetensors``."""
    if os.path.exists(spec):
        return spec
    repo, _, filename = spec.partition(":")
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo):
        raise ImportanceError(
            f"aim.importance {spec!r}: no such file, and not a Hub repository id "
            f"(expected a path, org/repo or org/repo:file.safetensors)"
        )
    filename = filename or DEFAULT_HUB_FILENAME
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, cache_dir=cache_dir)
    except Exception as error:  # offline, missing repo or file, network
        raise ImportanceError(
            f"aim.importance {spec!r}: could not get {filename} from the Hub "
            f"repository {repo} ({type(error).__name__}: {error}). Give a local "
            f"path, or publish the artifact as {repo}/{filename}"
        ) from None


DEFAULT_HUB_FILENAME = "aim_importance.safetensors"
