"""Calibration throughput: our collector, a paper-style hook loop, bare forwards.

Usage: ``python benchmarks/calibration.py [--quick] [--out DIR] [--repeat N]
[--threads N] [--device DEV] [--model NAME [--blocks N] [--batch N]]``.

All variants run on the same random token blocks through the same random-weight
Llama (built from a ``LlamaConfig`` with a 32000-token vocabulary, so the LM head
costs what it costs in a real model; nothing is downloaded):

* ``ours``: ``mergekit_aim.collect_importance(model, blocks, batch_size=B)``, at
  batch size B and at batch size 1;
* ``paper-style``: batch size 1, forward hooks on every Linear and norm computing
  the block's per-channel mean ``x.abs().reshape(-1, C).mean(0)``, moving it to the
  host and adding it into a Python dict on every call, full forward including
  the LM head (the habit of the paper's and llm-awq's code);
* ``bare``: ``model(input_ids=batch, use_cache=False)`` with no hooks, with the LM
  head (full forward) and without it (``model.model``: the decoder only, which
  is all our collector runs, since the head's statistic is its input).

Methods are timed round-robin (the median of ``--repeat`` rounds), so machine
noise hits every variant alike; CPU time and wall time are both recorded (see
``benchmarks/common.py``). A second part times ``ours`` against the number
of blocks and against model size, and plots it when matplotlib is installed.
Results go to ``DIR/calibration.json`` and ``DIR/calibration.md`` (``-quick``
suffix with ``--quick``), the plot to ``DIR/calibration.png``; tables are printed.

``--model smollm2-135m|gemma3-270m`` runs the same head-to-head on a real
pretrained checkpoint instead (provisioned by ``benchmarks.real_models.ensure``),
in float32 (``--dtype`` to change), on token blocks of real text (the builtin
corpus, packed the product's way; for models whose spec asks for it, Gemma-3,
every block starts with ``<bos>``). No scaling part. Results go to
``DIR/calibration-<model>[-<device>][-quick].{json,md}`` (the device only when
not the CPU).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

try:
    from benchmarks import common, real_models
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import common
    import real_models

from mergekit_aim import collect_importance

LOG = logging.getLogger("benchmarks.calibration")
VOCAB = 32000


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    layers: int
    intermediate: int

    @property
    def shape(self) -> common.LlamaShape:
        heads = self.hidden // 64
        return common.LlamaShape(
            self.hidden, self.intermediate, self.layers, heads, heads, VOCAB
        )


SIZES = {
    "small": Size("small", 512, 4, 1376),
    "medium": Size("medium", 768, 6, 2048),
    "large": Size("large", 1024, 8, 2816),
}


@dataclass(frozen=True)
class Plan:
    size: str
    blocks: int
    seq_len: int
    batch: int
    repeat: int
    block_counts: tuple[int, ...]
    scaling_blocks: int
    scaling_sizes: tuple[str, ...]


FULL = Plan("medium", 8, 512, 4, 3, (2, 4, 8, 16), 4, ("small", "medium", "large"))
QUICK = Plan("small", 8, 256, 4, 3, (2, 4, 8), 4, ("small", "medium"))


@dataclass(frozen=True)
class RealPlan:
    """The head-to-head on a real checkpoint: ``blocks`` × ``seq_len`` tokens."""

    blocks: int
    seq_len: int
    batch: int
    repeat: int


# Sized for minutes on one CPU thread. Gemma-3's LM head (vocabulary 262144) is
# twice its decoder's cost, and its batch-4 logits take 2 GiB in float32.
REAL_PLANS = {
    "smollm2-135m": RealPlan(8, 512, 4, 3),
    "gemma3-270m": RealPlan(4, 512, 4, 3),
}
REAL_QUICK = RealPlan(4, 256, 2, 1)


DEVICE = torch.device("cpu")


def random_llama(size: Size, seed: int = 0) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = common.llama_config(size.shape, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval().to(DEVICE)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the variants -----------------------------------------------------------------


def _is_paper_target(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__.endswith("Norm")


def paper_style(model: nn.Module, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch size 1, per-call block means moved to the host into a dict.

    ``reshape`` where the paper's and llm-awq's code write ``view``: some
    inputs are not contiguous (Gemma-3's q/k norms see a transposed view), and
    on contiguous ones the two are the same operation.
    """
    stats: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0]
            mean = x.abs().reshape(-1, x.shape[-1]).mean(0).cpu()
            stats[name] = stats[name] + mean if name in stats else mean

        return hook

    handles = [
        module.register_forward_hook(make_hook(name))
        for name, module in model.named_modules()
        if _is_paper_target(module)
    ]
    try:
        with torch.no_grad():
            for block in blocks:
                model(input_ids=block.unsqueeze(0), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def bare(model: nn.Module, blocks: torch.Tensor, batch: int, head: bool) -> None:
    run = model if head else model.model
    with torch.no_grad():
        for chunk in blocks.split(batch):
            run(input_ids=chunk, use_cache=False)


def ours(model: nn.Module, blocks: torch.Tensor, batch: int):
    return collect_importance(model, blocks, batch_size=batch)


OURS_B = "ours (batch {b})"
OURS_1 = "ours (batch 1)"
PAPER = "paper-style (batch 1)"
BARE_HEAD_B = "bare forward, with LM head (batch {b})"
BARE_B = "bare forward, no LM head (batch {b})"
BARE_HEAD_1 = "bare forward, with LM head (batch 1)"
BARE_1 = "bare forward, no LM head (batch 1)"


def variants(
    model: nn.Module, blocks: torch.Tensor, batch: int
) -> dict[str, Callable[[], object]]:
    # Neighbours in this order are neighbours in time in every round, so each
    # variant sits next to the bare forward it is compared with.
    return {
        OURS_B.format(b=batch): lambda: ours(model, blocks, batch),
        BARE_B.format(b=batch): lambda: bare(model, blocks, batch, False),
        BARE_HEAD_B.format(b=batch): lambda: bare(model, blocks, batch, True),
        PAPER: lambda: paper_style(model, blocks),
        BARE_HEAD_1: lambda: bare(model, blocks, 1, True),
        BARE_1: lambda: bare(model, blocks, 1, False),
        OURS_1: lambda: ours(model, blocks, 1),
    }


def head_to_head(plan: Plan) -> tuple[list[dict[str, object]], dict[str, object]]:
    size = SIZES[plan.size]
    model = random_llama(size)
    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, VOCAB, (plan.blocks, plan.seq_len), generator=gen)
    rows, extra = compare_variants(model, blocks.to(DEVICE), plan.batch, plan.repeat)
    extra["setting"] = {"model": asdict(size), **extra["setting"]}
    return rows, extra


