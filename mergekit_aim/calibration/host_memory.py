"""Keeping a capped calibration's resident memory near its cap (Linux, glibc).

Big-model inference bounds what the weights occupy, but two things outside
torch's view would still hold memory: the pages of the memory-mapped checkpoint
that loading touches, and the heap glibc keeps after streamed layers are freed.
Each helper is a no-op where the platform lacks the facility.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Collection, Iterator
from typing import Any

LOG = logging.getLogger(__name__)


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a local model directory (none for Hub ids)."""
    if not os.path.isdir(path):
        return []
    return sorted(
        os.path.realpath(os.path.join(path, name))
        for name in os.listdir(path)
        if name.endswith(".safetensors")
    )


_MADV_PAGEOUT = 21  # Linux >= 5.4; EINVAL on older kernels


@contextlib.contextmanager
def release_mapped_pages(
    files: Collection[str], interval: float = 0.02
) -> Iterator[None]:
    """While the block runs, keep pages of memory-mapped ``files`` out of RSS.

    A background thread scans ``/proc/self/maps`` every ``interval`` seconds
    and asks the kernel to reclaim the mappings of ``files`` (safetensors maps
    them private, copy-on-write) with ``madvise(MADV_PAGEOUT)``. That is
    non-destructive, unlike ``MADV_DONTNEED``: clean file pages go back to the
    page cache and fault back in on the next access, anonymous (written) pages
    can only be swapped out, never dropped, so no data is lost even if a
    scanned range was meanwhile unmapped and reused. The cost is that
    the evicted checkpoint pages are read from disk again if needed. A no-op
    off Linux, on kernels without ``MADV_PAGEOUT``, and where the kernel
    declines (files neither owned nor writable by this user).
    """
    import sys

    targets = {os.fsencode(f) for f in files}
    madvise = libc_madvise() if sys.platform.startswith("linux") else None
    if not targets or madvise is None:
        yield
        return
    import threading

    stop = threading.Event()
    released = [0]

    def sweep() -> bool:
        try:
            with open("/proc/self/maps", "rb") as handle:
                lines = handle.readlines()
        except OSError:
            return False
        for line in lines:
            fields = line.split(None, 5)
            if len(fields) < 6 or fields[5].rstrip(b"\n") not in targets:
                continue
            start, end = (int(x, 16) for x in fields[0].split(b"-"))
            if madvise(start, end - start, _MADV_PAGEOUT) != 0:
                return False  # unsupported: stop trying
            released[0] += 1
        return True

    def loop() -> None:
        while not stop.wait(interval):
            if not sweep():
                return

    thread = threading.Thread(target=loop, name="aim-release-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        LOG.debug("released checkpoint pages %d times while loading", released[0])


def libc_madvise() -> Any:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def return_large_frees(threshold: int = 1 << 20) -> None:
    """Serve allocations of ``threshold`` bytes or more by mmap (glibc).

    Such blocks go back to the system as soon as they are freed. By default
    glibc raises its mmap threshold to the largest block freed so far (up to
    32 MiB), after which weight-sized tensors come from the heap, and a heap
    that streamed weights and activations were allocated from and freed to in
    interleaved order keeps most of it: on a 516M-parameter model streamed
    under a 400 MiB cap that was ~600 MiB more resident memory than with this
    setting. Fixing the threshold also turns the adaptation off. Process-wide;
    a no-op off glibc.
    """
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, threshold) != 1:
        LOG.debug("mallopt(M_MMAP_THRESHOLD) refused")


def trim_heap() -> None:
    """Return freed heap to the system (glibc's ``malloc_trim``), if available."""
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
