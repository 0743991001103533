"""What AIM adds to a merge: wall time of the same config with and without ``aim:``.

Usage: ``python benchmarks/merge_overhead.py [--quick] [--out DIR] [--repeat N]
[--threads N] [--methods M,...] [--workdir DIR]``.

Builds a synthetic Llama-shaped base model and two fine-tunes (random bf16
weights, fine-tunes = base + small random deltas; ~0.66B parameters each, or
~0.1B with ``--quick``) as safetensors in a temporary directory, measures an
importance artifact for the base the real way (``collect_importance`` over a
few random token blocks), then runs each merge method's config through
mergekit's own pipeline (``mergekit.merge.run_merge`` with the plugin active),
once plain and once with ``aim: {omega: 0.4, importance: FILE}``, alternating,
``--repeat`` rounds. Before every AIM run the plugin's per-process caches (the
loaded artifact, the base checkpoint's index) are cleared, so each AIM merge
pays for reading and checking the artifact as a fresh ``mergekit-yaml`` would.
With CUDA, the same pairs run again with ``MergeOptions(cuda=True)``.

Reports the median wall time of each, and the AIM/plain ratio (median of the
per-round ratios, each AIM run next to its plain run in time). Results go to
``DIR/merge_overhead.json`` and ``.md`` (``-quick`` suffix with ``--quick``).
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

try:
    from benchmarks import common
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import common

LOG = logging.getLogger("benchmarks.merge_overhead")
OMEGA = 0.4


FULL = common.LlamaShape(2048, 5632, 12, 32, 4, 32000)
QUICK = common.LlamaShape(1024, 2816, 4, 16, 4, 32000)
METHODS = ("task_arithmetic",)


def write_models(shape: common.LlamaShape, root: Path) -> tuple[Path, list[Path], int]:
    """Base and two fine-tunes as bf16 safetensors; returns paths and #params."""
    from safetensors.torch import save_file

    config = common.llama_config(shape)
    gen = torch.Generator().manual_seed(0)
    base_dir, tuned = root / "base", [root / "ft1", root / "ft2"]
    base = common.random_llama_state(shape, gen)
    for directory, state in [(base_dir, base)] + [
        (path, {n: _finetune(t, gen) for n, t in base.items()}) for path in tuned
    ]:
        directory.mkdir(parents=True)
        config.save_pretrained(directory)
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        LOG.info("wrote %s", directory)
        del state
    params = sum(t.numel() for t in base.values())
    return base_dir, tuned, params


def _finetune(base: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    delta = torch.randn(base.shape, generator=gen) * 0.002
    return (base.float() + delta).to(torch.bfloat16)


def make_artifact(base_dir: Path, out: Path, tokens: tuple[int, int]) -> int:
    """Calibrate the base on random tokens (the real collector, fp32 CPU)."""
    from transformers import AutoModelForCausalLM

    from mergekit_aim import collect_importance
    from mergekit_aim.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, model.config.vocab_size, tokens, generator=gen)
    importance = collect_importance(
        model, blocks, batch_size=tokens[0], checkpoint_names=set(checkpoint.tensors)
    )
    importance.provenance.update(
        base_model=str(base_dir), base_fingerprint=checkpoint.fingerprint
    )
    importance.save(out)
    del model
    gc.collect()
    return len(importance)


def merge_config(method: str, base: Path, tuned: list[Path]) -> dict:
    parameters = {"weight": 0.5}
    if method in ("ties", "dare_ties", "breadcrumbs_ties"):
        parameters["density"] = 0.5
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": parameters} for p in tuned],
        "dtype": "bfloat16",
    }


def run_one(config: dict, out: Path, cuda: bool) -> None:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    if "aim" in config:
        _clear_aim_caches()
    try:
        run_merge(
            MergeConfiguration.model_validate(config),
            str(out),
            MergeOptions(
                cuda=cuda,
                quiet=True,
                copy_tokenizer=False,
                write_model_card=True,
                random_seed=0,
            ),
            config_source=yaml.safe_dump(config),
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)


class LoadCounter:
    """Counts ``ImportanceMap.load`` calls while active: the artifact must be
    read once per merge, not once per tensor."""

    def __init__(self) -> None:
        self.calls = 0

    def __enter__(self) -> LoadCounter:
        from mergekit_aim.importance import ImportanceMap

        self._original = ImportanceMap.__dict__["load"]
        original = self._original.__func__

        def counting(cls, path):
            self.calls += 1
            return original(cls, path)

        ImportanceMap.load = classmethod(counting)
        return self

    def __exit__(self, *exc: object) -> None:
        from mergekit_aim.importance import ImportanceMap

        ImportanceMap.load = self._original