def compare_variants(
    model: nn.Module, blocks: torch.Tensor, batch: int, repeat: int
) -> tuple[list[dict[str, object]], dict[str, object]]:
    """Every variant on ``blocks`` (already on the model's device), round-robin."""
    tokens = blocks.numel()
    warm = variants(model, blocks[: min(batch, len(blocks))], batch)
    for name, fn in warm.items():
        fn()
        LOG.info("warmed up %s", name)
    times = common.round_robin(
        variants(model, blocks, batch), repeat, log=LOG.info, sync=_sync
    )
    rows = []
    for name, t in times.items():
        cpu, wall = common.median(t["cpu"]), common.median(t["wall"])
        rows.append(
            {
                "variant": name,
                "cpu_s": cpu,
                "wall_s": wall,
                "cpu_runs": t["cpu"],
                "wall_runs": t["wall"],
                "tokens_per_cpu_s": tokens / cpu,
                "tokens_per_wall_s": tokens / wall,
            }
        )
    agreement = statistic_agreement(model, blocks, batch)
    setting = {
        "device": str(DEVICE),
        "params": parameter_count(model),
        "blocks": len(blocks),
        "seq_len": blocks.shape[1],
        "tokens": tokens,
        "batch": batch,
        "repeat": repeat,
        "max_rel_diff_ours_vs_paper": agreement,
    }
    return rows, {"setting": setting, "times": times}


# --- real checkpoints ----------------------------------------------------------------


def real_blocks(
    path: Path,
    count: int,
    seq_len: int,
    bos_every_chunk: bool,
    dataset: str = "builtin",
) -> torch.Tensor:
    """``count`` blocks of ``dataset`` text (the builtin corpus), tokenized
    with ``path``'s tokenizer and packed as the product packs calibration data;
    with ``bos_every_chunk`` each block is ``<bos>`` followed by ``seq_len - 1``
    packed tokens (the product's ``bos_per_block``)."""
    from transformers import AutoTokenizer

    from mergekit_aim.calibration.data import build_blocks

    tokenizer = AutoTokenizer.from_pretrained(path)
    built = build_blocks(
        dataset,
        tokenizer,
        num_samples=max(64, 4 * count),
        seq_len=seq_len,
        bos_per_block=bos_every_chunk,
    )
    tokens = built.tokens[:count]
    if len(tokens) < count:
        raise SystemExit(
            f"{dataset} gave {len(tokens)} blocks of {seq_len} tokens for "
            f"{path}; asked for {count}"
        )
    return tokens


