"""aim_relax: both backends against a float64 reference of the AIM formula."""

from __future__ import annotations

import math

import pytest
import torch
from fixtures.reference import aim_reference
from kernel_backends import BACKENDS, needs_interpreter

from mergekit_aim.kernels import _torch, aim_relax

# Half an ulp of the output dtype, doubled for the float32 arithmetic before it.
RTOL = {torch.float32: 4e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def make(shape, dtype, seed) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype)


def statistic(n: int, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=gen) * 50


def check(out, base, merged, importance, omega, axis) -> None:
    assert out.dtype == merged.dtype
    assert out.shape == merged.shape
    expected = aim_reference(base, merged, importance, omega, axis)
    torch.testing.assert_close(
        out.double(), expected, rtol=RTOL[merged.dtype], atol=1e-5
    )


CASES = [  # (shape, input_axis)
    ((7, 257), -1),  # Linear [out, in]
    ((7, 257), 1),
    ((257, 7), 0),  # GPT-2 Conv1D [in, out]
    ((1,), 0),  # norm weights: elementwise
    ((257,), -1),
    ((1, 1), -1),
    ((3, 5, 9), 1),  # N-D with a middle input axis
    ((4, 6, 9), -3),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ],
    ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""),
)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("omega", [0.0, 0.4, 1.0])
def test_matches_reference(backend, dtypes, case, omega):
    shape, axis = case
    base, merged = make(shape, dtypes[0], 1), make(shape, dtypes[1], 2)
    importance = statistic(shape[axis])
    out = aim_relax(base, merged, importance, omega, axis, backend=backend)
    check(out, base, merged, importance, omega, axis % len(shape))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base = make((257, 7), torch.float32, 1).t()  # [7, 257], column-major
    merged = make((7, 514), torch.bfloat16, 2)[:, ::2]
    importance = statistic(771)[::3]
    out = aim_relax(base, merged, importance, 0.4, -1, backend=backend)
    assert out.is_contiguous()
    check(out, base, merged, importance, 0.4, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_fusable_nd_weight(backend):
    base = make((4, 5, 6), torch.float32, 1).permute(2, 0, 1)  # [6, 4, 5]
    merged = make((6, 4, 10), torch.float16, 2)[..., ::2]
    importance = statistic(4)
    out = aim_relax(base, merged, importance, 0.3, 1, backend=backend)
    check(out, base, merged, importance, 0.3, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_statistic_keeps_merged(backend, dtype):
    base, merged = make((5, 33), dtype, 1), make((5, 33), dtype, 2)
    out = aim_relax(base, merged, torch.zeros(33), 0.0, -1, backend=backend)
    assert not out.isnan().any()
    torch.testing.assert_close(out, merged, rtol=RTOL[dtype], atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_most_salient_channel_returns_to_base_at_omega_zero(backend):
    base = make((9, 33), torch.bfloat16, 1)
    merged = make((9, 33), torch.bfloat16, 2)
    importance = statistic(33)
    top = int(importance.argmax())
    out = aim_relax(base, merged, importance, 0.0, -1, backend=backend)
    assert torch.equal(out[:, top], base[:, top])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_and_mean_statistics_agree_and_sign_is_ignored(backend):
    base, merged = make((6, 17), torch.float32, 1), make((6, 17), torch.float32, 2)
    total = statistic(17)
    by_sum = aim_relax(base, merged, total, 0.4, -1, backend=backend)
    by_mean = aim_relax(base, merged, total / 4096, 0.4, -1, backend=backend)
    by_negated = aim_relax(base, merged, -total.double(), 0.4, -1, backend=backend)
    torch.testing.assert_close(by_sum, by_mean)
    torch.testing.assert_close(by_sum, by_negated)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_not_modified_and_output_is_new(backend):
    base, merged = make((7, 33), torch.bfloat16, 1), make((7, 33), torch.bfloat16, 2)
    importance = statistic(33)
    saved = [t.clone() for t in (base, merged, importance)]
    out = aim_relax(base, merged, importance, 0.0, -1, backend=backend)
    for t, before in zip((base, merged, importance), saved, strict=True):
        assert torch.equal(t, before)
    assert out.data_ptr() not in (base.data_ptr(), merged.data_ptr())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_weight(backend):
    out = aim_relax(
        torch.empty(0, 4), torch.empty(0, 4), statistic(4), 0.5, -1, backend=backend
    )
    assert out.shape == (0, 4)


@pytest.mark.parametrize("block_elems", [1, 5, 64])
@pytest.mark.parametrize("case", [((6, 17), -1), ((17, 6), 0), ((3, 4, 5), 1)], ids=str)
def test_torch_blocks_cover_everything(monkeypatch, block_elems, case):
    monkeypatch.setattr(_torch, "BLOCK_ELEMS", block_elems)
    shape, axis = case
    base, merged = make(shape, torch.float32, 1), make(shape, torch.bfloat16, 2)
    importance = statistic(shape[axis])
    out = aim_relax(base, merged, importance, 0.25, axis, backend="torch")
    check(out, base, merged, importance, 0.25, axis % len(shape))


@needs_interpreter
@pytest.mark.parametrize(
    "case", [((300, 3), -1), ((3, 300), 0), ((20, 3, 70), 1)], ids=str
)
def test_triton_tiles(case):
    # Shapes whose tiles are ragged in both dims and span several programs.
    shape, axis = case
    base, merged = make(shape, torch.float16, 1), make(shape, torch.float16, 2)
    importance = statistic(shape[axis])
    out = aim_relax(base, merged, importance, 0.6, axis, backend="triton")
    check(out, base, merged, importance, 0.6, axis % len(shape))


def _args(**change):
    args = {
        "base": torch.zeros(4, 6),
        "merged": torch.ones(4, 6),
        "importance": torch.ones(6),
        "omega": 0.4,
        "input_axis": -1,
    }
    args.update(change)
    return args


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "change, match",
    [
        ({"importance": torch.ones(5)}, "5 entries .* size 6"),
        ({"input_axis": 0}, "6 entries .* size 4"),
        ({"input_axis": 2}, "out of range"),
        ({"input_axis": -3}, "out of range"),
        ({"omega": -0.1}, r"omega must be within \[0, 1\]"),
        ({"omega": 1.5}, r"omega must be within \[0, 1\]"),
        ({"omega": math.nan}, r"omega must be within \[0, 1\]"),
        ({"omega": "high"}, r"omega must be a number in \[0, 1\]"),
        ({"omega": True}, "not a boolean"),
        ({"base": torch.zeros(4, 7)}, r"base shape \(4, 7\) differs"),
        ({"importance": torch.ones(1, 6)}, "importance must be 1-D"),
        ({"merged": torch.ones(4, 6, dtype=torch.int64)}, "merged must be"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_refusals(backend, change, match):
    with pytest.raises(ValueError, match=match):
        aim_relax(**_args(**change), backend=backend)


def test_omega_accepts_ints():
    out = aim_relax(**_args(omega=1))
    assert torch.equal(out, torch.ones(4, 6))


@needs_interpreter
@pytest.mark.parametrize(
    "fused_max_len", [4096, 8], ids=["max-in-kernel", "max-launch"]
)
@pytest.mark.parametrize(
    "special",
    ["none", "zeros", "nan", "inf", "negative"],
)
def test_triton_factor_matches_formula(monkeypatch, fused_max_len, special):
    # The Triton kernel computes f itself (reducing max|a| in the kernel when
    # a is short, else by one launch): it must follow relax_factor, NaN, Inf
    # and all-zero statistics included.
    from mergekit_aim.kernels import _ops, relax_factor

    monkeypatch.setattr(_ops._triton_impl(), "FUSED_MAX_LEN", fused_max_len)
    shape = (5, 33)
    base, merged = make(shape, torch.float32, 1), make(shape, torch.float32, 2)
    importance = statistic(33)
    if special == "zeros":
        importance.zero_()
    elif special == "nan":
        importance[7] = math.nan
    elif special == "inf":
        importance[7] = math.inf
    elif special == "negative":
        importance[3] = -100.0
    out = aim_relax(base, merged, importance, 0.3, -1, backend="triton")
    f = relax_factor(importance, 0.3)
    want = base + (merged - base) * f
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_omega_one_is_the_plain_merge_exactly(backend):
    base, merged = make((9, 70), torch.bfloat16, 1), make((9, 70), torch.bfloat16, 2)
    out = aim_relax(base * 1e4, merged, statistic(70), 1.0, -1, backend=backend)
    assert torch.equal(out, merged)
