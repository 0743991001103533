"""Triton kernels for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``).

Imported lazily by ``_ops``: importing this module imports Triton, and
``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates, i.e. right here.
Nothing queries a driver at import time; device properties are read at launch.

Both ops are memory-bound streaming passes, so what matters is bytes in flight
per SM and how little else runs around the main kernel:

* ``aim_relax`` is one launch: the factor ``f = 1 − s·(1 − ω)`` is computed in
  the kernel, once per column of a tile, from ``a`` and ``max|a|`` (the same
  expression as ``_formula.relax_factor``; the tests hold the two within
  float32 rounding). Each program reduces a statistic of up to
  ``FUSED_MAX_LEN`` entries to its max itself (read from L2); a longer one is
  reduced first by one ``torch.linalg.vector_norm`` launch. The eager factor
  would cost nine launches, which at merge sizes take longer than the
  relaxation itself.
* ``channel_abs_sum`` reduces row splits into float32 partials and a second
  small kernel adds the partials into the accumulator in a fixed order, so the
  result is deterministic (no atomics).

On CUDA the channel sums' tile sizes and warps are autotuned per shape class
(rows and columns rounded up to powers of two, the dtypes) over a handful of
configurations and cached by Triton on disk (``cache_results``): a calibration
pays the tuning once per shape class per machine. Set
``MERGEKIT_AIM_TRITON_AUTOTUNE=0`` to use the fixed default configuration. The
relaxation runs one measured configuration (see ``RELAX_CONFIGS``); the
interpreter always runs the defaults.
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
# Read at each launch (the benchmarks switch it to time the default config).
AUTOTUNE = not INTERPRET and os.environ.get("MERGEKIT_AIM_TRITON_AUTOTUNE", "1") != "0"
# _ops computes no factor for this backend: the kernel does (see the docstring).
FACTOR_IN_KERNEL = True

# (BLOCK_R, BLOCK_C, num_warps) of the relaxation: 16 KiB per bf16 tensor per
# program, ~32 KiB of loads in flight, several programs per SM. Autotuning six
# configurations on an H200 (benchmarks/results/gpu/nvidia-h200) matched this
# one within noise at 4096×14336 and picked worse ones below 16 Mi elements,
# where the tuner's timings are noise: the relaxation runs this one everywhere.
RELAX_CONFIGS = ((16, 512, 8),)
# Statistics up to this length are reduced to max|a| inside the relaxation
# kernel (no second launch); longer ones by one vector_norm launch.
FUSED_MAX_LEN = 4096
# (BLOCK_N, BLOCK_C, num_warps) for the channel sums; the first is the default.
SUM_CONFIGS = (
    (32, 256, 8),
    (64, 128, 8),
    (128, 64, 4),
    (256, 64, 8),
    (128, 32, 4),
    (64, 64, 4),
)
SUM_PARTIAL_BLOCK = 256
# Rows a channel-sum program reduces at least: fewer would make the partials'
# second pass a noticeable share of the traffic.
MIN_ROWS_PER_PROGRAM = 64


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
    rows_per_prog,  # rows reduced by one program (the last one may get fewer)
    rows_class,  # autotuning key only: rows rounded up to a power of two
    channels_class,  # autotuning key only: channels rounded up likewise
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
def _add_partials_kernel(
    part_ptr,  # float32 [SPLIT, C] contiguous
    acc_ptr,  # float32 [C], strided
    split,  # SPLIT
    channels,  # C
    acc_stride,
    BLOCK: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < channels
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, split):
        total += tl.load(part_ptr + i * channels + cols, mask=mask, other=0.0)
    where = acc_ptr + cols.to(tl.int64) * acc_stride
    tl.store(where, tl.load(where, mask=mask) + total, mask=mask)


@triton.jit
def _aim_relax_kernel(
    base_ptr,  # weight B viewed as [batch, rows, cols]
    merged_ptr,  # weight M, same view, own strides and dtype
    out_ptr,  # output, same view, merged's dtype (may be merged itself)
    stat_ptr,  # raw statistic a, indexed by column (STAT_ON_COLS) or row
    amax_ptr,  # float32 scalar max|a| (unused when FUSE_MAX)
    stat_len,  # entries of a
    omega_minus_one,  # ω − 1, float32
    rows,
    cols,
    b_sb,  # base strides (batch, row, col)
    b_sr,
    b_sc,
    m_sb,  # merged strides
    m_sr,
    m_sc,
    o_sb,  # output strides
    o_sr,
    o_sc,
    stat_stride,
    STAT_ON_COLS: tl.constexpr,
    FUSE_MAX: tl.constexpr,  # each program reduces max|a| itself (short a)
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    MAX_BLOCK: tl.constexpr,  # chunk of a per step of the fused max
):
    # Row tiles (times batch entries) on grid axis 0, whose limit is 2**31 − 1:
    # an LM head's vocabulary rows would overflow axis 1's 65535 tiles.
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(rows, BLOCK_R)
    batch = (pid // row_tiles).to(tl.int64)
    pid_r = pid % row_tiles
    pid_c = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_mask = r < rows
    c_mask = c < cols
    r64 = r.to(tl.int64)[:, None]
    c64 = c.to(tl.int64)[None, :]
    mask = r_mask[:, None] & c_mask[None, :]

    # f = 1 − s·(1 − ω), s = |a| / max|a| (0 where the max is 0 or NaN), once
    # per column (or row) of the tile.
    if FUSE_MAX:
        # A short statistic is read from L2 by every program, which costs less
        # than a second launch; a NaN anywhere makes the max NaN, as amax does.
        peak = tl.zeros([MAX_BLOCK], dtype=tl.float32)
        nans = tl.zeros([MAX_BLOCK], dtype=tl.int32)
        for k0 in range(0, stat_len, MAX_BLOCK):
            k = k0 + tl.arange(0, MAX_BLOCK)
            v = tl.load(stat_ptr + k.to(tl.int64) * stat_stride, mask=k < stat_len)
            v = tl.abs(v.to(tl.float32))
            nans += (v != v).to(tl.int32)
            peak = tl.maximum(peak, tl.where(v != v, 0.0, v))
        amax = tl.max(peak, axis=0)
        positive = (amax > 0.0) & (tl.sum(nans, axis=0) == 0)
    else:
        amax = tl.load(amax_ptr)
        positive = amax > 0.0
    if STAT_ON_COLS:
        a = tl.load(stat_ptr + c.to(tl.int64) * stat_stride, mask=c_mask, other=0.0)
    else:
        a = tl.load(stat_ptr + r.to(tl.int64) * stat_stride, mask=r_mask, other=0.0)
    s = tl.where(
        positive, tl.abs(a.to(tl.float32)) / tl.where(positive, amax, 1.0), 0.0
    )
    f = s * omega_minus_one + 1.0
    if STAT_ON_COLS:
        f2 = f[None, :]
    else:
        f2 = f[:, None]

    b = tl.load(base_ptr + batch * b_sb + r64 * b_sr + c64 * b_sc, mask=mask)
    m = tl.load(merged_ptr + batch * m_sb + r64 * m_sr + c64 * m_sc, mask=mask)
    b = b.to(tl.float32)
    m = m.to(tl.float32)
    d = m - b
    # torch.lerp's two forms: for f ≥ 0.5 from M's side, so that f = 1 (ω = 1,
    # or s = 0) returns M exactly, as the torch and native backends do.
    out = tl.where(f2 < 0.5, b + d * f2, m - d * (1.0 - f2))
    tl.store(
        out_ptr + batch * o_sb + r64 * o_sr + c64 * o_sc,
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


# The interpreter runs the plain kernel with the default configuration.
_channel_abs_sum_tuned = (
    _channel_abs_sum_kernel
    if INTERPRET
    else triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": n, "BLOCK_C": c}, num_warps=w)
            for n, c, w in SUM_CONFIGS
        ],
        key=["rows_class", "channels_class", "FUSED"],
        warmup=5,
        rep=20,
        cache_results=True,
    )(_channel_abs_sum_kernel)
)


def _launch_context(device: torch.device):
    # mergekit's worker threads set only torch.device; Triton launches on the
    # *current* CUDA device, so make it the tensor's.
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _default_meta(configs, names, extents) -> dict[str, int]:
    """Meta-parameters when not autotuning: the first config, each block shrunk
    to its extent (a [1, C] norm needs no 16-row tiles)."""
    meta = {n: min(b, _pow2(e)) for n, b, e in zip(names, configs[0], extents)}
    return {**meta, "num_warps": configs[0][-1]}


def _sum_3d(part_acc: torch.Tensor, x: torch.Tensor) -> None:
    """``part_acc += Σ|x|`` for ``x`` of shape [N1, N2, C] (any strides)."""
    n1, n2, channels = x.shape
    rows = n1 * n2
    if rows == 0 or channels == 0:
        return
    # Enough programs for every SM eight times over at the narrowest column
    # tile, each reducing at least MIN_ROWS_PER_PROGRAM rows.
    narrowest = min(c[1] for c in SUM_CONFIGS)
    wanted = triton.cdiv(
        8 * _multiprocessors(x.device), triton.cdiv(channels, narrowest)
    )
    split = max(1, min(wanted, triton.cdiv(rows, MIN_ROWS_PER_PROGRAM), 65535))
    rows_per_prog = triton.cdiv(rows, split)
    split = triton.cdiv(rows, rows_per_prog)
    part = torch.empty((split, channels), dtype=torch.float32, device=x.device)
    args = (
        x,
        part,
        rows,
        n2,
        channels,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        rows_per_prog,
        _pow2(rows),
        _pow2(channels),
    )
    if AUTOTUNE and not INTERPRET:

        def grid(meta):
            return (triton.cdiv(channels, meta["BLOCK_C"]), split)

        _channel_abs_sum_tuned[grid](*args, FUSED=n1 == 1)
    else:
        meta = _default_meta(SUM_CONFIGS, ("BLOCK_N", "BLOCK_C"), (rows, channels))
        grid = (triton.cdiv(channels, meta["BLOCK_C"]), split)
        _channel_abs_sum_kernel[grid](*args, FUSED=n1 == 1, **meta)
    block = min(SUM_PARTIAL_BLOCK, _pow2(channels))
    _add_partials_kernel[(triton.cdiv(channels, block),)](
        part, part_acc, split, channels, part_acc.stride(0), BLOCK=block
    )


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


def statistic_max(importance: torch.Tensor) -> torch.Tensor:
    """Float32 scalar ``max|a|`` on the statistic's device, in one launch
    (NaN if any entry is NaN, as ``amax`` gives)."""
    stat = importance if importance.dtype == torch.float32 else importance.float()
    return torch.linalg.vector_norm(stat, float("inf"))


def aim_relax(
    base: torch.Tensor,
    merged: torch.Tensor,
    importance: torch.Tensor,
    omega: float,
    axis: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused ``B + (M − B)·f`` with ``f`` computed in the kernel from the raw
    statistic ``importance`` and ``omega``; ``axis`` non-negative and validated.

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
    fuse_max = importance.shape[0] <= FUSED_MAX_LEN
    with _launch_context(out.device):
        amax = importance if fuse_max else statistic_max(importance)
        args = (
            b3,
            m3,
            o3,
            importance,
            amax,
            importance.shape[0],
            float(omega) - 1.0,
            rows,
            cols,
            *b3.stride(),
            *m3.stride(),
            *o3.stride(),
            importance.stride(0),
        )
        meta = _default_meta(RELAX_CONFIGS, ("BLOCK_R", "BLOCK_C"), (rows, cols))
        grid = (
            batch * triton.cdiv(rows, meta["BLOCK_R"]),
            triton.cdiv(cols, meta["BLOCK_C"]),
        )
        _aim_relax_kernel[grid](
            *args,
            STAT_ON_COLS=stat_on_cols,
            FUSE_MAX=fuse_max,
            MAX_BLOCK=min(FUSED_MAX_LEN, _pow2(importance.shape[0])),
            **meta,
        )
    if write_back:
        out.copy_(o3.view(shape))
    return out


def tuned_configs() -> dict[str, dict[str, str]]:
    """The autotuner's picks so far, per kernel and key (for the benchmarks)."""
    # Without autotuning (the interpreter) the kernel is a plain JITFunction.
    cache = getattr(_channel_abs_sum_tuned, "cache", {})
    return {"channel_abs_sum": {str(k): str(c) for k, c in cache.items()}}