def real_head_to_head(
    path: Path,
    plan: RealPlan,
    *,
    dtype: torch.dtype,
    bos_every_chunk: bool,
    dataset: str = "builtin",
) -> tuple[list[dict[str, object]], dict[str, object]]:
    from transformers import AutoModelForCausalLM

    blocks = real_blocks(path, plan.blocks, plan.seq_len, bos_every_chunk, dataset)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model = model.eval().to(DEVICE)
    rows, extra = compare_variants(model, blocks.to(DEVICE), plan.batch, plan.repeat)
    config = model.config
    extra["setting"].update(
        checkpoint=str(path),
        architecture=type(model).__name__,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        vocab=config.vocab_size,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        dtype=str(dtype).replace("torch.", ""),
        data=("builtin corpus" if dataset == "builtin" else f"`{dataset}`")
        + (", <bos> at each block" if bos_every_chunk else ""),
    )
    return rows, extra


def statistic_agreement(model: nn.Module, blocks: torch.Tensor, batch: int) -> float:
    """Max relative difference of our per-token means and the paper-style ones."""
    ours_map = ours(model, blocks, batch)
    paper = paper_style(model, blocks)
    worst = 0.0
    for module_name, block_means in paper.items():
        name = f"{module_name}.weight"
        if name not in ours_map:
            continue
        reference = block_means / len(blocks)
        diff = (ours_map.mean(name) - reference).abs().max() / reference.abs().max()
        worst = max(worst, float(diff))
    return worst


def derived(times: dict[str, dict[str, list[float]]], batch: int) -> dict[str, float]:
    """Ratios of CPU-time medians ("cpu"), and of wall time per round ("wall")."""
    pairs = {
        "overhead_vs_bare_no_head": (OURS_B, BARE_B),
        "overhead_vs_bare_no_head_batch1": (OURS_1, BARE_1),
        "overhead_vs_bare_with_head": (OURS_B, BARE_HEAD_B),
        "paper_hook_overhead_vs_bare_with_head_batch1": (PAPER, BARE_HEAD_1),
        "speedup_vs_paper": (PAPER, OURS_B),
        "speedup_vs_paper_batch1": (PAPER, OURS_1),
        "bare_batching_speedup": (BARE_HEAD_1, BARE_HEAD_B),
        "lm_head_share_of_forward": (BARE_B, BARE_HEAD_B),
    }
    result: dict[str, float] = {}
    for key, (num, den) in pairs.items():
        num, den = times[num.format(b=batch)], times[den.format(b=batch)]
        cpu = common.median(num["cpu"]) / common.median(den["cpu"])
        wall = common.paired_ratio(num["wall"], den["wall"])
        if key.startswith("overhead") or key.startswith("paper_hook"):
            cpu, wall = cpu - 1, wall - 1
        elif key == "lm_head_share_of_forward":
            cpu, wall = 1 - cpu, 1 - wall
        result[key] = cpu
        result[key + "_wall"] = wall
    return result


# --- scaling -------------------------------------------------------------------------


def scaling(plan: Plan) -> list[dict[str, object]]:
    """Ours against the number of blocks, ours and paper-style against model size.

    Each point is the median of two runs (after a warm-up), CPU time.
    """
    rows: list[dict[str, object]] = []
    gen = torch.Generator().manual_seed(2)
    model = random_llama(SIZES[plan.size])
    params = parameter_count(model)
    most = max(plan.block_counts)
    blocks = torch.randint(0, VOCAB, (most, plan.seq_len), generator=gen).to(DEVICE)
    ours(model, blocks[: plan.batch], plan.batch)
    cases = {
        count: (lambda c=count, m=model: ours(m, blocks[:c], plan.batch))
        for count in plan.block_counts
    }
    for count, t in common.round_robin(cases, 2, sync=_sync).items():
        seconds = common.median(t["cpu"])
        rows.append(_scaling_row("blocks", plan.size, params, count, plan, seconds))
        LOG.info("scaling: %d blocks on %s: %.2f s", count, plan.size, seconds)
    blocks = blocks[: plan.scaling_blocks]
    for name in plan.scaling_sizes:
        model = random_llama(SIZES[name])
        params = parameter_count(model)
        ours(model, blocks[: plan.batch], plan.batch)
        cases = {
            "ours": lambda m=model: ours(m, blocks, plan.batch),
            "paper-style": lambda m=model: paper_style(m, blocks),
        }
        for variant, t in common.round_robin(cases, 2, sync=_sync).items():
            seconds = common.median(t["cpu"])
            row = _scaling_row("size", name, params, len(blocks), plan, seconds)
            row["variant"] = variant
            rows.append(row)
            LOG.info("scaling: %s on %s: %.2f s", variant, name, seconds)
    return rows


