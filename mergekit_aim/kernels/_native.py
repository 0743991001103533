"""The native CPU relaxation: ``aim_relax.c`` built with the system C compiler.

Why: on CPU the torch implementation needs four passes over every block of a
bf16 weight (two upcasts, the lerp, the downcast) and costs a CPU merge about
10% of its time; the fused C loop reads each input once and writes once
(measured in ``benchmarks/kernels.py``). Results are bit-identical to the torch
implementation, which stays the reference and the path everywhere else.

The shared library is compiled once per source, compiler and CPU into
``$MERGEKIT_AIM_CACHE/kernels/`` (atomically, so concurrent ranks do not
collide) and loaded with ctypes, whose calls release the GIL: a tensor is split
into contiguous ranges run on ``torch.get_num_threads()`` threads.

``MERGEKIT_AIM_CPU_KERNEL`` chooses: ``auto`` (default: native when it builds,
otherwise torch with one warning that says why), ``native`` (an error if it
cannot be built) or ``torch`` (never build).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mergekit_aim.cache_location import cache_dir
from mergekit_aim.kernels._checks import around_axis

LOG = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("aim_relax.c")
MODE_ENV = "MERGEKIT_AIM_CPU_KERNEL"
MODES = ("auto", "native", "torch")
# Only tensors of at least this many elements per thread are split. Smaller
# ones are mostly still in cache from the inner merge, where one core keeps up
# with the memory and a second thread only adds its hand-off (and competes with
# torch's OpenMP workers, which spin for a while after each op): in a 0.66B
# task-arithmetic merge on 2 cores, splitting at 256 Ki elements made the
# relaxation ~30% slower than at 4 Mi, which was no slower than one thread.
MIN_ELEMS_PER_THREAD = 1 << 22

_TYPE_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32", torch.float16: "f16"}
_FLAG_SETS = (["-O3", "-march=native"], ["-O3"])


class NativeKernelUnavailable(RuntimeError):
    """The native kernel cannot be built or loaded here (the message says why)."""


def mode() -> str:
    value = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


def supports(out: torch.Tensor, merged: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether the native loop handles these tensors (else use torch).

    Call after :func:`library` succeeded (float16 support depends on the
    compiler it was built with).
    """
    dtype = merged.dtype
    return (
        out.device.type == "cpu"
        and merged.device.type == "cpu"
        and base.device.type == "cpu"
        and dtype in _TYPE_SUFFIX
        and base.dtype == dtype
        and out.dtype == dtype
        and out.is_contiguous()
        and merged.is_contiguous()
        and base.is_contiguous()
        and (dtype != torch.float16 or library().has_f16)
    )


def unsupported_reason(
    out: torch.Tensor, merged: torch.Tensor, base: torch.Tensor
) -> str:
    # float16 only where the compiler has _Float16 (GCC >= 12, Clang).
    dtypes = [str(d) for d in _TYPE_SUFFIX if d != torch.float16 or library().has_f16]
    return (
        "backend='native' handles contiguous CPU tensors whose base, merged and "
        f"output dtypes are one of {', '.join(dtypes)}; got "
        f"base {base.dtype} on {base.device} (contiguous: {base.is_contiguous()}), "
        f"merged {merged.dtype} on {merged.device} (contiguous: "
        f"{merged.is_contiguous()}), output {out.dtype}"
    )


def available() -> bool:
    """Whether ``auto`` uses the native loop; warns once when it cannot."""
    if mode() == "torch":
        return False
    try:
        library()
    except NativeKernelUnavailable as err:
        if mode() == "native":
            raise
        _warn_unavailable(str(err))
        return False
    return True


@functools.cache
def _warn_unavailable(reason: str) -> None:
    LOG.warning(
        "mergekit-aim: the native CPU relaxation is unavailable (%s); relaxing "
        "with torch's CPU ops instead: identical results, about 2-3x slower. "
        "Install a C compiler (cc) to enable it, or set %s=torch to choose "
        "the torch path and silence this.",
        reason,
        MODE_ENV,
    )


class _Library:
    def __init__(self, path: Path):
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        self.has_f16 = bool(self._lib.aim_relax_has_f16())
        self.rows: dict[torch.dtype, ctypes._CFuncPtr] = {}
        self.lines: dict[torch.dtype, ctypes._CFuncPtr] = {}
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        for dtype, suffix in _TYPE_SUFFIX.items():
            if dtype == torch.float16 and not self.has_f16:
                continue
            rows = getattr(self._lib, f"aim_relax_rows_{suffix}")
            rows.argtypes = [ptr, ptr, ptr, ptr, i64, i64]
            rows.restype = None
            lines = getattr(self._lib, f"aim_relax_lines_{suffix}")
            lines.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64]
            lines.restype = None
            self.rows[dtype] = rows
            self.lines[dtype] = lines


_BUILD_LOCK = threading.Lock()
_LIBRARY: _Library | None = None
_FAILURE: str | None = None


def library() -> _Library:
    """The loaded kernel library, built on first use; raises when impossible."""
    global _LIBRARY, _FAILURE
    with _BUILD_LOCK:
        if _LIBRARY is not None:
            return _LIBRARY
        if _FAILURE is not None:
            raise NativeKernelUnavailable(_FAILURE)
        try:
            _LIBRARY = _Library(_build())
        except NativeKernelUnavailable as err:
            _FAILURE = str(err)
            raise
        except OSError as err:
            _FAILURE = f"the built library could not be loaded: {err}"
            raise NativeKernelUnavailable(_FAILURE) from err
        return _LIBRARY


