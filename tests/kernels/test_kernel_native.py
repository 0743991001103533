"""The native CPU relaxation: bit-identical to torch, built once, never silent."""

from __future__ import annotations

import logging
import subprocess

import pytest
import torch
from fixtures.native_compiler import needs_compiler
from test_kernel_aim_relax import make, statistic

from mergekit_aim.kernels import _native, aim_relax, aim_relax_, channel_abs_sum

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
LAYOUTS = [
    ((7, 257), -1),  # Linear [out, in]: the rows loop
    ((257, 7), 0),  # GPT-2 Conv1D [in, out]: the lines loop
    ((33,), 0),  # a norm weight
    ((3, 5, 9), 1),  # an inner axis
    ((2, 3, 4, 5), 3),
    ((1, 1), 0),
]


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """The native module with no library loaded, building into ``tmp_path``."""
    monkeypatch.setenv("MERGEKIT_AIM_CACHE", str(tmp_path))
    _native.reset()
    yield tmp_path
    _native.reset()


def with_specials(t: torch.Tensor) -> torch.Tensor:
    flat = t.view(-1)
    specials = [float("nan"), float("inf"), -float("inf"), 1e-40, -0.0, 3e38]
    flat[: len(specials)] = torch.tensor(specials)[: flat.numel()].to(t.dtype)
    return t


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal values and signs; NaN where the other has NaN (payloads may differ)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    nan = a.isnan()
    assert torch.equal(nan, b.isnan())
    assert torch.equal(a[~nan], b[~nan])
    assert torch.equal(a[~nan].signbit(), b[~nan].signbit())


@needs_compiler
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LAYOUTS, ids=str)
@pytest.mark.parametrize("omega", [0.0, 0.4, 0.75, 1.0])
def test_native_is_bit_identical_to_torch(dtype, case, omega):
    shape, axis = case
    base = with_specials(make(shape, dtype, 1))
    merged = make(shape, dtype, 2)
    merged.view(-1)[-1] = float("nan")
    importance = statistic(shape[axis])
    expected = aim_relax(base, merged, importance, omega, axis, backend="torch")
    native = aim_relax(base, merged, importance, omega, axis, backend="native")
    assert_bitwise_equal(native, expected)
    in_place = merged.clone()
    aim_relax_(in_place, base, importance, omega, axis, backend="native")
    assert_bitwise_equal(in_place, expected)


@needs_compiler
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_factor_near_one_half_rounds_like_torch(dtype):
    # torch's lerp switches formula at |f| = 0.5: the statistic is chosen so that
    # f = 1 - s(1 - ω) lands on both sides of it and on it exactly.
    omega = 0.0
    importance = torch.tensor([1.0, 0.5, 0.5 - 2**-20, 0.5 + 2**-20, 0.25, 0.0])
    base = make((4096, 6), dtype, 1)
    merged = make((4096, 6), dtype, 2) * 7
    expected = aim_relax(base, merged, importance, omega, -1, backend="torch")
    native = aim_relax(base, merged, importance, omega, -1, backend="native")
    assert_bitwise_equal(native, expected)


@needs_compiler
@pytest.mark.parametrize("case", [((301, 17), -1), ((17, 301), 0), ((5, 7, 11), 1)])
def test_threads_split_the_tensor_exactly(monkeypatch, case):
    """Ranges handed to several threads cover every element once, and the lines
    loop restarts its channel counter where each range begins."""
    shape, axis = case
    base, merged = make(shape, torch.bfloat16, 1), make(shape, torch.bfloat16, 2)
    importance = statistic(shape[axis])
    expected = aim_relax(base, merged, importance, 0.3, axis, backend="torch")
    calls = []
    split = _native._run_split

    def counting(units, unit_elems, call):
        calls.append(units)
        split(units, unit_elems, call)

    monkeypatch.setattr(_native, "MIN_ELEMS_PER_THREAD", 8)
    monkeypatch.setattr(_native, "_run_split", counting)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        native = aim_relax(base, merged, importance, 0.3, axis, backend="native")
    finally:
        torch.set_num_threads(threads)
    assert calls, "the native loop was not used"
    assert_bitwise_equal(native, expected)


@needs_compiler
def test_auto_uses_native_on_cpu(monkeypatch):
    used = []
    real = _native.aim_relax

    def spy(*args, **kwargs):
        used.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(_native, "aim_relax", spy)
    base, merged = make((8, 16), torch.bfloat16, 1), make((8, 16), torch.bfloat16, 2)
    importance = statistic(16)
    out = aim_relax(base, merged, importance, 0.4)
    aim_relax_(merged.clone(), base, importance, 0.4)
    assert len(used) == 2
    assert_bitwise_equal(out, aim_relax(base, merged, importance, 0.4, backend="torch"))


