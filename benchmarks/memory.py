"""Peak memory of ``mergekit-aim calibrate`` with and without ``--max-memory``.

Usage: ``python benchmarks/memory.py [--quick] [--out DIR] [--cap SIZE]
[--workdir DIR] [--model NAME]``.

Writes a synthetic Llama (random bf16 weights, a locally trained tokenizer, a
small JSON-lines calibration set) whose float32 weights — what
calibration on CPU computes with — are several times the cap, then runs
``python -m mergekit_aim calibrate`` on it in a subprocess three ways:
uncapped, ``--max-memory CAP --offload-dir DIR``, and uncapped again (so a
warm page cache favours neither). Each child's peak resident set size is its
``VmHWM`` polled from /proc (see ``_Poller``), next to the peak of the same
command on a tiny model (the interpreter, libraries, data
and tokenizer: what any run costs besides the weights). The capped
artifact must equal the uncapped one. Results go to ``DIR/memory.json`` and
``.md`` (``-quick`` suffix with ``--quick``).

``--model smollm2-135m|gemma3-270m`` calibrates a real pretrained checkpoint
(``benchmarks.real_models.ensure``) instead, with its own tokenizer; the
baseline is then a one-layer, 64-wide model of the same architecture and
vocabulary with the same tokenizer. Results go to ``DIR/memory-<model>.*``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch

try:
    from benchmarks import common, real_models, synthetic
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import common
    import real_models
    import synthetic

LOG = logging.getLogger("benchmarks.memory")

FULL = common.LlamaShape(2048, 5632, 10, 16, 16, 2048)
QUICK = common.LlamaShape(1024, 2816, 8, 8, 8, 2048)
FULL_CAP, QUICK_CAP = "400MiB", "150MiB"
SAMPLES, SEQ_LEN, BATCH = 24, 128, 4
# The baseline: the same command on a model too small to matter (what any run
# costs besides the weights: interpreter, libraries, data, tokenizer).
TINY = common.LlamaShape(64, 128, 1, 4, 4, 2048)
# Caps for the real checkpoints: well under their float32 weights (SmolLM2:
# 513 MiB, of which the tied embedding 108; Gemma-3: 1022 MiB, of which the tied
# embedding 640, so the cap puts the embedding itself on disk).
# Gemma-3 also at a cap above its embedding: below it, accelerate's device map
# offloads the whole model as one module (see the README).
REAL_CAPS = {"smollm2-135m": "150MiB", "gemma3-270m": "400MiB,700MiB"}


def write_model(shape: common.LlamaShape, directory: Path) -> tuple[Path, int]:
    """Checkpoint, config and tokenizer of a random Llama; returns (dir, params)."""
    from safetensors.torch import save_file

    from mergekit_aim.demo.models import train_tokenizer, vocabulary_settings

    tokenizer = train_tokenizer(
        synthetic.generate_sentences(2000, seed=0), vocab_size=shape.vocab
    )
    config = common.llama_config(shape, **vocabulary_settings(len(tokenizer)))
    shape = common.LlamaShape(**{**asdict(shape), "vocab": len(tokenizer)})
    state = common.random_llama_state(shape, torch.Generator().manual_seed(0))
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return directory, sum(t.numel() for t in state.values())


def write_tiny_like(real: Path, directory: Path) -> Path:
    """A one-layer, 64-wide random model of ``real``'s architecture and
    vocabulary, with ``real``'s tokenizer: the real model's baseline."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(real)
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    config.hidden_size, config.intermediate_size = 64, 128
    config.num_attention_heads = config.num_key_value_heads = 1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(real).save_pretrained(directory)
    return directory


def write_text(path: Path) -> Path:
    """A JSON-lines calibration set: rows of a few sentences (~60 tokens)."""
    import json

    sentences = synthetic.generate_sentences(3000, seed=1)
    rows = [" ".join(sentences[i : i + 6]) for i in range(0, len(sentences), 6)]
    path.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    return path


class _Poller(threading.Thread):
    """Peak RSS of a process from /proc, sampled every 10 ms.

    ``VmHWM`` is the kernel's high-water mark of this process's own address
    space (exact, whenever it is read). ``ru_maxrss`` from ``wait4`` is not
    usable here: Linux carries the spawning process's high-water mark into the
    child at ``exec``, so it reports at least the parent's RSS. The largest
    anonymous and file-backed parts are sampled: file-backed pages (libraries,
    mapped checkpoints, offload files) are page cache the kernel can drop,
    anonymous ones are not.
    """

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.path = f"/proc/{pid}/status"
        self.peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                with open(self.path) as handle:
                    for line in handle:
                        key = line.split(":", 1)[0]
                        if key in self.peak:
                            kib = int(line.split()[1])
                            self.peak[key] = max(self.peak[key], kib * 1024)
            except (OSError, ValueError):
                return
            time.sleep(0.01)


