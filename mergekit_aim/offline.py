"""AIM applied outside a mergekit run: to tensors, state dicts, or an
already-merged checkpoint on disk (what the paper's own code offers).

The checkpoint path streams tensor by tensor: each output shard is written with
the merged shard's own header (relaxation keeps names, shapes and dtypes), so
peak memory is a few tensors, not a model.

A merge written by mergekit 0.1.5 names its tensors as transformers' model
does (a Mixtral's experts fused into ``mlp.experts.gate_up_proj`` ``[E, 2I, H]``,
its router ``mlp.gate.weight``), while the base checkpoint keeps the names it
was saved with. Such a tensor's base value is built from the base's checkpoint
tensors with mergekit's own conversion
(``mergekit.architecture.conversion.convert_checkpoint_tensors``), and a stack
of experts is relaxed slice by slice, each expert with its own statistic.

Every path here decides and relaxes through :mod:`mergekit_aim.relaxation`;
this module reads and writes (state dicts, checkpoints, reports).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_aim.card import relaxed_card
from mergekit_aim.checkpoint import check_finite, safetensors_header
from mergekit_aim.config import PAPER_URL
from mergekit_aim.errors import AimConfigError, ImportanceError
from mergekit_aim.importance import ImportanceMap
from mergekit_aim.output import check_target, staged_directory, staged_file
from mergekit_aim.relaxation import (
    Coverage,
    Relaxation,
    Statistic,
    check_statistic_shape,
    elements_text,
    find_statistic,
    relax_with,
)
from mergekit_aim.selection import Selection, setting_json

LOG = logging.getLogger(__name__)


def relax(
    base: torch.Tensor,
    merged: torch.Tensor,
    importance: torch.Tensor,
    omega: float,
    input_axis: int = -1,
) -> torch.Tensor:
    """``B + (M − B)·(1 − s·(1 − ω))`` with ``s = |a|/max|a|`` along ``input_axis``."""
    return relax_with(base, merged, importance, omega, input_axis)


def apply_aim(
    base_sd: Mapping[str, torch.Tensor],
    merged_sd: Mapping[str, torch.Tensor],
    importance: ImportanceMap,
    omega: Any,
    *,
    exclude: Iterable[str] = (),
    model: Any = None,
) -> dict[str, torch.Tensor]:
    """Relax every tensor of ``merged_sd`` that the selection picks; copy the rest.

    ``omega`` is a scalar or any ``aim: {omega: ...}`` setting (filtered or a
    gradient over the layers, see :mod:`mergekit_aim.selection`); ``exclude``
    regexes leave tensors alone. Returns a new dict (inputs are not modified).
    Relaxed tensors must exist in ``base_sd`` with the merged tensor's shape.

    The artifact is keyed by checkpoint names. State dicts of a transformers
    model name some tensors otherwise (transformers 5 stacks a mixture of
    experts into ``mlp.experts.gate_up_proj`` ``[E, 2I, H]``): given ``model``
    (that model, possibly on the meta device, its config, or a checkpoint
    directory), transformers' conversion finds their statistics, and a stack
    is relaxed slice by slice, each expert with its own. Without it such a
    stack is refused by name. Gaps in coverage are logged as warnings.
    """
    relaxation = Relaxation(Selection(omega, exclude), importance)
    name_map = None if model is None else _name_map(model, importance)
    result = relaxation.relax_state(base_sd, merged_sd, name_map=name_map)
    for gap in relaxation.coverage.gaps():
        LOG.warning(gap)
    return result


def _name_map(model: Any, importance: ImportanceMap) -> Any:
    """The :class:`~mergekit_aim.names.NameMap` from the artifact's checkpoint
    names to ``model``'s (a model, a config, or a checkpoint directory)."""
    from mergekit_aim.names import NameMap, meta_model, meta_model_for_config

    if isinstance(model, (str, os.PathLike)):
        built = meta_model(str(model))
    elif isinstance(model, torch.nn.Module):
        built = model
    else:
        built = meta_model_for_config(model)
    if built is None:
        raise AimConfigError(
            f"model: transformers has no model class for {model!r}, so the "
            f"artifact's checkpoint names cannot be mapped to the state dict's"
        )
    return NameMap.from_model(built, list(importance))


