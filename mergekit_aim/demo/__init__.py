"""``mergekit-aim demo``: TIES with and without AIM, offline, in one table.

By default on a real pretrained model (:mod:`mergekit_aim.demo.real`:
SmolLM2-135M and two experts fine-tuned from it on code and on arithmetic);
``--toy`` on tiny models built on the spot (:mod:`mergekit_aim.demo.toy`).
Only the command line imports this package.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from mergekit_aim.demo.common import DemoResult


def main(
    out_dir: Path,
    *,
    toy: bool = False,
    quick: bool = False,
    seed: int = 0,
    base: str | os.PathLike | None = None,
) -> DemoResult:
    """Run a demo and print its table (the ``mergekit-aim demo`` command).

    The output is written like every command's (:mod:`mergekit_aim.output`):
    free space checked first, everything staged beside ``out_dir`` and moved
    into it at the end, nothing left behind on an error or an interrupt. The
    fine-tuned experts live in the cache and survive an interrupted run.
    """
    from mergekit_aim.output import staged_directory

    out_dir = Path(out_dir)
    if toy:
        from mergekit_aim.demo import toy as module

        needed = None  # tiny models: a few MB

        def run(stage: Path) -> DemoResult:
            return module.run_demo(stage, quick=quick, seed=seed)

    else:
        from mergekit_aim.demo import real as module

        settings = (
            module.DEFAULT
            if seed == module.DEFAULT.seed
            else module.RealSettings(seed=seed)
        )
        # Two merged models of the base's size, and the small reports.
        base_dir = module.find_base(base)
        needed = 2 * sum(p.stat().st_size for p in base_dir.glob("*.safetensors"))
        needed += 2**20

        def run(stage: Path) -> DemoResult:
            return module.run_real_demo(stage, base=base, settings=settings)

    with staged_directory(out_dir, needed) as stage:
        result = run(stage)
        _name_final_directory(stage, out_dir)
    result = _moved(result, stage, out_dir)
    print(module.report(result))
    print(f"Wrote {out_dir}/results.md and {out_dir}/results.json.")
    return result


def _moved(result: DemoResult, stage: Path, out_dir: Path) -> DemoResult:
    """``result`` with its paths in ``stage`` named where they now are."""

    def move(path: Path) -> Path:
        path = Path(path)
        return out_dir / path.relative_to(stage) if path.is_relative_to(stage) else path

    return dataclasses.replace(
        result,
        out_dir=out_dir,
        models={row: move(path) for row, path in result.models.items()},
        importance=move(result.importance),
    )


def _name_final_directory(stage: Path, out_dir: Path) -> None:
    """Reports written in ``stage`` name the directory they will end up in."""
    for name in ("results.md", "results.json"):
        report = stage / name
        if report.is_file():
            report.write_text(report.read_text().replace(str(stage), str(out_dir)))