def run_child(args: list[str]) -> dict[str, object]:
    """Run a child process; its wall time and peak RSS (bytes)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    poller = _Poller(proc.pid)
    poller.start()
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    poller.running = False
    poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{output[-4000:]}")
    return {
        "wall_s": wall,
        "peak_rss_bytes": poller.peak["VmHWM"],
        # Includes the parent's RSS at spawn (see _Poller); recorded, not used.
        "ru_maxrss_bytes": usage.ru_maxrss * 1024,
        "peak_anon_bytes": poller.peak["RssAnon"],
        "peak_file_bytes": poller.peak["RssFile"],
    }


def calibrate_args(
    model: Path, text: Path, out: Path, cap: str | None, offload: Path | None
) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "mergekit_aim",
        "calibrate",
        str(model),
        "-o",
        str(out),
        "--dataset",
        str(text),
        "--num-samples",
        str(SAMPLES),
        "--seq-len",
        str(SEQ_LEN),
        "--batch-size",
        str(BATCH),
        "--quiet",
    ]
    if cap is not None:
        args += ["--max-memory", cap]
    if offload is not None:
        args += ["--offload-dir", str(offload)]
    return args


def compare(first: Path, second: Path) -> dict[str, object]:
    from mergekit_aim.importance import ImportanceMap

    a, b = ImportanceMap.load(first), ImportanceMap.load(second)
    if set(a) != set(b):
        return {"same_tensors": False, "equal": False, "max_rel_diff": None}
    worst, equal = 0.0, True
    for name in a:
        equal = (
            equal and torch.equal(a[name], b[name]) and a.count(name) == b.count(name)
        )
        scale = float(a[name].abs().max()) or 1.0
        worst = max(worst, float((a[name] - b[name]).abs().max()) / scale)
    return {
        "same_tensors": True,
        "blocks": a.provenance.get("calibration", {}).get("num_blocks"),
        "tensors": len(a),
        "equal": equal,
        "max_rel_diff": worst,
    }


def parse_size(text: str) -> int:
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 1e3, "MB": 1e6}
    units["GB"] = 1e9
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def markdown(info, setting, rows, agreement, quick: bool) -> str:
    mib = 2**20
    s = setting["shape"]
    if "model" in setting:
        model = (
            f"Model: {setting['model']} (pretrained, {s['architecture']}, "
            f"{s['layers']} layers, hidden {s['hidden']}, vocab {s['vocab']}), "
        )
        baseline = (
            f"a one-layer, 64-wide random {s['architecture']} with the same "
            f"vocabulary and tokenizer (its embedding is "
            f"{64 * 4 * s['vocab'] / mib:.0f} MiB in float32)"
        )
    else:
        model = (
            f"Model: synthetic Llama (hidden {s['hidden']}, {s['layers']} layers, "
            f"intermediate {s['intermediate']}, vocab {s['vocab']}), "
        )
        baseline = f"a {TINY.hidden}-wide one-layer model"
    lines = [
        f"{common.machine_line(info)}; {'--quick' if quick else 'full'} settings.",
        "",
        f"{model}{setting['params'] / 1e6:.0f}M parameters: "
        f"{setting['checkpoint_bytes'] / mib:.0f} MiB bf16 on disk, "
        f"{setting['fp32_bytes'] / mib:.0f} MiB as the float32 weights calibration "
        f"runs with on CPU. Calibration: {SAMPLES} texts packed into "
        f"{setting['blocks']} blocks × {SEQ_LEN} tokens, batch {BATCH}. Peak RSS "
        f"of each `mergekit-aim calibrate` child: its VmHWM (anonymous and "
        f"file-backed parts sampled from /proc every 10 ms); the baseline is the "
        f"same command on {baseline} (libraries, data, tokenizer: everything but "
        "the weights).",
        "",
        "| run | peak RSS (MiB) | above baseline | vs fp32 weights "
        "| peak anonymous RSS (MiB) | above baseline | vs fp32 weights "
        "| peak file-backed RSS (MiB) | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = setting["baseline_rss_bytes"]
    base_anon = setting["baseline_anon_bytes"]
    weights = setting["fp32_bytes"]
    lines.append(
        f"| baseline (tiny model) | {base / mib:.0f} | | "
        f"| {base_anon / mib:.0f} | | | | |"
    )
    for r in rows:
        rss, anon = r["peak_rss_bytes"], r["peak_anon_bytes"]
        lines.append(
            f"| {r['run']} | {rss / mib:.0f} | {(rss - base) / mib:.0f} "
            f"| {(rss - base) / weights:.0%} | {anon / mib:.0f} "
            f"| {(anon - base_anon) / mib:.0f} | {(anon - base_anon) / weights:.0%} "
            f"| {r['peak_file_bytes'] / mib:.0f} | {r['wall_s']:.1f} |"
        )
    lines.append("")
    for r in rows:
        # Older single-cap results carry only the top-level agreement.
        same = r.get("agreement") or (agreement if r is rows[1] else None)
        if same is None:
            continue
        verdict = "equal" if same["equal"] else "not bit-equal"
        lines.append(
            f"`{r['run']}` vs uncapped artifact: {same.get('tensors')} tensors, "
            f"{verdict}, max relative difference {same['max_rel_diff']:.1e}."
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, ~1 min")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument(
        "--cap",
        default=None,
        help="--max-memory value; several, comma-separated, give a capped run each",
    )
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--model",
        choices=sorted(real_models.MODELS),
        default=None,
        help="a real pretrained checkpoint instead of the synthetic Llama",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model is not None and args.quick:
        parser.error("--quick sizes the synthetic model; it does not go with --model")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.model is not None:
        real = real_models.ensure(args.model)
        cap = args.cap or REAL_CAPS[args.model]
    else:
        shape = QUICK if args.quick else FULL
        cap = args.cap or (QUICK_CAP if args.quick else FULL_CAP)
    info = common.machine_info()
    with tempfile.TemporaryDirectory(prefix="aim-memory-bench-", dir=args.workdir) as t:
        tmp = Path(t)
        if args.model is not None:
            model, params = real, common.checkpoint_parameters(real)
            tiny = write_tiny_like(real, tmp / "tiny")
            shape = common.checkpoint_shape(real)
        else:
            model, params = write_model(shape, tmp / "model")
            tiny, _ = write_model(TINY, tmp / "tiny")
            shape = asdict(shape)
        text = write_text(tmp / "calibration.jsonl")
        LOG.info("model: %d parameters in %s", params, model)
        baseline = run_child(
            calibrate_args(tiny, text, tmp / "tiny.safetensors", None, None)
        )
        caps = [c.strip() for c in cap.split(",")]
        runs = [
            ("uncapped", None, None),
            *[
                (f"--max-memory {c} --offload-dir", c, tmp / f"offload-{i}")
                for i, c in enumerate(caps)
            ],
            ("uncapped (again)", None, None),
        ]
        rows = []
        for index, (name, max_memory, offload) in enumerate(runs):
            out = tmp / f"importance-{index}.safetensors"
            result = run_child(calibrate_args(model, text, out, max_memory, offload))
            rows.append({"run": name, "artifact": out.name, **result})
            LOG.info(
                "%s: peak RSS %.0f MiB, %.1f s",
                name,
                result["peak_rss_bytes"] / 2**20,
                result["wall_s"],
            )
        for row in rows[1:-1]:
            row["agreement"] = compare(
                tmp / "importance-0.safetensors", tmp / row["artifact"]
            )
        agreement = rows[1]["agreement"]
        checkpoint_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    common.record_end_load(info)
    setting = {
        "shape": shape,
        "params": params,
        "checkpoint_bytes": checkpoint_bytes,
        "fp32_bytes": 4 * params,
        "cap": cap,
        "cap_bytes": parse_size(cap) if len(caps) == 1 else list(map(parse_size, caps)),
        "baseline_rss_bytes": baseline["peak_rss_bytes"],
        "baseline_anon_bytes": baseline["peak_anon_bytes"],
        "samples": SAMPLES,
        "blocks": agreement.get("blocks"),
        "seq_len": SEQ_LEN,
        "batch": BATCH,
    }
    if args.model is not None:
        setting["model"] = args.model
        name = f"memory-{args.model}"
    else:
        name = "memory-quick" if args.quick else "memory"
    table = markdown(info, setting, rows, agreement, args.quick)
    payload = {"machine": info, "quick": args.quick, "setting": setting}
    payload.update(results=rows, agreement=agreement)
    common.write_results(args.out, name, payload, table)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
