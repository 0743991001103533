"""One weight, three spellings: checkpoint tensor, model parameter, mergekit output.

A checkpoint on disk names its tensors one way
(``block_sparse_moe.experts.3.w1.weight``, ``embed_out.weight``,
``model.layers.0…`` of a vision-language model); transformers
renames, and for mixture-of-experts fuses, them as it loads
(``mlp.experts.gate_up_proj`` holding every expert, ``lm_head.weight``,
``model.language_model.layers.0…``); mergekit 0.1.5 reads checkpoints through
that same conversion and writes its merge under the model's names.

:class:`NameMap` applies transformers' own conversion (the renamings and
converters it would run to load the checkpoint) to every checkpoint name, once,
and answers both ways: which model tensor a checkpoint tensor becomes, and which
checkpoint tensors (and, for stacked experts, which expert slice of it) a model
tensor is made of. Importance artifacts stay keyed by the checkpoint's own names.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """A checkpoint tensor that a model tensor is built from.

    ``expert`` is the index along the model tensor's first axis where stacked
    experts put it; ``None`` when the checkpoint tensor is the whole model tensor.
    """

    checkpoint: str
    expert: int | None = None


class NameMap:
    """Checkpoint tensor names ↔ model tensor names, by transformers' conversion."""

    def __init__(self, to_model: dict[str, tuple[str, int | None]]):
        self._to_model = dict(to_model)
        self._sources: dict[str, list[Source]] = {}
        for checkpoint, (model, expert) in self._to_model.items():
            self._sources.setdefault(model, []).append(Source(checkpoint, expert))
        for sources in self._sources.values():
            sources.sort(key=lambda s: -1 if s.expert is None else s.expert)

    @classmethod
    def identity(cls, checkpoint_names: Iterable[str]) -> NameMap:
        """Names equal in checkpoint and model (no conversion known)."""
        return cls({name: (name, None) for name in checkpoint_names})

    @classmethod
    def from_model(cls, model: Any, checkpoint_names: Iterable[str]) -> NameMap:
        """The conversion transformers applies to load ``checkpoint_names`` into
        ``model`` (a ``PreTrainedModel``, possibly on the meta device)."""
        # The loading API of transformers 5, which mergekit 0.1.5 itself uses.
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        try:
            transforms = get_model_conversion_mapping(model)
        except Exception as error:  # custom code, unusual classes
            LOG.info("names: no conversion for %s (%s)", type(model).__name__, error)
            transforms = []
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        prefix = getattr(model, "base_model_prefix", None) or None
        model_names = {name: True for name, _ in _model_tensors(model)}
        mapping = {}
        for name in checkpoint_names:
            target, pattern = rename_source_key(
                name, renamings, converters, prefix, model_names
            )
            mapping[name] = (target, _expert_index(name, pattern, converters))
        return cls(mapping)

    @classmethod
    def from_checkpoint(
        cls,
        path: str,
        checkpoint_names: Collection[str],
        *,
        trust_remote_code: bool = False,
    ) -> NameMap:
        """The map for a checkpoint directory, from a model built on the meta
        device from its config (no weight is read)."""
        model = meta_model(path, trust_remote_code=trust_remote_code)
        if model is None:
            return cls.identity(checkpoint_names)
        return cls.from_model(model, checkpoint_names)

    def to_model(self, checkpoint_name: str) -> str | None:
        """The model tensor ``checkpoint_name`` is loaded into."""
        found = self._to_model.get(checkpoint_name)
        return None if found is None else found[0]

    def sources(self, model_name: str) -> list[Source]:
        """The checkpoint tensors ``model_name`` is built from (by expert)."""
        return list(self._sources.get(model_name, ()))

    def experts(self, model_name: str) -> dict[int, list[str]]:
        """Stacked experts: expert index → the checkpoint tensors in its slice
        of ``model_name`` (e.g. ``{3: [...w1.weight, ...w3.weight]}``); empty
        when ``model_name`` is no stack of experts."""
        found: dict[int, list[str]] = {}
        for source in self._sources.get(model_name, ()):
            if source.expert is not None:
                found.setdefault(source.expert, []).append(source.checkpoint)
        return found

    def renamed(self) -> dict[str, str]:
        """Checkpoint → model names wherever they differ."""
        return {c: m for c, (m, _) in self._to_model.items() if c != m}


def lazy_name_map(checkpoint: Any) -> Callable[[], NameMap]:
    """A callable returning the :class:`NameMap` of ``checkpoint`` (a
    :class:`~mergekit_aim.checkpoint.CheckpointIndex`), built on its first call:
    building one constructs the model on the meta device, which only a name
    the checkpoint lacks needs."""
    return functools.cache(
        lambda: NameMap.from_checkpoint(checkpoint.path, checkpoint.tensors)
    )


