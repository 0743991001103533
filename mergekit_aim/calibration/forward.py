"""The forward loop: run a loaded model over token blocks with the observer on.

:func:`collect_importance` batches the blocks, feeds them to the model's input
device in eval mode without autograd, stops each pass at the LM head's input,
checks the accumulators for inf/NaN after every batch, adds them up over
``torchrun`` ranks (see :mod:`~mergekit_aim.calibration.distributed`) and
returns the :class:`~mergekit_aim.importance.ImportanceMap`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mergekit_aim.calibration.observer import ChannelStatistics, StopForward
from mergekit_aim.calibration.targets import NO_TOKENS, find_targets
from mergekit_aim.errors import CalibrationError

if TYPE_CHECKING:
    from mergekit_aim.importance import ImportanceMap

LOG = logging.getLogger(__name__)


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


def collect_importance(
    model: nn.Module,
    blocks: Any,
    batch_size: int = 8,
    *,
    checkpoint_names: Collection[str] | None = None,
    progress: bool = False,
) -> ImportanceMap:
    """Measure an already-loaded Hugging Face causal LM (or a vision-language
    model's text path) on token blocks.

    ``blocks`` is a LongTensor ``[N, L]`` (split into batches of
    ``batch_size``) or an iterable of ``[B, L]`` tensors. Returns per-channel
    |input| sums and token counts keyed by checkpoint tensor name (see
    :func:`~mergekit_aim.calibration.targets.find_targets`). Provenance beyond
    the skipped modules is the caller's to add.
    """
    from mergekit_aim.calibration.distributed import all_reduce
    from mergekit_aim.importance import ImportanceMap

    targets, skipped = find_targets(model, checkpoint_names)
    if not targets:
        raise CalibrationError(
            f"{type(model).__name__} has no Linear, Conv1D, norm, router or "
            f"experts module whose weight is in the checkpoint: nothing to measure"
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
            except StopForward:
                pass
            tokens += batch.numel()
            bar.update(batch.numel())
            if stats.first_non_finite() is not None:
                # Measuring on is wasted work. The error is raised after the
                # all-reduce below, which carries inf/NaN to every rank: under
                # torchrun all ranks then raise it, instead of one rank
                # failing while the others wait in the collective.
                break

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
            # An expert no token was routed to, under each of its tensors.
            skipped.update(dict.fromkeys(target.tensor_names, NO_TOKENS))
            continue
        total = acc.cpu()
        for index, name in enumerate(target.tensor_names):
            # Aliases (an expert's up projection beside its gate projection)
            # get their own copy: safetensors refuses tensors sharing memory.
            sums[name] = total if index == 0 else total.clone()
            counts[name] = rows
            axes[name] = target.input_axis
    LOG.info(
        "measured %d tensors over %d tokens; skipped %d (%s)",
        len(sums),
        tokens,
        len(skipped),
        ", ".join(sorted(set(skipped.values()))) or "none",
    )
    return ImportanceMap(
        sums,
        counts,
        axes,
        provenance={"skipped": skipped, "tokens": tokens},
        statistic=stats.statistic,
    )


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


def _progress(total: int | None, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc="AIM calibration",
        unit="tok",
        unit_scale=True,
        disable=not enabled,
    )
