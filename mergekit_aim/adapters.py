"""AIM on PEFT LoRA adapters: scale ``lora_A``'s input columns.

A LoRA adapter changes a linear weight by ``ΔW = scaling · B A`` with ``A``
``[r, in]``. AIM's factor ``f = 1 − s·(1 − ω)`` along the weight's input axis
gives ``ΔW·diag(f) = scaling · B (A diag f)``: the relaxed adapter is the
original with ``A``'s columns scaled, of the same rank, config and size, and
its merged weights equal AIM applied to the original's merged weights. The
factor is the relaxation core's (:func:`~mergekit_aim.relaxation.input_factor`)
and every tensor is decided by the core (:class:`~mergekit_aim.relaxation.Relaxation`),
so ω settings, ``exclude`` and coverage mean what they mean for a merge.

What each part of an adapter becomes:

* ``lora_A`` of a Linear or a GPT-2 ``Conv1D`` (``fan_in_fan_out``): PEFT keeps
  ``A`` ``[r, in]`` in both and transposes the product, so the input axis is
  ``A``'s last either way; scaled by the statistic of the adapted weight.
* ``lora_A`` of a stack of experts (``target_parameters``, PEFT's
  ``ParamWrapper``): ``A`` is ``[E·r, in]``, rows ``e·r … (e+1)·r`` expert
  ``e``'s; each block is scaled by expert ``e``'s statistic.
* ``lora_B``, its bias (``lora_bias``), embedding LoRAs
  (``lora_embedding_A``/``_B``: embeddings are never relaxed): as they are.
* ``modules_to_save`` copies: full tensors, relaxed like a merged tensor
  toward the base's (an LM head, a norm); a saved embedding layer stays.
* Scales (``lora_alpha``, ``rank_pattern``/``alpha_pattern``, rslora) are
  scalars per module and untouched; ``layers_to_transform`` only decides which
  keys exist (a gradient ω is read at the layer's position in the *base*).
* A tied LM head has no statistic of its own (calibration skips it), so its
  LoRA stays, as a merge leaves a tied head alone.

Refused, in one line naming the module and the reason, before anything is
written: DoRA (its magnitude vector makes the delta nonlinear in ``B A``),
initialisations that changed the base (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA,
KaSA), variants whose forward is not ``x Aᵀ Bᵀ`` (QA-LoRA's pooled input,
Arrow's routing, MonteCLoRA, VeLoRA, block-diagonal LoRA), any other tensor
kind, any adapter type other than LoRA, and a shape that does not fit the base
(the core's mismatch error).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_aim.config import PAPER_URL
from mergekit_aim.errors import AimConfigError
from mergekit_aim.importance import ImportanceMap
from mergekit_aim.names import PeftTensor, peft_model_key, peft_tensor
from mergekit_aim.relaxation import (
    Coverage,
    Relaxation,
    Statistic,
    check_same_shape,
    elements_text,
    find_statistic,
    input_factor,
    mismatch,
    tensor_statistic,
)
from mergekit_aim.selection import Selection, layer_positions, setting_json

LOG = logging.getLogger(__name__)

PEFT_EXTRA = "pip install 'mergekit-aim[peft]'"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
REPORT_FILE = "aim_relax.json"

# Initialisations after which the adapter is relative to a changed base.
_BASE_CHANGING_INIT = {
    "pissa": "PiSSA",
    "olora": "OLoRA",
    "corda": "CorDA",
    "loftq": "LoftQ",
}
# Config fields that, when set, make the adapter's delta more than B·A on the
# saved base (or the base itself different).
_REFUSED_FIELDS = {
    "use_dora": "DoRA: its magnitude vector rescales W + ΔW column by column, "
    "so the delta is not linear in B·A",
    "use_qalora": "QA-LoRA: lora_A reads the input pooled in groups",
    "use_bdlora": "block-diagonal LoRA: lora_A/lora_B are stored in blocks",
    "arrow_config": "Arrow: the delta is a routed mix of adapters",
    "monteclora_config": "MonteCLoRA: the delta is sampled",
    "velora_config": "VeLoRA: the forward is not x·Aᵀ·Bᵀ",
    "kasa_config": "KaSA: its initialisation truncates the base weights",
    "lora_ga_config": "LoRA-GA: its initialisation changes the base weights",
}
# Adapter tensor kinds that leave the input axis alone.
_KEPT_PARTS = ("lora_B", "lora_embedding_A", "lora_embedding_B", "trainable_tokens")


def require_peft() -> None:
    """Refuse, in one line, to work on adapters without PEFT installed."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise AimConfigError(
            f"LoRA adapters need PEFT, which is not installed: {PEFT_EXTRA}"
        ) from None