class AimTimer:
    """Time spent in AIM's own code during merges, by part.

    Wraps the per-merge planning session (artifact, checks, routing, coverage
    report) and the per-tensor relaxation, and adds up their wall time (the
    figure reported) and the CPU time of the calling thread (``time.thread_time``,
    kept in the JSON; it misses the relaxation's helper threads). Robust to
    machine noise in a way the end-to-end difference of two merges is not: it
    is the sum of the parts AIM adds, timed where they run. On CUDA the
    relaxation is timed after a synchronisation.
    """

    PARTS = ("planning", "relax")

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.cpu = dict.fromkeys(self.PARTS, 0.0)
        self.wall = dict.fromkeys(self.PARTS, 0.0)
        self._patches: list[tuple[object, str, object]] = []

    def _wrap(self, owner: object, name: str, part: str, *, static: bool) -> None:
        original = owner.__dict__[name]
        function = original.__func__ if static else original
        sync = torch.cuda.synchronize if self.cuda and part == "relax" else None

        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                result = function(*args, **kwargs)
                if sync is not None:
                    sync()
                return result
            finally:
                self.cpu[part] += time.thread_time() - cpu
                self.wall[part] += time.perf_counter() - wall

        setattr(owner, name, classmethod(timed) if static else timed)
        self._patches.append((owner, name, original))

    def __enter__(self) -> AimTimer:
        from mergekit_aim.method import AimMergeMethod
        from mergekit_aim.planning import AimMergeSession

        self._wrap(AimMergeSession, "prepare", "planning", static=True)
        self._wrap(AimMergeSession, "route", "planning", static=False)
        self._wrap(AimMergeSession, "finish", "planning", static=False)
        self._wrap(AimMergeMethod, "_relax_group", "relax", static=False)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)


def _clear_aim_caches() -> None:
    # Private caches, cleared so that every AIM merge reads and checks the
    # artifact and indexes the base checkpoint, as a new process would.
    from mergekit_aim import checkpoint, importance

    with importance._LOADED_LOCK:
        importance._LOADED.clear()
    checkpoint._read_index.cache_clear()


def measure_method(
    method: str,
    base: Path,
    tuned: list[Path],
    artifact: Path,
    work: Path,
    repeat: int,
    cuda: bool,
) -> dict[str, object]:
    plain = merge_config(method, base, tuned)
    aim = {**plain, "aim": {"omega": OMEGA, "importance": str(artifact)}}
    sync = torch.cuda.synchronize if cuda else None
    device = "cuda" if cuda else "cpu"
    timer = AimTimer(cuda)
    cases = {
        "plain": lambda: run_one(plain, work / "out-plain", cuda),
        "aim": lambda: run_one(aim, work / "out-aim", cuda),
    }
    for name, fn in cases.items():  # warm-up: page cache, imports, registry
        fn()
        LOG.info("warmed up %s %s on %s", method, name, device)
    with LoadCounter() as counter, timer:
        times = common.round_robin(
            cases,
            repeat,
            log=lambda m: LOG.info("%s/%s: %s", method, device, m),
            sync=sync,
        )
    plain_wall, aim_wall = times["plain"]["wall"], times["aim"]["wall"]
    # Per AIM merge; against the rest of the same merges on the same clock.
    own_cpu = {part: seconds / repeat for part, seconds in timer.cpu.items()}
    own_wall = {part: seconds / repeat for part, seconds in timer.wall.items()}
    aim_wall_median = common.median(aim_wall)
    # With one torch thread everything AIM does on CPU runs on the merging
    # thread, whose CPU clock ignores what else holds the cores: the robust
    # figure. With more, the relaxation splits large tensors across threads and
    # only wall time covers it all (on CUDA, too: the GPU's time is wall time).
    if not cuda and torch.get_num_threads() == 1:
        clock, own, total = "cpu", own_cpu, common.median(times["aim"]["cpu"])
    else:
        clock, own, total = "wall", own_wall, aim_wall_median
    return {
        "method": method,
        "device": device,
        "plain_s": common.median(plain_wall),
        "aim_s": common.median(aim_wall),
        "ratio": common.paired_ratio(aim_wall, plain_wall),
        "ratio_of_medians": common.median(aim_wall) / common.median(plain_wall),
        "ratio_cpu_time": common.median(times["aim"]["cpu"])
        / common.median(times["plain"]["cpu"]),
        "artifact_loads_per_aim_merge": counter.calls / repeat,
        "aim_own_cpu_s": own_cpu,
        "aim_own_wall_s": own_wall,
        "aim_own_clock": clock,
        "aim_own_s": own,
        # AIM's own time over the rest of the AIM merge (its inner merge, I/O).
        "aim_own_fraction": sum(own.values()) / (total - sum(own.values())),
        "plain_runs": plain_wall,
        "aim_runs": aim_wall,
        "plain_cpu_runs": times["plain"]["cpu"],
        "aim_cpu_runs": times["aim"]["cpu"],
    }


