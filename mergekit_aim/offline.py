"""AIM applied outside a mergekit run: to tensors, state dicts, or an
already-merged checkpoint on disk (what the paper's own code offers).

The checkpoint path streams tensor by tensor: each output shard is written with
the merged shard's own header (relaxation keeps names, shapes and dtypes), so
peak memory is a few tensors, not a model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_aim.card import relaxed_card
from mergekit_aim.checkpoint import safetensors_header
from mergekit_aim.config import PAPER_URL
from mergekit_aim.errors import AimConfigError, ImportanceError
from mergekit_aim.importance import ImportanceMap
from mergekit_aim.kernels import omega_value
from mergekit_aim.selection import Coverage, Selection, layer_positions, setting_json

LOG = logging.getLogger(__name__)


def relax(
    base: torch.Tensor,
    merged: torch.Tensor,
    importance: torch.Tensor,
    omega: float,
    input_axis: int = -1,
) -> torch.Tensor:
    """``B + (M − B)·(1 − s·(1 − ω))`` with ``s = |a|/max|a|`` along ``input_axis``."""
    from mergekit_aim.kernels import aim_relax

    return aim_relax(
        base, merged, importance, omega_value(omega), input_axis=input_axis
    )


def apply_aim(
    base_sd: Mapping[str, torch.Tensor],
    merged_sd: Mapping[str, torch.Tensor],
    importance: ImportanceMap,
    omega: Any,
    *,
    exclude: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Relax every tensor of ``merged_sd`` that the selection picks; copy the rest.

    ``omega`` is a scalar or any ``aim: {omega: ...}`` setting (filtered or a
    gradient over the layers, see :mod:`mergekit_aim.selection`); ``exclude``
    regexes leave tensors alone. Returns a new dict (inputs are not modified).
    Relaxed tensors must exist in ``base_sd`` with the merged tensor's shape.
    """
    selection = Selection(omega, exclude)
    positions = layer_positions(merged_sd)
    result = {}
    for name, merged in merged_sd.items():
        key = name if name in importance else None
        decision = selection.decide(name, key, positions[name])
        if not decision.relaxed:
            result[name] = merged
            continue
        base = base_sd.get(name)
        if base is None:
            raise ImportanceError(f"base state dict has no tensor {name}")
        if base.shape != merged.shape:
            raise ImportanceError(
                f"tensor {name}: base shape {tuple(base.shape)} differs from merged "
                f"{tuple(merged.shape)}"
            )
        result[name] = relax(
            base, merged, importance[name], decision.omega, importance.input_axis(name)
        )
    return result


# --- checkpoints on disk -----------------------------------------------------