# --- what the adapter is ---------------------------------------------------------


def check_config(config: Mapping[str, Any], where: str, module: str) -> None:
    """Refuse an adapter config whose delta is not ``scaling · B A`` on the
    unchanged base; ``module`` (an adapted module) is named in the message."""
    kind = config.get("peft_type", "")
    kind = str(getattr(kind, "value", kind)).upper()
    if kind != "LORA":
        raise AimConfigError(
            f"{where}: module {module}: adapter type {kind or 'unknown'!s} is "
            f"refused: AIM is exact only for LoRA (delta = scaling · B·A)"
        )
    for name, reason in _REFUSED_FIELDS.items():
        if config.get(name):
            raise AimConfigError(f"{where}: module {module}: {reason} ({name})")
    init = config.get("init_lora_weights")
    if isinstance(init, str):
        for prefix, label in _BASE_CHANGING_INIT.items():
            if init.lower().startswith(prefix):
                raise AimConfigError(
                    f"{where}: module {module}: init_lora_weights={init!r} "
                    f"({label}) changed the base weights, so the adapter is not "
                    f"a delta on the base; convert it to plain LoRA first "
                    f"(PEFT's path_initial_model_for_weight_conversion)"
                )


@dataclass
class Plan:
    """One adapter's relaxation, decided before any tensor is changed:
    the factor of every ``lora_A`` (or per-expert factors, by row block) and
    the ω of every relaxed copy."""

    factors: dict[str, torch.Tensor | list[tuple[slice, torch.Tensor]]] = field(
        default_factory=dict
    )
    copies: dict[str, tuple[str, Any, float]] = field(default_factory=dict)
    coverage: Coverage = field(default_factory=Coverage)


@dataclass(frozen=True)
class Base:
    """What relaxing an adapter needs of its base model, by model tensor name:
    ``statistic(name, shape)`` (the core's :class:`Statistic`, or ``None``
    when the base has no such tensor), ``shape(name)`` and ``value(name)``,
    the names of every base tensor (for layer positions), and
    ``targeted(module)``: the parameter names of ``module`` in declaration
    order (PEFT nests one wrapper per targeted parameter in that order)."""

    statistic: Callable[[str, Sequence[int]], Statistic | None]
    shape: Callable[[str], tuple[int, ...] | None]
    value: Callable[[str], torch.Tensor]
    names: Sequence[str]
    targeted: Callable[[str], list[str]]


