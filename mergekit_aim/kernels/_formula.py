"""The relaxation factor, computed once per tensor and handed to every backend.

For the raw statistic ``a`` of one weight and ω::

    s = |a| / max|a|            (s = 0 where max|a| is 0, or NaN)
    f = 1 − s·(1 − ω)

Every backend then computes ``B + (M − B)·f`` with ``f`` broadcast along the
weight's input axis. Keeping ``f`` here, rather than in each backend, is what
makes the torch, native and Triton results agree bit for bit on ``f``.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def omega_value(value: Any) -> float:
    """Validate one scalar ω: a number in [0, 1] (YAML strings like "4e-1" too).

    The one ω check of the package: the ``aim:`` block, the CLI, the Python
    API and the kernels all refuse the same values with the same words.
    """
    if isinstance(value, bool):
        raise ValueError(f"omega must be a number in [0, 1], not a boolean ({value})")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"omega must be a number in [0, 1]; got {value!r}") from None
    if math.isnan(number) or not 0.0 <= number <= 1.0:
        raise ValueError(
            f"omega must be within [0, 1] (1 = plain merge, 0 = the most used "
            f"channel fully back to the base); got {number}"
        )
    return number


def relax_factor(importance: torch.Tensor, omega: float) -> torch.Tensor:
    """Float32 ``f = 1 − s·(1 − ω)``, ``s = |a| / max|a|``, on ``importance``'s device.

    No host synchronisation: the zero test is a ``where`` on the device. A
    handful of ops on a vector of one weight's input size; negligible next to
    the relaxation itself. ``s·(ω − 1) + 1`` rounds exactly as
    ``1 − s·(1 − ω)`` (negation is exact).
    """
    a = importance.to(torch.float32, copy=True).abs_()
    amax = a.amax()
    positive = amax > 0
    s = torch.where(positive, a.div_(torch.where(positive, amax, 1.0)), 0.0)
    return s.mul_(omega - 1.0).add_(1.0)