def model_type(model_dir: str | os.PathLike) -> str | None:
    """The ``model_type`` of a checkpoint's ``config.json`` (what selects
    transformers' conversion), or ``None``."""
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def vocabulary_names(model_dir: str | os.PathLike) -> set[str]:
    """Names of the tensors with a vocabulary axis (embeddings, LM heads), as
    mergekit's architecture for the checkpoint's config lists them; tensors
    with ``embed`` in their name count too where the architecture is unknown."""
    names: set[str] = set()
    try:
        from mergekit.architecture import arch_info_for_config
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model_dir))
        arch = arch_info_for_config(config)
        for weight in arch.all_weights(config) if arch is not None else ():
            if weight.vocabulary_axis is not None:
                names.update((weight.name, *(weight.aliases or ())))
    except Exception as error:  # unknown or custom architectures
        LOG.info("no architecture for %s (%s)", model_dir, error)
    return names


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
    check_target(out_dir, directory=True)
    pair = check_pair(base_dir, merged_dir, importance, out_dir, source=source)
    with staged_directory(out_dir, output_bytes(pair.merged_dir)) as stage:
        coverage = write_relaxed(pair, importance, selection, stage)
        report = _write_report(pair, importance, selection, coverage, stage)
    LOG.info(
        "AIM relax: relaxed %d of %d tensors, %s (ω %s) into %s",
        report["relaxed"],
        report["tensors"],
        elements_text(report["coverage"]),
        json.dumps(report["omega"]),
        out_dir,
    )
    return report


def output_bytes(merged_dir: str | os.PathLike) -> int:
    """What relaxing ``merged_dir`` writes: the same shards (same headers,
    same sizes), its other files, and room for the card and the report."""
    total = 1 << 20
    for entry in os.scandir(merged_dir):
        if entry.is_file():
            total += entry.stat().st_size
    return total


def _write_report(
    pair: CheckpointPair,
    importance: ImportanceMap,
    selection: Selection,
    coverage: Coverage,
    out_dir: Path,
) -> dict[str, object]:
    """Write the card and ``aim_relax.json`` into ``out_dir``; return the report."""
    base_dir, merged_dir = pair.base_dir, pair.merged_dir
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
    return report


@dataclass(frozen=True)
class CheckpointPair:
    """A base checkpoint and a merge of it, checked to match tensor for tensor.

    ``statistics`` maps each merged tensor to the base tensor (or checkpoint
    tensors, converted) it is relaxed toward and its statistic(s).
    """

    base_dir: str
    merged_dir: str
    base_shards: dict[str, str]
    merged_shards: dict[str, str]
    statistics: dict[str, Statistic]
    model_type: str | None = None


def check_pair(
    base_dir: str | os.PathLike,
    merged_dir: str | os.PathLike,
    importance: ImportanceMap,
    out_dir: str | os.PathLike,
    *,
    source: str = "",
) -> CheckpointPair:
    """Refuse a merge that is not of ``base_dir``, an artifact of another base,
    or an output directory that is one of the inputs; reads headers only.

    A merged tensor matches when the base has it under the same name and
    shape, or when the base's checkpoint tensors convert to it (transformers'
    conversion, as mergekit reads them): a renamed tensor of the same shape,
    or a stack of experts with one slice per expert of the experts' size.
    """
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
    statistics = merged_statistics(base_ckpt, merged_ckpt, importance)
    return CheckpointPair(
        base_dir,
        merged_dir,
        base_shards,
        merged_shards,
        statistics,
        model_type(base_dir),
    )


def merged_statistics(
    base_ckpt: Any, merged_ckpt: Any, importance: ImportanceMap
) -> dict[str, Statistic]:
    """The base tensor and statistic of every tensor of a merge, by name;
    refuses a tensor the base can produce neither directly nor by conversion,
    and one whose shape differs from what the base produces."""
    from mergekit_aim.names import lazy_name_map

    name_map = lazy_name_map(base_ckpt)
    statistics: dict[str, Statistic] = {}
    foreign = []
    for name in sorted(merged_ckpt.tensors):
        found = find_statistic((name,), base_ckpt, importance, name_map)
        if found is None:
            foreign.append(name)
        else:
            statistics[name] = found
    if foreign:
        raise ImportanceError(
            f"{merged_ckpt.path} is not a merge of {base_ckpt.path}: the base has "
            f"no tensor {', '.join(foreign[:3])}{' …' if len(foreign) > 3 else ''}"
        )
    for name, found in statistics.items():
        check_statistic_shape(found, merged_ckpt.shape(name), base_ckpt.shape)
    return statistics