def plan(
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    base: Base,
    relaxation: Relaxation,
    where: str = "adapter",
) -> Plan:
    """Decide every tensor of one adapter (file keys, see
    :func:`~mergekit_aim.names.peft_tensor`) and check it against the base;
    refuses (config, tensor kinds, shapes) before anything is relaxed."""
    parsed = {key: peft_tensor(key) for key in tensors}
    lora = [p for p in parsed.values() if p.is_lora]
    check_config(config, where, lora[0].module if lora else "(none)")
    for item in parsed.values():
        if item.is_lora and item.part not in ("lora_A", *_KEPT_PARTS):
            raise AimConfigError(
                f"{where}: module {item.module}: adapter tensor {item.part} is "
                f"refused: the delta is not scaling · B·A alone"
            )
    targets = config.get("target_parameters") or ()
    positions = layer_positions({*base.names, *(p.parameter for p in parsed.values())})
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    result = Plan()
    result.coverage = relaxation.coverage
    for key in sorted(tensors):
        item = parsed[key]
        tensor = tensors[key]
        if item.part in _KEPT_PARTS:
            continue
        name = _parameter(item, targets, base, where)
        shape = base.shape(name)
        if shape is None:
            raise mismatch(
                key,
                f"it adapts {name}, which the base model does not have",
                "a tensor of the base model",
                "an adapter for another model",
            )
        if item.part == "copy":
            check_same_shape(key, tensor.shape, shape, f"the base's {name} {shape}")
        else:
            _check_lora_shapes(key, tensor, tensors, item, shape, fan_in_fan_out)
        statistic = base.statistic(name, shape)
        decision = relaxation.decide(
            name,
            statistic,
            positions.get(name, 0.0),
            vocabulary="embed" in name or item.tensor != "weight",
        )
        if not decision.relaxed or statistic is None:
            continue
        if item.part == "copy":
            result.copies[key] = (name, statistic.importance_key, decision.omega)
            continue
        result.factors[key] = _factors(
            key, tensor, statistic, relaxation.importance, decision.omega
        )
    return result


def _parameter(item: PeftTensor, targets: Sequence[str], base: Base, where: str) -> str:
    """The base model tensor a LoRA tensor adapts: ``module.weight``, or for
    ``target_parameters`` the targeted parameter its wrapper depth names."""
    if not item.is_lora or (item.depth == 0 and not targets):
        return item.parameter
    matched = [
        p
        for p in base.targeted(item.module)
        if any(f"{item.module}.{p}".endswith(t) for t in targets)
    ]
    if not matched:
        return item.parameter
    if item.depth >= len(matched):
        raise AimConfigError(
            f"{where}: module {item.module}: {item.key} is nested {item.depth} "
            f"wrappers deep, but the base's module has {len(matched)} targeted "
            f"parameter(s) {matched}: an adapter for another model"
        )
    return f"{item.module}.{matched[len(matched) - 1 - item.depth]}"


def _check_lora_shapes(
    key: str,
    tensor: torch.Tensor,
    tensors: Mapping[str, torch.Tensor],
    item: PeftTensor,
    shape: tuple[int, ...],
    fan_in_fan_out: bool,
) -> None:
    """``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]`` against a 2-D base
    weight (``[in, out]`` under ``fan_in_fan_out``)."""
    if item.part != "lora_A" or item.tensor != "weight" or len(shape) != 2:
        return
    out_features, in_features = shape[::-1] if fan_in_fan_out else shape
    partner = tensors.get(key.replace(".lora_A.", ".lora_B."))
    found = (tuple(tensor.shape), None if partner is None else tuple(partner.shape))
    fits = tensor.ndim == 2 and tensor.shape[1] == in_features
    if partner is not None:
        fits = fits and partner.ndim == 2
        fits = fits and tuple(partner.shape) == (out_features, tensor.shape[0])
    if not fits:
        raise mismatch(
            key,
            f"lora_A/lora_B have shapes {found[0]}/{found[1]} for a base weight "
            f"of shape {shape}",
            f"lora_A [r, {in_features}] and lora_B [{out_features}, r]",
            "an adapter for another model",
        )


def _factors(
    key: str,
    tensor: torch.Tensor,
    statistic: Statistic,
    importance: ImportanceMap,
    omega: float,
) -> torch.Tensor | list[tuple[slice, torch.Tensor]]:
    """The core's factor for one ``lora_A``: a vector over its columns, or
    for a stack of experts one per expert with a statistic, by row block."""
    columns = tensor.shape[-1]
    if statistic.experts is None:
        return input_factor(key, importance, statistic.key, omega, columns)
    experts = len(statistic.experts)
    if tensor.ndim != 2 or tensor.shape[0] % experts:
        raise mismatch(
            key,
            f"lora_A has shape {tuple(tensor.shape)} for a stack of {experts} experts",
            f"[{experts}·r, in]",
        )
    rows = tensor.shape[0] // experts
    return [
        (
            slice(e * rows, (e + 1) * rows),
            input_factor(f"{key}[{e}]", importance, member, omega, columns),
        )
        for e, member in enumerate(statistic.experts)
        if member is not None
    ]


