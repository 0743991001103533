"""``mergekit-aim demo``: TIES with and without AIM, offline, in one table.

By default on a real pretrained model (:mod:`mergekit_aim.demo.real`:
SmolLM2-135M and two experts fine-tuned from it on code and on arithmetic);
``--toy`` on tiny models built on the spot (:mod:`mergekit_aim.demo.toy`).
Only the command line imports this package.
"""

from __future__ import annotations

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
    """Run a demo and print its table (the ``mergekit-aim demo`` command)."""
    if toy:
        from mergekit_aim.demo import toy as demo

        return demo.main(Path(out_dir), quick=quick, seed=seed)
    from mergekit_aim.demo import real

    settings = (
        real.DEFAULT if seed == real.DEFAULT.seed else real.RealSettings(seed=seed)
    )
    result = real.run_real_demo(Path(out_dir), base=base, settings=settings)
    print(real.report(result))
    print(f"Wrote {out_dir}/results.md and {out_dir}/results.json.")
    return result
