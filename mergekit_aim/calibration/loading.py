"""Loading the base model for calibration: device placement, dtype, offload.

:func:`load_base_model` puts a causal LM (or a vision-language model, whose
text path is measured) on one device (or spreads it with
``device="auto"``) in the calibration dtype, optionally capping the memory its
weights may occupy and streaming the rest from disk; the host-memory side of
that is :mod:`mergekit_aim.calibration.host_memory`.
"""

from __future__ import annotations

import contextlib
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergekit_aim.calibration import host_memory
from mergekit_aim.calibration.settings import (
    CALIBRATION_DTYPES,
    FALLBACK_DEVICE,
    CalibrationConfig,
)
from mergekit_aim.errors import CalibrationError
from mergekit_aim.output import remove_tree, temporary_directory


def resolve_dtype(dtype: str, device: str) -> Any:
    """The ``torch_dtype`` to load with for a ``--dtype`` choice on ``device``
    (the rule for calibration and for evaluation alike)."""
    if dtype in (None, "auto"):
        # fp32 on CPU (fast and exact there); the checkpoint's dtype elsewhere.
        return torch.float32 if device.startswith("cpu") else "auto"
    try:
        return {
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }[dtype]
    except KeyError:
        raise CalibrationError(
            f"dtype must be one of {', '.join(CALIBRATION_DTYPES)}; got {dtype!r}"
        ) from None


def load_base_model(
    path: str,
    *,
    device: str = FALLBACK_DEVICE,
    dtype: str = CalibrationConfig.model_fields["dtype"].default,
    trust_remote_code: bool = False,
    max_memory: str | None = None,
    offload_dir: str | None = None,
) -> nn.Module:
    """Load a causal LM for calibration on ``device``.

    A checkpoint whose config names a class that is no causal LM (a
    vision-language model such as Qwen2-VL) is loaded with that class; its
    text path is what calibration measures (see :func:`calibration_model_class`).

    ``max_memory`` (e.g. "4GiB") caps what the weights may occupy on the
    device and in CPU memory; accelerate's big-model inference places the
    rest on disk and streams it in layer by layer. accelerate keeps one layer's
    worth of the cap free for the layer being streamed, so resident plus
    streamed weights stay within the cap. Weights kept "on disk" are read from
    the model's own safetensors files when it has them (nothing is copied);
    ``offload_dir`` holds only weights that must be rewritten (other formats,
    converted weights); without one, a temporary directory
    (:func:`offload_directory`) is made and removed with the model.
    ``device="auto"`` lets accelerate spread the model over all devices.

    Loading a capped model still reads every tensor once (transformers
    materializes the offloaded ones too, then drops them), through a memory
    map of the checkpoint: the pages it touches would stay in this process's
    resident set until the map closes, as much as the whole checkpoint. While
    it loads, those pages are handed back to the page cache as they are read.
    Streaming allocates and frees a layer's weights every forward pass; glibc
    would keep much of that in its heap (its mmap threshold adapts upwards to
    the sizes freed), so capped runs have large blocks mapped and unmapped
    directly. Both are in :mod:`mergekit_aim.calibration.host_memory`. The
    peak is then about the cap plus the fixed cost of a run.
    """
    kwargs: dict[str, Any] = {}
    owned = None
    if max_memory is not None:
        compute = "cpu" if device.startswith("cpu") else _device_index(device)
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = {compute: max_memory, "cpu": max_memory}
        if offload_dir is None:
            owned = offload_directory()
        kwargs["offload_folder"] = str(offload_dir or owned)
    else:
        kwargs["device_map"] = "auto" if device == "auto" else {"": device}
    if max_memory is not None:
        host_memory.return_large_frees()
    release = (
        host_memory.release_mapped_pages(host_memory.checkpoint_files(path))
        if max_memory is not None
        else contextlib.nullcontext()
    )
    try:
        with release:
            model_class = calibration_model_class(
                path, trust_remote_code=trust_remote_code
            )
            model = model_class.from_pretrained(
                path,
                dtype=resolve_dtype(dtype, device),
                trust_remote_code=trust_remote_code,
                **kwargs,
            )
    except BaseException as error:
        if owned is not None:
            remove_tree(owned)
        if not isinstance(error, Exception):
            raise
        raise CalibrationError(
            f"could not load base model {path} for calibration: "
            f"{type(error).__name__}: {error}"
        ) from error
    if owned is not None:
        # Removed with the model (or at exit); calibrate() passes its own
        # directory and removes it as soon as the forward pass is done.
        weakref.finalize(model, remove_tree, owned)
    if max_memory is not None:
        host_memory.trim_heap()
    return model


def calibration_model_class(path: str, *, trust_remote_code: bool = False) -> Any:
    """The class to load ``path`` with: ``AutoModelForCausalLM`` when it knows
    the config, else the class the config's ``architectures`` names (e.g.
    ``Qwen2VLForConditionalGeneration``), whose text path takes ``input_ids``
    alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mergekit_aim.names import model_class_for

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception:
        # Let from_pretrained report what is wrong with the checkpoint.
        return AutoModelForCausalLM
    if type(config) in AutoModelForCausalLM._model_mapping or getattr(
        config, "auto_map", None
    ):
        return AutoModelForCausalLM
    return model_class_for(config) or AutoModelForCausalLM


def _device_index(device: str) -> Any:
    parsed = torch.device(device)
    return parsed.index if parsed.index is not None else 0


OFFLOAD_PREFIX = "mergekit-aim-offload"


def offload_directory() -> Path:
    """A new temporary directory for offloaded weights; those a killed run
    left behind are removed first (:func:`mergekit_aim.output.temporary_directory`)."""
    return temporary_directory(OFFLOAD_PREFIX)
