"""``mergekit-aim``: calibrate, relax, merge with a YAML config, demo, inspect."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import get_args

import click

from mergekit_aim.calibration.data import BOS_PER_BLOCK_CHOICES, setting_text
from mergekit_aim.calibration.settings import (
    CALIBRATION_DTYPES,
    FALLBACK_DEVICE,
    CalibrationConfig,
)
from mergekit_aim.errors import AimError

LOG = logging.getLogger("mergekit_aim")


def _setup_logging(quiet: bool, verbose: int = 0) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


class _AimGroup(click.Group):
    """Turn the package's own errors into one clear line and exit status 2,
    and Ctrl-C or SIGTERM into one line and status 130 or 143, after the same
    cleanup (see :mod:`mergekit_aim.output`)."""

    def invoke(self, ctx: click.Context):
        from mergekit_aim.output import Terminated, terminate_as_interrupt

        received: list[int] = []
        try:
            with terminate_as_interrupt() as received:
                return super().invoke(ctx)
        except (SystemExit, click.exceptions.Exit):
            raise
        except BaseException as error:
            if received or isinstance(error, KeyboardInterrupt):
                # Whatever the signal's exception surfaced as (see
                # terminate_as_interrupt), the run was stopped; cleanup has run.
                if signal.SIGTERM in received or isinstance(error, Terminated):
                    click.echo("error: terminated (SIGTERM)", err=True)
                    sys.exit(143)
                click.echo("error: interrupted", err=True)
                sys.exit(130)
            if isinstance(error, AimError):
                click.echo(f"error: {error}", err=True)
                sys.exit(2)
            raise


@click.group(cls=_AimGroup)
@click.version_option(package_name="mergekit-aim")
def main() -> None:
    """Activation-Informed Merging (AIM, arXiv 2502.02421) for mergekit."""


def calibration_options(func):
    """Options shared by `calibrate` and `relax` (when it calibrates).

    Defaults and choices come from CalibrationConfig, the one source of them.
    """
    fields = CalibrationConfig.model_fields

    def default(name):
        return fields[name].default

    options = [
        click.option(
            "--dataset",
            default=default("dataset"),
            show_default=True,
            help="pile-val | builtin | local .txt/.jsonl/.parquet | HF dataset id",
        ),
        click.option("--split", default=default("split"), help="dataset split"),
        click.option(
            "--text-column",
            default=default("text_column"),
            help="column holding the text",
        ),
        click.option(
            "--num-samples", default=default("num_samples"), show_default=True, type=int
        ),
        click.option(
            "--seq-len", default=default("seq_len"), show_default=True, type=int
        ),
        click.option("--seed", default=default("seed"), show_default=True, type=int),
        click.option(
            "--batch-size", default=default("batch_size"), show_default=True, type=int
        ),
        # CalibrationConfig's device is None ("unset") so that a merge can take
        # mergekit's own --device/--cuda; this command has no such second
        # source, so it states the fallback calibrate() would use anyway, and
        # --help shows it.
        click.option(
            "--device",
            default=default("device") or FALLBACK_DEVICE,
            show_default=True,
        ),
        click.option(
            "--dtype",
            default=default("dtype"),
            show_default=True,
            type=click.Choice(get_args(fields["dtype"].annotation)),
        ),
        click.option("--trust-remote-code", is_flag=True, default=False),
        click.option(
            "--bos-per-block",
            default=setting_text(default("bos_per_block")),
            show_default=True,
            type=click.Choice(BOS_PER_BLOCK_CHOICES, case_sensitive=False),
            help="start every block with BOS: auto = when the tokenizer adds one "
            "to every text (Gemma, Llama); false = the paper's exact packing",
        ),
        click.option(
            "--max-memory",
            default=default("max_memory"),
            help="cap on weight memory per device and CPU (e.g. 8GiB); the rest is "
            "offloaded to disk",
        ),
        click.option(
            "--offload-dir",
            default=default("offload_dir"),
            type=click.Path(file_okay=False),
            help="where offloaded weights go (default: a temporary directory)",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _calibrate(base: str, quiet: bool, trust_remote_code: bool, **settings):
    """Run calibrate() with the calibration options (CalibrationConfig fields)."""
    from mergekit_aim.calibration import calibrate
    from mergekit_aim.calibration.settings import calibration_config
    from mergekit_aim.console import quiet_transformers

    # calibration_config validates like CalibrationConfig(**settings), but
    # reports an invalid option as an AimError (one line, exit status 2).
    config = calibration_config(**settings)
    with quiet_transformers() if quiet else contextlib.nullcontext():
        return calibrate(base, config, trust_remote_code=trust_remote_code, quiet=quiet)


@main.command()
@click.argument("base")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@calibration_options
@click.option("--quiet", "-q", is_flag=True, help="no progress bar or log lines")
@click.option("--verbose", "-v", count=True)
def calibrate(base: str, output: str, quiet: bool, verbose: int, **settings) -> None:
    """Measure BASE's input activations and write an importance artifact."""
    from mergekit_aim.calibration.distributed import ranks_from_env
    from mergekit_aim.output import check_target

    _setup_logging(quiet, verbose)
    check_target(output, directory=False)
    importance = _calibrate(base, quiet, **settings)
    if not ranks_from_env().is_main:
        return  # every rank holds the combined result; rank 0 writes it
    path = importance.save(output)
    if not quiet:
        click.echo(f"wrote {path} ({len(importance)} tensors)")


