"""``mergekit-aim``: calibrate, relax, merge with a YAML config, demo, inspect."""

from __future__ import annotations

import json
import logging
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
    """Turn the package's own errors into one clear line and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AimError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)


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

    # calibration_config validates like CalibrationConfig(**settings), but
    # reports an invalid option as an AimError (one line, exit status 2).
    return calibrate(
        base,
        calibration_config(**settings),
        trust_remote_code=trust_remote_code,
        quiet=quiet,
    )


@main.command()
@click.argument("base")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@calibration_options
@click.option("--quiet", "-q", is_flag=True, help="no progress bar or log lines")
@click.option("--verbose", "-v", count=True)
def calibrate(base: str, output: str, quiet: bool, verbose: int, **settings) -> None:
    """Measure BASE's input activations and write an importance artifact."""
    from mergekit_aim.calibration.distributed import ranks_from_env

    _setup_logging(quiet, verbose)
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
    from mergekit_aim.offline import load_importance, relax_checkpoint

    _setup_logging(quiet, verbose)
    try:
        omega = omega_value(omega)
    except ValueError as error:
        raise AimConfigError(f"--omega: {error}") from None
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
@click.option("--quick", is_flag=True, help="smaller models and fewer steps")
@click.option("--seed", default=0, show_default=True, type=int)
def demo(out: str, quick: bool, seed: int) -> None:
    """Build tiny models, merge with TIES with and without AIM, compare (offline)."""
    from mergekit_aim.demo import main as run_demo_cli

    _setup_logging(False)
    run_demo_cli(Path(out), quick=quick, seed=seed)


@main.command()
@click.argument("artifact")
@click.option("--tensors", is_flag=True, help="list every tensor with its token count")
def inspect(artifact: str, tensors: bool) -> None:
    """Print an importance artifact's provenance and coverage as JSON."""
    from mergekit_aim.offline import load_importance

    imap = load_importance(artifact)
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
    click.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))


if __name__ == "__main__":
    main()
