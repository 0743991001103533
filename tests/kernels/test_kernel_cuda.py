"""Compiled Triton kernels on a real GPU (skipped without CUDA).

The suite runs under TRITON_INTERPRET=1, which would make Triton interpret these
kernels too; the GPU checks therefore run in a subprocess without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SCRIPT = """
import torch
from mergekit_aim.kernels import aim_relax, aim_relax_
from mergekit_aim.kernels import channel_abs_sum, channel_abs_sum_

dev = torch.device("cuda", torch.cuda.device_count() - 1)
gen = torch.Generator(device=dev).manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for shape in ((1,), (7, 257), (3, 1000, 129), (4096, 4096)):
        x = torch.randn(shape, device=dev, generator=gen).to(dtype)
        for view in (x, x[..., ::2], x.transpose(0, -1) if x.dim() > 1 else x):
            ref = view.double().abs()
            if view.dim() > 1:
                ref = ref.sum(dim=tuple(range(view.dim() - 1)))
            for backend in ("auto", "triton", "torch"):
                got = channel_abs_sum(view, backend=backend)
                torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
            acc = torch.ones(view.shape[-1], device=dev)
            channel_abs_sum_(acc, view, backend="triton")
            torch.testing.assert_close(acc.double(), ref + 1, rtol=1e-5, atol=1e-4)
    for shape, axis in (((7, 257), -1), ((257, 7), 0), ((257,), 0), ((4096, 1000), 1)):
        base = torch.randn(shape, device=dev, generator=gen).to(dtype)
        merged = torch.randn(shape, device=dev, generator=gen).to(dtype)
        stat = torch.rand(shape[axis], device=dev, generator=gen)
        want = aim_relax(base.cpu(), merged.cpu(), stat.cpu(), 0.4, axis, "torch")
        for backend in ("triton", "torch"):
            # The launch must follow the tensors, not the current device.
            with torch.cuda.device(0):
                got = aim_relax(base, merged, stat, 0.4, axis, backend=backend)
            torch.testing.assert_close(got.cpu(), want, rtol=2**-7, atol=1e-5)
        # In place on a shape class the autotuner has not seen: tuning runs the
        # kernel several times and must restore merged between runs.
        shape2 = tuple(n * 3 for n in shape)
        base = torch.randn(shape2, device=dev, generator=gen).to(dtype)
        merged = torch.randn(shape2, device=dev, generator=gen).to(dtype)
        stat = torch.rand(shape2[axis], device=dev, generator=gen)
        relaxed = merged.clone()
        aim_relax_(relaxed, base, stat, 0.3, axis, backend="triton")
        want = aim_relax(base, merged, stat, 0.3, axis, backend="triton")
        assert torch.equal(relaxed, want), (shape2, axis, dtype)
        # omega = 1 is the plain merge, exactly.
        assert torch.equal(aim_relax(base, merged, stat, 1.0, axis, "triton"), merged)
print("ok")
"""


def test_compiled_kernels_on_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
