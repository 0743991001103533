"""Which modules calibration measures, and how each kind's input is observed.

A :class:`TargetKind` is a family of weight-owning modules AIM relaxes
(Linear, GPT-2 Conv1D, norms, mixture-of-experts routers and stacked experts;
never embeddings): the module types or class names that belong to it, the
weight axis its input channels run along, and its **hook strategy**, the way
the observer (:class:`~mergekit_aim.calibration.observer.ChannelStatistics`)
sees the module's input. Most kinds read the first tensor among the module's
arguments (:data:`FIRST_INPUT`). Stacked experts (transformers' ``…Experts``
modules, one 3-D ``gate_up_proj`` and ``down_proj`` for all experts) see only
the tokens routed to each expert, so their kind declares
:data:`ROUTED_EXPERTS`: one hook on the module measures every expert's
gate/up input and down input.

:func:`find_targets` lists a model's targets keyed by the checkpoint tensor
names the merge reads (through :class:`~mergekit_aim.names.NameMap`, which
applies transformers' own renaming: ``embed_out.weight`` for GPT-NeoX's head,
per-expert ``…experts.3.w1.weight`` for a slice of a stacked tensor,
``model.layers.*`` for a vision-language model's text tower), and reports
what it skips: an LM head tied to the input embedding, experts in a layout it
cannot observe, and modules off the text path (a vision tower).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from torch import nn

# Hook strategies: how a target's input is observed.
#: A forward pre-hook reads the first tensor among the module's arguments,
#: whose last dimension is the weight's input channels.
FIRST_INPUT = "first_input"
#: One forward pre-hook on a stacked-experts module reads its hidden states
#: and the router's top-k expert indices, and measures, per expert, the rows
#: routed to it (gate/up input) and its intermediate activation (down input).
ROUTED_EXPERTS = "routed_experts"
HOOK_STRATEGIES = (FIRST_INPUT, ROUTED_EXPERTS)

#: Target roles of a stacked-experts module: the input of an expert's gate and
#: up projections (the routed hidden states) and of its down projection.
GATE_UP = "gate_up"
DOWN = "down"

# Reasons recorded in provenance["skipped"] (the merge side may match them).
TIED_HEAD = "tied to the input embedding (not relaxed)"
NOT_IN_CHECKPOINT = "no such tensor in the checkpoint"
EXPERTS_LAYOUT = "experts layout not supported"
EXPERTS_FUSED = "experts stored fused in the checkpoint: not supported"
SEVERAL_SOURCES = "built from several checkpoint tensors: not supported"
VISION_TOWER = "vision tower: not measured by text calibration"
OFF_TEXT_PATH = "outside the language model: not measured by text calibration"
NO_TOKENS = "received no tokens"


@dataclass(frozen=True)
class TargetKind:
    """A family of modules whose weight AIM relaxes, its input axis and how
    its input is observed (one of :data:`HOOK_STRATEGIES`).

    A module belongs to the kind when it is an instance of ``module_types``,
    its class name matches ``class_pattern``, or ``match(module)`` holds.
    """

    name: str
    module_types: tuple[type, ...]
    class_pattern: re.Pattern | None
    input_axis: int
    hook: str = FIRST_INPUT
    match: Callable[[nn.Module], bool] | None = None


def target_kinds() -> tuple[TargetKind, ...]:
    """The kinds calibration knows, in the order a module is matched."""
    from transformers.pytorch_utils import Conv1D

    return (
        TargetKind("linear", (nn.Linear,), None, -1),
        # GPT-2 style Conv1D stores its weight [in, out].
        TargetKind("conv1d", (Conv1D,), None, 0),
        # Mixture-of-experts routers (MixtralTopKRouter, …): a 2-D weight
        # [experts, hidden] applied to the hidden state, every token.
        TargetKind("router", (), re.compile(r"Router$"), -1),
        # Stacked experts (MixtralExperts, Qwen2MoeExperts, …): recognised by
        # their 3-D parameters, whatever the class is called.
        TargetKind("experts", (), None, -1, ROUTED_EXPERTS, is_stacked_experts),
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
    """One tensor to measure: its checkpoint name, its kind's input axis and
    hook strategy, and the number of input channels.

    ``aliases`` are further checkpoint tensors that read the same input and
    carry the same statistic (an expert's up projection beside its gate
    projection). ``expert`` and ``role`` (:data:`GATE_UP` or :data:`DOWN`)
    place a stacked-experts target; ``None`` elsewhere.
    """

    module_name: str
    tensor_name: str
    kind: str
    input_axis: int
    channels: int
    hook: str = FIRST_INPUT
    aliases: tuple[str, ...] = ()
    expert: int | None = None
    role: str | None = None

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """Every checkpoint tensor this target's statistic is recorded under."""
        return (self.tensor_name, *self.aliases)