@main.command()
@click.option("--base", "base", required=True, help="base model directory")
@click.option("--merged", "merged", required=True, help="merged model directory")
@click.option("--importance", default=None, help="artifact path or Hub repo")
@click.option("--omega", default=0.4, show_default=True, type=float)
@click.option("--exclude", multiple=True, help="regex of tensor names to leave alone")
@calibration_options
@click.option("--quiet", "-q", is_flag=True)
@click.option("--verbose", "-v", count=True)
@click.argument("out", type=click.Path(file_okay=False))
def relax(
    base: str,
    merged: str,
    importance: str | None,
    omega: float,
    exclude: tuple,
    out: str,
    quiet: bool,
    verbose: int,
    **settings,
) -> None:
    """Apply AIM to an already-merged checkpoint MERGED, writing OUT.

    Without --importance, BASE is calibrated first (calibration options apply).
    """
    from mergekit_aim.errors import AimConfigError
    from mergekit_aim.kernels import omega_value
    from mergekit_aim.offline import load_importance, output_bytes, relax_checkpoint
    from mergekit_aim.output import check_space, check_target

    _setup_logging(quiet, verbose)
    try:
        omega = omega_value(omega)
    except ValueError as error:
        raise AimConfigError(f"--omega: {error}") from None
    check_target(out, directory=True)
    if Path(merged).is_dir():  # before calibrating; checked again before writing
        check_space(out, output_bytes(merged))
    if importance is not None:
        imap = load_importance(importance)
        source = importance
    else:
        imap = _calibrate(base, quiet, **settings)
        source = f"calibrated on {settings['dataset']}"
    report = relax_checkpoint(
        base, merged, imap, omega, out, exclude=exclude, source=source
    )
    if not quiet:
        from mergekit_aim.relaxation import elements_text

        click.echo(
            f"wrote {out}: relaxed {report['relaxed']} of {report['tensors']} "
            f"tensors at omega {omega:g}; {elements_text(report['coverage'])}"
        )


def _omega_setting(text: str):
    """``--omega`` of the adapter commands: any ``aim: {omega: ...}`` value
    written as YAML/JSON (``0.4``, ``[0.2, 0.6]``, ``[{filter: mlp, value:
    0.3}, {value: 0.5}]``); :class:`~mergekit_aim.selection.Selection` checks it."""
    import yaml as yaml_lib

    from mergekit_aim.errors import AimConfigError

    try:
        return yaml_lib.safe_load(text)
    except yaml_lib.YAMLError as error:
        raise AimConfigError(f"--omega {text!r}: not a YAML value ({error})") from None


