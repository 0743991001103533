"""What AIM adds to a merge: wall time of the same config with and without ``aim:``.

Usage: ``python benchmarks/merge_overhead.py [--quick] [--out DIR] [--repeat N]
[--threads N] [--methods M,...] [--workdir DIR] [--model NAME] [--cuda]``.

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

``--model smollm2-135m|gemma3-270m`` merges a real pretrained checkpoint
(``benchmarks.real_models.ensure``) and two variants made from it
deterministically (``benchmarks.synthetic.finetune_variant``: every parameter plus
seeded noise of ``VARIANT_SCALE`` times its RMS, saved as bf16 checkpoints and
cached under ``benchmarks/results/cache/``, which git ignores). Results go to
``DIR/merge_overhead-<model>[-cuda][-quick].{json,md}``. ``--cuda`` runs only
the ``MergeOptions(cuda=True)`` rows (and needs CUDA).
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
    from benchmarks import common, real_models, synthetic
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import common
    import real_models
    import synthetic

LOG = logging.getLogger("benchmarks.merge_overhead")
OMEGA = 0.4


FULL = common.LlamaShape(2048, 5632, 12, 32, 4, 32000)
QUICK = common.LlamaShape(1024, 2816, 4, 16, 4, 32000)
METHODS = ("task_arithmetic",)
VARIANT_SEEDS = (1, 2)
VARIANT_SCALE = 0.01
CACHE = common.RESULTS / "cache"


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


def real_variants(base: Path, cache: Path) -> list[Path]:
    """Two deterministic variants of the real checkpoint ``base``, cached.

    A cached variant is reused only when its marker names the same base
    checkpoint (its provisioning key), seed and scale.
    """
    import json

    from transformers import AutoModelForCausalLM

    try:
        base_key = json.loads((base / ".provisioned.json").read_text())["key"]
    except (OSError, ValueError, KeyError):
        base_key = None  # not from real_models: never reuse a cached variant
    paths, model = [], None
    for seed in VARIANT_SEEDS:
        target = cache / base.name / f"variant-seed{seed}-scale{VARIANT_SCALE:g}"
        marker = {"base_key": base_key, "seed": seed, "scale": VARIANT_SCALE}
        try:
            done = json.loads((target / "variant.json").read_text()) == marker
        except (OSError, ValueError):
            done = False
        if not done or base_key is None:
            if model is None:
                model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
            variant = synthetic.finetune_variant(model, seed=seed, scale=VARIANT_SCALE)
            shutil.rmtree(target, ignore_errors=True)
            variant.save_pretrained(target)
            (target / "variant.json").write_text(json.dumps(marker) + "\n")
            LOG.info("wrote variant %s", target)
            del variant
        paths.append(target)
    del model
    gc.collect()
    return paths


def copy_models(base: Path, tuned: list[Path], root: Path) -> tuple[Path, list[Path]]:
    """Copy checkpoints (config and safetensors) into ``root``: the merges
    then read from the work directory, a RAM disk when there is room."""
    copies = []
    for index, source in enumerate([base, *tuned]):
        target = root / ("base" if index == 0 else f"ft{index}")
        target.mkdir(parents=True)
        for item in source.iterdir():
            if item.suffix in (".json", ".safetensors") and item.name != "variant.json":
                shutil.copy2(item, target / item.name)
        copies.append(target)
    return copies[0], copies[1:]


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


def run_one(config: dict, out: Path, cuda: bool, keep: bool = False) -> None:
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
        if not keep:
            shutil.rmtree(out, ignore_errors=True)


def _bf16_steps(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Max ``|a − b|`` in bfloat16 rounding steps at ``max(|a|, |b|)`` (the
    spacing there: 2^(exponent − 8)), and how many elements differ."""
    a32, b32 = a.float(), b.float()
    if not a32.numel():
        return 0.0, 0
    top = torch.maximum(a32.abs(), b32.abs())
    exponent = torch.frexp(top.clamp_min(torch.finfo(torch.float32).tiny))[1]
    spacing = torch.ldexp(torch.ones_like(top), exponent - 8)
    steps = ((a32 - b32).abs() / spacing).max().item()
    return steps, int((a32 != b32).sum())