def find_targets(
    model: nn.Module, checkpoint_names: Collection[str] | None = None
) -> tuple[list[Target], dict[str, str]]:
    """Tensors to measure, keyed by checkpoint tensor name, and what was skipped.

    ``checkpoint_names`` are the tensor names of the checkpoint the merge will
    read; they are matched to the model's parameters by transformers' own
    conversion (:meth:`mergekit_aim.names.NameMap.from_model`). A module whose
    weight is in none of them (a tied LM head) is skipped and reported.
    Without it the model's own parameter names are used. ``skipped`` maps a
    checkpoint tensor name (a model parameter name where the checkpoint has
    none) to the reason it has no statistic.
    """
    from mergekit_aim.names import NameMap

    kinds = target_kinds()
    if checkpoint_names is None:
        names = NameMap.identity(n for n, _ in model.named_parameters())
    else:
        names = NameMap.from_model(model, checkpoint_names)
    tied = tied_output_embedding(model)
    off_text = _off_text_path(model)
    targets: list[Target] = []
    skipped: dict[str, str] = {}

    def sources_of(param_name: str) -> list[str]:
        # NameMap applies the head class's prefix rule too (a checkpoint saved
        # from the bare model, GPT-2 without "transformer.").
        return [s.checkpoint for s in names.sources(param_name)]

    for module_name, module in model.named_modules():
        if any(_is_under(module_name, root) for root in off_text):
            continue
        kind = _kind_of(module, kinds)
        if kind is None:
            continue
        if kind.hook == ROUTED_EXPERTS:
            found, why = _expert_targets(module_name, module, kind, names)
            targets.extend(found)
            skipped.update(why)
            continue
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        param_name = _join(module_name, "weight")
        if module is tied:
            skipped[param_name] = TIED_HEAD
            continue
        if kind.name == "norm" and weight.ndim != 1:
            continue
        if kind.name == "router" and weight.ndim != 2:
            continue
        sources = sources_of(param_name)
        if not sources:
            skipped[param_name] = NOT_IN_CHECKPOINT
            continue
        if len(sources) > 1:
            # Several checkpoint tensors concatenated into one parameter:
            # which axis they were joined along is the converter's business.
            skipped.update(dict.fromkeys(sources, SEVERAL_SOURCES))
            continue
        channels = weight.shape[kind.input_axis] if weight.ndim > 1 else weight.numel()
        targets.append(
            Target(
                module_name,
                sources[0],
                kind.name,
                kind.input_axis,
                channels,
                kind.hook,
            )
        )
    for root, reason in off_text.items():
        for param_name, _ in _named_parameters_under(model, root):
            if param_name.endswith("bias"):
                continue
            for source in sources_of(param_name) or [param_name]:
                skipped[source] = reason
    return targets, skipped


def is_stacked_experts(module: nn.Module) -> bool:
    """A module holding every expert's weights as 3-D parameters
    (``down_proj`` and ``gate_up_proj`` or ``up_proj``, experts first)."""
    params = module._parameters
    down = params.get("down_proj")
    up = params.get("gate_up_proj")
    if up is None:
        up = params.get("up_proj")
    return down is not None and up is not None and down.ndim == 3 and up.ndim == 3


