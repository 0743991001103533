"""Which modules calibration measures, and how each kind's input is observed.

A :class:`TargetKind` is a family of weight-owning modules AIM relaxes
(Linear, GPT-2 Conv1D, norms; never embeddings): the module types or class
names that belong to it, the weight axis its input channels run along, and its
**hook strategy**, the way the observer
(:class:`~mergekit_aim.calibration.observer.ChannelStatistics`) sees the
module's input. Every kind today reads it the same way (:data:`FIRST_INPUT`);
a kind whose input cannot be read like that (fused 3-D expert weights, which
see only the tokens routed to each expert) declares a strategy of its own and
the observer adds one case for it, leaving the others alone.

:func:`find_targets` lists a model's targets keyed by the checkpoint tensor
names the merge reads, skipping an LM head tied to the input embedding.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from torch import nn

# Hook strategies: how a target's input is observed.
#: A forward pre-hook reads the first tensor among the module's arguments,
#: whose last dimension is the weight's input channels.
FIRST_INPUT = "first_input"
HOOK_STRATEGIES = (FIRST_INPUT,)


@dataclass(frozen=True)
class TargetKind:
    """A family of modules whose weight AIM relaxes, its input axis and how
    its input is observed (one of :data:`HOOK_STRATEGIES`)."""

    name: str
    module_types: tuple[type, ...]
    class_pattern: re.Pattern | None
    input_axis: int
    hook: str = FIRST_INPUT


def target_kinds() -> tuple[TargetKind, ...]:
    """The kinds calibration knows, in the order a module is matched."""
    from transformers.pytorch_utils import Conv1D

    return (
        TargetKind("linear", (nn.Linear,), None, -1),
        # GPT-2 style Conv1D stores its weight [in, out].
        TargetKind("conv1d", (Conv1D,), None, 0),
        # Norm weights scale the hidden state elementwise: their input channels
        # are the weight's own entries. Model-specific norms (LlamaRMSNorm, …)
        # are matched by class name, as transformers defines one per model.
        TargetKind(
            "norm",
            (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm),
            re.compile(r"(RMS|Layer|Group)?Norm$"),
            0,
        ),
    )


@dataclass(frozen=True)
class Target:
    """One module to measure: its weight's checkpoint name, its kind's input
    axis and hook strategy, and the number of input channels."""

    module_name: str
    tensor_name: str
    kind: str
    input_axis: int
    channels: int
    hook: str = FIRST_INPUT


def find_targets(
    model: nn.Module, checkpoint_names: Collection[str] | None = None
) -> tuple[list[Target], dict[str, str]]:
    """Modules to measure, keyed by checkpoint tensor name, and what was skipped.

    ``checkpoint_names`` are the tensor names of the checkpoint the merge will
    read; a module whose weight is not among them (a tied LM head) is skipped
    and reported. Without it the model's own parameter names are used.
    """
    kinds = target_kinds()
    prefix = getattr(model, "base_model_prefix", "") or ""
    tied = tied_output_embedding(model)
    targets: list[Target] = []
    skipped: dict[str, str] = {}
    for module_name, module in model.named_modules():
        kind = _kind_of(module, kinds)
        if kind is None:
            continue
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        param_name = f"{module_name}.weight" if module_name else "weight"
        if module is tied:
            skipped[param_name] = "tied to the input embedding (not relaxed)"
            continue
        if kind.name == "norm" and weight.ndim != 1:
            continue
        tensor_name = checkpoint_name(param_name, prefix, checkpoint_names)
        if tensor_name is None:
            skipped[param_name] = "no such tensor in the checkpoint"
            continue
        channels = weight.shape[kind.input_axis] if weight.ndim > 1 else weight.numel()
        targets.append(
            Target(
                module_name,
                tensor_name,
                kind.name,
                kind.input_axis,
                channels,
                kind.hook,
            )
        )
    return targets, skipped


def _kind_of(module: nn.Module, kinds: tuple[TargetKind, ...]) -> TargetKind | None:
    for kind in kinds:
        if isinstance(module, kind.module_types):
            return kind
        if kind.class_pattern and kind.class_pattern.search(type(module).__name__):
            return kind
    return None


def tied_output_embedding(model: nn.Module) -> nn.Module | None:
    """The LM head when it shares its weight with the input embedding."""
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    if get_out is None or get_in is None:
        return None
    try:
        out, inp = get_out(), get_in()
    except (AttributeError, NotImplementedError):
        return None
    if out is None or inp is None:
        return None
    if getattr(out, "weight", None) is getattr(inp, "weight", object()):
        return out
    return None


def checkpoint_name(
    param_name: str, prefix: str, names: Collection[str] | None
) -> str | None:
    """The checkpoint's name for the model parameter ``param_name``, if any."""
    if names is None:
        return param_name
    candidates = [param_name]
    # Checkpoints saved from the bare model (e.g. the original GPT-2) omit the
    # head class's prefix ("transformer.").
    if prefix and param_name.startswith(prefix + "."):
        candidates.append(param_name[len(prefix) + 1 :])
    for name in candidates:
        if name in names:
            return name
    return None
