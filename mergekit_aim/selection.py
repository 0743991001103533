"""Which tensors of a merge AIM relaxes, and with which ω.

One rule for every path that relaxes weights: planning a mergekit merge, the
post-hoc ``relax`` of a checkpoint, and ``tune``'s candidates. A tensor is
relaxed when

1. no ``exclude`` pattern (a regular expression, searched) matches any of its
   names,
2. the importance artifact holds a statistic for it, and
3. its ω, evaluated from a mergekit parameter setting (a scalar, a gradient
   over the layers, or a filtered list), exists and is below 1.

The reasons are checked in that order, and the first one that fails is what
the coverage report gives for the tensor.

A merged tensor's statistic is the base checkpoint's own (:func:`find_statistic`):
under the same name, or, where mergekit wrote the tensor under transformers'
model name, under the checkpoint tensor it was converted from (a renamed
router: that tensor's statistic; a stack of experts ``[E, out, in]``: one
statistic per expert, each slice relaxed with its own). The coverage report
counts tensors and weight elements, and names every weight with an input that
had no statistic and every expert that had none.

ω settings follow mergekit's own semantics (``mergekit.config.evaluate_setting``):
a filter matches when it is a substring of the tensor name, and a gradient is
read at ``t``, the layer's position in the stack (``layer / (layers − 1)``;
0 for tensors outside the layers).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mergekit.config import ConditionalParameter, ParameterSetting, evaluate_setting
from pydantic import TypeAdapter, ValidationError

from mergekit_aim.errors import AimConfigError
from mergekit_aim.kernels import omega_value

RELAXED = "relaxed"
EXCLUDED = "excluded by aim.exclude"
NO_STATISTIC = "no input statistic"
NO_OMEGA = "no aim.omega filter matched"
OMEGA_ONE = "omega = 1 (plain merge)"

# The feed-forward part of a transformer block under the names transformers
# uses across families (Llama/Qwen ``mlp``, Gemma/Phi ``mlp``, OLMo/Falcon
# ``mlp``, T5-style ``feed_forward``/``ffn``, Mixtral ``block_sparse_moe``).
# As mergekit filters they are substrings, so each is bracketed by dots.
MLP_FILTERS = (".mlp.", ".feed_forward.", ".ffn.", ".block_sparse_moe.")

_LAYER_INDEX = re.compile(r"\.(\d+)\.")
_SETTING: TypeAdapter = TypeAdapter(ParameterSetting)


def check_omega_setting(setting: Any) -> None:
    """Refuse a ω setting with any value outside [0, 1] (or an empty list)."""
    if isinstance(setting, ConditionalParameter):
        check_omega_setting(setting.value)
    elif isinstance(setting, list):
        if not setting:
            raise ValueError("omega must not be an empty list")
        for item in setting:
            check_omega_setting(item)
    else:
        omega_value(setting)


def compile_exclude(patterns: Iterable[str]) -> list[re.Pattern]:
    """The exclude patterns compiled; a bad one is a ValueError naming it."""
    if isinstance(patterns, str):
        raise ValueError(
            f"exclude must be a list of patterns, not the string {patterns!r}"
        )
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError) as error:
            raise ValueError(
                f"exclude pattern {pattern!r} is not a valid regular expression: "
                f"{error}"
            ) from None
    return compiled


def is_mlp(name: str) -> bool:
    """Whether ``name`` is a feed-forward (MLP) tensor, for the split ω."""
    return any(marker in name for marker in MLP_FILTERS)


def split_omega(omega_other: float, omega_mlp: float) -> ParameterSetting:
    """The filtered ω setting giving MLP tensors ``omega_mlp`` and every other
    tensor ``omega_other``; a plain scalar when the two are equal.

    It is an ordinary ``aim: {omega: ...}`` value: pasted into a merge config
    it relaxes exactly what ``tune`` relaxed.
    """
    omega_other, omega_mlp = omega_value(omega_other), omega_value(omega_mlp)
    if omega_other == omega_mlp:
        return omega_other
    return [
        *(
            ConditionalParameter(filter=marker, value=omega_mlp)
            for marker in MLP_FILTERS
        ),
        ConditionalParameter(value=omega_other),
    ]


def setting_json(setting: ParameterSetting) -> Any:
    """A ω setting as plain JSON/YAML data (what an ``aim:`` block would hold)."""
    if isinstance(setting, ConditionalParameter):
        return {"filter": setting.filter, "value": setting_json(setting.value)}
    if isinstance(setting, list):
        return [setting_json(item) for item in setting]
    return omega_value(setting)


def uses_gradient(setting: ParameterSetting) -> bool:
    """Whether evaluating ``setting`` depends on the layer position ``t``."""
    if isinstance(setting, ConditionalParameter):
        return uses_gradient(setting.value)
    if isinstance(setting, list):
        if all(isinstance(item, (int, float, str)) for item in setting):
            return len(setting) > 1
        return any(uses_gradient(item) for item in setting)
    return False


def layer_positions(names: Iterable[str]) -> dict[str, float]:
    """``t`` for each tensor name, as mergekit computes it for a ``models:`` merge.

    A layer's tensors carry the layer index as their first numeric name
    component; the stack's size is one more than the largest index found.
    Tensors outside the layers (embeddings, final norm, head) get 0.
    """
    indices = {}
    for name in names:
        match = _LAYER_INDEX.search(name)
        if match:
            indices[name] = int(match.group(1))
    count = max(indices.values(), default=0) + 1
    return {
        name: (indices[name] / (count - 1) if count > 1 else 1.0)
        if name in indices
        else 0.0
        for name in names
    }


@dataclass(frozen=True)
class Decision:
    """Whether one tensor is relaxed (``omega`` set) or why it is left alone."""

    reason: str
    omega: float | None = None

    @property
    def relaxed(self) -> bool:
        return self.reason == RELAXED


class Selection:
    """The rule above for one ω setting and one list of exclude patterns."""

    def __init__(self, omega: Any, exclude: Iterable[str] = ()):
        try:
            # Plain data (a float, or [{filter:, value:}, ...] from JSON) becomes
            # mergekit's own setting objects, as in a validated merge config.
            omega = _SETTING.validate_python(omega)
            check_omega_setting(omega)
            patterns = compile_exclude(exclude)
        except (ValueError, ValidationError) as error:
            raise AimConfigError(f"aim settings: {error}") from None
        self.omega: ParameterSetting = omega
        self.exclude = tuple(p.pattern for p in patterns)
        self._patterns = patterns

    def excluded_by(self, *names: str | None) -> str | None:
        """The first exclude pattern matching any of ``names``, if one does."""
        for pattern in self._patterns:
            if any(name and pattern.search(name) for name in names):
                return pattern.pattern
        return None

    def decide(
        self,
        name: str,
        statistic: str | Sequence[str | None] | None,
        t: float = 0.0,
    ) -> Decision:
        """The decision for output tensor ``name``.

        ``statistic`` is the artifact key of the base tensor ``name`` is
        relaxed toward (``None`` when the artifact has none), or for a stack of
        experts the key of each expert (``None`` for an expert without one);
        exclude patterns are tried on the output name and every key (for a
        stack of experts a pattern matching one expert's checkpoint name
        leaves the whole stack alone).
        """
        keys = _keys(statistic)
        if self.excluded_by(name, *keys) is not None:
            return Decision(EXCLUDED)
        if not keys:
            return Decision(NO_STATISTIC)
        omega = evaluate_setting(name, self.omega, t, validate=omega_value)
        if omega is None:
            return Decision(NO_OMEGA)
        if omega >= 1.0:
            return Decision(OMEGA_ONE)
        return Decision(RELAXED, float(omega))


def _keys(statistic: str | Sequence[str | None] | None) -> list[str]:
    if statistic is None:
        return []
    if isinstance(statistic, str):
        return [statistic]
    return [key for key in statistic if key is not None]


def fold_layers(name: str) -> str:
    """``model.layers.3.mlp.gate.weight`` → ``model.layers.*.mlp.gate.weight``."""
    return _LAYER_INDEX.sub(".*.", _LAYER_INDEX.sub(".*.", name))


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
    def importance_key(self) -> str | tuple[str | None, ...] | None:
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
            count = max(experts) + 1
            slices = tuple(tuple(experts.get(e, ())) for e in range(count))
            keys = tuple(
                next((n for n in members if n in importance), None)
                for members in slices
            )
            ndim = 1 + max(len(checkpoint.shape(n) or ()) for n in checkpoint_names)
            return Statistic(
                name,
                checkpoint_names,
                elements,
                ndim,
                experts=keys,
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
