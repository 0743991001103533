"""Where mergekit-aim keeps what it computes once: calibration artifacts and built
kernels. Standard library only, so that the kernels can find it without
importing mergekit."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MERGEKIT_AIM_CACHE"


def cache_dir() -> Path:
    """``$MERGEKIT_AIM_CACHE``, else ``$XDG_CACHE_HOME/mergekit-aim``, else
    ``~/.cache/mergekit-aim``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return Path(root) / "mergekit-aim"
