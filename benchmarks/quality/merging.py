"""Merges through mergekit, and AIM and its controls applied to them in memory.

Every merge is run once, plainly, by mergekit's own pipeline
(``run_merge`` with a ``MergeConfiguration``). AIM's output is exactly the
relaxation of the plain output (tested in ``tests/test_methods_pipeline.py``),
so AIM at any ω and both controls are computed from that one plain merge:

* ``aim``: the kernel with the base's artifact (what
  :func:`mergekit_aim.offline.apply_aim` does).
* ``uniform``: every relaxed tensor's delta scaled by one number, the mean
  over the tensor of AIM's per-element factor ``1 − s·(1 − ω)``. Same overall
  shrinkage as AIM, no activation information.
* ``permuted``: AIM with each tensor's importance vector randomly permuted:
  the same distribution of factors, assigned to the wrong channels.

Both controls call :func:`mergekit_aim.kernels.aim_relax` (a constant
statistic makes ``s = 1`` everywhere, so ``ω' = f`` scales the delta by
``f``; the factors themselves are read off the kernel), so the formula stays
in one place.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_aim.importance import ImportanceMap

LOG = logging.getLogger(__name__)

METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear")
DARE = ("dare_ties", "dare_linear")
WEIGHTINGS = ("1", "1/k")
VARIANTS = ("plain", "aim", "uniform", "permuted", "tuned")


@dataclass(frozen=True)
class MergeSpec:
    """One merge of the grid: method, expert set, expert weighting and seed."""

    method: str
    experts: tuple[str, ...]
    weights: str
    seed: int

    @property
    def name(self) -> str:
        weights = "w1" if self.weights == "1" else "w1k"
        return f"{self.method}-{'+'.join(self.experts)}-{weights}-s{self.seed}"

    def weight(self) -> float:
        return 1.0 if self.weights == "1" else 1.0 / len(self.experts)


# mergekit's TIES normalizes by the sum of the weights (``normalize`` defaults
# to true): scaling every weight by 1/k leaves the merge unchanged up to
# float rounding.
WEIGHT_NORMALIZED = ("ties",)


def merge_grid(
    expert_sets: Sequence[tuple[str, ...]],
    dare_seeds: Sequence[int],
    methods: Sequence[str] = METHODS,
) -> list[MergeSpec]:
    """Every method × expert set × weighting; DARE methods once per seed;
    TIES with weights 1 only (it divides by the weights' sum, so its 1/k merge
    is the same merge)."""
    return [
        MergeSpec(method, experts, weights, seed)
        for experts in expert_sets
        for weights in WEIGHTINGS
        for method in methods
        if not (method in WEIGHT_NORMALIZED and weights != "1")
        for seed in (dare_seeds if method in DARE else (0,))
    ]


def merge_config(
    spec: MergeSpec, base: Path, experts: Mapping[str, Path], density: float
) -> dict:
    """The mergekit configuration of ``spec`` (float32, methods' own defaults)."""
    parameters: dict[str, float] = {"weight": spec.weight()}
    if spec.method != "task_arithmetic":
        parameters["density"] = density
    return {
        "merge_method": spec.method,
        "base_model": str(base),
        "models": [
            {"model": str(experts[e]), "parameters": dict(parameters)}
            for e in spec.experts
        ],
        "dtype": "float32",
    }


def run_plain_merge(
    spec: MergeSpec,
    base: Path,
    experts: Mapping[str, Path],
    density: float,
    out_root: Path,
) -> Path:
    """Merge ``spec`` with mergekit into ``out_root/<name>`` (reused if present)."""
    import yaml

    from mergekit_aim.plugin import run_yaml_merge

    out = Path(out_root) / spec.name
    if (out / "model.safetensors").exists():
        return out
    text = yaml.safe_dump(merge_config(spec, base, experts, density), sort_keys=False)
    run_yaml_merge(text, out, seed=spec.seed)
    (out / "mergekit_config.yml").write_text(text)
    return out


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def _relax_all(
    base: Mapping[str, torch.Tensor],
    merged: Mapping[str, torch.Tensor],
    importance: ImportanceMap,
    choose: Callable[[str], tuple[torch.Tensor, float]],
) -> dict[str, torch.Tensor]:
    """Every tensor with a statistic relaxed by the kernel with the statistic
    and ω that ``choose(name)`` returns; every other tensor as merged (the
    coverage of :func:`mergekit_aim.offline.apply_aim`). Inputs are not modified.
    """
    from mergekit_aim.kernels import aim_relax

    out = dict(merged)
    for name in importance:
        statistic, omega = choose(name)
        out[name] = aim_relax(
            base[name],
            merged[name],
            statistic,
            omega,
            input_axis=importance.input_axis(name),
        )
    return out


def aim_state(
    base: Mapping[str, torch.Tensor],
    merged: Mapping[str, torch.Tensor],
    importance: ImportanceMap,
    omega: float,
    omega_mlp: float | None = None,
) -> dict[str, torch.Tensor]:
    """AIM at ``omega``: equal to ``apply_aim(base, merged, importance, omega)``;
    with ``omega_mlp``, MLP tensors at that ω instead (``tune``'s split)."""
    from mergekit_aim.selection import is_mlp

    mlp = omega if omega_mlp is None else omega_mlp
    return _relax_all(
        base,
        merged,
        importance,
        lambda name: (importance[name], mlp if is_mlp(name) else omega),
    )


def aim_factors(importance: ImportanceMap, name: str, omega: float) -> torch.Tensor:
    """AIM's per-input-channel factor ``1 − s·(1 − ω)`` for tensor ``name``,
    read off the kernel (base 0, merged 1)."""
    from mergekit_aim.kernels import aim_relax

    stat = importance[name]
    ones = torch.ones(1, stat.numel())
    return aim_relax(torch.zeros_like(ones), ones, stat, omega, input_axis=-1)[0]


def uniform_state(
    base: Mapping[str, torch.Tensor],
    merged: Mapping[str, torch.Tensor],
    importance: ImportanceMap,
    omega: float,
) -> dict[str, torch.Tensor]:
    """Each relaxed tensor's delta scaled by AIM's mean factor over the tensor."""

    def choose(name: str) -> tuple[torch.Tensor, float]:
        factor = float(aim_factors(importance, name, omega).mean())
        return torch.ones_like(importance[name]), factor

    return _relax_all(base, merged, importance, choose)


def permuted_state(
    base: Mapping[str, torch.Tensor],
    merged: Mapping[str, torch.Tensor],
    importance: ImportanceMap,
    omega: float,
    *,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """AIM with each tensor's statistic randomly permuted (seeded per tensor)."""

    def choose(name: str) -> tuple[torch.Tensor, float]:
        statistic = importance[name]
        return statistic[channel_order(name, statistic.numel(), seed)], omega

    return _relax_all(base, merged, importance, choose)


def channel_order(name: str, size: int, seed: int = 0) -> torch.Tensor:
    """The permuted control's order of tensor ``name``'s input channels
    (seeded by the name, so every merge gets the same one)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:7], "big"))
    return torch.randperm(size, generator=generator)


def control_factors(
    importance: ImportanceMap, name: str, omega: float, control: str
) -> torch.Tensor:
    """The per-input-channel factor a control scales tensor ``name``'s delta
    by: ``uniform``, AIM's mean factor on every channel; ``permuted``, AIM's
    factors in :func:`channel_order` (a factor is a function of one channel's
    ``s``, and ``max a`` does not change under a permutation). What
    :func:`uniform_state` and :func:`permuted_state` apply, for deltas kept
    in factored form (a LoRA's ``lora_A`` columns)."""
    factors = aim_factors(importance, name, omega)
    if control == "uniform":
        return factors.mean().expand_as(factors)
    if control == "permuted":
        return factors[channel_order(name, factors.numel())]
    raise ValueError(f"unknown control {control!r}")