def apply(
    tensors: Mapping[str, torch.Tensor],
    decided: Plan,
    base: Base,
    relaxation: Relaxation,
) -> dict[str, torch.Tensor]:
    """The relaxed adapter: every tensor of ``tensors``, those the plan names
    relaxed (into new tensors, in their own dtype); inputs are not modified."""
    result = dict(tensors)
    for key, factor in decided.factors.items():
        result[key] = scaled_columns(tensors[key], factor)
    for key, (name, stat_key, omega) in decided.copies.items():
        result[key] = relaxation.relax(
            key, base.value(name), tensors[key], stat_key, omega
        )
    return result


def scaled_columns(
    tensor: torch.Tensor, factor: torch.Tensor | list[tuple[slice, torch.Tensor]]
) -> torch.Tensor:
    """``A diag(f)`` in float32, rounded once to ``A``'s dtype; for a stack
    of experts, each expert's block of rows (a slice) by its own factor (rows
    of an expert without a statistic are copied)."""
    # Always a new tensor, never ``tensor`` itself: tensors read with
    # safetensors lie in a copy-on-write mapping of the file, and writing
    # into them faults page by page (4x the time of writing fresh memory on
    # a Llama-7B adapter, for no saving: each written page becomes a copy).
    result = torch.empty_like(tensor)
    # The float32 factor promotes the product to float32; writing into
    # ``result`` rounds it to A's dtype in the same pass.
    if isinstance(factor, torch.Tensor):
        torch.mul(tensor, factor.to(tensor.device), out=result)
        return result
    result.copy_(tensor)
    for rows, vector in factor:
        torch.mul(tensor[rows], vector.to(tensor.device), out=result[rows])
    return result


# --- adapters on disk --------------------------------------------------------------


def adapter_dirs(path: str | os.PathLike) -> list[Path]:
    """The adapter directories under ``path``: itself when it holds an
    ``adapter_config.json``, and each immediate subdirectory that does (PEFT
    saves extra named adapters there)."""
    root = Path(path)
    if not root.is_dir():
        raise AimConfigError(f"--adapter {root}: not a directory")
    found = [root] if (root / CONFIG_FILE).is_file() else []
    found += sorted(
        entry
        for entry in root.iterdir()
        if entry.is_dir() and (entry / CONFIG_FILE).is_file()
    )
    if not found:
        raise AimConfigError(
            f"--adapter {root}: no {CONFIG_FILE} in it or its subdirectories "
            f"(a PEFT adapter saved with save_pretrained)"
        )
    return found


def read_adapter(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict]:
    """An adapter directory's config, tensors and safetensors metadata."""
    from safetensors import safe_open

    config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        other = "adapter_model.bin" if (path / "adapter_model.bin").exists() else ""
        raise AimConfigError(
            f"{path}: no {WEIGHTS_FILE}"
            + (
                f" ({other} found: re-save it with safe_serialization=True)"
                if other
                else ""
            )
        )
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    return config, tensors, metadata


