"""`mergekit-aim relax` stopped mid-write: Ctrl-C and SIGTERM remove every
temporary and exit 130/143 with one line; after SIGKILL, rerunning the same
command into the same output needs no cleanup and gives the same bytes as an
uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.reliability import calibrate_to, leftovers

from mergekit_aim.offline import load_importance, relax_checkpoint

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).with_name("mergekit-aim"))


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tiny_tokenizer, tiny_text_file):
    """A Llama of ~13 MB in float32 (base and one variant) and its artifact:
    big enough that writing it takes a moment to interrupt."""
    from fixtures.tiny_models import build_family

    root = tmp_path_factory.mktemp("wide")
    family = build_family(
        "llama", root, tiny_tokenizer, num_finetunes=1, hidden_size=256, num_layers=4
    )
    return family, calibrate_to(family.base, tiny_text_file, root / "imp.safetensors")


def relax_command(wide, out):
    family, artifact = wide
    return [
        CLI, "relax", "--base", str(family.base), "--merged",
        str(family.finetunes[0]), "--importance", str(artifact), "-q", str(out),
    ]  # fmt: skip


def stop_mid_write(command, out: Path, signum: int) -> subprocess.CompletedProcess:
    """Start ``command``; send ``signum`` once its first output shard is being
    written (the temporary holds bytes); return the finished process."""
    shards = f".{out.name}.aim-partial-*/.model.safetensors.aim-partial-*"
    for _ in range(3):
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        while process.poll() is None:
            found = list(out.parent.glob(shards))
            if found and found[0].exists() and found[0].stat().st_size > 0:
                process.send_signal(signum)
                break
            time.sleep(0.0005)
        stdout, stderr = process.communicate(timeout=120)
        if found:
            return subprocess.CompletedProcess(
                command, process.returncode, stdout, stderr
            )
        assert process.returncode == 0, stderr
        _remove(out)  # finished before it could be stopped: try again
    pytest.fail("the write was never caught in progress")


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize(
    "signum, status, line",
    [
        (signal.SIGTERM, 143, "error: terminated (SIGTERM)"),
        (signal.SIGINT, 130, "error: interrupted"),
    ],
)
def test_interrupted_run_leaves_nothing(wide, tmp_path, signum, status, line):
    out = tmp_path / "out"
    result = stop_mid_write(relax_command(wide, out), out, signum)
    assert result.returncode == status, result.stderr
    assert result.stderr.strip() == line
    assert os.listdir(tmp_path) == []


def test_rerun_after_sigkill_gives_the_uninterrupted_output(wide, tmp_path):
    family, artifact = wide
    out = tmp_path / "out"
    command = relax_command(wide, out)
    killed = stop_mid_write(command, out, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert leftovers(tmp_path) and not out.exists()  # it was stopped mid-write

    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert os.listdir(tmp_path) == ["out"]

    reference = tmp_path.parent / f"{tmp_path.name}-reference" / "out"
    relax_checkpoint(
        str(family.base),
        str(family.finetunes[0]),
        load_importance(str(artifact)),
        0.4,
        reference,
    )
    files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == files
    for name in files:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
