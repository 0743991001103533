"""The ``torch.ops.mergekit_aim`` custom ops and the Python entry points.

Each op has one kernel for every device, which picks the implementation the
way "auto" does (Triton on CUDA when it can be imported; on CPU, for the
relaxation, the native C loop when it can be built and handles the tensors;
torch otherwise), and a fake implementation, so
``torch.compile(fullgraph=True)`` traces callers. The entry points add a
``backend`` argument that bypasses dispatch, which is how tests run every
implementation on CPU tensors.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from mergekit_aim.kernels import _native, _torch
from mergekit_aim.kernels._checks import (
    check_aim_relax,
    check_aim_relax_,
    check_backend,
    check_channel_abs_sum,
    check_channel_abs_sum_,
)
from mergekit_aim.kernels._formula import omega_value, relax_factor

LOG = logging.getLogger(__name__)


@functools.cache
def _triton_impl() -> ModuleType | None:
    """The Triton implementation module, or None when Triton is not installed."""
    try:
        from mergekit_aim.kernels import _triton
    except ImportError as err:
        LOG.info("Triton unavailable (%s); kernels use the torch implementation", err)
        return None
    return _triton


def _require_triton(device: torch.device) -> ModuleType:
    impl = _triton_impl()
    if impl is None:
        raise RuntimeError(
            "backend='triton' needs Triton: pip install 'mergekit-aim[triton]'"
        )
    if device.type != "cuda" and not impl.INTERPRET:
        raise RuntimeError(
            f"backend='triton' on {device.type} tensors runs only in Triton's "
            f"interpreter: set TRITON_INTERPRET=1 in the environment before "
            f"Python starts (Triton reads it when the kernels are defined), or "
            f"use backend='torch'"
        )
    return impl


def _cuda_impl() -> ModuleType:
    # The interpreter on CUDA tensors round-trips through host memory; it is a
    # testing tool, so dispatch keeps CUDA tensors on the torch path under it.
    impl = _triton_impl()
    if impl is None or impl.INTERPRET:
        return _torch
    return impl


# Below this many elements "auto" sums channels on CUDA with torch's fused
# float32 reduction (one launch) rather than the Triton kernel (two launches and
# the autotuner's host work per call). On an H200
# (benchmarks/results/gpu/nvidia-h200/kernels-cuda*.md, two runs) the reduction
# took the same or less device time up to 4×2048×4096 (34 Mi elements: 0.041 ms
# against 0.042 and 0.158 ms) and a 2-3x cheaper call, which is what a
# calibration hook, called hundreds of times per forward, pays; at 8×4096×4096
# the tuned kernel reached 79-82% of copy bandwidth against the reduction's 75%.
CUDA_TRITON_SUM_MIN_ELEMS = 1 << 26


def _impl(
    backend: str, device: torch.device, elements: int | None = None
) -> ModuleType:
    """The module of ``backend``'s kernels; for "auto", the channel sums' kernels
    for ``elements`` on ``device`` (the relaxation's choice is
    ``_default_aim_relax``)."""
    if backend == "torch":
        return _torch
    if backend == "native":
        return _native
    if backend == "triton":
        return _require_triton(device)
    if device.type != "cuda":
        return _torch
    if elements is not None and elements < CUDA_TRITON_SUM_MIN_ELEMS:
        return _torch
    return _cuda_impl()


def _eager(*tensors: torch.Tensor) -> bool:
    """Whether an "auto" call may run its kernel without the dispatcher.

    Entering a Python custom op through ``torch.ops`` costs tens of
    microseconds per call (a measurable share of a merge's relaxation, one call
    per tensor, and of calibration hooks). The dispatcher is needed only for
    tracing, fake tensors and other subclasses, dispatch modes and autograd;
    a plain eager call on plain tensors goes straight to the kernel the op
    would have picked.
    """
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode():
        return False
    return all(type(t) is torch.Tensor and not t.requires_grad for t in tensors)


def _relax_with(
    impl: ModuleType,
    base: torch.Tensor,
    merged: torch.Tensor,
    importance: torch.Tensor,
    omega: float,
    axis: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``impl``'s relaxation: the Triton kernel computes the factor itself
    (one launch instead of the eager factor's nine); the others take ``f``."""
    if getattr(impl, "FACTOR_IN_KERNEL", False):
        return impl.aim_relax(base, merged, importance, omega, axis, out=out)
    factor = relax_factor(importance, omega)
    return impl.aim_relax(base, merged, factor, axis, out=out)