def reset() -> None:
    """Forget the loaded library and any failure (tests change the compiler)."""
    global _LIBRARY, _FAILURE
    with _BUILD_LOCK:
        _LIBRARY, _FAILURE = None, None
    _warn_unavailable.cache_clear()


def compiler() -> str:
    """The C compiler: ``$CC`` if set, else the first of cc, gcc, clang on PATH."""
    explicit = os.environ.get("CC")
    if explicit:
        found = shutil.which(explicit)
        if found is None:
            raise NativeKernelUnavailable(f"CC={explicit!r} is not an executable")
        return found
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    raise NativeKernelUnavailable("no C compiler (cc, gcc or clang) on PATH")


def _compiler_identity(cc: str) -> str:
    try:
        done = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as err:
        raise NativeKernelUnavailable(f"{cc} --version failed: {err}") from err
    if done.returncode != 0:
        raise NativeKernelUnavailable(f"{cc} --version exited {done.returncode}")
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else cc


def _cpu_identity() -> str:
    # -march=native code must never run on another CPU that shares the cache
    # (a home directory mounted on several machines): the key includes the
    # CPU's feature flags.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build() -> Path:
    cc = compiler()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                _compiler_identity(cc).encode(),
                cc.encode(),
                platform.machine().encode(),
                _cpu_identity().encode(),
            ]
        )
    ).hexdigest()[:24]
    folder = cache_dir() / "kernels"
    target = folder / f"aim_relax-{key}.so"
    if target.exists():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return _compile(cc, folder, target)
    except OSError as err:
        raise NativeKernelUnavailable(
            f"cannot build into {folder} ({err}); set MERGEKIT_AIM_CACHE to a "
            f"writable directory"
        ) from err


def _compile(cc: str, folder: Path, target: Path) -> Path:
    errors = []
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
        built = Path(tmp) / target.name
        for flags in _FLAG_SETS:
            command = [cc, *flags, "-fPIC", "-shared", str(SOURCE), "-o", str(built)]
            try:
                done = subprocess.run(
                    command, capture_output=True, text=True, timeout=300
                )
            except (OSError, subprocess.SubprocessError) as err:
                errors.append(f"{' '.join(command)}: {err}")
                continue
            if done.returncode == 0:
                os.replace(built, target)
                LOG.info("built the native CPU relaxation: %s", target)
                return target
            errors.append(f"{' '.join(command)}: {done.stderr.strip()[-500:]}")
    raise NativeKernelUnavailable("compiling aim_relax.c failed: " + " | ".join(errors))


_POOL_LOCK = threading.Lock()
_POOL: tuple[ThreadPoolExecutor, int] | None = None


def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads, remade when torch's thread count changes."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[1] != workers:
            if _POOL is not None:
                _POOL[0].shutdown(wait=False)
            _POOL = (
                ThreadPoolExecutor(workers, thread_name_prefix="aim-relax"),
                workers,
            )
        return _POOL[0]


def _run_split(units: int, unit_elems: int, call) -> None:
    """``call(start, stop)`` over ``[0, units)``, split across torch's threads."""
    threads = torch.get_num_threads()
    parts = max(1, min(threads, units * unit_elems // MIN_ELEMS_PER_THREAD, units))
    if parts == 1:
        call(0, units)
        return
    bounds = [units * i // parts for i in range(parts + 1)]
    futures = [
        _pool(threads - 1).submit(call, bounds[i], bounds[i + 1])
        for i in range(1, parts)
    ]
    call(bounds[0], bounds[1])
    for future in futures:
        future.result()


def aim_relax(
    base: torch.Tensor,
    merged: torch.Tensor,
    factor: torch.Tensor,
    axis: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The backend interface of ``_torch.aim_relax``, on the native loop.

    Arguments are validated by the caller; raises ValueError for tensors the
    loop does not handle (see :func:`supports`) and NativeKernelUnavailable
    when the library cannot be built.
    """
    lib = library()
    if out is None:
        out = torch.empty(merged.shape, dtype=merged.dtype, device=merged.device)
    if not supports(out, merged, base):
        raise ValueError(unsupported_reason(out, merged, base))
    if out.numel() == 0:
        return out
    factor = factor.contiguous()
    outer, channels, inner = around_axis(tuple(merged.shape), axis)
    size = merged.element_size()
    o, m, b, f = (t.data_ptr() for t in (out, merged, base, factor))
    if inner == 1:
        rows = lib.rows[merged.dtype]

        def run_rows(start: int, stop: int) -> None:
            at = start * channels * size
            rows(o + at, m + at, b + at, f, stop - start, channels)

        _run_split(outer, channels, run_rows)
    else:
        lines = lib.lines[merged.dtype]

        def run_lines(start: int, stop: int) -> None:
            at = start * inner * size
            first = start % channels
            lines(o + at, m + at, b + at, f, stop - start, channels, first, inner)

        _run_split(outer * channels, inner, run_lines)
    return out


def _only_relax(*_args, **_kwargs):
    raise ValueError(
        "backend='native' implements aim_relax and aim_relax_ only; "
        "channel_abs_sum runs on backend 'torch' or 'triton'"
    )


channel_abs_sum = channel_abs_sum_ = _only_relax
