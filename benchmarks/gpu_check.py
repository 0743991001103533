"""``python -m benchmarks.gpu_check`` (``make gpu-check``): the GPU checks in one go.

Where torch sees a CUDA device, provisions SmolLM2-135M and Gemma-3-270M
(``benchmarks.real_models.ensure``) and runs, one after the other, each in a
subprocess with its own time limit inside one overall budget (``--budget``,
default 475 s, provisioning included):

1. the CUDA tests: ``pytest -m gpu`` (the compiled Triton kernels and the
   in-place relaxation on CUDA);
2. ``benchmarks/kernels.py --device cuda``: the Triton kernels' effective
   bandwidth against the GPU's ``copy_`` bandwidth and the eager expressions,
   over a ladder of shapes from 1k×1k to the full sizes;
3. ``benchmarks/calibration.py --model M --device cuda`` for both models (float32,
   so the statistic parity is not blurred by half-precision means): our
   collector (batch 8 and batch 1) against the paper-style loop (batch 1) and
   bare forwards on the same tokens (compare the wall-time columns);
4. ``benchmarks/merge_overhead.py --model smollm2-135m --cuda --compare-cpu``:
   AIM TIES merge against the plain one with ``MergeOptions(cuda=True)``, and
   the CUDA merge's tensors against the same merge on the CPU; then the same
   timing on the synthetic 0.66B Llama, where per-tensor launch costs weigh
   less against the merge.

A device machine may receive a model directory without its weights (its
config and tokenizer only, when the checkpoint is too large to send there):
``--random-weights`` then fills in seeded random weights of the exact
architecture, which changes no throughput figure and no parity check, and says
so in every table it writes.

Everything goes to ``--out`` (default ``benchmarks/results/gpu/<device>/``,
the device's name made file-safe): each benchmark's ``.json``/``.md`` (whose
machine line names the GPU), a log per step that starts with the device's
name, and ``gpu-check.md``/``.json`` summarising the steps. A step that fails
or runs out of time does not stop the others; the exit status is 1 if any step
failed, else 0.

Without CUDA it says so and exits 0. ``--dry-run`` lists the steps and checks
each benchmark's arguments against its parser, with or without CUDA, and
runs nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_RESULTS = ROOT / "benchmarks" / "results" / "gpu"
MODEL = "smollm2-135m"
MODELS = ("smollm2-135m", "gemma3-270m")
DEFAULT_BUDGET_S = 475


@dataclass(frozen=True)
class Step:
    """One check: ``python ARGV...`` from the repository root."""

    name: str
    argv: tuple[str, ...]
    timeout_s: int
    # The benchmark module whose ``build_parser()`` must accept ``argv[2:]``
    # (``argv`` is ``("-m", module, ...)``); None for other commands.
    parser_module: str | None = None
    what: str = ""


def plan(out: Path) -> list[Step]:
    """The steps, in order; their limits add up to about the default budget."""
    out_arg = str(out)
    return [
        Step(
            "tests-gpu",
            ("-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"),
            110,
            what="tests marked gpu (compiled Triton kernels, in-place relaxation)",
        ),
        Step(
            "kernels",
            ("-m", "benchmarks.kernels", "--device", "cuda", "--out", out_arg),
            60,
            "benchmarks.kernels",
            "Triton kernels against copy bandwidth",
        ),
        *(
            Step(
                f"calibration-{model}",
                (
                    "-m",
                    "benchmarks.calibration",
                    "--model",
                    model,
                    "--device",
                    "cuda",
                    "--blocks",
                    "32",
                    "--batch",
                    "8",
                    "--repeat",
                    "3",
                    "--out",
                    out_arg,
                ),  # fmt: skip
                60,
                "benchmarks.calibration",
                f"{model} calibration against the paper loop (batch 1)",
            )
            for model in MODELS
        ),
        Step(
            "merge",
            (
                "-m",
                "benchmarks.merge_overhead",
                "--model",
                MODEL,
                "--cuda",
                "--methods",
                "ties",
                "--repeat",
                "5",
                "--compare-cpu",
                "--out",
                out_arg,
            ),  # fmt: skip
            80,
            "benchmarks.merge_overhead",
            "AIM TIES merge against plain, MergeOptions(cuda=True); CUDA vs CPU",
        ),
        Step(
            "merge-synthetic",
            (
                "-m",
                "benchmarks.merge_overhead",
                "--cuda",
                "--methods",
                "ties",
                "--repeat",
                "3",
                "--out",
                out_arg,
            ),  # fmt: skip
            100,
            "benchmarks.merge_overhead",
            "the same on the synthetic 0.66B Llama (AIM's overhead at a larger size)",
        ),
    ]


def check_arguments(steps: Sequence[Step]) -> None:
    """Parse every benchmark step's arguments with that benchmark's parser
    (argparse exits with its usage message on a mismatch)."""
    for step in steps:
        if step.parser_module is None:
            continue
        module = importlib.import_module(step.parser_module)
        module.build_parser().parse_args(list(step.argv[2:]))


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The suite's TRITON_INTERPRET=1 would make Triton interpret the kernels
    # being measured; the GPU checks want them compiled.
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("HF_HUB_OFFLINE", "1")
    pythonpath = [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    return env


def run_steps(
    steps: Sequence[Step],
    out: Path,
    device: str,
    deadline: float,
    env: Mapping[str, str] | None = None,
) -> list[dict[str, object]]:
    """Run ``steps`` in order, each until its limit or ``deadline``
    (``time.monotonic()``), whichever comes first; log to ``out/<step>.log``."""
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for index, step in enumerate(steps, 1):
        left = deadline - time.monotonic()
        record: dict[str, object] = {**asdict(step), "log": f"{step.name}.log"}
        label = f"[{index}/{len(steps)}] {step.name}"
        if left < 10:
            record.update(status="skipped: budget spent", rc=None, wall_s=0.0)
            print(f"{label}: skipped, the time budget is spent", flush=True)
            results.append(record)
            continue
        limit = min(step.timeout_s, int(left))
        print(f"{label}: {step.what or ' '.join(step.argv)} ...", flush=True)
        log = out / f"{step.name}.log"
        start = time.monotonic()
        with open(log, "w") as handle:
            handle.write(f"device: {device}\ncommand: python {' '.join(step.argv)}\n")
            handle.flush()
            # A session of its own, so that a timeout ends the step's own
            # children too (pytest runs the CUDA kernels in a subprocess).
            child = subprocess.Popen(
                [sys.executable, *step.argv],
                cwd=ROOT,
                env=dict(env if env is not None else child_env()),
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                rc = child.wait(timeout=limit)
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                rc, status = None, f"timed out after {limit} s"
        wall = time.monotonic() - start
        record.update(status=status, rc=rc, wall_s=round(wall, 1), limit_s=limit)
        print(f"{label}: {status} in {wall:.0f} s (log: {log})", flush=True)
        results.append(record)
    return results


RANDOM_WEIGHTS_NOTE = (
    "Weights: seeded random, of the exact architecture (the checkpoint was too "
    "large to send to the device machine); throughput and parity do not depend "
    "on the weights' values."
)


def fill_random_weights(path: Path, seed: int = 0) -> bool:
    """Write seeded random weights into a model directory that has a config but
    no ``*.safetensors``; True if it did."""
    if any(path.glob("*.safetensors")):
        return False
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory(dir=path) as tmp:
        model.save_pretrained(tmp)
        for weights in Path(tmp).glob("*.safetensors*"):
            weights.rename(path / weights.name)
    return True


def summary_markdown(
    device: str, machine_line: str, results: Sequence[Mapping[str, object]]
) -> str:
    lines = [
        f"# gpu-check on {device}",
        "",
        machine_line,
        "",
        "| step | what | status | wall s | limit s | log |",
        "|---|---|---|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['what']} | {r['status']} | {r['wall_s']} "
            f"| {r.get('limit_s', '')} | `{r['log']}` |"
        )
    return "\n".join(lines) + "\n"


def no_cuda_message() -> str:
    import torch

    build = torch.version.cuda
    why = (
        f"torch {torch.__version__} is built for CUDA {build} but sees no device"
        if build
        else f"torch {torch.__version__} is a CPU-only build"
    )
    return (
        f"gpu-check: no CUDA device ({why}); nothing to check here. Run "
        f"`make gpu-check` on a machine with an NVIDIA GPU and a CUDA build of torch."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default benchmarks/results/gpu/<device>)",
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=DEFAULT_BUDGET_S,
        help="seconds for everything, provisioning included",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="fill model directories that have no weights with seeded random "
        "weights of their architecture (device machines the checkpoints cannot "
        "be sent to)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list the steps and check their arguments; run nothing",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.monotonic()
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else None
    if not cuda and not args.dry_run:
        print(no_cuda_message())
        return 0
    from benchmarks import common

    slug = common.device_slug(device) if device else "<cuda-device>"
    out = args.out or GPU_RESULTS / slug
    steps = plan(out)
    if args.dry_run:
        check_arguments(steps)
        print(f"gpu-check --dry-run: device {device or 'none (no CUDA here)'}")
        print(f"1. provision {', '.join(MODELS)} (benchmarks.real_models.ensure)")
        for index, step in enumerate(steps, 2):
            print(
                f"{index}. {step.name} (limit {step.timeout_s} s): "
                f"python {' '.join(step.argv)}"
            )
        print(f"results: {out}; budget {args.budget} s; arguments checked")
        return 0

    from benchmarks import real_models

    print(f"gpu-check on {device}: results in {out}", flush=True)
    random_weights = []
    for model in MODELS:
        path = real_models.ensure(model)
        if args.random_weights and fill_random_weights(path):
            random_weights.append(model)
        print(f"provisioned {model}: {path}", flush=True)
    info = common.machine_info()
    results = run_steps(steps, out, device, start + args.budget)
    common.record_end_load(info)
    if random_weights:
        for table in out.glob("*.md"):
            if table.name != "gpu-check.md":
                table.write_text(table.read_text() + "\n" + RANDOM_WEIGHTS_NOTE + "\n")
    wall = time.monotonic() - start
    payload = {
        "device": device,
        "machine": info,
        "python": platform.python_version(),
        "models": list(MODELS),
        "random_weights": random_weights,
        "budget_s": args.budget,
        "wall_s": round(wall, 1),
        "steps": results,
    }
    table = summary_markdown(device, common.machine_line(info), results)
    table += f"\nTotal {wall:.0f} s (budget {args.budget} s).\n"
    if random_weights:
        table += f"\n{', '.join(random_weights)}: {RANDOM_WEIGHTS_NOTE}\n"
    (out / "gpu-check.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "gpu-check.md").write_text(table)
    sys.stdout.write(table)
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
