"""AIM's two hot operations as ``torch.ops.mergekit_aim`` custom ops.

The formula lives here and nowhere else (the factor ``f`` in ``_formula``).
For a weight with base ``B``, merge output ``M`` and the raw per-input-channel
activation statistic ``a``::

    s = |a| / max|a|            (s = 0 where max|a| = 0)
    W = B + (M − B) ⊙ (1 − s·(1 − ω)),   s broadcast along the weight's input axis

computed in float32 and returned in ``M``'s dtype. The statistic comes from
``channel_abs_sum`` (Σ|x| per channel over all leading dims of an activation).

Importing this package registers ``torch.ops.mergekit_aim.channel_abs_sum``,
``channel_abs_sum_``, ``aim_relax`` and ``aim_relax_`` (in place). Triton is
optional and imported only when a Triton kernel is first needed.
"""

from mergekit_aim.kernels import _native
from mergekit_aim.kernels._formula import omega_value, relax_factor
from mergekit_aim.kernels._native import NativeKernelUnavailable
from mergekit_aim.kernels._ops import (
    aim_relax,
    aim_relax_,
    channel_abs_sum,
    channel_abs_sum_,
)


def check_cpu_kernel() -> None:
    """Refuse a bad ``MERGEKIT_AIM_CPU_KERNEL`` (ValueError) or, where it
    requires the native CPU loop, one that cannot be built
    (:class:`NativeKernelUnavailable`): before the first relaxation."""
    if _native.mode() == "native":
        _native.library()


def native_available() -> bool:
    """Whether "auto" relaxes CPU tensors with the native loop (built on first
    call; warns once when it cannot be)."""
    return _native.available()


__all__ = [
    "NativeKernelUnavailable",
    "aim_relax",
    "aim_relax_",
    "channel_abs_sum",
    "channel_abs_sum_",
    "check_cpu_kernel",
    "native_available",
    "omega_value",
    "relax_factor",
]