def checkpoint_base(base_dir: str | os.PathLike, importance: ImportanceMap) -> Base:
    """:class:`Base` of a safetensors checkpoint directory (headers read once;
    a tensor's value only when a relaxed copy needs it)."""
    from mergekit_aim.checkpoint import read_checkpoint
    from mergekit_aim.names import lazy_name_map, meta_model

    checkpoint = read_checkpoint(str(base_dir))
    name_map = lazy_name_map(checkpoint)

    @functools.cache
    def statistic(name: str) -> Statistic | None:
        return find_statistic((name,), checkpoint, importance, name_map)

    def shape(name: str) -> tuple[int, ...] | None:
        found = checkpoint.shape(name)
        if found is not None:
            return found
        stat = statistic(name)
        if stat is None:
            return None
        if stat.experts is not None:
            first = next(s for s in stat.expert_sources if s)
            inner = checkpoint.shape(first[0]) or ()
            rows = sum((checkpoint.shape(n) or (0,))[0] for n in first)
            return (len(stat.experts), rows, *inner[1:])
        if len(stat.sources) == 1:
            return checkpoint.shape(stat.sources[0])
        return None

    def shape_or_tied(name: str) -> tuple[int, ...] | None:
        # A tied LM head is no tensor of the checkpoint: the model's own
        # parameter (on the meta device) gives its shape; it has no statistic.
        found = shape(name)
        if found is None and model() is not None:
            try:
                found = tuple(model().get_parameter(name).shape)
            except AttributeError:
                return None
        return found

    def value(name: str) -> torch.Tensor:
        from safetensors import safe_open

        def read(tensor: str) -> torch.Tensor:
            file = os.path.join(checkpoint.path, checkpoint.tensors[tensor].file)
            with safe_open(file, framework="pt") as handle:
                return handle.get_tensor(tensor)

        found = statistic(name)
        if found is None or not found.converted:
            return read(name)
        if found.experts is None and len(found.sources) == 1:
            return read(found.sources[0])  # renamed only
        raise AimConfigError(
            f"modules_to_save copy of {name}: the base checkpoint holds it as "
            f"several tensors ({', '.join(found.sources[:3])} …); relaxing such "
            f"a copy is not supported: exclude it"
        )

    @functools.cache
    def model() -> Any:
        return meta_model(str(base_dir))

    def targeted(module: str) -> list[str]:
        built = model()
        return [] if built is None else _declared(built, module)

    return Base(
        lambda name, _shape: statistic(name),
        shape_or_tied,
        value,
        list(checkpoint.tensors),
        targeted,
    )


def _declared(model: torch.nn.Module, module: str) -> list[str]:
    """``module``'s own parameter names in declaration order, below any PEFT
    wrappers (``base_layer``)."""
    try:
        found = model.get_submodule(module)
    except AttributeError:
        return []
    while hasattr(found, "base_layer"):
        found = found.base_layer
    return [name for name, _ in found.named_parameters(recurse=False)]


def relax_adapter(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    importance: ImportanceMap,
    omega: Any,
    out: str | os.PathLike,
    *,
    exclude: Iterable[str] = (),
    source: str = "",
) -> dict[str, Any]:
    """Write ``adapter`` (a PEFT adapter directory, or one holding several
    named adapters) to ``out`` with AIM applied against ``base``'s statistic;
    returns a report per adapter. ``omega`` is any ``aim: {omega: ...}``
    setting. Every adapter is read, checked and relaxed before ``out`` is
    created; ``out`` gets the same layout, configs and files, and an
    ``aim_relax.json`` beside each ``adapter_model.safetensors``."""
    require_peft()
    selection = Selection(omega, exclude)
    adapter, out = Path(adapter), Path(out)
    if out.resolve() == adapter.resolve() or adapter.resolve() in out.resolve().parents:
        raise AimConfigError("the output directory must not be the adapter's")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AimConfigError(f"output directory {out} exists and is not empty")
    results = []
    for planned in _planned(base, adapter, importance, selection, source):
        directory, tensors, metadata, found, relaxation, decided = planned
        relaxed = apply(tensors, decided, found, relaxation)
        report = _report(selection, relaxation.coverage, base, directory, importance)
        results.append((directory.relative_to(adapter), relaxed, metadata, report))
        for gap in relaxation.coverage.gaps():
            LOG.warning("%s: %s", directory, gap)

    from safetensors.torch import save_file

    from mergekit_aim.output import staged_directory

    # The output is the adapter's size (same tensors, same dtypes) plus reports.
    needed = sum(
        entry.stat().st_size
        for relative, *_ in results
        for entry in (adapter / relative).iterdir()
        if entry.is_file()
    )
    with staged_directory(out, needed + 2**20) as stage:
        for relative, relaxed, metadata, report in results:
            target = stage / relative
            target.mkdir(parents=True, exist_ok=True)
            source_dir = adapter / relative
            for entry in source_dir.iterdir():
                if entry.is_file() and entry.name not in (WEIGHTS_FILE, REPORT_FILE):
                    shutil.copy2(entry, target / entry.name)
            save_file(
                {k: v.contiguous() for k, v in relaxed.items()},
                str(target / WEIGHTS_FILE),
                metadata=metadata,
            )
            (target / REPORT_FILE).write_text(
                json.dumps(report, indent=2, sort_keys=True, default=str), "utf-8"
            )
    for relative, _, _, report in results:
        LOG.info(
            "AIM relax-adapter: %s: %d lora_A and copies relaxed, %s",
            out / relative,
            report["relaxed"],
            elements_text(report["coverage"]),
        )
    return {str(relative): report for relative, _, _, report in results}


