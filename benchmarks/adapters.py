"""What relaxing a LoRA adapter costs next to reading and writing it.

Usage: ``python -m benchmarks.adapters [--quick] [--out DIR] [--repeat N]
[--rank R] [--threads N]`` (as a module: run as a script, ``benchmarks/``
would come first on ``sys.path`` and its ``kernels.py`` shadow the ``kernels``
package that transformers imports).

Writes, once, into a temporary directory: a Llama-7B-shaped base checkpoint
(``config.json`` and a ``model.safetensors`` whose header is real and whose
data is a sparse hole: relaxing an adapter reads the base's header and a few
fingerprint samples, never its weights), an importance artifact with random
positive statistics for every linear weight and norm, and a synthetic PEFT
adapter: rank ``--rank`` (16) LoRAs on q/k/v/o/gate/up/down of every layer,
bf16, as ``save_pretrained`` writes it (~80 MB). Then measures, round-robin
over ``--repeat`` rounds:

* ``read+write``: ``safetensors.torch.load_file`` of the adapter and
  ``save_file`` of the same tensors into a fresh directory (with its config);
* ``relax-adapter``: :func:`mergekit_aim.adapters.relax_adapter` end to end
  into a fresh directory (artifact loaded and base indexed once beforehand,
  as the CLI does once per run).

Reports both medians and their ratio (median of per-round ratios). The issue's
bar is a ratio of at most 2. Results go to ``DIR/adapters.json`` and ``.md``
(``adapters-quick`` with ``--quick``: a small shape, a few seconds).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import torch

try:
    from benchmarks import common
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import common

LOG = logging.getLogger("benchmarks.adapters")
OMEGA = 0.4
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FULL = common.LlamaShape(4096, 11008, 32, 32, 32, 32000)
QUICK = common.LlamaShape(256, 688, 2, 4, 4, 1000)


def write_sparse_base(shape: common.LlamaShape, directory: Path) -> Path:
    """A bf16 checkpoint of ``shape`` whose tensors are all zeros on disk
    (a sparse file: its size costs no disk space)."""
    directory.mkdir(parents=True, exist_ok=True)
    header, offset = {}, 0
    for name, dims in sorted(common.tensor_shapes(shape).items()):
        size = 2 * torch.Size(dims).numel()
        header[name] = {"dtype": "BF16", "shape": list(dims)}
        header[name]["data_offsets"] = [offset, offset + size]
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = directory / "model.safetensors"
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)
    common.llama_config(shape).save_pretrained(directory)
    return directory


def write_artifact(shape: common.LlamaShape, path: Path, gen: torch.Generator) -> Path:
    from mergekit_aim.importance import ImportanceMap

    sums, counts, axes = {}, {}, {}
    for name, dims in common.tensor_shapes(shape).items():
        if "embed" in name:
            continue
        sums[name] = torch.rand(dims[-1], generator=gen) * 4 + 0.01
        counts[name], axes[name] = 1000, -1 if len(dims) == 2 else 0
    return ImportanceMap(sums, counts, axes, {"base_model": "synthetic"}).save(path)


def write_adapter(
    shape: common.LlamaShape, rank: int, directory: Path, gen: torch.Generator
) -> Path:
    """A PEFT LoRA adapter directory on every linear module of every layer."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, dims in common.tensor_shapes(shape).items():
        module = name.removesuffix(".weight")
        if not module.endswith(MODULES):
            continue
        out_features, in_features = dims
        prefix = f"base_model.model.{module}"
        a = torch.randn(rank, in_features, generator=gen) * 0.01
        b = torch.randn(out_features, rank, generator=gen) * 0.01
        tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16)
        tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16)
    save_file(tensors, str(directory / "adapter_model.safetensors"), {"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(MODULES),
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "use_rslora": False,
        "base_model_name_or_path": None,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


def run(shape: common.LlamaShape, rank: int, repeat: int, work: Path) -> dict:
    from safetensors.torch import load_file, save_file

    from mergekit_aim.adapters import relax_adapter
    from mergekit_aim.importance import ImportanceMap

    gen = torch.Generator().manual_seed(0)
    base = write_sparse_base(shape, work / "base")
    imap = ImportanceMap.load(write_artifact(shape, work / "imp.safetensors", gen))
    adapter = write_adapter(shape, rank, work / "adapter", gen)
    weights = adapter / "adapter_model.safetensors"
    counter = iter(range(10**6))

    def fresh() -> Path:
        path = work / f"out-{next(counter)}"
        return path

    def read_write() -> None:
        out = fresh()
        out.mkdir()
        save_file(load_file(str(weights)), str(out / weights.name), {"format": "pt"})
        shutil.copy2(adapter / "adapter_config.json", out / "adapter_config.json")
        shutil.rmtree(out)

    def relax() -> None:
        out = fresh()
        relax_adapter(base, adapter, imap, OMEGA, out)
        shutil.rmtree(out)

    relax()  # warm-up: imports PEFT once and indexes the base (cached per process)
    times = common.round_robin(
        {"read+write": read_write, "relax-adapter": relax}, repeat, log=LOG.info
    )
    size = weights.stat().st_size
    return {
        "shape": shape.__dict__,
        "rank": rank,
        "adapter_bytes": size,
        "adapter_tensors": len(load_file(str(weights))),
        "omega": OMEGA,
        "repeat": repeat,
        "times": times,
        "median_wall_s": {k: common.median(v["wall"]) for k, v in times.items()},
        "ratio_wall": common.paired_ratio(
            times["relax-adapter"]["wall"], times["read+write"]["wall"]
        ),
        "ratio_cpu": common.paired_ratio(
            times["relax-adapter"]["cpu"], times["read+write"]["cpu"]
        ),
    }


def markdown(info: dict, result: dict, quick: bool) -> str:
    shape = result["shape"]
    label = "quick shape" if quick else "Llama-7B shape"
    walls = result["median_wall_s"]
    return "\n".join(
        [
            "# Relaxing a LoRA adapter vs reading and writing it",
            "",
            common.machine_line(info),
            "",
            f"Adapter: rank {result['rank']} LoRAs on q/k/v/o/gate/up/down of "
            f"{shape['layers']} layers ({label}: hidden {shape['hidden']}, "
            f"intermediate {shape['intermediate']}), bf16, "
            f"{result['adapter_bytes'] / 2**20:.1f} MiB, "
            f"{result['adapter_tensors']} tensors; ω {result['omega']}, "
            f"{result['repeat']} rounds.",
            "",
            "| step | median wall (s) |",
            "|---|---:|",
            f"| read + write (safetensors) | {walls['read+write']:.3f} |",
            f"| relax-adapter | {walls['relax-adapter']:.3f} |",
            "",
            f"Ratio relax / (read + write): **{result['ratio_wall']:.2f}×** wall, "
            f"{result['ratio_cpu']:.2f}× CPU (median of per-round ratios; the bar "
            "is ≤ 2×).",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("mergekit_aim").setLevel(logging.WARNING)
    common.set_threads(args.threads)
    info = common.machine_info()
    repeat = args.repeat or (2 if args.quick else 5)
    with tempfile.TemporaryDirectory(prefix="aim-adapters-") as work:
        result = run(QUICK if args.quick else FULL, args.rank, repeat, Path(work))
    info = common.record_end_load(info)
    name = "adapters-quick" if args.quick else "adapters"
    table = markdown(info, result, args.quick)
    paths = common.write_results(args.out, name, {"machine": info, **result}, table)
    print(table)
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
