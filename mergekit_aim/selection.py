"""Which tensors of a merge AIM relaxes, and with which ω.

One rule for every path that relaxes weights (a mergekit merge, the post-hoc
``relax`` of a checkpoint or state dict, ``tune``'s candidates), applied by
:mod:`mergekit_aim.relaxation`. A tensor is relaxed when

1. no ``exclude`` pattern (a regular expression, searched) matches any of its
   names,
2. the importance artifact holds a statistic for it, and
3. its ω, evaluated from a mergekit parameter setting (a scalar, a gradient
   over the layers, or a filtered list), exists and is below 1.

The reasons are checked in that order, and the first one that fails is what
the coverage report gives for the tensor. Which statistic a tensor has, how it
is relaxed and the coverage record are the relaxation core's
(:mod:`mergekit_aim.relaxation`), the only caller of :meth:`Selection.decide`.

ω settings follow mergekit's own semantics (``mergekit.config.evaluate_setting``):
a filter matches when it is a substring of the tensor name, and a gradient is
read at ``t``, the layer's position in the stack (``layer / (layers − 1)``;
0 for tensors outside the layers).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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