@needs_compiler
@pytest.mark.parametrize(
    ("base", "merged"),
    [
        (make((4, 6), torch.float64, 1), make((4, 6), torch.float64, 2)),
        (make((4, 6), torch.float32, 1), make((4, 6), torch.bfloat16, 2)),
        (make((6, 4), torch.float32, 1).t(), make((4, 6), torch.float32, 2)),
    ],
    ids=["float64", "mixed dtypes", "non-contiguous"],
)
def test_native_refuses_what_it_does_not_handle_and_auto_uses_torch(base, merged):
    importance = statistic(6)
    with pytest.raises(ValueError, match="backend='native' handles contiguous CPU"):
        aim_relax(base, merged, importance, 0.4, backend="native")
    expected = aim_relax(base, merged, importance, 0.4, backend="torch")
    assert torch.equal(aim_relax(base, merged, importance, 0.4), expected)


def test_channel_abs_sum_has_no_native_backend():
    with pytest.raises(ValueError, match="implements aim_relax and aim_relax_ only"):
        channel_abs_sum(torch.ones(3, 4), backend="native")


@needs_compiler
def test_library_is_built_once_per_cache(fresh_native, monkeypatch):
    builds = []
    real_run = subprocess.run

    def counting_run(command, *args, **kwargs):
        if "-shared" in command:
            builds.append(command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(_native.subprocess, "run", counting_run)
    first = _native.library().path
    assert first.parent == fresh_native / "kernels"
    assert len(builds) == 1
    _native.reset()
    assert _native.library().path == first
    assert len(builds) == 1, "a second process must reuse the cached library"
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".build-")]


def test_missing_compiler_warns_once_and_relaxes_with_torch(
    fresh_native, monkeypatch, caplog
):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    base, merged = make((4, 6), torch.bfloat16, 1), make((4, 6), torch.bfloat16, 2)
    importance = statistic(6)
    with caplog.at_level(logging.WARNING, logger=_native.LOG.name):
        out = aim_relax(base, merged, importance, 0.4)
        aim_relax(base, merged, importance, 0.4)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "CC='/nonexistent/cc' is not an executable" in warnings[0]
    assert "MERGEKIT_AIM_CPU_KERNEL=torch" in warnings[0]
    assert torch.equal(out, aim_relax(base, merged, importance, 0.4, backend="torch"))


def test_native_mode_makes_a_missing_compiler_an_error(fresh_native, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv(_native.MODE_ENV, "native")
    base, merged = make((4, 6), torch.float32, 1), make((4, 6), torch.float32, 2)
    with pytest.raises(_native.NativeKernelUnavailable, match="not an executable"):
        aim_relax(base, merged, statistic(6), 0.4)
    with pytest.raises(_native.NativeKernelUnavailable):
        aim_relax(base, merged, statistic(6), 0.4, backend="native")


def test_failing_compiler_reports_its_output(fresh_native, monkeypatch, tmp_path):
    fake = tmp_path / "broken-cc"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --version ]; then echo "broken-cc 1.0"; exit 0; fi\n'
        "echo 'cc: error: no such luck' >&2\n"
        "exit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(_native.NativeKernelUnavailable) as err:
        _native.library()
    assert "compiling aim_relax.c failed" in str(err.value)
    assert "no such luck" in str(err.value)


def test_torch_mode_never_builds(fresh_native, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv(_native.MODE_ENV, "torch")
    base, merged = make((4, 6), torch.float32, 1), make((4, 6), torch.float32, 2)
    with caplog.at_level(logging.WARNING, logger=_native.LOG.name):
        aim_relax(base, merged, statistic(6), 0.4)
    assert not caplog.records
    assert not (fresh_native / "kernels").exists()


def test_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv(_native.MODE_ENV, "fast")
    with pytest.raises(ValueError, match="MERGEKIT_AIM_CPU_KERNEL='fast'"):
        aim_relax(torch.zeros(2, 3), torch.ones(2, 3), torch.ones(3), 0.4)


@needs_compiler
def test_unwritable_cache_is_reported(fresh_native, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("MERGEKIT_AIM_CACHE", str(blocker))
    with pytest.raises(_native.NativeKernelUnavailable, match="cannot build into"):
        _native.library()