def _default_aim_relax(
    base: torch.Tensor,
    merged: torch.Tensor,
    importance: torch.Tensor,
    omega: float,
    axis: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """What "auto" runs: the CUDA kernel on CUDA; on CPU the native loop where
    it applies; torch otherwise."""
    device = merged.device
    if device.type == "cuda":
        impl = _cuda_impl()
    else:
        target = merged if out is None else out  # a new output is contiguous
        native = (
            device.type == "cpu"
            and _native.available()
            and _native.supports(target, merged, base)
        )
        impl = _native if native else _torch
    return _relax_with(impl, base, merged, importance, omega, axis, out=out)


# --- channel_abs_sum -----------------------------------------------------------


@torch.library.custom_op("mergekit_aim::channel_abs_sum", mutates_args=())
def _channel_abs_sum_op(x: torch.Tensor) -> torch.Tensor:
    check_channel_abs_sum(x)
    return _impl("auto", x.device, x.numel()).channel_abs_sum(x)


@_channel_abs_sum_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    check_channel_abs_sum(x)
    return x.new_empty((x.shape[-1],), dtype=torch.float32)


@torch.library.custom_op("mergekit_aim::channel_abs_sum_", mutates_args=("acc",))
def _channel_abs_sum_inplace_op(acc: torch.Tensor, x: torch.Tensor) -> None:
    check_channel_abs_sum_(acc, x)
    _impl("auto", x.device, x.numel()).channel_abs_sum_(acc, x)


@_channel_abs_sum_inplace_op.register_fake
def _(acc: torch.Tensor, x: torch.Tensor) -> None:
    check_channel_abs_sum_(acc, x)


# --- aim_relax -------------------------------------------------------------------


@torch.library.custom_op("mergekit_aim::aim_relax", mutates_args=())
def _aim_relax_op(
    base: torch.Tensor,
    merged: torch.Tensor,
    importance: torch.Tensor,
    omega: float,
    input_axis: int,
) -> torch.Tensor:
    axis = check_aim_relax(base, merged, importance, omega, input_axis)
    return _default_aim_relax(base, merged, importance, omega, axis)


@_aim_relax_op.register_fake
def _(
    base: torch.Tensor,
    merged: torch.Tensor,
    importance: torch.Tensor,
    omega: float,
    input_axis: int,
) -> torch.Tensor:
    check_aim_relax(base, merged, importance, omega, input_axis)
    return merged.new_empty(merged.shape)


@torch.library.custom_op("mergekit_aim::aim_relax_", mutates_args=("merged",))
def _aim_relax_inplace_op(
    merged: torch.Tensor,
    base: torch.Tensor,
    importance: torch.Tensor,
    omega: float,
    input_axis: int,
) -> None:
    axis = check_aim_relax_(merged, base, importance, omega, input_axis)
    _default_aim_relax(base, merged, importance, omega, axis, out=merged)


@_aim_relax_inplace_op.register_fake
def _(
    merged: torch.Tensor,
    base: torch.Tensor,
    importance: torch.Tensor,
    omega: float,
    input_axis: int,
) -> None:
    check_aim_relax_(merged, base, importance, omega, input_axis, memory=False)


# --- entry points ------------------------------------------------------------------


def channel_abs_sum(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Σ|x| per channel over all leading dims of ``x[..., C]``.

    Returns a new float32 tensor of shape ``[C]`` on ``x``'s device. ``x`` is
    float16, bfloat16, float32 or float64 with any strides; it is reduced in
    float32 (float64 too) without materialising ``|x|`` or a float32 copy of it,
    and never written. ``backend``: "auto" (the custom op: Triton for CUDA
    tensors, torch elsewhere), "torch", or "triton" (CUDA, or CPU under
    ``TRITON_INTERPRET=1``); "native" implements only the relaxation.
    """
    check_backend(backend)
    if backend == "auto" and not _eager(x):
        return torch.ops.mergekit_aim.channel_abs_sum(x)
    check_channel_abs_sum(x)
    return _impl(backend, x.device, x.numel()).channel_abs_sum(x)


def channel_abs_sum_(
    acc: torch.Tensor, x: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """In place ``acc += Σ|x|`` (see :func:`channel_abs_sum`); returns ``acc``.

    ``acc`` is a 1-D float32 tensor of ``x.shape[-1]`` entries on ``x``'s device;
    the streaming form for calibration hooks.
    """
    check_backend(backend)
    if backend == "auto" and not _eager(acc, x):
        torch.ops.mergekit_aim.channel_abs_sum_(acc, x)
        return acc
    check_channel_abs_sum_(acc, x)
    _impl(backend, x.device, x.numel()).channel_abs_sum_(acc, x)
    return acc


def aim_relax(
    base: torch.Tensor,
    merged: torch.Tensor,
    importance: torch.Tensor,
    omega: float,
    input_axis: int = -1,
    backend: str = "auto",
) -> torch.Tensor:
    """AIM relaxation ``B + (M − B)·(1 − s·(1 − ω))``, ``s = |a| / max|a|``.

    ``importance`` is the raw 1-D statistic ``a`` (sum or mean of |input|: the
    normalisation makes them equal); its length must equal the size of
    ``merged`` along ``input_axis`` (−1 for Linear ``[out, in]``, 0 for GPT-2
    Conv1D ``[in, out]``, either for 1-D norm weights), along which ``s``
    broadcasts. If ``max|a| == 0``, ``s = 0`` everywhere. Non-finite entries of
    ``a`` propagate. ``base`` and ``merged`` have equal shapes and any float
    dtypes; the arithmetic is float32 and the result is a new contiguous tensor
    of ``merged``'s dtype. Inputs are never written. ``omega`` in [0, 1].
    Raises ValueError on any violation.

    ``backend``: "auto" (the custom op: Triton for CUDA tensors; on CPU the
    native C loop, see :mod:`mergekit_aim.kernels._native`, where it can be
    built and handles the dtypes, else torch), "torch", "triton" (CUDA, or CPU
    under ``TRITON_INTERPRET=1``) or "native" (contiguous CPU tensors of one
    dtype among bfloat16, float16, float32; bit-identical to "torch").
    """
    check_backend(backend)
    omega = omega_value(omega)
    if backend == "auto" and not _eager(base, merged, importance):
        return torch.ops.mergekit_aim.aim_relax(
            base, merged, importance, omega, input_axis
        )
    axis = check_aim_relax(base, merged, importance, omega, input_axis)
    if backend == "auto":
        return _default_aim_relax(base, merged, importance, omega, axis)
    impl = _impl(backend, merged.device)
    return _relax_with(impl, base, merged, importance, omega, axis)


def aim_relax_(
    merged: torch.Tensor,
    base: torch.Tensor,
    importance: torch.Tensor,
    omega: float,
    input_axis: int = -1,
    backend: str = "auto",
) -> torch.Tensor:
    """In place ``merged ← B + (M − B)·(1 − s·(1 − ω))`` (see :func:`aim_relax`).

    Returns ``merged``. Saves the output allocation (and, on CPU, the page
    faults of first touching it) when the caller owns ``merged``, as a merge
    method owns its inner method's fresh result. ``merged`` must not share
    memory with ``base`` or ``importance`` and must not be a broadcast view.
    """
    check_backend(backend)
    omega = omega_value(omega)
    if backend == "auto" and not _eager(merged, base, importance):
        torch.ops.mergekit_aim.aim_relax_(merged, base, importance, omega, input_axis)
        return merged
    axis = check_aim_relax_(merged, base, importance, omega, input_axis)
    if backend == "auto":
        _default_aim_relax(base, merged, importance, omega, axis, out=merged)
    else:
        impl = _impl(backend, merged.device)
        _relax_with(impl, base, merged, importance, omega, axis, out=merged)
    return merged