@main.command("relax-adapter")
@click.option("--base", "base", required=True, help="base model directory")
@click.option(
    "--adapter",
    required=True,
    help="PEFT adapter directory (or one holding several named adapters)",
)
@click.option("--importance", required=True, help="artifact path or Hub repo")
@click.option(
    "--omega",
    default="0.4",
    show_default=True,
    help="a scalar, a gradient list ([0.2, 0.6]) or a filtered list, as in aim:",
)
@click.option("--exclude", multiple=True, help="regex of tensor names to leave alone")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--verbose", "-v", count=True)
@click.argument("out", type=click.Path(file_okay=False))
def relax_adapter(
    base: str,
    adapter: str,
    importance: str,
    omega: str,
    exclude: tuple,
    out: str,
    quiet: bool,
    verbose: int,
) -> None:
    """Apply AIM to a LoRA ADAPTER of BASE, writing a PEFT adapter to OUT.

    lora_A's input columns are scaled by AIM's factor: the rank, config and
    size stay, and the merged weights equal `relax` on the merged original.
    """
    from mergekit_aim.adapters import relax_adapter as run
    from mergekit_aim.adapters import require_peft
    from mergekit_aim.offline import load_importance

    _setup_logging(quiet, verbose)
    require_peft()
    reports = run(
        base,
        adapter,
        load_importance(importance),
        _omega_setting(omega),
        out,
        exclude=exclude,
        source=importance,
    )
    if not quiet:
        from mergekit_aim.relaxation import elements_text

        for name, report in reports.items():
            click.echo(
                f"wrote {Path(out) / name}: relaxed {report['relaxed']} of "
                f"{report['tensors']} adapted tensors; "
                f"{elements_text(report['coverage'])}"
            )


