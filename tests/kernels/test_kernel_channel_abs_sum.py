"""channel_abs_sum / channel_abs_sum_: both backends against a float64 reference."""

from __future__ import annotations

import pytest
import torch
from kernel_backends import BACKENDS, needs_interpreter

from mergekit_aim.kernels import _torch, channel_abs_sum, channel_abs_sum_

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def reference(x: torch.Tensor) -> torch.Tensor:
    x64 = x.double().abs()
    if x.dim() == 1:
        return x64
    return x64.sum(dim=tuple(range(x.dim() - 1)))


def make(shape, dtype, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 3).to(dtype)


def check(result: torch.Tensor, x: torch.Tensor) -> None:
    assert result.dtype == torch.float32
    assert result.shape == (x.shape[-1],)
    torch.testing.assert_close(result.double(), reference(x), rtol=1e-5, atol=1e-5)


SHAPES = [(1,), (7,), (257,), (1, 1), (7, 257), (257, 7), (3, 5, 257), (2, 3, 4, 33)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_contiguous(backend, dtype, shape):
    x = make(shape, dtype)
    check(channel_abs_sum(x, backend=backend), x)


VIEWS = {
    "transpose_leading": lambda t: t.transpose(0, 1),
    "step_slice": lambda t: t[:, 1::3],
    "channel_step": lambda t: t[..., ::2],
    "channels_strided": lambda t: t.transpose(1, 2),
    "permuted_sliced": lambda t: t.permute(1, 2, 0)[::2, 1:],
    "broadcast": lambda t: t[:1].expand(4, -1, -1),
    "negative_offset_slice": lambda t: t[1:, 2:-1, 3:],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("view", sorted(VIEWS))
def test_non_contiguous_views(backend, dtype, view):
    x = VIEWS[view](make((3, 11, 37), dtype))
    check(channel_abs_sum(x, backend=backend), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_four_strided_leading_dims(backend):
    # Leading dims that cannot fuse into two: the Triton path walks them on the host.
    x = make((3, 4, 5, 6, 9), torch.float32)[:, ::2, :, ::2, 1:]
    check(channel_abs_sum(x, backend=backend), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (2, 0, 5), (4, 0)], ids=str)
def test_empty(backend, shape):
    x = torch.empty(shape, dtype=torch.bfloat16)
    result = channel_abs_sum(x, backend=backend)
    assert result.shape == (shape[-1],)
    assert not result.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_accumulates(backend, dtype):
    x1, x2 = make((2, 9, 33), dtype, 1), make((5, 33), dtype, 2)
    start = torch.linspace(0, 1, 33)
    acc = start.clone()
    assert channel_abs_sum_(acc, x1, backend=backend) is acc
    channel_abs_sum_(acc, x2, backend=backend)
    expected = start.double() + reference(x1) + reference(x2)
    torch.testing.assert_close(acc.double(), expected, rtol=1e-5, atol=1e-5)


def test_inplace_op_is_registered():
    x = make((4, 9), torch.float16)
    acc = torch.zeros(9)
    torch.ops.mergekit_aim.channel_abs_sum_(acc, x)
    check(acc, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_not_modified(backend):
    x = make((3, 7, 257), torch.bfloat16)[:, ::2]
    before = x.clone()
    channel_abs_sum(x, backend=backend)
    channel_abs_sum_(torch.zeros(257), x, backend=backend)
    assert torch.equal(x, before)


@pytest.mark.parametrize("block_elems", [1, 7, 64, 1000])
@pytest.mark.parametrize("view", ["contiguous", "transposed", "sliced"])
def test_torch_blocks_cover_everything(monkeypatch, block_elems, view):
    # Tiny blocks make every tiling path (row steps, recursion, one row per block)
    # run on small tensors.
    monkeypatch.setattr(_torch, "BLOCK_ELEMS", block_elems)
    x = make((5, 6, 17), torch.float32)
    x = {"contiguous": x, "transposed": x.transpose(0, 1), "sliced": x[:, ::2, 1:]}[
        view
    ]
    check(channel_abs_sum(x, backend="torch"), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_elems", [None, 64])
def test_non_finite_input_stays_non_finite(monkeypatch, backend, block_elems):
    # Calibration detects activations that overflowed their dtype by the
    # non-finite sums they leave: no backend may drop or clamp inf and NaN.
    if block_elems is not None:
        monkeypatch.setattr(_torch, "BLOCK_ELEMS", block_elems)
    x = make((3, 40, 17), torch.float16)
    x[0, 3, 5] = float("inf")
    x[2, 39, 9] = float("nan")
    result = channel_abs_sum(x, backend=backend)
    assert result[5] == float("inf") and result[9].isnan()
    assert int(torch.isfinite(result).sum()) == 15


@needs_interpreter
def test_triton_row_splits():
    # Enough rows for several programs per column block and a ragged last split.
    x = make((2500, 7), torch.float16)
    check(channel_abs_sum(x, backend="triton"), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "x",
    [torch.ones(3, 4, dtype=torch.int32), torch.tensor(1.0)],
    ids=["int", "scalar"],
)
def test_bad_input(backend, x):
    with pytest.raises(ValueError, match="x must"):
        channel_abs_sum(x, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "acc, match",
    [
        (torch.zeros(5, dtype=torch.float64), "float32"),
        (torch.zeros(1, 5), "1-D"),
        (torch.zeros(4), "4 channels but x has 5"),
    ],
    ids=["dtype", "2d", "length"],
)
def test_bad_accumulator(backend, acc, match):
    with pytest.raises(ValueError, match=match):
        channel_abs_sum_(acc, torch.ones(3, 5), backend=backend)
