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
from pathlib import Path

import torch

from mergekit_aim.checkpoint import safetensors_header
from mergekit_aim.config import PAPER_URL
from mergekit_aim.errors import AimConfigError, ImportanceError
from mergekit_aim.importance import ImportanceMap
from mergekit_aim.kernels import omega_value

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
    omega: float,
    *,
    exclude: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Relax every tensor of ``merged_sd`` that has a statistic; copy the rest.

    Returns a new dict (inputs are not modified). Tensors with a statistic must
    exist in ``base_sd`` with the merged tensor's shape.
    """
    import re

    omega = omega_value(omega)
    patterns = [re.compile(p) for p in exclude]
    result = {}
    for name, merged in merged_sd.items():
        if name not in importance or any(p.search(name) for p in patterns):
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
            base, merged, importance[name], omega, importance.input_axis(name)
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
    omega: float,
    out_dir: str | os.PathLike,
    *,
    exclude: Iterable[str] = (),
    source: str = "",
) -> dict[str, object]:
    """Write AIM(base, merged) to ``out_dir`` and return a coverage report.

    Everything is checked before the output directory is created: shapes of
    base and merged tensors, the statistic lengths, and the artifact against
    the base model.
    """
    import re

    from safetensors import safe_open

    from mergekit_aim.checkpoint import read_checkpoint

    omega = omega_value(omega)
    base_dir, merged_dir, out_dir = str(base_dir), str(merged_dir), Path(out_dir)
    if out_dir.resolve() in (Path(merged_dir).resolve(), Path(base_dir).resolve()):
        raise AimConfigError("the output directory must differ from base and merged")
    patterns = [re.compile(p) for p in exclude]
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
    plan = {
        name: name in importance and not any(p.search(name) for p in patterns)
        for name in merged_shards
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    handles: dict[str, object] = {}

    def tensor(path: str, name: str) -> torch.Tensor:
        if path not in handles:
            handles[path] = safe_open(path, framework="pt")
        return handles[path].get_tensor(name)

    relaxed: list[str] = []
    for shard in sorted(set(merged_shards.values())):
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
                if plan.get(name):
                    merged = tensor(shard, name)
                    result = relax(
                        tensor(base_shards[name], name),
                        merged,
                        importance[name],
                        omega,
                        importance.input_axis(name),
                    ).to(merged.dtype)
                    data = result.contiguous().reshape(-1).view(torch.uint8)
                    out.write(data.numpy().tobytes())
                    relaxed.append(name)
                else:
                    raw.seek(data_start + start)
                    out.write(raw.read(end - start))
        os.replace(tmp, target)

    for entry in os.scandir(merged_dir):
        if entry.is_file() and not entry.name.endswith(".safetensors"):
            if entry.name != "README.md":
                shutil.copy2(entry.path, out_dir / entry.name)
    report = {
        "omega": omega,
        "relaxed": len(relaxed),
        "tensors": len(merged_shards),
        "left_alone": len(merged_shards) - len(relaxed),
        "base_model": base_dir,
        "merged_model": merged_dir,
        "importance": importance.provenance,
        "paper": PAPER_URL,
    }
    _write_card(Path(merged_dir), out_dir, report)
    LOG.info(
        "AIM relax: relaxed %d of %d tensors (ω %g) into %s",
        len(relaxed),
        len(merged_shards),
        omega,
        out_dir,
    )
    return report


def _write_card(merged_dir: Path, out_dir: Path, report: dict[str, object]) -> None:
    previous = merged_dir / "README.md"
    card = previous.read_text(encoding="utf-8") if previous.exists() else ""
    section = (
        "\n## Activation-Informed Merging\n\n"
        f"Relaxed after merging with [AIM]({PAPER_URL}) at ω = {report['omega']:g}: "
        f"{report['relaxed']} of {report['tensors']} tensors, toward base model "
        f"`{report['base_model']}`.\n"
    )
    (out_dir / "README.md").write_text(card.rstrip("\n") + "\n" + section, "utf-8")
    (out_dir / "aim_relax.json").write_text(
        json.dumps(report, indent=2, sort_keys=True, default=str), "utf-8"
    )


def load_importance(spec: str | None) -> ImportanceMap:
    from mergekit_aim.importance import resolve_artifact

    if not spec:
        raise AimConfigError("an importance artifact is required")
    return ImportanceMap.load(resolve_artifact(spec))