def _model_tensors(model: Any) -> Iterable[tuple[str, Any]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _expert_index(name: str, pattern: str | None, converters: list) -> int | None:
    """The expert a checkpoint tensor is stacked as, when a converter stacks
    per-expert tensors (``MergeModulelist`` along the first axis)."""
    if pattern is None or "*" not in pattern:
        return None
    for converter in converters:
        if pattern not in converter.source_patterns:
            continue
        operations = list(getattr(converter, "operations", ()) or ())
        stacks = [
            op
            for op in operations
            if type(op).__name__ == "MergeModulelist" and getattr(op, "dim", 0) == 0
        ]
        if not stacks:
            return None
        regex = re.escape(pattern).replace(r"\*", r"(\d+)")
        match = re.search(regex, name)
        return int(match.group(1)) if match else None
    return None


def meta_model(path: str, *, trust_remote_code: bool = False) -> Any | None:
    """The model class the checkpoint's config names, built on the meta device.

    The class is the config's ``architectures[0]`` (what the checkpoint was
    saved from: a causal LM, or a vision-language model whose language tower
    is merged); ``None`` when transformers has no such class.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as error:
        LOG.info("names: cannot read the config of %s (%s)", path, error)
        return None
    return meta_model_for_config(config)


def meta_model_for_config(config: Any) -> Any | None:
    """The model class ``config`` names (a transformers config), built on the
    meta device; ``None`` when transformers has no such class."""
    import torch

    model_class = model_class_for(config)
    if model_class is None:
        return None
    try:
        with torch.device("meta"):
            return model_class._from_config(config)
    except Exception as error:
        LOG.info("names: cannot build %s on meta (%s)", model_class.__name__, error)
        return None


def model_class_for(config: Any) -> Any | None:
    """The transformers class a config's ``architectures`` names, if known."""
    import transformers

    for name in getattr(config, "architectures", None) or ():
        found = getattr(transformers, name, None)
        if found is not None:
            return found
    return None


# --- PEFT adapter keys ---------------------------------------------------------

PEFT_PREFIX = "base_model.model."
_PEFT_WRAPPER = "base_layer"
_TOKEN_ADAPTER = "token_adapter"


@dataclass(frozen=True)
class PeftTensor:
    """What one tensor of a PEFT adapter is, in the base model's names.

    ``module`` is the adapted module as the model names it
    (``model.layers.0.self_attn.q_proj``); ``part`` the adapter tensor's kind:
    ``lora_A``/``lora_B`` (and ``lora_embedding_A``/``_B``, or any other
    ``lora_*`` tensor a variant adds, such as DoRA's
    ``lora_magnitude_vector``), or ``"copy"`` for a full copy of a base tensor
    (``modules_to_save``, a saved embedding layer). ``parameter`` is the base
    model parameter the tensor concerns: the adapted ``module.weight`` for a
    LoRA tensor, the copied parameter for a copy. ``depth`` counts the
    ``base_layer`` wrappers between ``module`` and the LoRA tensor: PEFT nests
    one wrapper per targeted parameter of a module (``target_parameters``), so
    the depth says which of them the tensor adapts. ``tensor`` is the last
    name component (``weight``, ``bias``, or the part itself for a bare
    parameter).
    """

    key: str
    module: str
    part: str
    parameter: str
    depth: int = 0
    tensor: str = "weight"

    @property
    def is_lora(self) -> bool:
        return self.part.startswith("lora_")


def peft_tensor(key: str, adapter: str | None = None) -> PeftTensor:
    """Parse an adapter tensor's key: one in ``adapter_model.safetensors``
    (``base_model.model.<module>.lora_A.weight``) or, given ``adapter``, one
    of a loaded ``PeftModel``'s state dict (``….lora_A.<adapter>.weight``,
    ``….modules_to_save.<adapter>.weight``)."""
    name = key.removeprefix(PEFT_PREFIX)
    parts = name.split(".")
    if adapter is not None:
        parts = [p for i, p in enumerate(parts) if not _adapter_slot(parts, i, adapter)]
    if _TOKEN_ADAPTER in parts:
        at = parts.index(_TOKEN_ADAPTER)
        module = ".".join(parts[:at])
        return PeftTensor(
            key, module, "trainable_tokens", f"{module}.weight", 0, parts[-1]
        )
    lora = next((i for i, p in enumerate(parts) if p.startswith("lora_")), None)
    if lora is None:
        if "modules_to_save" in parts:
            parts.remove("modules_to_save")
        kept = [p for p in parts if p not in (_PEFT_WRAPPER, "original_module")]
        return PeftTensor(key, ".".join(kept[:-1]), "copy", ".".join(kept), 0, kept[-1])
    wrapped = parts[:lora]
    depth = 0
    while wrapped and wrapped[-1] == _PEFT_WRAPPER:
        wrapped.pop()
        depth += 1
    module = ".".join(wrapped)
    tail = parts[lora + 1 :]
    return PeftTensor(
        key,
        module,
        parts[lora],
        f"{module}.weight",
        depth,
        tail[-1] if tail else parts[lora],
    )


def _adapter_slot(parts: list[str], index: int, adapter: str) -> bool:
    """Whether ``parts[index]`` is the adapter-name level of a loaded model's key."""
    if parts[index] != adapter or index == 0:
        return False
    previous = parts[index - 1]
    return previous.startswith("lora_") or previous == "modules_to_save"


def peft_model_key(key: str, adapter: str) -> str:
    """The loaded ``PeftModel`` parameter behind an adapter file's ``key``:
    the adapter's name inserted after the ``lora_*`` level (LoRA tensors), or
    as ``modules_to_save.<adapter>`` before the tensor's name (copies)."""
    parts = key.removeprefix(PEFT_PREFIX).split(".")
    lora = next((i for i, p in enumerate(parts) if p.startswith("lora_")), None)
    if lora is not None:
        parts.insert(lora + 1, adapter)
    else:
        parts[-1:] = ["modules_to_save", adapter, parts[-1]]
    return PEFT_PREFIX + ".".join(parts)
