"""The statistic: mean |input| per input channel of every weight-owning module.

For each target module (Linear, GPT-2 Conv1D, norms, the LM head; never
embeddings) a forward pre-hook adds Σ|x| over all tokens of its input to a
float32 accumulator on the input's own device, through the ``channel_abs_sum``
kernel, once per distinct input tensor (q/k/v projections share one). Nothing is
copied to the host until the end, and no activation outlives the forward pass.
Sums and token counts (not means) make results additive across batches, ranks
and runs. An input holding inf or NaN (activations that overflowed a float16
calibration, say) would make its statistic meaningless: after every batch the
accumulators are checked, and the first module in forward order with a
non-finite sum is named in a :class:`CalibrationError` before anything is
returned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mergekit_aim.calibration import host_memory
from mergekit_aim.calibration.data import (
    DEFAULT_BOS_PER_BLOCK,
    BosPerBlock,
    bos_per_block_value,
)
from mergekit_aim.errors import CalibrationError

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetKind:
    """A family of modules whose weight AIM relaxes, and its input axis."""

    name: str
    module_types: tuple[type, ...]
    class_pattern: re.Pattern | None
    input_axis: int


def _target_kinds() -> tuple[TargetKind, ...]:
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
    module_name: str
    tensor_name: str
    kind: str
    input_axis: int
    channels: int


def find_targets(
    model: nn.Module, checkpoint_names: Collection[str] | None = None
) -> tuple[list[Target], dict[str, str]]:
    """Modules to measure, keyed by checkpoint tensor name, and what was skipped.

    ``checkpoint_names`` are the tensor names of the checkpoint the merge will
    read; a module whose weight is not among them (a tied LM head) is skipped
    and reported. Without it the model's own parameter names are used.
    """
    kinds = _target_kinds()
    prefix = getattr(model, "base_model_prefix", "") or ""
    tied = _tied_output_embedding(model)
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
        tensor_name = _checkpoint_name(param_name, prefix, checkpoint_names)
        if tensor_name is None:
            skipped[param_name] = "no such tensor in the checkpoint"
            continue
        channels = weight.shape[kind.input_axis] if weight.ndim > 1 else weight.numel()
        targets.append(
            Target(module_name, tensor_name, kind.name, kind.input_axis, channels)
        )
    return targets, skipped


def _kind_of(module: nn.Module, kinds: tuple[TargetKind, ...]) -> TargetKind | None:
    for kind in kinds:
        if isinstance(module, kind.module_types):
            return kind
        if kind.class_pattern and kind.class_pattern.search(type(module).__name__):
            return kind
    return None


def _tied_output_embedding(model: nn.Module) -> nn.Module | None:
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


def _checkpoint_name(
    param_name: str, prefix: str, names: Collection[str] | None
) -> str | None:
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


class _StopForward(Exception):
    """Raised before the LM head's matmul: its input is all AIM needs."""