@main.command("tune-adapter")
@click.option("--base", "base", required=True, help="base model directory")
@click.option("--adapter", required=True, help="PEFT LoRA adapter directory")
@click.option("--importance", required=True, help="artifact path or Hub repo")
@click.option(
    "--eval",
    "evals",
    multiple=True,
    required=True,
    metavar="NAME=FILE",
    help="held-out eval set (repeatable), as for tune",
)
@click.option("--omega", "omegas", default="0,0.2,0.4,0.6,0.8,1.0", show_default=True)
@click.option("--split-attention-mlp", is_flag=True)
@click.option("--exclude", multiple=True, help="regex of tensor names to leave alone")
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--dtype", default="auto", show_default=True, type=click.Choice(CALIBRATION_DTYPES)
)
@click.option("--seq-len", default=512, show_default=True, type=int)
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--quiet", "-q", is_flag=True)
@click.option("--verbose", "-v", count=True)
@click.argument("out", type=click.Path(file_okay=False))
def tune_adapter(
    base: str,
    adapter: str,
    importance: str,
    evals: tuple[str, ...],
    omegas: str,
    out: str,
    quiet: bool,
    verbose: int,
    **settings,
) -> None:
    """Pick ω for a LoRA ADAPTER of BASE as `tune` does; write it relaxed to OUT."""
    from mergekit_aim.adapters import require_peft
    from mergekit_aim.offline import load_importance
    from mergekit_aim.tuning import parse_omegas
    from mergekit_aim.tuning.adapter import tune_adapter as run
    from mergekit_aim.tuning.evaluation import parse_eval_spec

    _setup_logging(quiet, verbose)
    require_peft()
    files = dict(parse_eval_spec(spec) for spec in evals)
    result = run(
        base,
        adapter,
        load_importance(importance),
        files,
        out,
        omegas=parse_omegas(omegas),
        **settings,
    )
    click.echo(result.to_markdown())
    click.echo(f"wrote {out} (ω {result.chosen.label()})")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "--eval",
    "evals",
    multiple=True,
    metavar="NAME=FILE",
    help="held-out eval set (repeatable): .txt (documents separated by blank "
    "lines) or .jsonl (a 'text' field per line)",
)
@click.option(
    "--omega",
    "omegas",
    default="0,0.2,0.4,0.6,0.8,1.0",
    show_default=True,
    help="comma-separated candidate ω in [0, 1]; 1 (the plain merge) is always added",
)
@click.option(
    "--importance",
    default=None,
    help="importance artifact (path or Hub repo); needed when CONFIG has no aim: "
    "block, and replaces the block's importance/calibration when given",
)
@click.option(
    "--split-attention-mlp",
    is_flag=True,
    help="tune two ω: one for MLP weights, one for all other relaxed weights "
    "(attention, norms, LM head); the grid is every pair of --omega values",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="for evaluation, the plain merge's arithmetic and calibration",
)
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(CALIBRATION_DTYPES),
    help="evaluation dtype (auto: float32 on CPU, the checkpoint's elsewhere)",
)
@click.option("--seq-len", default=512, show_default=True, type=int)
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--random-seed", default=None, type=int, help="for the plain merge")
@click.option(
    "--lm-eval",
    "lm_eval",
    default=None,
    metavar="TASK[,TASK…]",
    help="lm-evaluation-harness tasks every candidate is also scored by "
    "(needs the extra: pip install 'mergekit-aim[eval]')",
)
@click.option(
    "--lm-eval-include-path",
    default=None,
    type=click.Path(file_okay=False),
    help="a directory of your own lm-eval task YAMLs",
)
@click.option(
    "--lm-eval-limit",
    default=None,
    type=int,
    help="score at most N documents of each lm-eval task",
)
@click.option(
    "--objective",
    default=None,
    metavar="METRIC",
    help="what the pick maximises among eligible candidates: 'loss' (the --eval "
    "sets' mean relative loss change; the default with --eval), an --eval set, "
    "or an lm-eval TASK/METRIC (a task alone when it has one metric)",
)
@click.option(
    "--keep",
    "keep",
    multiple=True,
    metavar="METRIC[=TOLERANCE]",
    help="skill floor (repeatable): a candidate more than TOLERANCE (default 0, "
    "in the metric's units) worse than the plain merge on METRIC is not picked",
)
@click.option("--quiet", "-q", is_flag=True, help="only the table and errors")
@click.option("--verbose", "-v", count=True)
@click.argument("out", type=click.Path(file_okay=False))
def tune(
    config: str,
    evals: tuple[str, ...],
    omegas: str,
    out: str,
    quiet: bool,
    verbose: int,
    lm_eval: str | None,
    keep: tuple[str, ...],
    **settings,
) -> None:
    """Merge CONFIG once without AIM, pick ω on held-out data, write it to OUT.

    Every candidate is the plain merge relaxed at that ω (in memory), scored by
    mean token NLL on each --eval set and by each --lm-eval task's metrics.
    Eligible: the plain merge, and candidates within each --keep floor of it.
    Among those the best --objective wins (by default the mean over eval sets
    of (L(ω) − L_base) / L_base, lowest); ties go to the larger ω. CONFIG's
    aim: block supplies the importance (or calibration, cached) and exclude;
    its omega is ignored. OUT gets the chosen model, aim_tune.json and
    aim_tune.md.
    """
    from mergekit_aim.errors import AimConfigError
    from mergekit_aim.tuning import parse_omegas
    from mergekit_aim.tuning import tune as run_tune
    from mergekit_aim.tuning.evaluation import parse_eval_spec
    from mergekit_aim.tuning.search import parse_keep

    _setup_logging(quiet, verbose)
    tasks: list[str] = []
    if lm_eval is not None:
        from mergekit_aim.tuning.harness import parse_tasks, require_lm_eval

        tasks = parse_tasks(lm_eval)
        require_lm_eval()
    files: dict[str, Path] = {}
    for spec in evals:
        name, path = parse_eval_spec(spec)
        if name in files:
            raise AimConfigError(f"--eval: the name {name!r} is given twice")
        files[name] = path
    result = run_tune(
        config,
        files,
        Path(out),
        omegas=parse_omegas(omegas),
        quiet=quiet,
        lm_eval_tasks=tasks,
        keep=parse_keep(keep),
        **settings,
    )
    click.echo(result.to_markdown())
    click.echo(
        f"wrote {out} (ω {result.chosen.label()}), {Path(out) / 'aim_tune.json'} "
        f"and {Path(out) / 'aim_tune.md'}"
    )


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def yaml(ctx: click.Context) -> None:
    """Run mergekit-yaml with the plugin explicitly active.

    Usage: mergekit-aim yaml CONFIG OUT [mergekit-yaml options]
    """
    from mergekit_aim.plugin import activate

    activate()
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    mergekit_yaml.main(args=list(ctx.args), prog_name="mergekit-aim yaml")