def base_tensor(
    found: Statistic,
    read: Any,
    model_type_name: str | None,
) -> torch.Tensor:
    """The base value of a merged tensor: ``read(name)`` of the checkpoint
    tensor itself, or, for a tensor mergekit names as the model does, the
    base's checkpoint tensors converted by mergekit's own conversion."""
    if not found.converted:
        return read(found.name)
    if found.experts is None and len(found.sources) == 1:
        return read(found.sources[0])  # renamed only
    from mergekit.architecture.conversion import convert_checkpoint_tensors

    sources = {name: (lambda name=name: read(name)) for name in found.sources}
    try:
        tensor = convert_checkpoint_tensors(model_type_name, sources, found.name)
    except Exception as error:
        raise ImportanceError(
            f"tensor {found.name}: cannot build the base's value from "
            f"{', '.join(found.sources[:3])} …: {error}"
        ) from error
    if tensor is None:
        raise ImportanceError(
            f"tensor {found.name}: transformers' conversion for model type "
            f"{model_type_name!r} does not build it from the base's tensors"
        )
    return tensor


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
    are ``relax(base, merged, ω)`` cast to the merged dtype, on the CPU (a
    stack of experts slice by slice). Weights with an input that no statistic
    covers, and experts without one, are logged as warnings.
    """
    from safetensors import safe_open

    relaxation = Relaxation(selection, importance)
    decisions = relaxation.decide_all(
        {name: pair.statistics[name] for name in pair.merged_shards},
        vocabulary=vocabulary_names(pair.merged_dir),
    )
    for gap in relaxation.coverage.gaps():
        LOG.warning(gap)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    handles: dict[str, Any] = {}

    def tensor(path: str, name: str) -> torch.Tensor:
        if path not in handles:
            handles[path] = safe_open(path, framework="pt")
        return handles[path].get_tensor(name)

    def read_base(name: str) -> torch.Tensor:
        return tensor(pair.base_shards[name], name)

    for shard in sorted(set(pair.merged_shards.values())):
        header, data_start = safetensors_header(shard)
        names = sorted(
            (k for k in header if k != "__metadata__"),
            key=lambda k: header[k]["data_offsets"][0],
        )
        target = out_dir / os.path.basename(shard)
        with (
            staged_file(target) as partial,
            open(partial, "wb") as out,
            open(shard, "rb") as raw,
        ):
            out.write(raw.read(data_start))  # same header: same names, shapes, dtypes
            for name in names:
                start, end = header[name]["data_offsets"]
                decision = decisions[name]
                if decision.relaxed:
                    found = pair.statistics[name]
                    merged = tensor(shard, name)
                    check_finite(name, merged, pair.merged_dir)
                    base = base_tensor(found, read_base, pair.model_type)
                    result = relaxation.relax(
                        name, base, merged, found.importance_key, decision.omega
                    )
                    check_finite(name, result, f"relaxing toward {pair.base_dir}")
                    data = result.contiguous().reshape(-1).view(torch.uint8)
                    out.write(data.numpy().tobytes())
                else:
                    raw.seek(data_start + start)
                    data = raw.read(end - start)
                    check_finite(name, data, pair.merged_dir, header[name]["dtype"])
                    out.write(data)

    for entry in os.scandir(pair.merged_dir):
        if entry.is_file() and not entry.name.endswith(".safetensors"):
            if entry.name != "README.md":
                shutil.copy2(entry.path, out_dir / entry.name)
    return relaxation.coverage


def load_importance(spec: str | None) -> ImportanceMap:
    from mergekit_aim.importance import resolve_artifact

    if not spec:
        raise AimConfigError("an importance artifact is required")
    return ImportanceMap.load(resolve_artifact(spec))