class ChannelStatistics:
    """Owns the hooks and accumulators of one calibration; always removes hooks."""

    def __init__(self, model: nn.Module, targets: list[Target], stop_at=None):
        self.model = model
        self.targets = targets
        self.sums: list[torch.Tensor | None] = [None] * len(targets)
        self.rows: list[int] = [0] * len(targets)
        self._stop_at = stop_at
        self._handles: list[Any] = []
        # The last input measured and its Σ|x|: sibling modules that read the
        # same tensor (q/k/v, gate/up projections) reuse the sum instead of
        # reducing the activation again.
        self._last: tuple[torch.Tensor, int, torch.Tensor] | None = None
        # Target indices in the order their hooks first ran: named_modules()
        # lists a layer's norms after its projections, but an error must name
        # the first module the forward pass reached.
        self._order: list[int] = []
        self._seen = [False] * len(targets)

    def __enter__(self) -> ChannelStatistics:
        modules = dict(self.model.named_modules())
        try:
            for index, target in enumerate(self.targets):
                module = modules[target.module_name]
                self._handles.append(
                    module.register_forward_pre_hook(
                        self._hook(index, module is self._stop_at), with_kwargs=True
                    )
                )
            if self._stop_at is not None and not any(
                modules[t.module_name] is self._stop_at for t in self.targets
            ):
                self._handles.append(
                    self._stop_at.register_forward_pre_hook(self._stop)
                )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last = None

    @staticmethod
    def _stop(module: nn.Module, args: Any) -> None:
        raise _StopForward

    def _abs_sum(self, x: torch.Tensor) -> torch.Tensor:
        from mergekit_aim.kernels import channel_abs_sum

        last = self._last
        if last is not None and last[0] is x and last[1] == x._version:
            return last[2]
        # On CUDA the custom op dispatches to Triton; on CPU calling the torch
        # kernel directly saves the dispatcher's ~50 µs per call.
        backend = "auto" if x.device.type == "cuda" else "torch"
        total = channel_abs_sum(x.detach(), backend=backend)
        # Holding x until the next distinct input costs no memory the forward
        # pass does not hold anyway, and keeps its identity from being reused.
        self._last = (x, x._version, total)
        return total

    def first_non_finite(
        self, sums: list[torch.Tensor | None] | None = None
    ) -> int | None:
        """Index of the first target, in forward order, whose sum is inf or NaN.

        Checks ``sums`` (default: this run's accumulators). A non-finite input
        leaves its module's sum non-finite for good (|x| sums never cancel), so
        a check of the accumulators after a batch covers every batch so far. It
        costs one concatenation, one maximum and one host sync per device the
        sums live on, about a millisecond a batch on CPU for Gemma-3-270M's 235
        sums: they are non-negative, so their maximum is finite exactly when all
        are (NaN propagates through it), and a maximum is cheaper than testing
        every element with ``isfinite``.
        """
        sums = self.sums if sums is None else sums
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for acc in sums:
            if acc is not None:
                by_device.setdefault(acc.device, []).append(acc)
        if all(
            bool(torch.cat(group).amax().isfinite()) for group in by_device.values()
        ):
            return None
        unseen = [i for i in range(len(self.targets)) if not self._seen[i]]
        for index in (*self._order, *unseen):
            acc = sums[index]
            if acc is not None and not bool(torch.isfinite(acc).all()):
                return index
        return None

    def non_finite_error(self, index: int) -> CalibrationError:
        """The error for target ``index`` having received inf or NaN input."""
        return _non_finite_error(self.model, self.targets[index])

    def _hook(self, index: int, stop: bool):
        target = self.targets[index]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self._seen[index]:
                self._seen[index] = True
                self._order.append(index)
            x = _first_tensor(args, kwargs)
            if x is None or x.shape[-1] != target.channels:
                raise CalibrationError(
                    f"module {target.module_name} ({type(module).__name__}) got "
                    f"input of shape {None if x is None else tuple(x.shape)}; "
                    f"expected {target.channels} channels in the last dimension"
                )
            total = self._abs_sum(x)
            acc = self.sums[index]
            if acc is None:
                # The first batch's sum becomes the accumulator: no zeros to add.
                self.sums[index] = total.clone()
            else:
                if acc.device != total.device:
                    acc = self.sums[index] = acc.to(total.device)
                acc.add_(total)
            # Shapes are host-side metadata: counting rows never syncs a device.
            self.rows[index] += x.numel() // target.channels
            if stop:
                raise _StopForward

        return hook


# Calibration dtypes an overflow of each narrower dtype can be avoided in, the
# one to suggest first leading (bfloat16 has float32's range at half the memory).
_WIDER_DTYPES: dict[torch.dtype, tuple[str, ...]] = {
    torch.float16: ("bfloat16", "float32"),
    torch.bfloat16: ("float32",),
}


def _non_finite_error(model: nn.Module, target: Target) -> CalibrationError:
    dtype = _model_dtype(model)
    name = str(dtype).removeprefix("torch.")
    where = (
        f"module {target.module_name} (tensor {target.tensor_name}) was the first, "
        f"in forward order, to receive non-finite input (inf or NaN) while "
        f"calibrating in {name}"
    )
    weight = _first_non_finite_parameter(model)
    cause = (
        f"; the model's weight {weight} is itself inf or NaN in {name}"
        if weight is not None
        else ""
    )
    if dtype in _WIDER_DTYPES:
        wider = _WIDER_DTYPES[dtype]
        return CalibrationError(
            f"{where}: the activations overflowed {name} (largest finite value "
            f"{torch.finfo(dtype).max:g}) in or before this module{cause}. "
            f"Calibrate in a wider dtype: "
            + " or ".join(f"--dtype {w}" for w in wider)
            + f" (in the aim: block, calibration: {{dtype: {wider[0]}}})."
        )
    return CalibrationError(
        f"{where}{cause}: no calibration dtype is wider than {name}; check the "
        f"base model's weights and the calibration data for values that overflow"
    )


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model was loaded in (what ``--dtype`` chose)."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _first_non_finite_parameter(model: nn.Module) -> str | None:
    # Only on the error path: it reads every resident weight once. Offloaded
    # weights (on the meta device) are not in memory to check.
    for name, param in model.named_parameters():
        if (
            param.is_floating_point()
            and param.device.type != "meta"
            and not bool(torch.isfinite(param).all())
        ):
            return name
    return None


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