def check_adapter(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    importance: ImportanceMap,
    *,
    exclude: Iterable[str] = (),
    source: str = "",
) -> None:
    """Refuse now, writing nothing, what :func:`relax_adapter` would refuse
    for any ω: the config, the tensor kinds and the shapes against ``base``
    and the artifact. ``tune-adapter`` runs it before its search, so that an
    adapter it could not write is refused before the merge and the scoring."""
    require_peft()
    # ω 0 relaxes every tensor that has a statistic, so every check runs.
    for _ in _planned(base, adapter, importance, Selection(0.0, exclude), source):
        pass


def _planned(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    importance: ImportanceMap,
    selection: Selection,
    source: str,
) -> Iterator[tuple[Path, dict, dict, Base, Relaxation, Plan]]:
    """Each adapter directory under ``adapter``, read and planned against
    ``base``: ``(directory, tensors, metadata, base, relaxation, plan)``."""
    from mergekit_aim.checkpoint import read_checkpoint

    importance.check_against(read_checkpoint(str(base)), source=source or "importance")
    found = checkpoint_base(base, importance)
    for directory in adapter_dirs(adapter):
        config, tensors, metadata = read_adapter(directory)
        relaxation = Relaxation(selection, importance)
        decided = plan(tensors, config, found, relaxation, str(directory))
        yield directory, tensors, metadata, found, relaxation, decided


def _report(
    selection: Selection,
    coverage: Coverage,
    base: Any,
    adapter: Path,
    importance: ImportanceMap,
) -> dict[str, Any]:
    summary = coverage.summary()
    return {
        "omega": setting_json(selection.omega),
        "exclude": list(selection.exclude),
        "relaxed": summary["relaxed"],
        "tensors": summary["tensors"],
        "coverage": summary,
        "base_model": str(base),
        "adapter": str(adapter),
        "importance": importance.provenance,
        "paper": PAPER_URL,
    }


# --- loaded models -----------------------------------------------------------------


