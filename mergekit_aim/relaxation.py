"""The one relaxation core: what a tensor is relaxed with, and relaxing it.

Every path that relaxes weights goes through this module: the merge-time AIM
method (:mod:`mergekit_aim.method`, routed by :mod:`mergekit_aim.planning`),
the post-hoc ``relax`` of a checkpoint and :func:`~mergekit_aim.offline.apply_aim`
on state dicts (:mod:`mergekit_aim.offline`), and ``tune``'s candidates. It
owns four things:

1. **The decision** (:class:`Relaxation`): for one tensor, from its name, the
   base tensor and statistic(s) behind it (:class:`Statistic`, found by
   :func:`find_statistic` through transformers' names) and the ω setting
   (:class:`~mergekit_aim.selection.Selection`: exclude → statistic → ω),
   whether it is relaxed and with which ω, or why it is left alone.
2. **How** (:func:`parts`): the artifact records each statistic's input axis
   (−1 for Linear ``[out, in]``, 0 for GPT-2 Conv1D ``[in, out]``; a norm's
   1-D weight is relaxed elementwise); a stack of experts ``[E, out, in]`` is
   relaxed slice by slice, expert ``e`` with expert ``e``'s statistic along the
   slice's input axis; an adapter's ``lora_A`` ``[r, in]`` takes the factor
   alone (:func:`input_factor`).
3. **The one mismatch refusal** (:func:`mismatch`): a statistic whose channel
   count, a stack whose expert count or a merged tensor whose shape disagrees
   with what the base and the artifact say raises
   :class:`~mergekit_aim.errors.ShapeMismatchError` naming the tensor and what
   was expected; nothing is relaxed with a statistic that does not fit.
4. **The coverage record** (:class:`Coverage`): tensors and weight elements
   relaxed, and every weight with an input (or expert) that no statistic covered.

The arithmetic is the kernels' (:func:`mergekit_aim.kernels.aim_relax`): float32
whatever the storage dtype, the result in the merged tensor's dtype.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mergekit_aim import kernels
from mergekit_aim.errors import AimConfigError, ImportanceError, ShapeMismatchError
from mergekit_aim.importance import ImportanceMap
from mergekit_aim.selection import (
    EXCLUDED,
    NO_STATISTIC,
    RELAXED,
    Decision,
    Selection,
    fold_layers,
    layer_positions,
)

# The artifact key(s) of one tensor's statistic: a key, or for a stack of
# experts one key per expert (``None`` for an expert without a statistic).
Key = str | tuple[str | None, ...]

_MISMATCH_HINT = (
    "an artifact for another model, or a layer mapping the artifact does not cover"
)


# --- what a merged tensor is relaxed toward ---------------------------------------


@dataclass(frozen=True)
class Statistic:
    """The base tensor a merged tensor is relaxed toward, and its statistic.

    ``sources`` are the base checkpoint tensors it is built from (itself, when
    the names agree). ``key`` is the artifact key for the whole tensor;
    ``experts`` the key of each expert's slice for a stack of experts
    (``[E, …]``, ``None`` for an expert without a statistic), with
    ``expert_sources`` the checkpoint tensors of each slice. ``elements`` and
    ``ndim`` describe the base tensor.
    """

    name: str
    sources: tuple[str, ...]
    elements: int
    ndim: int
    key: str | None = None
    experts: tuple[str | None, ...] | None = None
    expert_sources: tuple[tuple[str, ...], ...] = ()
    expert_elements: tuple[int, ...] = ()

    @property
    def converted(self) -> bool:
        """Whether the base checkpoint has the tensor only through conversion."""
        return self.sources != (self.name,)

    @property
    def importance_key(self) -> Key | None:
        """What the AIM method takes as ``importance_key`` (hashable)."""
        return self.experts if self.experts is not None else self.key

    def relaxed_elements(self) -> int:
        """Elements relaxed when the tensor is relaxed at all."""
        if self.experts is None:
            return self.elements if self.key is not None else 0
        return sum(
            n for key, n in zip(self.experts, self.expert_elements) if key is not None
        )

    def missing_experts(self) -> list[str]:
        """``name[e] (checkpoint names)`` of every expert without a statistic."""
        if self.experts is None:
            return []
        return [
            f"{self.name}[{e}] ({', '.join(self.expert_sources[e])})"
            for e, key in enumerate(self.experts)
            if key is None
        ]


def find_statistic(
    names: Sequence[str],
    checkpoint: Any,
    importance: Any,
    name_map: Callable[[], Any],
) -> Statistic | None:
    """The base tensor and statistic of a merged tensor, or ``None`` when the
    base checkpoint can produce none of ``names`` (the tensor's name first,
    then its aliases).

    ``checkpoint`` is a :class:`~mergekit_aim.checkpoint.CheckpointIndex`,
    ``importance`` an :class:`~mergekit_aim.importance.ImportanceMap` and
    ``name_map`` a callable returning the base's
    :class:`~mergekit_aim.names.NameMap` (built only when a name is not a
    checkpoint tensor). Stacked experts take, per expert, the first of the
    expert's checkpoint tensors that has a statistic (gate and up projections
    share their input, so either serves).
    """

    def numel(name: str) -> int:
        return math.prod(checkpoint.shape(name) or ())

    for name in names:
        if name in checkpoint:
            return Statistic(
                name,
                (name,),
                numel(name),
                len(checkpoint.shape(name) or ()),
                key=name if name in importance else None,
            )
    found = name_map()
    for name in names:
        sources = found.sources(name)
        if not sources:
            continue
        checkpoint_names = tuple(s.checkpoint for s in sources)
        elements = sum(numel(n) for n in checkpoint_names)
        experts = found.experts(name)
        if experts:
            slices = _expert_slices(experts, max(experts) + 1)
            ndim = 1 + max(len(checkpoint.shape(n) or ()) for n in checkpoint_names)
            return Statistic(
                name,
                checkpoint_names,
                elements,
                ndim,
                experts=_expert_keys(slices, importance),
                expert_sources=slices,
                expert_elements=tuple(
                    sum(numel(n) for n in members) for members in slices
                ),
            )
        if len(sources) == 1 and sources[0].expert is None:
            source = sources[0].checkpoint
            return Statistic(
                name,
                (source,),
                elements,
                len(checkpoint.shape(source) or ()),
                key=source if source in importance else None,
            )
        # Any other conversion (several tensors fused into one): no rule says
        # which statistic its input axis would take, so none.
        ndim = max(len(checkpoint.shape(n) or ()) for n in checkpoint_names)
        return Statistic(name, checkpoint_names, elements, ndim)
    return None


def tensor_statistic(
    name: str,
    tensor: torch.Tensor,
    importance: ImportanceMap,
    name_map: Any | None = None,
) -> Statistic:
    """:func:`find_statistic` for a tensor held in memory under ``name``.

    The artifact is keyed by checkpoint names: ``name`` itself when it is one,
    else (given ``name_map``, the :class:`~mergekit_aim.names.NameMap` of the
    model whose state dict it is) the checkpoint tensor it was renamed from, or
    for a stack of experts the checkpoint tensors of each slice. A stack's
    expert count is its first dimension; an expert the map names beyond it is
    a mismatch.
    """
    shape = tuple(tensor.shape)
    elements = math.prod(shape)
    if name in importance or name_map is None:
        key = name if name in importance else None
        return Statistic(name, (name,), elements, len(shape), key=key)
    sources = name_map.sources(name)
    experts = name_map.experts(name)
    if experts:
        count = shape[0] if shape else 0
        if max(experts) >= count:
            raise mismatch(
                name,
                f"the weight has shape {shape}",
                f"a stack of at least {max(experts) + 1} experts",
            )
        slices = _expert_slices(experts, count)
        return Statistic(
            name,
            tuple(s.checkpoint for s in sources),
            elements,
            len(shape),
            experts=_expert_keys(slices, importance),
            expert_sources=slices,
            expert_elements=(elements // count,) * count,
        )
    if len(sources) == 1 and sources[0].expert is None:
        source = sources[0].checkpoint
        key = source if source in importance else None
        return Statistic(name, (source,), elements, len(shape), key=key)
    return Statistic(name, (name,), elements, len(shape))


def keyed_statistic(name: str, tensor: torch.Tensor, key: Key | None) -> Statistic:
    """The statistic of a tensor held in memory whose artifact key (or, for a
    stack of experts, key per expert) the caller already knows."""
    shape = tuple(tensor.shape)
    elements = math.prod(shape)
    if key is None or isinstance(key, str):
        return Statistic(name, (name,), elements, len(shape), key=key)
    count = len(key)
    return Statistic(
        name,
        (name,),
        elements,
        len(shape),
        experts=tuple(key),
        expert_sources=tuple((k,) if k else () for k in key),
        expert_elements=(elements // max(count, 1),) * count,
    )


def _expert_slices(
    experts: Mapping[int, Sequence[str]], count: int
) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(experts.get(e, ())) for e in range(count))


def _expert_keys(
    slices: Sequence[Sequence[str]], importance: Any
) -> tuple[str | None, ...]:
    return tuple(
        next((n for n in members if n in importance), None) for members in slices
    )


def skipped_reason(importance: Any, statistic: Statistic | None) -> str | None:
    """Calibration's reason for not measuring a tensor (the artifact's
    ``skipped`` entry for one of its checkpoint tensors), if it recorded one."""
    if statistic is None:
        return None
    skipped = importance.provenance.get("skipped", {}) or {}
    for source in statistic.sources:
        if source in skipped:
            return str(skipped[source])
    return None


def has_input(statistic: Statistic | None, *, vocabulary: bool) -> bool:
    """Whether a merged tensor is a weight with an input that a statistic
    should cover: a matrix or a stack of experts, not an embedding or LM head
    (``vocabulary``: it has a vocabulary axis) and not a buffer (causal masks,
    rotary frequencies: names not ending in ``weight`` unless a stack of
    experts, which transformers names ``gate_up_proj``/``down_proj``)."""
    if statistic is None or statistic.ndim < 2 or vocabulary:
        return False
    if "embed" in statistic.name:
        return False
    return (
        statistic.name.endswith("weight")
        or statistic.experts is not None
        or (
            any(source.endswith("weight") for source in statistic.sources)
            and statistic.converted
        )
    )


# --- the coverage record ---------------------------------------------------------


@dataclass
class Coverage:
    """Which output tensors were relaxed, which were left alone and why.

    Besides tensors it counts weight elements, those of the tensors AIM can
    relax (weights with an input, see :func:`has_input`, and whatever was
    relaxed, such as norms), so that 100% means every one is covered. It keeps
    the gaps: weights with an input that no statistic covered (with the reason
    calibration gave, where it gave one) and experts without a statistic in a
    relaxed stack (both keep the merged value).
    """

    decisions: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    omegas: list[float] = field(default_factory=list)
    elements: int = 0
    elements_relaxed: int = 0
    uncovered: dict[str, list[str]] = field(default_factory=dict)
    uncovered_why: dict[str, set[str]] = field(default_factory=dict)
    missing_experts: list[str] = field(default_factory=list)

    def add(
        self,
        tensor: str,
        decision: Decision,
        statistic: Statistic | None = None,
        *,
        has_input: bool = False,
        why: str | None = None,
    ) -> None:
        """Tally one tensor; ``why`` is calibration's reason for a missing
        statistic (the artifact's ``skipped`` entry), if it gave one."""
        self.decisions[decision.reason].append(tensor)
        if decision.omega is not None:
            self.omegas.append(decision.omega)
        if statistic is None:
            return
        if decision.relaxed:
            self.elements += statistic.elements
            self.elements_relaxed += statistic.relaxed_elements()
            self.missing_experts.extend(statistic.missing_experts())
        elif has_input:
            self.elements += statistic.elements
            if decision.reason == NO_STATISTIC:
                group = fold_layers(tensor)
                self.uncovered.setdefault(group, []).append(tensor)
                if why:
                    self.uncovered_why.setdefault(group, set()).add(why)

    def gaps(self) -> list[str]:
        """One line per uncovered weight group, and one naming the experts
        without a statistic; empty when every weight with an input is covered."""
        lines = []
        for group, names in sorted(self.uncovered.items()):
            count = f"{len(names)} tensor{'s' if len(names) != 1 else ''}"
            why = "; ".join(sorted(self.uncovered_why.get(group, ())))
            lines.append(
                f"AIM: no input statistic for {group} ({count}"
                f"{'; ' + why if why else ''}): the merged value is kept"
            )
        if self.missing_experts:
            lines.append(
                f"AIM: {len(self.missing_experts)} expert slice(s) without a "
                f"statistic keep the merged value: {', '.join(self.missing_experts)}"
            )
        return lines

    def summary(self) -> dict[str, Any]:
        counts = {reason: len(names) for reason, names in self.decisions.items()}
        result: dict[str, Any] = {
            "tensors": sum(counts.values()),
            "relaxed": counts.get(RELAXED, 0),
            "left_alone": {k: v for k, v in counts.items() if k != RELAXED},
            "elements": self.elements,
            "elements_relaxed": self.elements_relaxed,
        }
        if self.uncovered:
            result["uncovered"] = sorted(self.uncovered)
        if self.missing_experts:
            result["experts_without_statistic"] = list(self.missing_experts)
        if self.omegas:
            result["omega_min"] = min(self.omegas)
            result["omega_max"] = max(self.omegas)
        return result


def elements_text(summary: dict[str, Any]) -> str:
    """``"weight elements relaxed: 1,234 of 5,678 (21.7%)"`` for a coverage
    summary."""
    total = int(summary.get("elements", 0))
    done = int(summary.get("elements_relaxed", 0))
    share = f" ({100 * done / total:.1f}%)" if total else ""
    return f"weight elements relaxed: {done:,} of {total:,}{share}"


# --- the decision ------------------------------------------------------------------


class Relaxation:
    """One run's relaxation: the rule (a :class:`Selection`), the artifact,
    and the coverage of every tensor decided.

    Every path decides through :meth:`decide` and relaxes through
    :meth:`relax` (or, where the tensors are far from the decision, as in a
    mergekit task, :func:`relax_tensor` with the decided key and ω).
    """

    def __init__(self, selection: Selection, importance: ImportanceMap):
        self.selection = selection
        self.importance = importance
        self.coverage = Coverage()

    def decide(
        self,
        name: str,
        statistic: Statistic | None,
        t: float = 0.0,
        *,
        vocabulary: bool = False,
    ) -> Decision:
        """Whether output tensor ``name`` is relaxed (and with which ω) or why
        not, tallied in :attr:`coverage`. ``t`` is the layer's position for a
        gradient ω; ``vocabulary`` says the tensor has a vocabulary axis (an
        embedding or LM head: not a gap when it has no statistic)."""
        key = None if statistic is None else statistic.importance_key
        decision = self.selection.decide(name, key, t)
        self.coverage.add(
            name,
            decision,
            statistic,
            has_input=has_input(statistic, vocabulary=vocabulary),
            why=skipped_reason(self.importance, statistic),
        )
        return decision

    def decide_all(
        self,
        statistics: Mapping[str, Statistic | None],
        *,
        vocabulary: Iterable[str] = (),
    ) -> dict[str, Decision]:
        """:meth:`decide` for every tensor of a model at once, in name order,
        with ``t`` from the tensors' layer positions."""
        vocabulary = set(vocabulary)
        positions = layer_positions(statistics)
        return {
            name: self.decide(
                name,
                statistics[name],
                positions[name],
                vocabulary=name in vocabulary,
            )
            for name in sorted(statistics)
        }

    def candidates(self, statistics: Mapping[str, Statistic | None]) -> dict[str, Key]:
        """The artifact key of every tensor some ω relaxes: each with a
        statistic that no exclude pattern names (nothing is tallied)."""
        found = {}
        for name, statistic in statistics.items():
            key = None if statistic is None else statistic.importance_key
            if self.selection.decide(name, key).reason not in (EXCLUDED, NO_STATISTIC):
                found[name] = key
        return found

    def relax(
        self,
        name: str,
        base: torch.Tensor | None,
        merged: torch.Tensor,
        key: Key | None,
        omega: float,
        *,
        in_place: bool = False,
    ) -> torch.Tensor:
        """:func:`relax_tensor` with this run's artifact."""
        return relax_tensor(
            name, base, merged, self.importance, key, omega, in_place=in_place
        )

    def relax_state(
        self,
        base: Mapping[str, torch.Tensor],
        merged: Mapping[str, torch.Tensor],
        *,
        keys: Mapping[str, Key] | None = None,
        name_map: Any | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every tensor of the state dict ``merged`` decided and, where
        relaxed, relaxed toward ``base[name]``; the others as they are.
        Returns a new dict; inputs are not modified.

        A tensor's statistic is ``keys[name]`` where given, else found by
        :func:`tensor_statistic` (through ``name_map`` for tensors named as a
        transformers model names them). Without ``name_map``, a tensor of three
        or more dimensions that the artifact has no statistic for (a stack of
        experts, which the artifact keeps under per-expert checkpoint names)
        is refused by name rather than left merged, unless excluded.
        """
        statistics = {
            name: (
                keyed_statistic(name, tensor, keys[name])
                if keys is not None and name in keys
                else tensor_statistic(name, tensor, self.importance, name_map)
            )
            for name, tensor in merged.items()
        }
        decisions = self.decide_all(statistics)
        result = {}
        for name, tensor in merged.items():
            decision = decisions[name]
            if (
                decision.reason == NO_STATISTIC
                and name_map is None
                and tensor.ndim >= 3
                and tensor.is_floating_point()
            ):
                raise ImportanceError(
                    f"tensor {name}: the artifact has no statistic for this "
                    f"{tuple(tensor.shape)} weight; a stack of experts has one "
                    f"per expert under the checkpoint's own names: give the "
                    f"model (or its config or checkpoint directory) so that "
                    f"transformers' conversion names them, or exclude it"
                )
            if not decision.relaxed:
                result[name] = tensor
                continue
            if name not in base:
                raise ImportanceError(f"base state dict has no tensor {name}")
            key = statistics[name].importance_key
            result[name] = self.relax(name, base[name], tensor, key, decision.omega)
        return result


# --- how one tensor is relaxed -----------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One relaxation of a tensor: the whole tensor (``expert`` ``None``) or
    one expert's slice of a stack, with the artifact key of its statistic and
    the input axis along which the factor broadcasts."""

    key: str
    axis: int
    expert: int | None = None


def has_statistic(importance: ImportanceMap, key: Key | None) -> bool:
    """Whether the artifact holds a statistic for ``key`` (for a stack, for
    at least one expert)."""
    if key is None:
        return False
    if isinstance(key, str):
        return key in importance
    return any(k is not None and k in importance for k in key)


def parts(
    name: str,
    shape: Sequence[int],
    importance: ImportanceMap,
    key: Key | None,
) -> list[Part]:
    """How tensor ``name`` of ``shape`` is relaxed with statistic(s) ``key``:
    one part for a tensor (along the statistic's recorded input axis), one per
    expert with a statistic for a stack of experts (``key`` a tuple, one entry
    per slice of the first axis; the axis is the expert's own matrix's);
    empty when the artifact holds none. Each statistic's channel count is
    checked against the axis it runs along: a mismatch is refused, naming the
    tensor (and expert), the statistic and the expected size."""
    shape = tuple(shape)
    if key is None:
        return []
    if isinstance(key, str):
        if key not in importance:
            return []
        part = Part(key, importance.input_axis(key))
        _check_channels(name, importance, part, shape)
        return [part]
    if len(shape) < 2 or shape[0] != len(key):
        raise mismatch(
            name,
            f"{len(key)} experts have statistics, but the weight has shape {shape}",
            f"a stack of {len(key)} experts [{len(key)}, …]",
        )
    found = []
    for expert, member in enumerate(key):
        if member is None or member not in importance:
            continue
        part = Part(member, importance.input_axis(member) % (len(shape) - 1), expert)
        _check_channels(f"{name}[{expert}]", importance, part, shape[1:])
        found.append(part)
    return found


def _check_channels(
    name: str, importance: ImportanceMap, part: Part, shape: tuple[int, ...]
) -> None:
    channels = importance[part.key].numel()
    if len(shape) == 0 or shape[part.axis] != channels:
        raise mismatch(
            name,
            f"the statistic {part.key} has {channels} channels, but the weight has "
            f"shape {shape} (input axis {part.axis})",
            f"{channels} along that axis",
            _MISMATCH_HINT,
        )


def mismatch(
    name: str, found: str, expected: str, hint: str = ""
) -> ShapeMismatchError:
    """The one refusal of a tensor that does not fit its base or statistic:
    ``tensor NAME: FOUND; expected EXPECTED (HINT)``. Every path raises it."""
    return ShapeMismatchError(
        f"tensor {name}: {found}; expected {expected}" + (f" ({hint})" if hint else "")
    )


def check_same_shape(
    name: str, merged: Sequence[int], base: Sequence[int] | None, what: str = ""
) -> None:
    """Refuse a merged tensor whose shape differs from its base's."""
    merged, base = tuple(merged), None if base is None else tuple(base)
    if base != merged:
        raise mismatch(
            name,
            f"merged shape {merged} differs from the base's",
            what or f"the base's shape {base}",
        )


def check_statistic_shape(
    statistic: Statistic, shape: Sequence[int], base_shape: Callable[[str], Any]
) -> None:
    """Refuse a merged tensor of ``shape`` that the base tensor(s) behind it
    cannot produce (read from headers before any tensor is, so a mismatch
    fails before anything is written); ``base_shape(name)`` is the shape of
    a base checkpoint tensor."""
    shape = tuple(shape)
    name = statistic.name
    if statistic.experts is None and len(statistic.sources) == 1:
        expected = base_shape(statistic.sources[0])
        check_same_shape(name, shape, expected)
        return
    numel = math.prod(shape)
    if numel != statistic.elements:
        sources = ", ".join(statistic.sources[:2])
        check_same_shape(
            name, shape, None, f"{statistic.elements} elements in {sources} …"
        )
    if statistic.experts is not None:
        count = len(statistic.experts)
        if not shape or shape[0] != count:
            check_same_shape(name, shape, None, f"a stack of {count} experts")
        if any(n * shape[0] != numel for n in statistic.expert_elements):
            check_same_shape(
                name,
                shape,
                None,
                f"experts of {list(statistic.expert_elements)} elements",
            )


# --- relaxing ----------------------------------------------------------------------


def relax_tensor(
    name: str,
    base: torch.Tensor | None,
    merged: torch.Tensor,
    importance: ImportanceMap,
    key: Key | None,
    omega: float,
    *,
    in_place: bool = False,
) -> torch.Tensor:
    """``merged`` relaxed toward ``base`` with the statistic(s) ``key``, in
    ``merged``'s dtype and on its device: a tensor along its input axis, a
    stack of experts slice by slice (see :func:`parts`; an expert without a
    statistic keeps its slice). ``merged`` itself when the artifact has no
    statistic for ``key`` or the merge has no floating-point value.

    ``in_place``: the caller owns ``merged`` (a method's fresh result) and it
    is written where it lies, saving an output-sized allocation; otherwise the
    inputs are never written. Shapes and channel counts are checked first:
    a mismatch raises :func:`mismatch`'s error naming ``name``.
    """
    if not has_statistic(importance, key):
        return merged
    if base is None:
        raise AimConfigError(
            f"tensor {name}: relaxing it needs the base model's tensor "
            f"({key}), and the merge has none"
        )
    if not merged.is_floating_point():
        return merged
    check_same_shape(name, merged.shape, base.shape)
    omega = kernels.omega_value(omega)
    steps = parts(name, merged.shape, importance, key)
    if isinstance(key, str):
        (part,) = steps
        vector = importance.on_device(part.key, merged.device)
        if in_place:
            return kernels.aim_relax_(merged, base, vector, omega, part.axis)
        return kernels.aim_relax(base, merged, vector, omega, input_axis=part.axis)
    result = merged if in_place else merged.clone()
    for part in steps:
        vector = importance.on_device(part.key, merged.device)
        kernels.aim_relax_(
            result[part.expert], base[part.expert], vector, omega, part.axis
        )
    return result


def relax_with(
    base: torch.Tensor,
    merged: torch.Tensor,
    statistic: torch.Tensor,
    omega: float,
    input_axis: int = -1,
    *,
    name: str = "weight",
) -> torch.Tensor:
    """``B + (M − B)·(1 − s·(1 − ω))`` with a raw statistic vector (not an
    artifact key) along ``input_axis``; a new tensor in ``merged``'s dtype.
    Shapes and the channel count are refused as :func:`relax_tensor` refuses
    them."""
    check_same_shape(name, merged.shape, base.shape)
    shape = tuple(merged.shape)
    if not shape or not -len(shape) <= input_axis < len(shape):
        raise mismatch(
            name,
            f"input axis {input_axis} is out of range for shape {shape}",
            "an axis of the weight",
        )
    if shape[input_axis] != statistic.numel():
        raise mismatch(
            name,
            f"the statistic has {statistic.numel()} channels, but the weight has "
            f"shape {shape} (input axis {input_axis})",
            f"{statistic.numel()} along that axis",
        )
    omega = kernels.omega_value(omega)
    return kernels.aim_relax(base, merged, statistic, omega, input_axis=input_axis)


def input_factor(
    name: str,
    importance: ImportanceMap,
    key: str,
    omega: float,
    channels: int,
) -> torch.Tensor:
    """The float32 factor ``1 − s·(1 − ω)`` per input channel of statistic
    ``key``, for a weight with ``channels`` inputs along its last axis: what
    scaling an adapter's ``lora_A`` ``[r, in]`` column by column takes. The
    channel count is refused as :func:`parts` refuses it."""
    _check_channels(name, importance, Part(key, -1), (channels,))
    return kernels.relax_factor(importance[key], kernels.omega_value(omega))
