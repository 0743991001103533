"""Triton kernels for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``).

Imported lazily by ``_ops``: importing this module imports Triton, and
``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates, i.e. right here.
Nothing queries a driver at import time; device properties are read at launch.

Block sizes follow a fixed heuristic rather than autotuning (both ops are
memory-bound streaming passes, and autotuning would re-run on every new shape
of a merge): column tiles of up to 128 (sum) or 256 (relax) elements along the
contiguous dimension, rows filling a tile of 4096 elements, i.e. 32 elements per
thread at 4 warps.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from mergekit_aim.kernels._checks import around_axis, merged_leading_dims

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TILE_ELEMS = 4096


@triton.jit
def _channel_abs_sum_kernel(
    x_ptr,  # input viewed as [N1, N2, C] with arbitrary strides
    part_ptr,  # float32 [SPLIT, C] contiguous: one partial sum per row split
    rows,  # N1 * N2
    n2,  # size of the inner leading dim (unused when FUSED)
    channels,  # C
    stride_1,  # element stride of the outer leading dim
    stride_2,  # element stride of the inner leading dim (of all rows when FUSED)
    stride_c,  # element stride of the channel dim
    rows_per_prog,  # rows reduced by one program, a multiple of BLOCK_N
    FUSED: tl.constexpr,  # leading dims fused into one: no div/mod per row
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < channels
    col_off = cols.to(tl.int64) * stride_c
    start = pid_n * rows_per_prog
    end = tl.minimum(start + rows_per_prog, rows)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for row0 in range(start, end, BLOCK_N):
        r = row0 + tl.arange(0, BLOCK_N)
        r64 = r.to(tl.int64)
        if FUSED:
            row_off = r64 * stride_2
        else:
            row_off = (r64 // n2) * stride_1 + (r64 % n2) * stride_2
        mask = (r < end)[:, None] & col_mask[None, :]
        v = tl.load(x_ptr + row_off[:, None] + col_off[None, :], mask=mask, other=0.0)
        acc += tl.abs(v.to(tl.float32))
    tl.store(part_ptr + pid_n * channels + cols, tl.sum(acc, axis=0), mask=col_mask)


@triton.jit
def _aim_relax_kernel(
    base_ptr,  # weight B viewed as [batch, rows, cols]
    merged_ptr,  # weight M, same view, own strides and dtype
    out_ptr,  # output, same view, merged's dtype
    factor_ptr,  # float32 factor f, indexed by column (STAT_ON_COLS) or row
    rows,
    cols,
    col_tiles,  # tiles along cols
    batch_tiles,  # tiles per batch entry
    b_sb,  # base strides (batch, row, col)
    b_sr,
    b_sc,
    m_sb,  # merged strides
    m_sr,
    m_sc,
    o_sb,  # output strides
    o_sr,
    o_sc,
    factor_stride,
    STAT_ON_COLS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = (pid // batch_tiles).to(tl.int64)
    tile = pid % batch_tiles
    r = (tile // col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = (tile % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_mask = r < rows
    c_mask = c < cols
    r64 = r.to(tl.int64)[:, None]
    c64 = c.to(tl.int64)[None, :]
    mask = r_mask[:, None] & c_mask[None, :]

    if STAT_ON_COLS:
        f = tl.load(factor_ptr + c.to(tl.int64) * factor_stride, mask=c_mask, other=1.0)
    else:
        f = tl.load(factor_ptr + r.to(tl.int64) * factor_stride, mask=r_mask, other=1.0)
    if STAT_ON_COLS:
        f2 = f[None, :]
    else:
        f2 = f[:, None]

    b = tl.load(base_ptr + batch * b_sb + r64 * b_sr + c64 * b_sc, mask=mask)
    m = tl.load(merged_ptr + batch * m_sb + r64 * m_sr + c64 * m_sc, mask=mask)
    b = b.to(tl.float32)
    out = b + (m.to(tl.float32) - b) * f2
    tl.store(
        out_ptr + batch * o_sb + r64 * o_sr + c64 * o_sc,
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def _launch_context(device: torch.device):
    # mergekit's worker threads set only torch.device; Triton launches on the
    # *current* CUDA device, so make it the tensor's.
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@functools.cache
def _programs_wanted(device: torch.device) -> int:
    """Programs that keep every SM busy: 4 per SM on CUDA, a few elsewhere."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return 4 * props.multi_processor_count
    return 4


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _sum_3d(part_acc: torch.Tensor, x: torch.Tensor) -> None:
    """``part_acc += Σ|x|`` for ``x`` of shape [N1, N2, C] (any strides)."""
    n1, n2, channels = x.shape
    rows = n1 * n2
    if rows == 0 or channels == 0:
        return
    fused = n1 == 1
    block_c = min(128, _pow2(channels))
    block_n = min(_pow2(rows), max(2, TILE_ELEMS // block_c))
    col_blocks = triton.cdiv(channels, block_c)
    row_blocks = triton.cdiv(rows, block_n)
    wanted = triton.cdiv(_programs_wanted(x.device), col_blocks)
    split = max(1, min(row_blocks, 65535, wanted))
    rows_per_prog = triton.cdiv(row_blocks, split) * block_n
    split = triton.cdiv(rows, rows_per_prog)
    part = torch.empty((split, channels), dtype=torch.float32, device=x.device)
    _channel_abs_sum_kernel[(col_blocks, split)](
        x,
        part,
        rows,
        n2,
        channels,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        rows_per_prog,
        FUSED=fused,
        BLOCK_N=block_n,
        BLOCK_C=block_c,
    )
    part_acc.add_(part.sum(dim=0) if split > 1 else part[0])


def channel_abs_sum_(acc: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += Σ|x|`` over the leading dims of ``x[..., C]`` (validated by caller)."""
    if x.numel() == 0:
        return
    view = merged_leading_dims(x)
    # The kernel addresses two leading dims; layouts that fuse to more (several
    # strided slices at once) are walked on the host, one launch per outer index.
    with _launch_context(x.device):
        for block in _outer_slices(view):
            _sum_3d(acc, block)


def _outer_slices(view: torch.Tensor):
    if view.dim() == 2:
        yield view.unsqueeze(0)
        return
    if view.dim() == 3:
        yield view
        return
    for i in range(view.shape[0]):
        yield from _outer_slices(view[i])


def channel_abs_sum(x: torch.Tensor) -> torch.Tensor:
    """Float32 ``[C]``: Σ|x| over the leading dims of ``x[..., C]``."""
    acc = torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)
    channel_abs_sum_(acc, x)
    return acc


def _as_3d(t: torch.Tensor, shape: tuple) -> torch.Tensor:
    try:
        return t.view(shape)
    except RuntimeError:
        # Only N-D weights (N > 2) whose dims cannot fuse around the input axis
        # land here; the copy costs one extra pass, never a wrong answer.
        return t.contiguous().view(shape)


def aim_relax(
    base: torch.Tensor,
    merged: torch.Tensor,
    factor: torch.Tensor,
    axis: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused ``B + (M − B)·f`` (``f`` from ``relax_factor``); ``axis`` non-negative
    and validated.

    Writes into ``out`` (default: a new tensor; ``out`` may be ``merged``: every
    program loads its tile of ``merged`` before storing the same tile).
    """
    if out is None:
        out = torch.empty(merged.shape, dtype=merged.dtype, device=merged.device)
    if out.numel() == 0:
        return out
    shape = tuple(merged.shape)
    outer, channels, inner = around_axis(shape, axis)
    if inner == 1:
        # Statistic along the columns: Linear [out, in], norms [C].
        view = (1, outer, channels)
        stat_on_cols = True
    else:
        # Statistic along the rows: Conv1D [in, out], or an inner axis of N-D.
        view = (outer, channels, inner)
        stat_on_cols = False
    b3, m3 = _as_3d(base, view), _as_3d(merged, view)
    try:
        o3, write_back = out.view(view), False
    except RuntimeError:
        # A layout that does not fuse: compute into a contiguous buffer.
        o3, write_back = torch.empty(view, dtype=out.dtype, device=out.device), True
    batch, rows, cols = view
    block_c = min(256, _pow2(cols))
    block_r = min(_pow2(rows), max(2, TILE_ELEMS // block_c))
    col_tiles = triton.cdiv(cols, block_c)
    batch_tiles = triton.cdiv(rows, block_r) * col_tiles
    with _launch_context(out.device):
        _aim_relax_kernel[(batch * batch_tiles,)](
            b3,
            m3,
            o3,
            factor,
            rows,
            cols,
            col_tiles,
            batch_tiles,
            *b3.stride(),
            *m3.stride(),
            *o3.stride(),
            factor.stride(0),
            STAT_ON_COLS=stat_on_cols,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
        )
    if write_back:
        out.copy_(o3.view(shape))
    return out