def _shards(model_dir: str) -> dict[str, str]:
    """tensor name -> shard path, for a safetensors checkpoint directory."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(index):
        with open(index) as handle:
            weight_map = json.load(handle)["weight_map"]
        return {k: os.path.join(model_dir, v) for k, v in weight_map.items()}
    if os.path.exists(single):
        header, _ = safetensors_header(single)
        return {k: single for k in header if k != "__metadata__"}
    raise AimConfigError(
        f"{model_dir} has no model.safetensors[.index.json]; relax reads safetensors "
        f"checkpoints (re-save a .bin checkpoint with safe_serialization=True)"
    )


def relax_checkpoint(
    base_dir: str | os.PathLike,
    merged_dir: str | os.PathLike,
    importance: ImportanceMap,
    omega: Any,
    out_dir: str | os.PathLike,
    *,
    exclude: Iterable[str] = (),
    source: str = "",
) -> dict[str, object]:
    """Write AIM(base, merged) to ``out_dir`` and return a coverage report.

    ``omega`` is a scalar or any ``aim: {omega: ...}`` setting. Everything is
    checked before the output directory is created: shapes of base and merged
    tensors, the statistic lengths, and the artifact against the base model.
    ``out_dir`` gets the relaxed checkpoint, the merged model's other files,
    its card with an AIM section, and ``aim_relax.json`` (the report).
    """
    selection = Selection(omega, exclude)
    pair = check_pair(base_dir, merged_dir, importance, out_dir, source=source)
    coverage = write_relaxed(pair, importance, selection, out_dir)
    summary = coverage.summary()
    report = {
        "omega": setting_json(selection.omega),
        "exclude": list(selection.exclude),
        "relaxed": summary["relaxed"],
        "tensors": summary["tensors"],
        "left_alone": summary["tensors"] - summary["relaxed"],
        "coverage": summary,
        "base_model": str(base_dir),
        "merged_model": str(merged_dir),
        "importance": importance.provenance,
        "paper": PAPER_URL,
    }
    out_dir = Path(out_dir)
    previous = Path(merged_dir) / "README.md"
    card = previous.read_text(encoding="utf-8") if previous.exists() else ""
    (out_dir / "README.md").write_text(relaxed_card(card, report), "utf-8")
    (out_dir / "aim_relax.json").write_text(
        json.dumps(report, indent=2, sort_keys=True, default=str), "utf-8"
    )
    LOG.info(
        "AIM relax: relaxed %d of %d tensors (ω %s) into %s",
        summary["relaxed"],
        summary["tensors"],
        json.dumps(report["omega"]),
        out_dir,
    )
    return report


@dataclass(frozen=True)
class CheckpointPair:
    """A base checkpoint and a merge of it, checked to match tensor for tensor."""

    base_dir: str
    merged_dir: str
    base_shards: dict[str, str]
    merged_shards: dict[str, str]


def check_pair(
    base_dir: str | os.PathLike,
    merged_dir: str | os.PathLike,
    importance: ImportanceMap,
    out_dir: str | os.PathLike,
    *,
    source: str = "",
) -> CheckpointPair:
    """Refuse a merge that is not of ``base_dir``, an artifact of another base,
    or an output directory that is one of the inputs; reads headers only."""
    from mergekit_aim.checkpoint import read_checkpoint

    base_dir, merged_dir = str(base_dir), str(merged_dir)
    if Path(out_dir).resolve() in (
        Path(merged_dir).resolve(),
        Path(base_dir).resolve(),
    ):
        raise AimConfigError("the output directory must differ from base and merged")
    base_ckpt = read_checkpoint(base_dir)
    importance.check_against(base_ckpt, source=source or "importance")
    base_shards = _shards(base_dir)
    merged_shards = _shards(merged_dir)
    merged_ckpt = read_checkpoint(merged_dir)
    foreign = sorted(n for n in merged_shards if n not in base_shards)
    if foreign:
        raise ImportanceError(
            f"{merged_dir} is not a merge of {base_dir}: the base has no tensor "
            f"{', '.join(foreign[:3])}{' …' if len(foreign) > 3 else ''}"
        )
    for name in merged_shards:
        if base_ckpt.shape(name) != merged_ckpt.shape(name):
            raise ImportanceError(
                f"tensor {name}: merged shape {merged_ckpt.shape(name)} differs "
                f"from the base's {base_ckpt.shape(name)}"
            )
    return CheckpointPair(base_dir, merged_dir, base_shards, merged_shards)


def write_relaxed(
    pair: CheckpointPair,
    importance: ImportanceMap,
    selection: Selection,
    out_dir: str | os.PathLike,
) -> Coverage:
    """Stream the merge into ``out_dir`` with the selected tensors relaxed.

    Each output shard keeps the merged shard's header (names, shapes, dtypes);
    tensors left alone are copied byte for byte. The merge's other files are
    copied too, except its card (the caller writes the card). Relaxed values
    are ``relax(base, merged, ω)`` cast to the merged dtype, on the CPU.
    """
    from safetensors import safe_open

    positions = layer_positions(pair.merged_shards)
    coverage = Coverage()
    decisions = {}
    for name in sorted(pair.merged_shards):
        decision = selection.decide(
            name, name if name in importance else None, positions[name]
        )
        coverage.add(name, decision)
        decisions[name] = decision

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    handles: dict[str, Any] = {}

    def tensor(path: str, name: str) -> torch.Tensor:
        if path not in handles:
            handles[path] = safe_open(path, framework="pt")
        return handles[path].get_tensor(name)

    for shard in sorted(set(pair.merged_shards.values())):
        header, data_start = safetensors_header(shard)
        names = sorted(
            (k for k in header if k != "__metadata__"),
            key=lambda k: header[k]["data_offsets"][0],
        )
        target = out_dir / os.path.basename(shard)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=out_dir)
        with os.fdopen(fd, "wb") as out, open(shard, "rb") as raw:
            out.write(raw.read(data_start))  # same header: same names, shapes, dtypes
            for name in names:
                start, end = header[name]["data_offsets"]
                decision = decisions[name]
                if decision.relaxed:
                    merged = tensor(shard, name)
                    result = relax(
                        tensor(pair.base_shards[name], name),
                        merged,
                        importance[name],
                        decision.omega,
                        importance.input_axis(name),
                    ).to(merged.dtype)
                    data = result.contiguous().reshape(-1).view(torch.uint8)
                    out.write(data.numpy().tobytes())
                else:
                    raw.seek(data_start + start)
                    out.write(raw.read(end - start))
        os.replace(tmp, target)

    for entry in os.scandir(pair.merged_dir):
        if entry.is_file() and not entry.name.endswith(".safetensors"):
            if entry.name != "README.md":
                shutil.copy2(entry.path, out_dir / entry.name)
    return coverage


def load_importance(spec: str | None) -> ImportanceMap:
    from mergekit_aim.importance import resolve_artifact

    if not spec:
        raise AimConfigError("an importance artifact is required")
    return ImportanceMap.load(resolve_artifact(spec))