def relax_adapter_(
    peft_model: Any,
    importance: ImportanceMap,
    omega: Any,
    *,
    exclude: Iterable[str] = (),
    adapter_name: str | None = None,
) -> Coverage:
    """Relax a loaded ``PeftModel``'s active adapter (or ``adapter_name``) in
    place: ``lora_A`` columns scaled, ``modules_to_save`` copies relaxed
    toward the wrapped originals, exactly as :func:`relax_adapter` relaxes the
    saved adapter. Refusals come before any parameter changes. Returns the
    coverage record."""
    require_peft()
    from peft.utils import get_peft_model_state_dict

    name = adapter_name or peft_model.active_adapter
    if not isinstance(name, str):
        raise AimConfigError(f"relax one adapter at a time; {name} are active")
    config = peft_model.peft_config[name].to_dict()
    tensors = get_peft_model_state_dict(
        peft_model, adapter_name=name, save_embedding_layers=False
    )
    base = _module_base(peft_model.get_base_model(), importance)
    relaxation = Relaxation(Selection(omega, exclude), importance)
    decided = plan(tensors, config, base, relaxation, f"adapter {name!r}")
    targets = {}
    for key in (*decided.factors, *decided.copies):
        try:
            targets[key] = peft_model.get_parameter(peft_model_key(key, name))
        except AttributeError:
            raise AimConfigError(
                f"adapter {name!r}: {key} is not a parameter of the loaded model "
                f"(looked for {peft_model_key(key, name)})"
            ) from None
    relaxed = apply(tensors, decided, base, relaxation)
    with torch.no_grad():
        for key, parameter in targets.items():
            parameter.copy_(relaxed[key])
    for gap in relaxation.coverage.gaps():
        LOG.warning(gap)
    return relaxation.coverage


def _module_base(model: torch.nn.Module, importance: ImportanceMap) -> Base:
    """:class:`Base` of a loaded model that PEFT may have wrapped: its base
    tensors under the model's own names (wrappers' ``base_layer`` and
    ``original_module`` levels dropped, adapters' tensors left out)."""
    from mergekit_aim.names import NameMap

    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        item = peft_tensor(key)
        if item.part != "copy" or ".modules_to_save." in f".{key}":
            continue
        state.setdefault(item.parameter, tensor.detach())
    name_map = functools.cache(lambda: NameMap.from_model(model, list(importance)))

    def statistic(name: str, _shape: Sequence[int]) -> Statistic | None:
        if name not in state:
            return None
        return tensor_statistic(name, state[name], importance, _Lazy(name_map))

    def shape(name: str) -> tuple[int, ...] | None:
        return tuple(state[name].shape) if name in state else None

    return Base(
        statistic,
        shape,
        state.__getitem__,
        list(state),
        lambda module: _declared(model, module),
    )


class _Lazy:
    """A :class:`~mergekit_aim.names.NameMap` built on first use."""

    def __init__(self, build: Callable[[], Any]):
        self._build = build

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._build(), attribute)


def relax_module_(
    module: torch.nn.Module,
    base_tensors: Mapping[str, torch.Tensor],
    importance: ImportanceMap,
    omega: Any,
    *,
    exclude: Iterable[str] = (),
) -> Coverage:
    """Relax a plain loaded model (a merge, a ``merge_and_unload()``-ed
    adapter) in place toward ``base_tensors`` (the base's state dict, by the
    module's own parameter names): what :func:`~mergekit_aim.offline.apply_aim`
    returns, written into the parameters. Tied parameters are relaxed once
    (a tied LM head is the embedding, which is never relaxed)."""
    from mergekit_aim.names import NameMap

    params = dict(module.named_parameters())
    relaxation = Relaxation(Selection(omega, exclude), importance)
    name_map = NameMap.from_model(module, list(importance))
    statistics = {
        name: tensor_statistic(name, tensor, importance, name_map)
        for name, tensor in params.items()
    }
    decisions = relaxation.decide_all(statistics)
    missing = [n for n, d in decisions.items() if d.relaxed and n not in base_tensors]
    if missing:
        raise AimConfigError(
            f"base_tensors has no {', '.join(missing[:3])}: give the base "
            f"model's state dict under the module's parameter names"
        )
    with torch.no_grad():
        for name, decision in decisions.items():
            if not decision.relaxed:
                continue
            tensor = params[name]
            relaxed = relaxation.relax(
                name,
                base_tensors[name].to(tensor.device),
                tensor.detach(),
                statistics[name].importance_key,
                decision.omega,
            )
            tensor.copy_(relaxed)
    for gap in relaxation.coverage.gaps():
        LOG.warning(gap)
    return relaxation.coverage
