"""What long-running commands show on the console: progress bars and timings.

Kept apart from the commands themselves so that any of them (``tune``, the
demo) and the benchmarks quiet transformers and time their steps one way.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

LOG = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' progress bars inside the block; the caller's setting
    is restored afterwards."""
    # Saving and loading a dozen tiny checkpoints would print a dozen progress
    # bars between the log lines.
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class Stopwatch:
    """Times named steps (``with watch("step"):``) into ``timings`` and logs them."""

    def __init__(self, label: str = "demo") -> None:
        self.label = label
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[step] = round(time.perf_counter() - start, 2)
        LOG.info("%s: %s done in %.1f s", self.label, step, self.timings[step])
