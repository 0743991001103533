"""aim_relax_: in place, equal to aim_relax, refusing what it must not write."""

from __future__ import annotations

import pytest
import torch
from kernel_backends import BACKENDS
from test_kernel_aim_relax import make, statistic

from mergekit_aim.kernels import aim_relax, aim_relax_


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("shape", "axis", "layout"),
    [
        ((7, 257), -1, "contiguous"),
        ((257, 7), 0, "contiguous"),
        ((33,), 0, "contiguous"),
        ((3, 5, 9), 1, "contiguous"),
        ((9, 13), -1, "transposed"),
        ((3, 5, 9), 1, "permuted"),
    ],
)
def test_in_place_equals_out_of_place(backend, dtype, shape, axis, layout):
    base = make(shape, dtype, 1)
    merged = make(shape, dtype, 2)
    if layout == "transposed":
        base, merged = base.t(), merged.t()
    elif layout == "permuted":
        base, merged = base.permute(2, 0, 1), merged.permute(2, 0, 1)
        axis = 2
    stat = statistic(merged.shape[axis])
    # The same implementation out of place (on CPU, "auto" runs the torch one).
    same = "torch" if backend == "auto" else backend
    expected = aim_relax(base, merged, stat, 0.3, axis, backend=same)
    base_before = base.clone()
    result = aim_relax_(merged, base, stat, 0.3, axis, backend=backend)
    assert result is merged
    torch.testing.assert_close(merged, expected, rtol=0, atol=0)
    assert torch.equal(base, base_before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refuses_shared_or_broadcast_memory(backend):
    base = make((4, 8), torch.float32, 1)
    stat = statistic(8)
    with pytest.raises(ValueError, match="shares memory with base"):
        aim_relax_(base, base, stat, 0.4, backend=backend)
    with pytest.raises(ValueError, match="shares memory with base"):
        aim_relax_(base.view(8, 4).view(4, 8), base, stat, 0.4, backend=backend)
    expanded = make((1, 8), torch.float32, 2).expand(4, 8)
    with pytest.raises(ValueError, match="broadcast"):
        aim_relax_(expanded, base, stat, 0.4, backend=backend)


def test_op_is_registered_and_traceable():
    base = make((4, 8), torch.float32, 1)
    merged = make((4, 8), torch.float32, 2)
    stat = statistic(8)
    expected = aim_relax(base, merged, stat, 0.5)
    torch.ops.mergekit_aim.aim_relax_(merged, base, stat, 0.5, -1)
    torch.testing.assert_close(merged, expected, rtol=0, atol=0)
    torch.library.opcheck(
        torch.ops.mergekit_aim.aim_relax_.default,
        (make((4, 8), torch.float32, 3), base, stat, 0.5, -1),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("shape", "axis"), [((64, 300), -1), ((300, 64), 0)])
def test_cuda_in_place_equals_out_of_place(shape, axis):
    base = make(shape, torch.bfloat16, 1).cuda()
    merged = make(shape, torch.bfloat16, 2).cuda()
    stat = statistic(shape[axis]).cuda()
    expected = aim_relax(base, merged, stat, 0.4, axis)
    aim_relax_(merged, base, stat, 0.4, axis)
    torch.testing.assert_close(merged, expected, rtol=0, atol=0)
