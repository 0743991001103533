"""Helpers shared by the benchmark scripts: machine description, timing, output.

Timings on a shared machine are noisy, so variants are measured round-robin
(every round runs each variant once, in an order rotated from round to round)
and each measurement records both wall time and this process's CPU time
(``time.process_time``: user + system time of all its threads). With one torch
thread, CPU time is insensitive to other jobs taking the cores, which wall time
is not; the scripts report medians of both.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    from benchmarks.kernels import machine
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from kernels import machine

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, object]:
    """``benchmarks.kernels.machine()`` plus RAM and the load when measuring."""
    info = machine()
    try:
        with open("/proc/meminfo") as handle:
            kib = int(handle.readline().split()[1])
        info["ram_gib"] = round(kib / 2**20, 1)
    except (OSError, ValueError, IndexError):
        info["ram_gib"] = None
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["load_average_at_start"] = None
    return info


def record_end_load(info: dict[str, object]) -> dict[str, object]:
    """Add the load average when measuring ended (the other job's share shows
    in both ends: a run that started idle may have ended loaded)."""
    try:
        info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["load_average_at_end"] = None
    return info


def machine_line(info: Mapping[str, object]) -> str:
    load = info.get("load_average_at_start")
    load_text = f", load average {load[0]:.1f} at start" if load else ""
    end = info.get("load_average_at_end")
    if load and end:
        load_text += f", {end[0]:.1f} at end"
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores "
        f"({info['torch_threads']} torch threads), {info['ram_gib']} GiB RAM, "
        f"torch {info['torch']}, GPU: {info['gpu'] or 'none'}{load_text}"
    )


def device_slug(name: str) -> str:
    """A file-name-safe form of a device name ("NVIDIA H100 80GB HBM3" ->
    "nvidia-h100-80gb-hbm3")."""
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())
    return "-".join(part for part in slug.split("-") if part) or "device"


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def measure(fn: Callable[[], object], sync: Callable[[], None] | None = None):
    """``(wall_s, cpu_s)`` of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def round_robin(
    cases: Mapping[str, Callable[[], object]],
    repeat: int,
    *,
    log: Callable[[str], None] | None = None,
    sync: Callable[[], None] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Run every case once per round, ``repeat`` rounds, rotating the order.

    Returns ``{case: {"wall": [...], "cpu": [...]}}`` in round order, so that
    ratios can also be taken round by round (neighbours in time share the
    machine's load).
    """
    names = list(cases)
    times = {name: {"wall": [], "cpu": []} for name in names}
    for round_ in range(repeat):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = measure(cases[name], sync)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
            if log is not None:
                log(f"round {round_} {name}: wall {wall:.2f} s, cpu {cpu:.2f} s")
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of the per-round ratio."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def write_results(
    out: Path, name: str, payload: Mapping[str, object], table: str
) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md_path.write_text(table)
    return json_path, md_path


# --- checkpoints on disk -------------------------------------------------------------


def checkpoint_parameters(directory: Path) -> int:
    """Parameters stored in ``directory``'s safetensors files (a tied head is
    stored once, so counted once)."""
    from safetensors import safe_open

    count = 0
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            for key in handle.keys():
                count += torch.Size(handle.get_slice(key).get_shape()).numel()
    return count


def checkpoint_shape(directory: Path) -> dict[str, object]:
    """Architecture and sizes from ``directory/config.json``."""
    config = json.loads((directory / "config.json").read_text())
    return {
        "architecture": (config.get("architectures") or ["?"])[0],
        "layers": config.get("num_hidden_layers"),
        "hidden": config.get("hidden_size"),
        "intermediate": config.get("intermediate_size"),
        "vocab": config.get("vocab_size"),
    }


# --- synthetic Llama checkpoints ----------------------------------------------------


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


def llama_config(shape: LlamaShape, **overrides: object):
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        torch_dtype="bfloat16",
    )
    return LlamaConfig(**{**settings, **overrides})


def tensor_shapes(shape: LlamaShape) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes of a Llama of ``shape``."""
    h, i = shape.hidden, shape.intermediate
    kv = shape.kv_heads * (h // shape.heads)
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (shape.vocab, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (shape.vocab, h),
    }
    for n in range(shape.layers):
        p = f"model.layers.{n}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        )
    return shapes


def random_llama_state(
    shape: LlamaShape, gen: torch.Generator, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Random weights (std 0.02, norms at 1): far faster than instantiating the
    model, and activations stay finite through any depth used here."""
    state = {}
    for name, dims in tensor_shapes(shape).items():
        if len(dims) == 1:
            state[name] = torch.ones(dims, dtype=dtype)
        else:
            state[name] = (torch.randn(dims, generator=gen) * 0.02).to(dtype)
    return state
