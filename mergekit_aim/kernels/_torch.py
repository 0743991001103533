"""Torch implementations: the CPU kernels of the custom ops, and the fallback anywhere.

Both operations stream over blocks of about ``BLOCK_ELEMS`` elements so that the
float32 temporaries stay a few MiB (cache-resident, and far below the 64 MiB the
calibration hooks can afford) whatever the size of the input. Every step is a
single-dtype float32 op on a reused buffer: measured on a 2-core EPYC, torch's CPU
kernels that mix bf16 and float32 operands (``acc.add_(bf16)``, ``addcmul`` of
mixed dtypes) run 1.5-5x slower than a ``copy_`` to float32 followed by the pure
float32 op, ``block.abs().sum(0, dtype=float32)`` per block is ~20% slower than
abs-and-add into a ``[rows, C]`` accumulator reduced once at the end, and
``torch.linalg.vector_norm(block, 1, dim=0)`` is ~10x slower than both (its CPU
reduction is not vectorised). Validation happens in the callers (``_ops``).
"""

from __future__ import annotations

import torch

from mergekit_aim.kernels._checks import index_blocks, merged_leading_dims

# ~1 Mi elements per block: 4 MiB of float32 temporaries per buffer. Larger blocks
# fall out of cache and smaller ones pay Python and dispatch overhead per block.
BLOCK_ELEMS = 1 << 20
# On a GPU a block is a few kernel launches, each costing microseconds of host
# time, while a 1 Mi-element pass takes about one: blocks of 64 Mi elements
# (256 MiB of float32 per buffer) make the launches negligible and still bound
# the temporaries for embedding-sized weights.
DEVICE_BLOCK_ELEMS = 1 << 26


def _block_elems(device: torch.device) -> int:
    return BLOCK_ELEMS if device.type == "cpu" else DEVICE_BLOCK_ELEMS


def channel_abs_sum_(acc: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += Σ|x|`` over all leading dims of ``x[..., C]`` (acc: float32 [C]).

    Reduces in float32 (float64 inputs too). Temporaries stay below 8 MiB
    (``2 * BLOCK_ELEMS`` float32): a larger ``x`` is never copied as a whole.
    """
    channels = x.shape[-1]
    if x.numel() == 0:
        return
    view = merged_leading_dims(x)
    if x.device.type != "cpu":
        # GPU reductions read half-precision input and accumulate in float32
        # inside one kernel: |x| is never materialised, and there is no cache
        # to stay inside.
        source = view.float() if view.dtype == torch.float64 else view
        dims = tuple(range(view.dim() - 1))
        acc.add_(torch.linalg.vector_norm(source, 1, dim=dims, dtype=torch.float32))
        return
    if view.numel() <= 2 * BLOCK_ELEMS:
        # A small input (a calibration hook's, mostly): reduce it in one pass over
        # one float32 temporary, with no running partial to zero and add into;
        # 2-4x faster up to ~2 Mi elements, slower above (out of cache).
        if view.dtype == torch.float32:
            absolute = view.abs()
        else:
            absolute = view.to(torch.float32).abs_()
        acc.add_(absolute.sum(dim=tuple(range(view.dim() - 1))))
        return
    rows = min(view.numel() // channels, max(1, BLOCK_ELEMS // max(channels, 1)))
    work = torch.empty(rows * channels, dtype=torch.float32, device=x.device)
    partial = torch.zeros(rows * channels, dtype=torch.float32, device=x.device)
    for index in index_blocks(tuple(view.shape), BLOCK_ELEMS, keep_last=True):
        block = view[index]
        n = block.numel()
        absolute = work[:n].view(block.shape).copy_(block).abs_()
        partial[:n].view(block.shape).add_(absolute)
    acc.add_(partial.view(rows, channels).sum(dim=0))


def channel_abs_sum(x: torch.Tensor) -> torch.Tensor:
    """Float32 ``[C]``: Σ|x| over all leading dims of ``x[..., C]``."""
    acc = torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)
    channel_abs_sum_(acc, x)
    return acc


def aim_relax(
    base: torch.Tensor,
    merged: torch.Tensor,
    factor: torch.Tensor,
    axis: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``B + (M − B)·f`` in float32 blocks, written into ``out`` (default: a new
    tensor of merged's dtype; ``out`` may be ``merged`` itself).

    ``factor`` is :func:`~mergekit_aim.kernels._formula.relax_factor`'s ``f``;
    ``axis`` is non-negative and already validated; ``f`` broadcasts along it.
    Temporaries: two float32 blocks of ``BLOCK_ELEMS`` (``DEVICE_BLOCK_ELEMS``
    off the CPU) and the factor vector.
    Each block of ``merged`` is copied out before its block of ``out`` is
    written, so relaxing in place is safe.
    """
    if out is None:
        out = torch.empty(merged.shape, dtype=merged.dtype, device=merged.device)
    if out.numel() == 0:
        return out
    shape = [1] * merged.dim()
    shape[axis] = merged.shape[axis]
    factor = factor.view(shape).expand(merged.shape)
    block_elems = _block_elems(out.device)
    size = min(out.numel(), block_elems)
    base_work = torch.empty(size, dtype=torch.float32, device=out.device)
    merged_work = torch.empty(size, dtype=torch.float32, device=out.device)
    for index in index_blocks(tuple(out.shape), block_elems, keep_last=False):
        o = out[index]
        n = o.numel()
        b = base_work[:n].view(o.shape).copy_(base[index])
        m = merged_work[:n].view(o.shape).copy_(merged[index])
        # lerp(B, M, f) is B + f·(M − B) (for f ≥ 0.5 torch evaluates it as
        # M − (M − B)·(1 − f), equal up to float32 rounding) in one pass.
        o.copy_(torch.lerp(b, m, factor[index], out=m))
    return out