def compare_devices(
    method: str, base: Path, tuned: list[Path], artifact: Path, work: Path
) -> dict[str, object]:
    """The same merge with ``MergeOptions(cuda=True)`` and on the CPU, plain and
    with AIM: how far apart the written tensors are, in bfloat16 rounding steps.

    The plain pair shows what the merge method itself does differently on the
    two devices; ``aim_own`` compares the CUDA AIM merge with AIM applied on the
    CPU (``apply_aim``) to the CUDA plain merge, i.e. the relaxation alone.
    """
    from safetensors.torch import load_file

    from mergekit_aim.importance import ImportanceMap
    from mergekit_aim.offline import apply_aim

    plain = merge_config(method, base, tuned)
    aim = {**plain, "aim": {"omega": OMEGA, "importance": str(artifact)}}
    outs: dict[str, Path] = {}
    for label, config in (("plain", plain), ("aim", aim)):
        for device in ("cuda", "cpu"):
            outs[f"{label}-{device}"] = work / f"compare-{label}-{device}"
            run_one(config, outs[f"{label}-{device}"], device == "cuda", keep=True)

    def tensors(label: str) -> dict[str, torch.Tensor]:
        found: dict[str, torch.Tensor] = {}
        for shard in sorted(outs[label].glob("*.safetensors")):
            found.update(load_file(shard))
        return found

    base_sd: dict[str, torch.Tensor] = {}
    for shard in sorted(base.glob("*.safetensors")):
        base_sd.update(load_file(shard))
    plain_cuda = tensors("plain-cuda")
    relaxed_on_cpu = apply_aim(
        {k: base_sd[k] for k in plain_cuda if k in base_sd},
        plain_cuda,
        ImportanceMap.load(artifact),
        OMEGA,
    )
    pairs = {
        "plain": (plain_cuda, tensors("plain-cpu")),
        "aim": (tensors("aim-cuda"), tensors("aim-cpu")),
        "aim_own": (tensors("aim-cuda"), {**plain_cuda, **relaxed_on_cpu}),
    }
    result: dict[str, object] = {"method": method, "tensors": len(plain_cuda)}
    for label, (left, right) in pairs.items():
        worst, differing, total = 0.0, 0, 0
        for name, a in left.items():
            steps, count = _bf16_steps(a, right[name])
            worst, differing, total = (
                max(worst, steps),
                differing + count,
                total + a.numel(),
            )
        result[label] = {
            "elements": total,
            "differing": differing,
            "max_bf16_steps": worst,
        }
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    return result


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

    importance.forget_loaded()
    checkpoint.forget_indexes()


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
    if "model" in setting:
        models = (
            f"Models: {setting['model']} (pretrained, {s['architecture']}, "
            f"{s['layers']} layers, hidden {s['hidden']}, vocab {s['vocab']}), "
            f"{setting['params'] / 1e6:.0f}M parameters per checkpoint, bf16 "
            f"safetensors; base + 2 variants (every parameter + seeded noise of "
            f"{setting['variant_scale']:g} × its RMS, `synthetic.finetune_variant`)"
        )
    else:
        models = (
            f"Models: synthetic Llama (hidden {s['hidden']}, {s['layers']} layers, "
            f"intermediate {s['intermediate']}, vocab {s['vocab']}), "
            f"{setting['params'] / 1e9:.2f}B parameters per model, bf16 "
            f"safetensors; base + 2 fine-tunes"
        )
    lines = [
        f"{common.machine_line(info)}; {'--quick' if quick else 'full'} settings.",
        "",
        f"{models}, output bf16. AIM: ω = {OMEGA}, artifact of "
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


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument(
        "--model",
        choices=sorted(real_models.MODELS),
        default=None,
        help="a real pretrained checkpoint and two variants of it instead of the "
        "synthetic models",
    )
    parser.add_argument(
        "--cuda",
        action="store_true",
        help="only the MergeOptions(cuda=True) rows (default: CPU, plus CUDA "
        "where available)",
    )
    parser.add_argument(
        "--compare-cpu",
        action="store_true",
        help="also write the first method's AIM merge with CUDA and on the CPU "
        "and report how far apart their tensors are",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=CACHE,
        help="with --model: where the variants are kept between runs",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cuda and not torch.cuda.is_available():
        parser.error("--cuda: torch sees no CUDA device")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("mergekit", "mergekit_aim", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    common.set_threads(args.threads)

    from mergekit_aim.plugin import activate

    activate()
    repeat = args.repeat or (3 if args.quick else 7)
    calibration_tokens = (2, 64)
    if args.model is not None:
        real_base = real_models.ensure(args.model)
        real_tuned = real_variants(real_base, args.cache)
        # Three checkpoints copied in, two merge outputs.
        need = 5 * sum(_weights_bytes(p) for p in [real_base, *real_tuned]) // 3
    else:
        shape = QUICK if args.quick else FULL
        params = sum(math.prod(d) for d in common.tensor_shapes(shape).values())
        need = 2 * params * 5
    info = common.machine_info()
    rows = []
    workdir = args.workdir or _ram_disk(need=need + 2**30)
    with tempfile.TemporaryDirectory(prefix="aim-merge-bench-", dir=workdir) as tmp:
        root = Path(tmp)
        if args.model is not None:
            base, tuned = copy_models(real_base, real_tuned, root / "models")
            params = common.checkpoint_parameters(base)
        else:
            base, tuned, params = write_models(shape, root / "models")
        artifact = root / "importance.safetensors"
        tensors = make_artifact(base, artifact, calibration_tokens)
        if args.cuda:
            devices = [True]
        else:
            devices = [False] + ([True] if torch.cuda.is_available() else [])
        for cuda in devices:
            for method in args.methods.split(","):
                rows.append(
                    measure_method(method, base, tuned, artifact, root, repeat, cuda)
                )
        comparison = None
        if args.compare_cpu:
            comparison = compare_devices(
                args.methods.split(",")[0], base, tuned, artifact, root
            )
            LOG.info("CUDA against CPU: %s", comparison)
        if args.model is not None:
            shape = common.checkpoint_shape(base)
    common.record_end_load(info)
    setting = {
        "workdir": str(workdir or tempfile.gettempdir()),
        "shape": shape if args.model is not None else asdict(shape),
        "params": params,
        "repeat": repeat,
        "omega": OMEGA,
        "artifact_tensors": tensors,
        "calibration_tokens": calibration_tokens[0] * calibration_tokens[1],
    }
    name = "merge_overhead"
    if args.model is not None:
        setting.update(
            model=args.model,
            variant_seeds=list(VARIANT_SEEDS),
            variant_scale=VARIANT_SCALE,
        )
        name += f"-{args.model}"
    if args.cuda:
        name += "-cuda"
    if args.quick:
        name += "-quick"
    table = markdown(info, setting, rows, args.quick)
    if comparison is not None:
        setting["cuda_vs_cpu"] = comparison
        words = {
            "plain": "plain merge, CUDA vs CPU (the merge method itself)",
            "aim": "AIM merge, CUDA vs CPU",
            "aim_own": "AIM's relaxation alone: CUDA AIM merge vs `apply_aim` on "
            "the CPU applied to the CUDA plain merge",
        }
        table += (
            f"\n{comparison['method']} with `MergeOptions(cuda=True)` against the "
            f"CPU ({comparison['tensors']} tensors; steps are bfloat16 rounding "
            f"steps at the larger magnitude):\n\n"
            "| comparison | elements differing | max steps |\n|---|---:|---:|\n"
        )
        for label, text in words.items():
            c = comparison[label]
            table += (
                f"| {text} | {c['differing']} of {c['elements']} "
                f"| {c['max_bf16_steps']:g} |\n"
            )
    payload = {"machine": info, "quick": args.quick, "setting": setting}
    common.write_results(args.out, name, {**payload, "results": rows}, table)
    sys.stdout.write(table)
    return 0


def _weights_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


if __name__ == "__main__":
    sys.exit(main())