@contextlib.contextmanager
def calibration_forward_context(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; restore the training flag."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _batches(blocks: Any, batch_size: int) -> tuple[Iterable[torch.Tensor], int | None]:
    if batch_size < 1:
        raise CalibrationError(f"batch_size must be at least 1; got {batch_size}")
    if isinstance(blocks, torch.Tensor):
        if blocks.ndim != 2 or blocks.dtype not in (torch.long, torch.int):
            raise CalibrationError(
                f"blocks must be an integer tensor [num_blocks, seq_len]; got "
                f"{blocks.dtype} {tuple(blocks.shape)}"
            )
        return blocks.split(batch_size), blocks.numel()
    return blocks, None


def _input_device(model: nn.Module) -> torch.device:
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    weight = getattr(embeddings, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def collect_importance(
    model: nn.Module,
    blocks: Any,
    batch_size: int = 8,
    *,
    checkpoint_names: Collection[str] | None = None,
    progress: bool = False,
) -> ImportanceMap:  # noqa: F821
    """Measure an already-loaded Hugging Face causal LM on token blocks.

    ``blocks`` is a LongTensor ``[N, L]`` (split into batches of
    ``batch_size``) or an iterable of ``[B, L]`` tensors. Returns per-channel
    |input| sums and token counts keyed by checkpoint tensor name (see
    :func:`find_targets`). Provenance beyond the skipped modules is the
    caller's to add.
    """
    from mergekit_aim.importance import ImportanceMap

    targets, skipped = find_targets(model, checkpoint_names)
    if not targets:
        raise CalibrationError(
            f"{type(model).__name__} has no Linear, Conv1D or norm module whose "
            f"weight is in the checkpoint: nothing to measure"
        )
    batches, total = _batches(blocks, batch_size)
    device = _input_device(model)
    stop_at = getattr(model, "get_output_embeddings", lambda: None)()
    tokens = 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(calibration_forward_context(model))
        stats = stack.enter_context(ChannelStatistics(model, targets, stop_at))
        bar = stack.enter_context(_progress(total, progress))
        for batch in batches:
            if batch.ndim == 1:
                batch = batch.unsqueeze(0)
            if batch.numel() == 0:
                continue
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
            tokens += batch.numel()
            bar.update(batch.numel())
            if stats.first_non_finite() is not None:
                # Measuring on is wasted work. The error is raised after the
                # all-reduce below, which carries inf/NaN to every rank: under
                # torchrun all ranks then raise it, instead of one rank
                # failing while the others wait in the collective.
                break
    from mergekit_aim.calibration.distributed import all_reduce

    # The token total rides along with the row counts: one collective.
    reduced, totals = all_reduce(
        stats.sums, [*stats.rows, tokens], [t.channels for t in targets]
    )
    bad = stats.first_non_finite(reduced)
    if bad is not None:
        raise stats.non_finite_error(bad)
    *rows_per_target, tokens = totals
    if tokens == 0:
        raise CalibrationError("calibration got no token blocks")
    sums, counts, axes = {}, {}, {}
    for target, acc, rows in zip(targets, reduced, rows_per_target):
        if acc is None or rows == 0:
            skipped[target.tensor_name] = "received no tokens"
            continue
        sums[target.tensor_name] = acc.cpu()
        counts[target.tensor_name] = rows
        axes[target.tensor_name] = target.input_axis
    LOG.info(
        "measured %d tensors over %d tokens; skipped %d (%s)",
        len(sums),
        tokens,
        len(skipped),
        ", ".join(sorted(set(skipped.values()))) or "none",
    )
    return ImportanceMap(
        sums, counts, axes, provenance={"skipped": skipped, "tokens": tokens}
    )


def _progress(total: int | None, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc="AIM calibration",
        unit="tok",
        unit_scale=True,
        disable=not enabled,
    )


def _resolve_dtype(dtype: str, device: str) -> Any:
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
            f"dtype must be auto, float32, bfloat16 or float16; got {dtype!r}"
        ) from None


def load_base_model(
    path: str,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    max_memory: str | None = None,
    offload_dir: str | None = None,
) -> nn.Module:
    """Load a causal LM for calibration on ``device``.

    ``max_memory`` (e.g. "4GiB") caps what the weights may occupy on the
    device and in CPU memory; accelerate's big-model inference places the
    rest on disk and streams it in layer by layer. accelerate keeps one layer's
    worth of the cap free for the layer being streamed, so resident plus
    streamed weights stay within the cap. Weights kept "on disk" are read from
    the model's own safetensors files when it has them (nothing is copied);
    ``offload_dir`` holds only weights that must be rewritten (other formats,
    converted weights). ``device="auto"`` lets accelerate spread the model over
    all devices.

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
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if max_memory is not None:
        compute = "cpu" if device.startswith("cpu") else _device_index(device)
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = {compute: max_memory, "cpu": max_memory}
        kwargs["offload_folder"] = offload_dir or _default_offload_dir()
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
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=_resolve_dtype(dtype, device),
                trust_remote_code=trust_remote_code,
                **kwargs,
            )
    except Exception as error:
        raise CalibrationError(
            f"could not load base model {path} as a causal LM for calibration: "
            f"{type(error).__name__}: {error}"
        ) from error
    if max_memory is not None:
        host_memory.trim_heap()
    return model


def _device_index(device: str) -> Any:
    parsed = torch.device(device)
    return parsed.index if parsed.index is not None else 0


def _default_offload_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="mergekit-aim-offload-")


def calibrate(
    model_or_path: Any,
    *,
    tokenizer: Any = None,
    dataset: str = "pile-val",
    split: str | None = None,
    text_column: str | None = None,
    num_samples: int = 256,
    seq_len: int = 512,
    seed: int = 42,
    batch_size: int = 4,
    device: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    quiet: bool = False,
    blocks: Any = None,
    max_memory: str | None = None,
    offload_dir: str | None = None,
    bos_per_block: BosPerBlock | str = DEFAULT_BOS_PER_BLOCK,
) -> ImportanceMap:  # noqa: F821
    """Calibrate a base model (path, Hub id or loaded model) on a dataset.

    Samples and packs the data the paper's way (see
    :func:`mergekit_aim.calibration.data.build_blocks`; ``bos_per_block``
    ``"auto"``, True or False chooses whether every block starts with BOS),
    runs the model, and returns an :class:`ImportanceMap` whose provenance
    names the base model, its fingerprint, the settings and the data
    fingerprint. ``blocks`` may be a prebuilt ``CalibrationBlocks`` (skips
    sampling; the packing recorded is the blocks' own). Under ``torchrun``
    every rank builds the same blocks, measures its share of them, and all
    ranks return the combined map (see
    :mod:`mergekit_aim.calibration.distributed`).
    """
    from mergekit_aim.calibration.data import build_blocks
    from mergekit_aim.calibration.distributed import setup, shard
    from mergekit_aim.checkpoint import read_checkpoint, resolve_local_path

    bos_per_block = bos_per_block_value(bos_per_block)
    ranks, device = setup(device or "cpu")
    if isinstance(model_or_path, (str, os.PathLike)):
        base_id = str(model_or_path)
        path = resolve_local_path(base_id)
        checkpoint = read_checkpoint(path)
        model = None
    else:
        model = model_or_path
        base_id = getattr(model, "name_or_path", "") or type(model).__name__
        path = base_id if os.path.isdir(base_id) else None
        checkpoint = read_checkpoint(path) if path else None
    if blocks is None:
        if tokenizer is None:
            if path is None:
                raise CalibrationError(
                    "pass tokenizer= (the model has no local directory to load "
                    "one from)"
                )
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                path, trust_remote_code=trust_remote_code
            )
        blocks = build_blocks(
            dataset,
            tokenizer,
            num_samples=num_samples,
            seq_len=seq_len,
            seed=seed,
            split=split,
            text_column=text_column,
            trust_remote_code=trust_remote_code,
            bos_per_block=bos_per_block,
        )
    if model is None:
        model = load_base_model(
            path,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            max_memory=max_memory,
            offload_dir=offload_dir,
        )
    importance = collect_importance(
        model,
        shard(blocks.tokens, ranks),
        batch_size,
        checkpoint_names=None if checkpoint is None else set(checkpoint.tensors),
        progress=not quiet and ranks.is_main,
    )
    from mergekit_aim import __version__

    importance.provenance.update(
        {
            "base_model": base_id,
            "base_fingerprint": None if checkpoint is None else checkpoint.fingerprint,
            "calibration": {
                "dataset": blocks.dataset,
                "split": split,
                "text_column": text_column,
                "num_samples": num_samples,
                "seq_len": int(blocks.tokens.shape[1]),
                "seed": seed,
                "dtype": dtype,
                "num_blocks": int(blocks.tokens.shape[0]),
                "num_texts": blocks.num_texts,
                # Read from the blocks, which may have been built elsewhere:
                # the packing recorded must be the one measured.
                "bos_per_block": blocks.description.get("bos_per_block"),
                "bos_per_block_resolved": blocks.description.get(
                    "bos_per_block_resolved"
                ),
            },
            "data_fingerprint": blocks.fingerprint,
            "data": blocks.description,
            "mergekit_aim_version": __version__,
        }
    )
    return importance
