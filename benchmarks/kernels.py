"""Throughput of the AIM kernels: effective GB/s against the machine's copy bandwidth.

Usage: ``python benchmarks/kernels.py [--quick] [--out DIR] [--device cpu|cuda]``.

"Effective" bandwidth is the bytes an op must move at least (each input read
once, each output written once) divided by its time. Each op is compared with
``dst.copy_(src)`` of comparable bytes on the same device (the practical ceiling
for a streaming pass) and with the eager, unfused torch expression it replaces.
Results go to ``DIR/kernels.json`` and ``DIR/kernels.md``; the table is printed.
By default the CPU rows run, then the GPU rows where CUDA exists; ``--device``
runs one device only (``--device cuda`` writes ``kernels-cuda.*``).

On CUDA every op runs over a ladder of shapes, from 1k×1k to the full sizes,
and two times are taken: the **device time** (CUDA events around one call, the
L2 cache flushed before it, median of many; the host enqueues the call while the
flush runs, so launch overhead shows only where it exceeds the flush) and the
**call time** (wall time of one call followed by a synchronisation: what a
caller waiting on each result pays, Python and launches included). The copy
ceiling is measured the same way at the same traffic. The channel sums' Triton
rows are the autotuned kernel (``tuned``) and its fixed default configuration
(``default``, ``MERGEKIT_AIM_TRITON_AUTOTUNE=0``); the configurations the tuner
picked are written to the JSON. ``auto`` is what the product runs (see
``mergekit_aim.kernels._ops``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mergekit_aim.kernels import aim_relax, aim_relax_, channel_abs_sum

LOG = logging.getLogger("benchmarks.kernels")
FULL = {"activation": (8, 4096, 4096), "weight": (4096, 14336)}
QUICK = {"activation": (2, 1024, 4096), "weight": (1024, 4096)}
DTYPE = torch.bfloat16
OMEGA = 0.4


def machine() -> dict[str, object]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, object] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def timed(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median seconds of ``repeat`` runs after one warm-up run."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, device: torch.device, repeat: int) -> float:
    """Bytes/s of ``dst.copy_(src)`` (read + write) for ``nbytes`` per tensor."""
    src = torch.ones(nbytes // 2, dtype=DTYPE, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, repeat)


def fresh_copy_bandwidth(nbytes: int, device: torch.device, repeat: int) -> float:
    """Bytes/s of ``torch.empty_like(src).copy_(src)``: a copy into a new tensor.

    What an op that returns a new tensor can reach at best: on CPU, large fresh
    allocations come from the OS and every page faults on first touch.
    """
    src = torch.ones(nbytes // 2, dtype=DTYPE, device=device)
    return 2 * nbytes / timed(lambda: torch.empty_like(src).copy_(src), device, repeat)


def eager_channel_abs_sum(x: torch.Tensor) -> torch.Tensor:
    return x.abs().float().sum(dim=tuple(range(x.dim() - 1)))


def eager_relax(base, merged, importance, omega, axis=-1) -> torch.Tensor:
    a = importance.float().abs()
    s = a / a.max()
    shape = [1] * merged.dim()
    shape[axis] = -1
    f = (1 - s * (1 - omega)).view(shape)
    b = base.float()
    return (b + (merged.float() - b) * f).to(merged.dtype)


def run_device(device: torch.device, sizes, repeat: int) -> list[dict[str, object]]:
    gen = torch.Generator(device=device).manual_seed(0)
    act_shape, w_shape = sizes["activation"], sizes["weight"]
    x = torch.randn(act_shape, device=device, generator=gen).to(DTYPE)
    base = torch.randn(w_shape, device=device, generator=gen).to(DTYPE)
    merged = torch.randn(w_shape, device=device, generator=gen).to(DTYPE)
    stat = torch.rand(w_shape[-1], device=device, generator=gen)
    x_bytes = x.numel() * x.element_size()
    w_bytes = base.numel() * base.element_size()
    sum_bytes = x_bytes + 4 * act_shape[-1]
    relax_bytes = 3 * w_bytes + 4 * stat.numel()
    copy_bw = copy_bandwidth(max(x_bytes, w_bytes), device, repeat)
    fresh_bw = fresh_copy_bandwidth(w_bytes, device, repeat)

    backends = ["torch"]
    if device.type == "cuda":
        backends.insert(0, "triton")
    relax_backends = list(backends)
    if device.type == "cpu":
        from mergekit_aim.kernels import native_available

        if native_available():
            relax_backends.append("native")
        else:
            LOG.warning("native CPU relaxation unavailable: its rows are left out")
    cases = []
    for backend in backends:
        cases.append(
            (
                "channel_abs_sum",
                backend,
                sum_bytes,
                lambda b=backend: channel_abs_sum(x, backend=b),
                lambda: eager_channel_abs_sum(x),
            )
        )
    for backend in relax_backends:
        cases.append(
            (
                "aim_relax",
                backend,
                relax_bytes,
                lambda b=backend: aim_relax(base, merged, stat, OMEGA, -1, b),
                lambda: eager_relax(base, merged, stat, OMEGA),
            )
        )
        # In place, as the AIM merge wrapper runs it on its inner method's fresh
        # result: no output allocation (on CPU, no page faults first touching it).
        # Repeated relaxation changes the values, not the work.
        scratch = merged.clone()
        cases.append(
            (
                "aim_relax_ (in place)",
                backend,
                relax_bytes,
                lambda b=backend, m=scratch: aim_relax_(m, base, stat, OMEGA, -1, b),
                lambda: eager_relax(base, merged, stat, OMEGA),
            )
        )
    rows = []
    eager_times: dict[str, float] = {}
    for op, backend, nbytes, fn, eager in cases:
        if op not in eager_times:
            eager_times[op] = timed(eager, device, repeat)
        seconds = timed(fn, device, repeat)
        shape = act_shape if op == "channel_abs_sum" else w_shape
        rows.append(
            {
                "op": op,
                "backend": backend,
                "device": device.type,
                "shape": list(shape),
                "dtype": str(DTYPE).replace("torch.", ""),
                "ms": seconds * 1e3,
                "gbps": nbytes / seconds / 1e9,
                "copy_gbps": copy_bw / 1e9,
                "fraction_of_copy": nbytes / seconds / copy_bw,
                "fresh_copy_gbps": fresh_bw / 1e9,
                "eager_ms": eager_times[op] * 1e3,
                "speedup_vs_eager": eager_times[op] / seconds,
            }
        )
        LOG.info("%s/%s on %s: %.1f ms", op, backend, device, seconds * 1e3)
    return rows


# The CUDA ladder: (activation [N, T, C]) and (weight, input axis).
CUDA_SUM_SHAPES = (
    (1, 1024, 1024),
    (4, 2048, 576),  # a SmolLM2-135M calibration hook at batch 4 × 2048 tokens
    (4, 2048, 4096),
    (8, 4096, 4096),
)
CUDA_RELAX_SHAPES = (
    ((1024, 1024), -1),
    ((4096, 4096), -1),
    ((14336, 4096), -1),
    ((4096, 14336), -1),
    ((4096, 14336), 0),  # statistic along the rows (GPT-2 Conv1D layout)
    ((4096,), -1),  # a norm weight
)


def device_time(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of one call between CUDA events, L2 flushed before each."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(repeat):
        flush.zero_()
        start, end = (
            torch.cuda.Event(enable_timing=True),
            torch.cuda.Event(enable_timing=True),
        )
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs) / 1e3


def run_cuda(repeat: int) -> list[dict[str, object]]:
    """The CUDA ladder: Triton (tuned, default), torch, eager, copy."""
    from mergekit_aim.kernels import _triton

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    rows: list[dict[str, object]] = []

    def copy_time(traffic: int) -> float:
        src = torch.ones(traffic // 4, dtype=DTYPE, device=device)
        dst = torch.empty_like(src)
        return device_time(lambda: dst.copy_(src), repeat)

    def triton_variant(tuned: bool, fn: Callable[[], object]) -> Callable[[], object]:
        def call() -> object:
            saved = _triton.AUTOTUNE
            _triton.AUTOTUNE = tuned
            try:
                return fn()
            finally:
                _triton.AUTOTUNE = saved

        return call

    def add_rows(op, shape, traffic, variants, eager) -> None:
        copy_s = copy_time(traffic)
        eager_s = device_time(eager, repeat)
        for backend, fn in variants:
            seconds = device_time(fn, repeat)
            call_s = timed(fn, device, max(5, repeat // 4))
            rows.append(
                {
                    "op": op,
                    "backend": backend,
                    "device": "cuda",
                    "shape": list(shape),
                    "dtype": str(DTYPE).replace("torch.", ""),
                    "ms": seconds * 1e3,
                    "call_ms": call_s * 1e3,
                    "gbps": traffic / seconds / 1e9,
                    "copy_gbps": traffic / copy_s / 1e9,
                    "fraction_of_copy": copy_s / seconds,
                    "eager_ms": eager_s * 1e3,
                    "speedup_vs_eager": eager_s / seconds,
                }
            )
            LOG.info("%s/%s %s: %.3f ms", op, backend, shape, seconds * 1e3)

    for shape in CUDA_SUM_SHAPES:
        x = torch.randn(shape, device=device, generator=gen).to(DTYPE)
        traffic = x.numel() * x.element_size() + 4 * shape[-1]
        variants = [
            (
                "triton tuned",
                triton_variant(True, lambda x=x: channel_abs_sum(x, "triton")),
            ),
            (
                "triton default",
                triton_variant(False, lambda x=x: channel_abs_sum(x, "triton")),
            ),
            ("torch", lambda x=x: channel_abs_sum(x, "torch")),
            ("auto", lambda x=x: channel_abs_sum(x, "auto")),
        ]
        add_rows(
            "channel_abs_sum",
            shape,
            traffic,
            variants,
            lambda x=x: eager_channel_abs_sum(x),
        )
        del x
    for shape, axis in CUDA_RELAX_SHAPES:
        base = torch.randn(shape, device=device, generator=gen).to(DTYPE)
        merged = torch.randn(shape, device=device, generator=gen).to(DTYPE)
        stat = torch.rand(shape[axis], device=device, generator=gen)
        traffic = 3 * base.numel() * base.element_size() + 4 * stat.numel()
        scratch = merged.clone()

        def relax(backend, b=base, m=merged, st=stat, ax=axis):
            return lambda: aim_relax(b, m, st, OMEGA, ax, backend)

        def relax_inplace(backend, b=base, m=scratch, st=stat, ax=axis):
            return lambda: aim_relax_(m, b, st, OMEGA, ax, backend)

        def eager(b=base, m=merged, st=stat, ax=axis):
            return eager_relax(b, m, st, OMEGA, ax)

        label = f"aim_relax (axis {axis})" if axis != -1 else "aim_relax"
        add_rows(
            label,
            shape,
            traffic,
            [("triton", relax("triton")), ("torch", relax("torch"))],
            eager,
        )
        add_rows(
            label.replace("aim_relax", "aim_relax_ (in place)"),
            shape,
            traffic,
            [("triton", relax_inplace("triton")), ("torch", relax_inplace("torch"))],
            eager,
        )
        del base, merged, scratch
    return rows


def markdown(
    info: dict[str, object], rows: list[dict[str, object]], quick: bool
) -> str:
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores "
        f"({info['torch_threads']} torch threads), torch {info['torch']}, "
        f"GPU: {info['gpu'] or 'none'}; {'--quick' if quick else 'full'} sizes.",
        "",
        "| op | backend | device | shape (bf16) | ms | call ms | GB/s "
        "| copy GB/s | of copy | vs eager |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        shape = "×".join(str(n) for n in r["shape"])
        call = f"{r['call_ms']:.3f}" if "call_ms" in r else "–"
        lines.append(
            f"| {r['op']} | {r['backend']} | {r['device']} | {shape} "
            f"| {r['ms']:.3f} | {call} | {r['gbps']:.1f} | {r['copy_gbps']:.1f} "
            f"| {r['fraction_of_copy']:.0%} | {r['speedup_vs_eager']:.1f}× |"
        )
    fresh = {r["device"]: r["fresh_copy_gbps"] for r in rows if "fresh_copy_gbps" in r}
    lines.append("")
    if fresh:
        lines.append(
            "Copy into a new tensor (`torch.empty_like(M).copy_(M)`, the ceiling "
            "for an op that returns a new tensor): "
            + ", ".join(f"{gbps:.1f} GB/s on {dev}" for dev, gbps in fresh.items())
            + "."
        )
    if any(r["device"] == "cuda" for r in rows):
        lines.append(
            "CUDA: *ms* is device time (CUDA events around one call, L2 flushed "
            "before it, median); *call ms* is one call's wall time with a "
            "synchronisation after it (host overhead included); *of copy* "
            "compares device times with `copy_` moving the same bytes."
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 1 min")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="directory for kernels.json and kernels.md",
    )
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per op")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="only this device (default: the CPU, then CUDA where available)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    sizes = QUICK if args.quick else FULL
    repeat = args.repeat or (3 if args.quick else 5)
    info = machine()
    rows = []
    if args.device in (None, "cpu"):
        rows += run_device(torch.device("cpu"), sizes, repeat)
    if args.device == "cuda" or (args.device is None and torch.cuda.is_available()):
        rows += run_cuda(max(repeat, 50))
    table = markdown(info, rows, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "kernels" + (f"-{args.device}" if args.device == "cuda" else "")
    name += "-quick" if args.quick else ""
    payload = {"machine": info, "quick": args.quick, "results": rows}
    if any(r["device"] == "cuda" for r in rows):
        from mergekit_aim.kernels import _triton

        payload["triton_autotuned"] = _triton.tuned_configs()
    (args.out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (args.out / f"{name}.md").write_text(table)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
