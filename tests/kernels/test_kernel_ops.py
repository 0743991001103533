"""Op registration, torch.compile tracing, backend selection and import hygiene."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mergekit_aim.kernels._ops as ops
from mergekit_aim.kernels import aim_relax, channel_abs_sum, channel_abs_sum_

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.mark.parametrize(
    "x",
    [_x(4, 9), _x(2, 3, 9, dtype=torch.bfloat16), _x(9, 4).t(), _x(7)],
    ids=["2d", "3d-bf16", "transposed", "1d"],
)
def test_opcheck_channel_abs_sum(x):
    torch.library.opcheck(torch.ops.mergekit_aim.channel_abs_sum.default, (x,))
    acc = torch.rand(x.shape[-1])
    torch.library.opcheck(torch.ops.mergekit_aim.channel_abs_sum_.default, (acc, x))


@pytest.mark.parametrize(
    "args",
    [
        (_x(4, 9), _x(4, 9, dtype=torch.bfloat16), torch.rand(9), 0.4, -1),
        (_x(9, 4), _x(9, 4), torch.rand(9), 0.0, 0),
        (
            _x(9, dtype=torch.float16),
            _x(9, dtype=torch.float16),
            torch.zeros(9),
            1.0,
            0,
        ),
    ],
    ids=["linear", "conv1d", "norm"],
)
def test_opcheck_aim_relax(args):
    torch.library.opcheck(torch.ops.mergekit_aim.aim_relax.default, args)


def test_compile_fullgraph_traces_the_ops():
    def step(acc, x, base, merged):
        channel_abs_sum_(acc, x)
        stat = channel_abs_sum(x)
        return aim_relax(base, merged, stat, 0.4, input_axis=-1), stat

    x = _x(2, 5, 16, dtype=torch.bfloat16)
    base, merged = _x(3, 16), _x(3, 16, dtype=torch.bfloat16) + 1
    acc_eager, acc_compiled = torch.zeros(16), torch.zeros(16)
    expected = step(acc_eager, x, base, merged)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(acc_compiled, x, base, merged)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(acc_compiled, acc_eager)


def test_fake_implementation_refuses_like_the_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        base, merged = torch.empty(4, 6), torch.empty(4, 6)
        out = torch.ops.mergekit_aim.aim_relax(base, merged, torch.empty(6), 0.5, -1)
        assert out.shape == (4, 6)
        with pytest.raises(ValueError, match="5 entries"):
            torch.ops.mergekit_aim.aim_relax(base, merged, torch.empty(5), 0.5, -1)
        assert torch.ops.mergekit_aim.channel_abs_sum(torch.empty(3, 7)).shape == (7,)


@pytest.mark.parametrize("call", ["sum", "sum_", "relax"])
def test_unknown_backend_lists_choices(call):
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="auto, torch, triton"):
        if call == "sum":
            channel_abs_sum(x, backend="cuda")
        elif call == "sum_":
            channel_abs_sum_(torch.zeros(3), x, backend="numpy")
        else:
            aim_relax(x, x, torch.ones(3), 0.5, backend="Triton")


@pytest.mark.skipif(not INTERPRETED, reason="needs Triton importable")
def test_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setattr(ops._triton_impl(), "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        channel_abs_sum(torch.ones(2, 3), backend="triton")


def test_auto_on_cpu_uses_torch(monkeypatch):
    # CPU tensors never reach Triton through dispatch, interpreter or not.
    def boom():
        raise AssertionError("Triton consulted for a CPU tensor")

    monkeypatch.setattr(ops, "_triton_impl", boom)
    monkeypatch.setattr(ops, "_cuda_impl", boom)
    x = torch.ones(2, 3)
    assert torch.equal(channel_abs_sum(x), torch.full((3,), 2.0))
    assert torch.equal(aim_relax(x, x, torch.ones(3), 0.5), x)


def _run(code: str, env_drop=("TRITON_INTERPRET",)) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_hygiene_in_a_fresh_interpreter():
    # One subprocess for four facts, to keep the suite fast: importing the
    # kernels touches neither Triton nor CUDA; relaxing on CPU imports no
    # mergekit or pydantic; without the interpreter,
    # backend="triton" on CPU explains how to enable it; and with Triton
    # unimportable everything but backend="triton" still works.
    result = _run(
        """
        import sys, torch
        import mergekit_aim.kernels as k
        assert "triton" not in sys.modules, "triton imported eagerly"
        assert not torch.cuda.is_initialized()
        x = torch.ones(2, 3)
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        assert k.channel_abs_sum(x).tolist() == [2.0, 2.0, 2.0]
        assert torch.equal(k.aim_relax(x, x, torch.ones(3), 0.5), x)
        # The native CPU loop (built or found by that call) needs no mergekit.
        heavy = [m for m in sys.modules if m.split(".")[0] in ("mergekit", "pydantic")]
        assert not heavy, heavy
        try:
            k.aim_relax(x, x, torch.ones(3), 0.5, backend="triton")
        except RuntimeError as err:
            assert "mergekit-aim[triton]" in str(err), err
        else:
            raise AssertionError("backend='triton' ran without Triton")
        del sys.modules["triton"]
        k._ops._triton_impl.cache_clear()
        try:
            k.channel_abs_sum(x, backend="triton")
        except RuntimeError as err:
            assert "TRITON_INTERPRET=1" in str(err), err
        else:
            raise AssertionError("triton on CPU without the interpreter ran")
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_calls_skip_the_dispatcher_only_when_nothing_watches(monkeypatch):
    """Plain eager calls run the kernel directly (the dispatcher costs tens of
    microseconds per tensor); a dispatch mode, autograd or a subclass still sees
    the op, so tracing and debugging tools keep working."""
    from mergekit_aim.kernels import aim_relax_

    base, merged, stat = _x(4, 9), _x(4, 9) + 1, torch.rand(9)
    entered = []
    real = torch.ops.mergekit_aim.aim_relax_

    class Spy:
        def __call__(self, *args):
            entered.append(args)
            return real(*args)

        def __getattr__(self, name):  # .default and friends, used by redispatch
            return getattr(real, name)

    monkeypatch.setattr(torch.ops.mergekit_aim, "aim_relax_", Spy())
    expected = aim_relax(base, merged, stat, 0.4, backend="torch")
    result = aim_relax_(merged.clone(), base, stat, 0.4)
    assert not entered
    assert torch.equal(result, expected)

    with _OpLog() as log:
        watched = aim_relax_(merged.clone(), base, stat, 0.4)
    assert len(entered) == 1
    assert any("mergekit_aim.aim_relax_" in op for op in log.ops)
    assert torch.equal(watched, expected)

    with _OpLog() as log:
        aim_relax(base, merged, stat, 0.4)
        channel_abs_sum(merged)
    assert any("mergekit_aim.aim_relax.default" in op for op in log.ops)
    assert any("mergekit_aim.channel_abs_sum.default" in op for op in log.ops)