@main.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path())
@click.option(
    "--toy",
    is_flag=True,
    help="tiny models built on the spot instead of SmolLM2-135M (about a minute)",
)
@click.option("--quick", is_flag=True, help="with --toy: smaller models, fewer steps")
@click.option(
    "--base",
    default=None,
    type=click.Path(file_okay=False),
    help="the SmolLM2-135M checkpoint (default: $MERGEKIT_AIM_REAL_MODELS/"
    "smollm2-135m or .real-models/smollm2-135m, as `make real-models` writes it)",
)
@click.option("--seed", default=0, show_default=True, type=int)
def demo(out: str, toy: bool, quick: bool, base: str | None, seed: int) -> None:
    """Fine-tune two experts, merge them with TIES with and without AIM, compare.

    By default on SmolLM2-135M (provisioned offline by `make real-models`):
    a code and a math expert are fine-tuned on the CPU (cached for later
    runs), the base is calibrated (cached), the experts are merged through
    mergekit twice, and every model's held-out loss on code, math and general
    text is printed in one table. --toy does the same with tiny models.
    """
    from mergekit_aim.demo import main as run_demo_cli
    from mergekit_aim.errors import AimConfigError

    if quick and not toy:
        raise AimConfigError("--quick applies to the toy demo: add --toy")
    if base is not None and toy:
        raise AimConfigError("--base applies to the real-model demo, not --toy")
    _setup_logging(False)
    run_demo_cli(Path(out), toy=toy, quick=quick, seed=seed, base=base)


@main.command()
@click.argument("artifacts", nargs=-1, required=True, metavar="ARTIFACT [ARTIFACT]")
@click.option(
    "--model",
    default=None,
    help="a model directory (or Hub id): report which of its weights the "
    "artifact covers, as a merge would",
)
@click.option(
    "--tensors", is_flag=True, help="add one line per tensor to the layer summary"
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="machine-readable output instead (one artifact: its summary and "
    "provenance; two: the per-tensor comparison)",
)
def inspect(
    artifacts: tuple[str, ...], model: str | None, tensors: bool, as_json: bool
) -> None:
    """Summarise an importance artifact, or compare two of one model.

    With one ARTIFACT: its provenance (model, dataset, dtype, when), a
    per-layer summary (tokens seen, mean s = a / max(a), max/median of the
    channel statistic a, outlier channels) and a verdict on what AIM will do
    with it. An outlier channel is one whose a is more than 8x its tensor's
    median; a tensor is flat when max/median is below 3 (AIM then scales its
    merge delta almost uniformly). With --model, which of the model's weights
    the artifact covers.

    With two ARTIFACTs of the same model: per-tensor Spearman rank
    correlation and top-1% channel overlap of s, per layer, to see whether
    another calibration set changes anything. Artifacts of different models
    are refused.
    """
    from mergekit_aim import inspection
    from mergekit_aim.errors import AimConfigError

    if len(artifacts) > 2:
        raise AimConfigError(
            f"inspect takes one artifact, or two to compare; got {len(artifacts)}"
        )
    maps = [inspection.load_artifact(spec) for spec in artifacts]
    if len(maps) == 2:
        if model is not None or tensors:
            raise AimConfigError(
                "--model and --tensors apply to one artifact, not a comparison"
            )
        comparison = inspection.compare(*maps)
        if as_json:
            click.echo(json.dumps(comparison.to_json(), indent=2, sort_keys=True))
        else:
            click.echo(comparison.text())
        return
    imap = maps[0]
    coverage = inspection.model_coverage(imap, model) if model else None
    if not as_json:
        click.echo(inspection.describe(imap, tensors=tensors))
        if coverage is not None:
            click.echo("")
            click.echo(coverage.text())
        return
    summary = imap.summary()
    if tensors:
        summary["tensor_list"] = {
            name: {
                "channels": imap[name].numel(),
                "tokens": imap.count(name),
                "input_axis": imap.input_axis(name),
            }
            for name in imap
        }
    if coverage is not None:
        summary["coverage"] = coverage.to_json()
    click.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))


if __name__ == "__main__":
    main()