def _scaling_row(
    axis: str, size: str, params: int, blocks: int, plan: Plan, seconds: float
) -> dict[str, object]:
    tokens = blocks * plan.seq_len
    return {
        "axis": axis,
        "variant": "ours",
        "model": size,
        "params": params,
        "blocks": blocks,
        "tokens": tokens,
        "batch": plan.batch,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
    }


def plot(rows: list[dict[str, object]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.stdout.write(
            "note: matplotlib is not installed; no plot (pip install matplotlib)\n"
        )
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    by_blocks = [r for r in rows if r["axis"] == "blocks"]
    left.plot([r["blocks"] for r in by_blocks], [r["seconds"] for r in by_blocks], "o-")
    left.set_xlabel(f"calibration blocks ({by_blocks[0]['model']} model)")
    left.set_ylabel("CPU seconds")
    left.set_title("time vs number of samples")
    left.grid(alpha=0.3)
    for variant in ("ours", "paper-style"):
        pts = [r for r in rows if r["axis"] == "size" and r["variant"] == variant]
        right.plot(
            [r["params"] / 1e6 for r in pts],
            [r["seconds"] for r in pts],
            "o-",
            label=variant,
        )
    right.set_xlabel("model parameters (M)")
    right.set_ylabel("CPU seconds")
    right.set_title("time vs model size")
    right.legend()
    right.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- output ------------------------------------------------------------------------


def markdown(
    info: dict[str, object],
    setting: dict[str, object],
    rows: list[dict[str, object]],
    ratios: dict[str, float],
    scale_rows: list[dict[str, object]],
    quick: bool,
) -> str:
    model = setting["model"]
    b = setting["batch"]
    if isinstance(model, str):
        described = (
            f"Model: {model} ({setting['architecture']}, {setting['layers']} layers, "
            f"hidden {setting['hidden']}, vocab {setting['vocab']}"
            f"{', tied embeddings' if setting['tied_embeddings'] else ''}), "
            f"pretrained, {setting['params'] / 1e6:.0f}M parameters, "
            f"{setting['dtype']}, on {setting['device']}. Data: {setting['data']}, "
        )
    else:
        described = (
            f"Model: random-weight Llama, hidden {model['hidden']}, "
            f"{model['layers']} layers, vocab {VOCAB}, "
            f"{setting['params'] / 1e6:.0f}M parameters, float32, on "
            f"{setting['device']}. Data: "
        )
    lines = [
        f"{common.machine_line(info)}; {'--quick' if quick else 'full'} settings.",
        "",
        f"{described}{setting['blocks']} blocks × {setting['seq_len']} tokens "
        f"({setting['tokens']} tokens); medians of {setting['repeat']} round-robin "
        f"rounds. CPU time is this process's (all threads); wall time includes "
        f"waiting for cores other jobs hold.",
        "",
        "| variant | CPU s | tokens/CPU s | wall s | tokens/wall s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['cpu_s']:.2f} | {r['tokens_per_cpu_s']:.0f} "
            f"| {r['wall_s']:.2f} | {r['tokens_per_wall_s']:.0f} |"
        )
    measures = [
        (
            f"ours vs bare forward without LM head, batch {b} (hook overhead)",
            "overhead_vs_bare_no_head",
            "{:+.1%}",
            "≤ +5%",
        ),
        (
            "ours vs bare forward without LM head, batch 1",
            "overhead_vs_bare_no_head_batch1",
            "{:+.1%}",
            "",
        ),
        (
            f"ours vs bare full forward, batch {b}",
            "overhead_vs_bare_with_head",
            "{:+.1%}",
            "",
        ),
        (
            "paper-style vs bare full forward, batch 1 (its hook overhead)",
            "paper_hook_overhead_vs_bare_with_head_batch1",
            "{:+.1%}",
            "",
        ),
        (
            f"speedup ours (batch {b}) over paper-style",
            "speedup_vs_paper",
            "{:.2f}×",
            "≥ 1.5×",
        ),
        (
            "speedup ours (batch 1) over paper-style",
            "speedup_vs_paper_batch1",
            "{:.2f}×",
            "",
        ),
        (
            f"bare full forward, batch {b} over batch 1 (batching alone)",
            "bare_batching_speedup",
            "{:.2f}×",
            "",
        ),
        (
            f"LM head's share of the full forward (batch {b})",
            "lm_head_share_of_forward",
            "{:.0%}",
            "",
        ),
    ]
    lines += [
        "",
        "| measure | CPU time | wall time (per-round) | goal |",
        "|---|---:|---:|---|",
    ]
    for label, key, fmt, goal in measures:
        lines.append(
            f"| {label} | {fmt.format(ratios[key])} "
            f"| {fmt.format(ratios[key + '_wall'])} | {goal} |"
        )
    lines += [
        "",
        "Max relative difference of the statistics, ours vs paper-style: "
        f"{setting['max_rel_diff_ours_vs_paper']:.1e}.",
    ]
    if not scale_rows:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        f"Scaling (CPU time, median of 2; ours at batch {b}, paper-style at batch 1):",
        "",
        "| axis | variant | model | params (M) | blocks | tokens | CPU s "
        "| tokens/CPU s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in scale_rows:
        lines.append(
            f"| {r['axis']} | {r['variant']} | {r['model']} | {r['params'] / 1e6:.0f} "
            f"| {r['blocks']} | {r['tokens']} | {r['seconds']:.2f} "
            f"| {r['tokens_per_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, ~2 min")
    parser.add_argument(
        "--out",
        type=Path,
        default=common.RESULTS,
        help="directory for calibration.json, .md and .png",
    )
    parser.add_argument("--repeat", type=int, default=None, help="timed rounds")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's; 1 gives reproducible CPU "
        "times on a shared machine)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the model runs (cuda: then compare wall-time columns)",
    )
    parser.add_argument(
        "--model",
        choices=sorted(real_models.MODELS),
        default=None,
        help="a real pretrained checkpoint (benchmarks.real_models) instead of the "
        "synthetic Llama; only the head-to-head runs",
    )
    parser.add_argument(
        "--blocks", type=int, default=None, help="with --model: token blocks"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="with --model: our batch size"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="with --model: the dtype the model runs in",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model is None and (args.blocks or args.batch or args.dtype != "float32"):
        parser.error("--blocks, --batch and --dtype go with --model")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    common.set_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.model is not None:
        return main_real(args)

    plan = QUICK if args.quick else FULL
    if args.repeat:
        plan = Plan(**{**asdict(plan), "repeat": args.repeat})
    info = common.machine_info()
    rows, extra = head_to_head(plan)
    setting = extra["setting"]
    ratios = derived(extra["times"], plan.batch)
    scale_rows = scaling(plan)
    common.record_end_load(info)
    name = "calibration-quick" if args.quick else "calibration"
    args.out.mkdir(parents=True, exist_ok=True)
    plotted = plot(scale_rows, args.out / f"{name}.png", common.machine_line(info))
    table = markdown(info, setting, rows, ratios, scale_rows, args.quick)
    if plotted:
        table += f"\nPlot: `{name}.png`.\n"
    return _write(args, name, info, setting, rows, ratios, table, scaling=scale_rows)


def main_real(args: argparse.Namespace) -> int:
    spec = real_models.model_spec(args.model)
    plan = REAL_QUICK if args.quick else REAL_PLANS[args.model]
    overrides = {"blocks": args.blocks, "batch": args.batch, "repeat": args.repeat}
    plan = RealPlan(**{**asdict(plan), **{k: v for k, v in overrides.items() if v}})
    path = real_models.ensure(args.model)
    info = common.machine_info()
    rows, extra = real_head_to_head(
        path,
        plan,
        dtype=getattr(torch, args.dtype),
        bos_every_chunk=spec.bos_every_chunk,
    )
    common.record_end_load(info)
    setting = {"model": args.model, **extra["setting"]}
    ratios = derived(extra["times"], plan.batch)
    table = markdown(info, setting, rows, ratios, [], args.quick)
    name = f"calibration-{args.model}"
    if DEVICE.type != "cpu":
        name += f"-{DEVICE.type}"
    if args.quick:
        name += "-quick"
    return _write(args, name, info, setting, rows, ratios, table)


def _write(
    args: argparse.Namespace,
    name: str,
    info: dict,
    setting: dict,
    rows: list,
    ratios: dict,
    table: str,
    **extra: object,
) -> int:
    payload = {
        "machine": info,
        "quick": args.quick,
        "setting": setting,
        "results": rows,
        "ratios": ratios,
        **extra,
    }
    common.write_results(args.out, name, payload, table)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
