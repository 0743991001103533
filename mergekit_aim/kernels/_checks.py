"""Argument validation and layout helpers shared by the op kernels and the wrappers.

Kernels only do maths; everything that can refuse an input lives here so that the
torch and Triton implementations, and the fake (meta) implementations used by
``torch.compile``, refuse exactly the same inputs with the same messages.
"""

from __future__ import annotations

import math

import torch

from mergekit_aim.kernels._formula import omega_value

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "torch", "triton", "native")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}"
        )


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
        )


def check_channel_abs_sum(x: torch.Tensor) -> None:
    _check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (channels last)")


def check_channel_abs_sum_(acc: torch.Tensor, x: torch.Tensor) -> None:
    check_channel_abs_sum(x)
    if acc.dtype != torch.float32 or acc.dim() != 1:
        raise ValueError(
            f"acc must be a 1-D float32 tensor, got {acc.dim()}-D {acc.dtype}"
        )
    if acc.shape[0] != x.shape[-1]:
        raise ValueError(
            f"acc has {acc.shape[0]} channels but x has {x.shape[-1]} "
            f"(its last dimension)"
        )
    if acc.device != x.device:
        raise ValueError(f"acc is on {acc.device} but x is on {x.device}")


def check_aim_relax(
    base: torch.Tensor,
    merged: torch.Tensor,
    importance: torch.Tensor,
    omega: float,
    input_axis: int,
) -> int:
    """Validate the relaxation's arguments; return ``input_axis`` made non-negative."""
    omega_value(omega)
    for name, t in (("base", base), ("merged", merged), ("importance", importance)):
        _check_float(name, t)
    if base.shape != merged.shape:
        raise ValueError(
            f"base shape {tuple(base.shape)} differs from merged shape "
            f"{tuple(merged.shape)}"
        )
    if base.device != merged.device or importance.device != merged.device:
        raise ValueError(
            f"base ({base.device}), merged ({merged.device}) and importance "
            f"({importance.device}) must be on one device"
        )
    if importance.dim() != 1:
        raise ValueError(f"importance must be 1-D, got shape {tuple(importance.shape)}")
    ndim = merged.dim()
    if isinstance(input_axis, bool) or not isinstance(input_axis, int):
        raise ValueError(f"input_axis must be an int, got {input_axis!r}")
    if not -ndim <= input_axis < ndim:
        raise ValueError(
            f"input_axis {input_axis} is out of range for a weight of shape "
            f"{tuple(merged.shape)}"
        )
    axis = input_axis % ndim
    if importance.shape[0] != merged.shape[axis]:
        raise ValueError(
            f"importance has {importance.shape[0]} entries but the weight's input "
            f"axis {input_axis} has size {merged.shape[axis]} "
            f"(weight shape {tuple(merged.shape)})"
        )
    return axis


def check_aim_relax_(
    merged: torch.Tensor,
    base: torch.Tensor,
    importance: torch.Tensor,
    omega: float,
    input_axis: int,
    *,
    memory: bool = True,
) -> int:
    """:func:`check_aim_relax`, plus what writing into ``merged`` needs.

    ``memory=False`` skips the aliasing checks, which need real storage (fake
    tensors, used when tracing, have none).
    """
    axis = check_aim_relax(base, merged, importance, omega, input_axis)
    if any(n > 1 and s == 0 for n, s in zip(merged.shape, merged.stride())):
        raise ValueError(
            "merged is an expanded (broadcast) view: several of its elements share "
            "memory, so it cannot be relaxed in place"
        )
    if not memory or not merged.numel():
        return axis
    if _same_storage(merged, base):
        raise ValueError("merged shares memory with base: cannot relax in place")
    if _same_storage(merged, importance):
        raise ValueError("merged shares memory with importance")
    return axis


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def merged_leading_dims(x: torch.Tensor) -> torch.Tensor:
    """A view of ``x[..., C]`` with leading dims reordered and fused where possible.

    A sum over the leading dims does not depend on their order, so they are sorted
    by decreasing stride (a transposed activation becomes its contiguous parent)
    and adjacent dims that address memory as one are fused. The result has at
    least two dims and the same elements as ``x``; no data is copied.
    """
    channels, channel_stride = x.shape[-1], x.stride(-1)
    lead = [
        (n, s) for n, s in zip(x.shape[:-1], x.stride()[:-1], strict=True) if n != 1
    ]
    lead.sort(key=lambda d: d[1], reverse=True)
    fused: list[tuple[int, int]] = []
    for n, s in lead:
        if fused and fused[-1][1] == s * n:
            fused[-1] = (fused[-1][0] * n, s)
        else:
            fused.append((n, s))
    if not fused:
        fused = [(1, 0)]
    sizes = [n for n, _ in fused] + [channels]
    strides = [s for _, s in fused] + [channel_stride]
    return x.as_strided(sizes, strides, x.storage_offset())


def around_axis(shape: tuple[int, ...], axis: int) -> tuple[int, int, int]:
    """``(outer, channels, inner)``: ``shape`` seen as ``[outer, shape[axis], inner]``.

    How the fused kernels address a weight whose statistic runs along ``axis``
    (contiguous layout): ``inner == 1`` for Linear ``[out, in]`` and norms, > 1
    for GPT-2 Conv1D ``[in, out]`` and inner axes of N-D weights.
    """
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])


def index_blocks(shape: tuple[int, ...], max_elems: int, keep_last: bool):
    """Yield index tuples that tile a tensor of ``shape`` in order.

    Each block holds at most ``max_elems`` elements, except that with
    ``keep_last`` the last dim is never split (a block is then at least one
    row). Splitting the outermost dim first keeps blocks contiguous in memory
    for contiguous tensors.
    """

    def rec(prefix: tuple, dims: tuple[int, ...]):
        total = math.prod(dims)
        if not dims or total <= max_elems or (keep_last and len(dims) == 1):
            yield prefix
            return
        inner = math.prod(dims[1:])
        if inner <= max_elems or (keep_last and len(dims) == 2):
            step = max(1, max_elems // max(inner, 1))
            for start in range(0, dims[0], step):
                yield prefix + (slice(start, start + step),)
        else:
            for i in range(dims[0]):
                yield from rec(prefix + (i,), dims[1:])

    yield from rec((), tuple(shape))