def markdown(info, setting, rows, quick: bool) -> str:
    s = setting["shape"]
    lines = [
        f"{common.machine_line(info)}; {'--quick' if quick else 'full'} settings.",
        "",
        f"Models: synthetic Llama (hidden {s['hidden']}, {s['layers']} layers, "
        f"intermediate {s['intermediate']}, vocab {s['vocab']}), "
        f"{setting['params'] / 1e9:.2f}B parameters per model, bf16 safetensors; "
        f"base + 2 fine-tunes, output bf16. AIM: ω = {OMEGA}, artifact of "
        f"{setting['artifact_tensors']} statistics (measured on "
        f"{setting['calibration_tokens']} random tokens). Median of "
        f"{setting['repeat']} alternating rounds after one warm-up each; the "
        f"ratio is the median of per-round AIM/plain ratios. AIM's own time is "
        f"what its planning session and relaxation took inside the AIM merges "
        f"(per merge; on the merging thread's CPU clock with one torch thread, "
        f"else wall time), set against the rest of the median AIM merge on the "
        f"same clock.",
        "",
        "| method | device | plain s | AIM s | AIM / plain (wall) "
        "| ratio of medians | AIM / plain (CPU time) | AIM's own s (planning "
        "+ relax) | AIM's own / rest | artifact reads per merge | goal |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        own = r["aim_own_s"]
        lines.append(
            f"| {r['method']} | {r['device']} | {r['plain_s']:.2f} | {r['aim_s']:.2f} "
            f"| {r['ratio']:.3f} | {r['ratio_of_medians']:.3f} "
            f"| {r['ratio_cpu_time']:.3f} | {own['planning']:.2f} + "
            f"{own['relax']:.2f} | {r['aim_own_fraction']:+.1%} "
            f"| {r['artifact_loads_per_aim_merge']:g} | ≤ 1.05 |"
        )
    return "\n".join(lines) + "\n"


def _ram_disk(need: int) -> Path | None:
    shm = Path("/dev/shm")
    try:
        stats = os.statvfs(shm)
    except OSError:
        return None
    return shm if stats.f_bavail * stats.f_frsize > need else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~0.1B models, ~1 min")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument("--repeat", type=int, default=None, help="timed rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated merge methods"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where models and outputs are written (default: /dev/shm when it "
        "has room, so disk write-back does not add noise; else the temp dir)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("mergekit", "mergekit_aim", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    common.set_threads(args.threads)

    from mergekit_aim.plugin import activate

    activate()
    shape = QUICK if args.quick else FULL
    repeat = args.repeat or (3 if args.quick else 7)
    calibration_tokens = (2, 64)
    info = common.machine_info()
    rows = []
    params = sum(math.prod(d) for d in common.tensor_shapes(shape).values())
    workdir = args.workdir or _ram_disk(need=2 * params * 5 + 2**30)
    with tempfile.TemporaryDirectory(prefix="aim-merge-bench-", dir=workdir) as tmp:
        root = Path(tmp)
        base, tuned, params = write_models(shape, root / "models")
        artifact = root / "importance.safetensors"
        tensors = make_artifact(base, artifact, calibration_tokens)
        devices = [False] + ([True] if torch.cuda.is_available() else [])
        for cuda in devices:
            for method in args.methods.split(","):
                rows.append(
                    measure_method(method, base, tuned, artifact, root, repeat, cuda)
                )
    setting = {
        "workdir": str(workdir or tempfile.gettempdir()),
        "shape": asdict(shape),
        "params": params,
        "repeat": repeat,
        "omega": OMEGA,
        "artifact_tensors": tensors,
        "calibration_tokens": calibration_tokens[0] * calibration_tokens[1],
    }
    table = markdown(info, setting, rows, args.quick)
    name = "merge_overhead-quick" if args.quick else "merge_overhead"
    payload = {"machine": info, "quick": args.quick, "setting": setting}
    common.write_results(args.out, name, {**payload, "results": rows}, table)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