def supported_experts_layout(module: nn.Module) -> bool:
    """The layout the routed-experts hook computes exactly: gate and up
    concatenated in one ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I],
    not transposed, no biases (Mixtral, Qwen2-MoE, Qwen3-MoE, …)."""
    if not (
        getattr(module, "has_gate", None) is True
        and getattr(module, "is_concatenated", None) is True
        and getattr(module, "is_transposed", None) is False
        and getattr(module, "has_bias", None) is False
        and callable(getattr(module, "_apply_gate", None))
    ):
        return False
    gate_up = module._parameters.get("gate_up_proj")
    down = module._parameters.get("down_proj")
    if gate_up is None or down is None or gate_up.ndim != 3 or down.ndim != 3:
        return False
    experts, double, hidden = gate_up.shape
    return down.shape == (experts, hidden, double // 2) and double % 2 == 0


def _expert_targets(
    module_name: str, module: nn.Module, kind: TargetKind, names: Any
) -> tuple[list[Target], dict[str, str]]:
    """Per expert, a gate/up target (channels H) and a down target (channels
    I), keyed by the expert's own checkpoint tensors; or why there are none."""
    params = [
        _join(module_name, p)
        for p, value in module._parameters.items()
        if value is not None and value.ndim == 3
    ]

    def report(reason: str) -> dict[str, str]:
        found: dict[str, str] = {}
        for param in params:
            for source in names.sources(param) or ():
                found[source.checkpoint] = reason
            if not names.sources(param):
                found[param] = reason
        return found

    if not supported_experts_layout(module):
        return [], report(EXPERTS_LAYOUT)
    gate_up = names.experts(_join(module_name, "gate_up_proj"))
    down = names.experts(_join(module_name, "down_proj"))
    if not gate_up or not down:
        missing = not names.sources(_join(module_name, "gate_up_proj"))
        return [], report(NOT_IN_CHECKPOINT if missing else EXPERTS_FUSED)
    num_experts, double, hidden = module.gate_up_proj.shape
    targets = []
    for expert in range(num_experts):
        for role, tensors, channels in (
            (GATE_UP, gate_up.get(expert), hidden),
            (DOWN, down.get(expert), double // 2),
        ):
            if not tensors:
                continue
            # Sorted, so that the primary name does not depend on the order
            # the checkpoint's names came in (w1 before w3, gate_ before up_).
            tensors = sorted(tensors)
            targets.append(
                Target(
                    module_name,
                    tensors[0],
                    kind.name,
                    kind.input_axis,
                    channels,
                    kind.hook,
                    aliases=tuple(tensors[1:]),
                    expert=expert,
                    role=role,
                )
            )
    return targets, {}


def _kind_of(module: nn.Module, kinds: tuple[TargetKind, ...]) -> TargetKind | None:
    for kind in kinds:
        if kind.module_types and isinstance(module, kind.module_types):
            return kind
        if kind.class_pattern and kind.class_pattern.search(type(module).__name__):
            return kind
        if kind.match is not None and kind.match(module):
            return kind
    return None


def _join(module_name: str, param: str) -> str:
    return f"{module_name}.{param}" if module_name else param


def _is_under(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


def _named_parameters_under(model: nn.Module, root: str):
    for name, param in model.named_parameters():
        if _is_under(name, root):
            yield name, param


def _off_text_path(model: nn.Module) -> dict[str, str]:
    """Top modules a text-only forward pass does not reach, with the reason.

    A vision-language model's language tower is its decoder
    (``get_decoder()``, e.g. ``model.language_model``); with the LM head it is
    the text path. Every other child along the way to the decoder (the vision
    tower, a multimodal projector) is off it. For a causal LM the decoder is a
    direct child and nothing is off the path but what holds no weight.
    """
    get_decoder = getattr(model, "get_decoder", None)
    if get_decoder is None:
        return {}
    try:
        decoder = get_decoder()
    except Exception:  # models that do not implement it as expected
        return {}
    if not isinstance(decoder, nn.Module) or decoder is model:
        return {}
    paths = {id(m): n for n, m in model.named_modules()}
    decoder_name = paths.get(id(decoder))
    if not decoder_name:
        return {}
    keep = {decoder_name}
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if isinstance(head, nn.Module) and id(head) in paths:
        keep.add(paths[id(head)])
    off: dict[str, str] = {}
    # Walk from the model down to the decoder; siblings of each step are off
    # the text path unless they hold the head.
    parts = decoder_name.split(".")
    for depth in range(len(parts)):
        parent_name = ".".join(parts[:depth])
        parent = model.get_submodule(parent_name) if parent_name else model
        for child_name, child in parent.named_children():
            full = _join(parent_name, child_name)
            if _is_under(decoder_name, full) or any(_is_under(k, full) for k in keep):
                continue
            if not any(p is not None for p in child.parameters()):
                continue
            vision = re.search(r"vis(ion|ual)|image|patch", full, re.IGNORECASE)
            off[full] = VISION_TOWER if vision else OFF_TEXT_PATH
    return off


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
